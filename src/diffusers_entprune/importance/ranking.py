"""One entry point for every block-ranking method, so the command line and the pruning script rank alike."""

from collections.abc import Iterable

import torch

from ..models.entpruned_transformer_2d import EntPrunedTransformer2DModel
from ..objectives import Objective
from ..randomness import Reduce
from .baselines import (
    BASELINE_METHODS,
    block_influence_scores,
    loss_ablation_scores,
    magnitude_scores,
    random_scores,
    taylor_scores,
    uniform_scores,
)
from .ced import CEDOptions, compute_ced
from .learned import LearnedRankingOptions, learned_scores

RANKING_METHODS = ("ced", *BASELINE_METHODS, "learned")
# rankings that pick the set for a given number of blocks to remove, rather than score each block alone
TARGET_AWARE_METHODS = ("uniform", "learned")


def score_blocks(method: str, model: EntPrunedTransformer2DModel, objective: Objective,
                 batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_samples: int, seed: int = 0,
                 ced_options: CEDOptions | None = None, prefix_cache: bool = True, progress: bool = False,
                 reduce: Reduce | None = None, process_index: int = 0, num_processes: int = 1,
                 num_to_prune: int | None = None, learned_options: LearnedRankingOptions | None = None):
    """Score the model's present blocks with ``method`` (higher = more important).

    Args:
        method (`str`): one of `RANKING_METHODS`: ``"ced"`` (`compute_ced`), a baseline of `baselines`, or
            ``"learned"`` (`learned_scores`).
        model (`EntPrunedTransformer2DModel`): the model as it is now (no block skipped).
        objective (`Objective`): the training objective, whose prediction and loss the methods measure.
        batches (iterable of `(torch.Tensor, torch.Tensor)`): this process's share of (clean latents, labels),
            e.g. `randomness.shard_batches` of the calibration pool.
        num_samples (`int`): draws over all processes together.
        seed (`int`, *optional*, defaults to 0): seed of the draws (and of the random ranking).
        ced_options (`CEDOptions`, *optional*): the CED estimator's options (their timestep range applies to the
            baselines too).
        reduce (`Reduce`, *optional*): sums a tensor over processes; None with one process.
        num_to_prune (`int`, *optional*): how many blocks are to go; the methods in `TARGET_AWARE_METHODS` choose
            that set (its blocks rank lowest) and need it.
        learned_options (`LearnedRankingOptions`, *optional*): the options of the ``learned`` ranking.

    Returns:
        An `ImportanceResult` (``block_indices``, ``scores``, ``ranking`` from least to most important).
    """
    if method not in RANKING_METHODS:
        raise ValueError(f"`method` must be one of {RANKING_METHODS}, got {method!r}.")
    if method in TARGET_AWARE_METHODS and num_to_prune is None:
        raise ValueError(f"The {method!r} ranking chooses a set of blocks to remove: pass `num_to_prune`.")
    if method == "uniform":
        return uniform_scores(model, num_to_prune)
    if method == "random":
        return random_scores(model, seed=seed)
    if method == "magnitude":
        return magnitude_scores(model)
    shards = dict(reduce=reduce, process_index=process_index, num_processes=num_processes, progress=progress)
    if method == "ced":
        return compute_ced(model, objective, batches, num_samples, ced_options, seed=seed, prefix_cache=prefix_cache,
                           **shards)
    options = ced_options or CEDOptions()
    if method == "learned":
        return learned_scores(model, objective, batches, num_samples, num_to_prune, seed=seed, options=learned_options,
                              timestep_range=options.timestep_range, **shards)
    functions = {"taylor": taylor_scores, "block_influence": block_influence_scores, "loss": loss_ablation_scores}
    return functions[method](model, objective, batches, num_samples, seed=seed,
                             timestep_range=options.timestep_range, **shards)
