from .baselines import (
    BASELINE_METHODS,
    block_influence_scores,
    loss_ablation_scores,
    magnitude_scores,
    random_scores,
    taylor_scores,
)
from .ced import CEDOptions, CEDResult, GaussianEntropyAccumulator, compute_ced
from .result import ImportanceResult

__all__ = [
    "BASELINE_METHODS",
    "CEDOptions",
    "CEDResult",
    "GaussianEntropyAccumulator",
    "ImportanceResult",
    "block_influence_scores",
    "compute_ced",
    "loss_ablation_scores",
    "magnitude_scores",
    "random_scores",
    "taylor_scores",
]
