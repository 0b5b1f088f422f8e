"""Baseline block-importance metrics, with the interface of `compute_ced` (higher score = more important).

- ``random``: a seeded random score per block (the floor any metric must beat).
- ``magnitude``: mean absolute weight of the block's own parameters.
- ``taylor``: first-order Taylor importance, sum over the block's parameters of |w * dL/dw|, with the training loss
  accumulated over the fixed draws.
- ``block_influence``: ShortGPT's Block Influence, 1 - cos(block input, block output) per token, averaged.
- ``loss``: loss ablation, the increase of the training loss when the block is skipped (the expensive "oracle").
- ``uniform``: keep evenly spaced blocks, block 0 first (12 -> 6 keeps 0, 2, ..., 10): the fixed choice that
  TinyFusion calls the oracle of depth pruning ("every other block" at 50%). It needs the number to remove.

The blocks' shared timestep/label embedder is not part of any block's own parameters (it stays when a block goes),
so magnitude and Taylor leave it out.
"""

import torch
import torch.nn.functional as F

from ..models.entpruned_transformer_2d import EntPrunedTransformer2DModel
from ..objectives import Objective
from ..randomness import Reduce
from .draws import fixed_draws
from .result import ImportanceResult

BASELINE_METHODS = ("random", "magnitude", "taylor", "block_influence", "loss", "uniform")


def own_parameters(block) -> list[torch.nn.Parameter]:
    return [p for name, p in block.named_parameters() if not name.startswith("norm1.emb.")]


def random_scores(model: EntPrunedTransformer2DModel, seed: int = 0) -> ImportanceResult:
    scores = torch.rand(model.num_blocks, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ImportanceResult("random", list(model.kept_block_indices), scores.tolist(), options={"seed": seed})


def uniform_scores(model: EntPrunedTransformer2DModel, num_to_prune: int) -> ImportanceResult:
    """1 for the evenly spaced blocks to keep, 0 for the others: the ``num_to_prune`` lowest are the ones between.

    Spacing is over the blocks present now, so use it in one stage (``--pruning_mode one_shot``) to get the same
    choice as on the full model."""
    n = model.num_blocks
    if not 0 <= num_to_prune < n:
        raise ValueError(f"`num_to_prune` must lie in [0, {n - 1}] for the uniform ranking, got {num_to_prune}.")
    keep = n - num_to_prune
    kept_positions = {round(i * n / keep) for i in range(keep)}
    scores = [1.0 if position in kept_positions else 0.0 for position in range(n)]
    return ImportanceResult("uniform", list(model.kept_block_indices), scores, options={"num_to_prune": num_to_prune})


@torch.no_grad()
def magnitude_scores(model: EntPrunedTransformer2DModel) -> ImportanceResult:
    scores = []
    for block in model.transformer_blocks:
        params = own_parameters(block)
        scores.append(sum(p.detach().abs().double().sum().item() for p in params) / sum(p.numel() for p in params))
    return ImportanceResult("magnitude", list(model.kept_block_indices), scores)


def _loss(model, objective: Objective, draw, tokens=None) -> torch.Tensor:
    t, y = draw.noised.timesteps, draw.labels
    tokens = model.embed(draw.noised.noisy.to(model.dtype)) if tokens is None else tokens
    output = model.head(model.run_blocks(tokens, t, y), t, y).float()
    return objective.loss(output, draw.latents.float(), draw.noised).sum()


def taylor_scores(model: EntPrunedTransformer2DModel, objective: Objective, batches, num_samples: int, seed: int = 0,
                  timestep_range=(0.0, 1.0), progress: bool = False, reduce: Reduce | None = None,
                  process_index: int = 0, num_processes: int = 1):
    """|w * dL/dw| per block for the mean training loss over the draws. Uses (and clears) the model's `.grad`."""
    params = [own_parameters(block) for block in model.transformer_blocks]
    grads = [[torch.zeros_like(p, dtype=torch.float64) for p in ps] for ps in params]
    was_training = model.training
    model.eval()
    try:
        for draw in fixed_draws(model, objective, batches, num_samples, seed, timestep_range, process_index,
                                num_processes, progress_desc="taylor" if progress else None):
            model.zero_grad(set_to_none=True)
            _loss(model, objective, draw).backward()
            for gs, ps in zip(grads, params):
                for g, p in zip(gs, ps):
                    if p.grad is not None:
                        g += p.grad.double()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if reduce is not None:
        grads = [[reduce(g) for g in gs] for gs in grads]
    # the gradient of the mean loss over all samples, then |w * g| summed per block
    scores = [sum((p.detach().double() * g / num_samples).abs().sum().item() for p, g in zip(ps, gs))
              for ps, gs in zip(params, grads)]
    return ImportanceResult("taylor", list(model.kept_block_indices), scores, num_samples,
                            {"seed": seed, "timestep_range": list(timestep_range)})


@torch.no_grad()
def block_influence_scores(model: EntPrunedTransformer2DModel, objective: Objective, batches, num_samples: int,
                           seed: int = 0, timestep_range=(0.0, 1.0), progress: bool = False,
                           reduce: Reduce | None = None, process_index: int = 0, num_processes: int = 1):
    totals = torch.zeros(model.num_blocks, dtype=torch.float64)
    tokens_seen = torch.zeros((), dtype=torch.float64)
    for draw in fixed_draws(model, objective, batches, num_samples, seed, timestep_range, process_index,
                            num_processes, progress_desc="block influence" if progress else None):
        t, y = draw.noised.timesteps, draw.labels
        h = model.embed(draw.noised.noisy.to(model.dtype))
        for position in range(model.num_blocks):
            out = model.run_blocks(h, t, y, start=position, end=position + 1)
            totals[position] += (1 - F.cosine_similarity(h.double(), out.double(), dim=-1)).sum().item()
            h = out
        tokens_seen += h.shape[0] * h.shape[1]
    if reduce is not None:
        totals, tokens_seen = reduce(totals), reduce(tokens_seen)
    return ImportanceResult("block_influence", list(model.kept_block_indices), (totals / tokens_seen).tolist(),
                            num_samples, {"seed": seed, "timestep_range": list(timestep_range)})


@torch.no_grad()
def loss_ablation_scores(model: EntPrunedTransformer2DModel, objective: Objective, batches, num_samples: int,
                         seed: int = 0, timestep_range=(0.0, 1.0), progress: bool = False, reduce: Reduce | None = None,
                         process_index: int = 0, num_processes: int = 1):
    totals = torch.zeros(model.num_blocks + 1, dtype=torch.float64)  # [full, skip block 0, skip block 1, ...]
    for draw in fixed_draws(model, objective, batches, num_samples, seed, timestep_range, process_index,
                            num_processes, progress_desc="loss ablation" if progress else None):
        tokens = model.embed(draw.noised.noisy.to(model.dtype))
        totals[0] += _loss(model, objective, draw, tokens).double().item()
        for position, index in enumerate(model.kept_block_indices):
            with model.skipping([index]):
                totals[position + 1] += _loss(model, objective, draw, tokens).double().item()
    if reduce is not None:
        totals = reduce(totals)
    scores = ((totals[1:] - totals[0]) / num_samples).tolist()
    return ImportanceResult("loss", list(model.kept_block_indices), scores, num_samples,
                            {"seed": seed, "timestep_range": list(timestep_range)})
