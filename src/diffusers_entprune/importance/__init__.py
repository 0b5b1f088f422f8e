from .baselines import (
    BASELINE_METHODS,
    block_influence_scores,
    loss_ablation_scores,
    magnitude_scores,
    random_scores,
    taylor_scores,
    uniform_scores,
)
from .ced import CEDOptions, CEDResult, GaussianEntropyAccumulator, compute_ced
from .ranking import RANKING_METHODS, TARGET_AWARE_METHODS, score_blocks
from .result import ImportanceResult

__all__ = [
    "BASELINE_METHODS",
    "CEDOptions",
    "CEDResult",
    "GaussianEntropyAccumulator",
    "ImportanceResult",
    "RANKING_METHODS",
    "TARGET_AWARE_METHODS",
    "block_influence_scores",
    "compute_ced",
    "loss_ablation_scores",
    "magnitude_scores",
    "random_scores",
    "score_blocks",
    "taylor_scores",
    "uniform_scores",
]
