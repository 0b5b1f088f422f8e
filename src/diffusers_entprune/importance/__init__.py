from .baselines import (
    BASELINE_METHODS,
    block_influence_scores,
    loss_ablation_scores,
    magnitude_scores,
    random_scores,
    taylor_scores,
    uniform_scores,
)
from .ced import CED_PRESETS, CEDOptions, CEDResult, GaussianEntropyAccumulator, compute_ced
from .learned import LearnedRankingOptions, LearnedRankingResult, learned_scores
from .ranking import RANKING_METHODS, TARGET_AWARE_METHODS, score_blocks
from .result import ImportanceResult

__all__ = [
    "BASELINE_METHODS",
    "CED_PRESETS",
    "CEDOptions",
    "CEDResult",
    "GaussianEntropyAccumulator",
    "ImportanceResult",
    "LearnedRankingOptions",
    "LearnedRankingResult",
    "RANKING_METHODS",
    "TARGET_AWARE_METHODS",
    "block_influence_scores",
    "compute_ced",
    "learned_scores",
    "loss_ablation_scores",
    "magnitude_scores",
    "random_scores",
    "score_blocks",
    "taylor_scores",
    "uniform_scores",
]
