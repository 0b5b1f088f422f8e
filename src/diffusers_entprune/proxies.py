"""Zero-shot trainability proxies for candidate sub-networks of an `EntPrunedTransformer2DModel`.

A candidate is a list of ORIGINAL block indices to skip (``[]`` = the model as it is). Each proxy scores the
candidate without training it:

- ``ntk_condition_number``: condition number of the empirical neural tangent kernel of the prediction (AutoProg-Zero
  / TE-NAS style, adapted to the diffusion/flow regression). Lower = more trainable; ``math.inf`` when the NTK is
  numerically singular.
- ``zico``: ZiCo, the inverse coefficient of variation of the loss gradients across mini-batches, per layer.
  Higher = more trainable.

Conventions shared by every function here:

- Candidates replace the model's current skip state for the duration of the call (``model.skipping``), and the
  previous skips come back afterwards, even on error.
- Nothing the caller owns changes: weights, ``.grad`` (only `torch.autograd.grad` is used, never ``.backward()``,
  so no ``.grad`` is written and, under DDP, no gradient hooks fire), skip state, the global torch RNG, and each
  module's train/eval mode. During the call the model runs in eval mode: DiT has no batch norm, so this only
  switches off dropout, which would otherwise make the scores random and consume the global RNG.
- Noise and timesteps come from a CPU `torch.Generator` seeded with ``seed`` (then moved to the model's device), so
  every candidate sees the same draws (common random numbers) and results do not depend on the device's RNG. For
  each batch, in order: ``timesteps = objective.sample_timesteps(B, generator)``, then
  ``noise = torch.randn(latents.shape, generator=generator)`` (float32, cast to the latents' dtype). ZiCo continues
  one generator through its batches.
"""

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import logging

from .objectives import Objective

logger = logging.get_logger(__name__)

ZICO_REDUCTIONS = ("sum", "mean")


@dataclass
class ProxyScores:
    """The proxies of one candidate (``skipped_blocks``: original indices of the skipped blocks)."""

    skipped_blocks: list[int]
    ntk_condition_number: float  # lower = more trainable; math.inf when the NTK is singular
    zico: float  # higher = more trainable; -math.inf when no layer contributes

    def to_dict(self) -> dict:
        """Plain-Python dict (infinities stay floats; `json.dump` writes them as ``Infinity``)."""
        return {"skipped_blocks": list(self.skipped_blocks), "ntk_condition_number": float(self.ntk_condition_number),
                "zico": float(self.zico)}


# ---------------------------------------------------------------------------------------------------- helpers


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _check_skip(model, skip_blocks: Iterable[int], argument: str) -> list[int]:
    """Validated, sorted skip list; errors name ``argument`` (the model's own check would say `indices`)."""
    indices = model._validate_indices(skip_blocks, argument)
    if len(indices) >= model.num_blocks:
        raise ValueError(f"`{argument}`: skipping all {model.num_blocks} remaining blocks {indices} leaves no "
                         "transformer block to run.")
    return indices


@contextlib.contextmanager
def _scoring(model, indices: list[int]):
    """Inside: ``indices`` skipped, eval mode, grad enabled. After: the previous skips and every module's mode."""
    # modes are saved per module: a caller may keep parts of the model (e.g. a frozen embedder) in eval mode
    modes = [(module, module.training) for module in model.modules()]
    try:
        with model.skipping(indices), torch.enable_grad():  # the caller may be inside torch.no_grad()
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


def _noised(objective: Objective, latents: torch.Tensor, generator: torch.Generator, device):
    """One seeded draw for a batch of clean latents (the module docstring gives the order)."""
    timesteps = objective.sample_timesteps(len(latents), generator=generator).to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device=device, dtype=latents.dtype)
    return objective.add_noise(latents, noise, timesteps)


def _forward(model, noised, labels) -> torch.Tensor:
    output = model(noised.noisy.to(model.dtype), timestep=noised.timesteps, class_labels=labels).sample
    return output.float()  # losses and kernels in at least float32 for half-precision models


def _trainable(named) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(n, p) for n, p in named if p.requires_grad]
    if not named:
        raise ValueError("No parameter of the model requires grad; the proxies need gradients.")
    return named


def _check_batch(model, latents, labels, argument: str):
    if latents.ndim != 4 or len(labels) != len(latents):
        raise ValueError(f"`{argument}` must hold latents (B, C, H, W) and B labels, got shapes "
                         f"{tuple(latents.shape)} and {tuple(labels.shape)}.")
    device = _device(model)
    return latents.to(device), labels.to(device)


# ---------------------------------------------------------------------------------------------------- NTK


def ntk_condition_number(model, objective: Objective, latents: torch.Tensor, labels: torch.Tensor,
                         skip_blocks: Sequence[int] = (), seed: int = 0) -> float:
    """Condition number lambda_max / lambda_min of the empirical NTK of the prediction, with ``skip_blocks`` skipped.

    The B clean ``latents`` (B, C, H, W) and ``labels`` are noised once (seeded; see the module docstring). For each
    sample i, ``g_i = d objective.prediction(output)[i].sum() / d theta`` over every parameter that requires grad and
    receives a gradient under the skip (skipped blocks' parameters receive none and are left out). ``K = G G^T``
    (B x B, float64) for ``G`` = the stacked, flattened g_i.

    Returns ``math.inf`` (with a warning) when ``lambda_min <= lambda_max * B * eps(float32)``: G is computed in
    float32, and below that ratio its rounding would dominate lambda_min, so the NTK is treated as singular (e.g.
    two identical samples in the batch). Finite values are therefore at most ``1 / (B * eps)``, about 2e6 for B=4.

    Memory: G is held in float32 on the model's device, ``B * P * 4`` bytes for P trainable parameters (about
    2.7 GB per sample for DiT-XL's 675M), plus the batched forward graph, retained for the B backward passes.
    """
    if latents.ndim < 1 or len(latents) < 2:
        raise ValueError(f"`latents` must hold at least 2 samples (B >= 2) for a condition number, got "
                         f"shape {tuple(latents.shape)}.")
    latents, labels = _check_batch(model, latents, labels, "latents, labels")
    skip = _check_skip(model, skip_blocks, "skip_blocks")
    generator = torch.Generator().manual_seed(seed)
    with _scoring(model, skip):
        named = _trainable(model.named_parameters())
        noised = _noised(objective, latents, generator, latents.device)
        prediction = objective.prediction(_forward(model, noised, labels))
        params = [p for _, p in named]
        rows = None
        for i in range(len(latents)):
            # samples do not interact in DiT (no batch statistics), so this is sample i's own gradient
            grads = torch.autograd.grad(prediction[i].sum(), params, retain_graph=i < len(latents) - 1,
                                        allow_unused=True)
            if rows is None:
                # the unused set is a property of the graph, the same for every sample
                used = [k for k, g in enumerate(grads) if g is not None]
                if not used:
                    raise ValueError("No trainable parameter receives a gradient under this skip.")
                size = sum(grads[k].numel() for k in used)
                rows = torch.empty(len(latents), size, dtype=torch.float32, device=latents.device)
            offset = 0
            for k in used:
                n = grads[k].numel()
                rows[i, offset : offset + n] = grads[k].reshape(-1)
                offset += n
            del grads
        del prediction
    return _condition_number(rows)


def _condition_number(rows: torch.Tensor) -> float:
    batch = rows.shape[0]
    # K = G G^T in float64, over column chunks so that no float64 copy of the whole G is ever made
    gram = torch.zeros(batch, batch, dtype=torch.float64, device=rows.device)
    chunk = max(1, (1 << 24) // batch)
    for start in range(0, rows.shape[1], chunk):
        part = rows[:, start : start + chunk].double()
        gram += part @ part.T
    eigenvalues = torch.linalg.eigvalsh(gram.cpu())
    low, high = eigenvalues[0].item(), eigenvalues[-1].item()
    if high <= 0 or low <= 0 or low <= high * batch * torch.finfo(torch.float32).eps:
        logger.warning(f"The NTK is singular (eigenvalues {low:.3g} .. {high:.3g} for {batch} samples); its condition "
                       "number is reported as inf. Identical or degenerate samples in the batch cause this.")
        return math.inf
    return high / low


# ---------------------------------------------------------------------------------------------------- ZiCo


def zico_from_gradients(gradients: dict[str, list[torch.Tensor]], reduction: str = "mean") -> float:
    """ZiCo from per-layer gradients over D >= 2 mini-batches: ``{layer_name: [g_batch1, ..., g_batchD]}``.

    Per element: mean over batches of |g|, and the population std over batches (``unbiased=False``). Per layer:
    ``log(sum over elements with std > 0 of mean|g| / std)``; "std > 0" is tested exactly (the D values are not all
    equal), so float rounding of the mean of identical values cannot create a spurious tiny std. Layers where no
    element varies are left out. Layers are combined by ``"mean"`` (the per-layer average, the default, as
    `EntPrunerConfig.zico_reduction`: less biased towards deeper networks, which have more terms) or ``"sum"`` (ZiCo's
    definition). Computed in float64. ``-math.inf`` when no layer contributes.
    """
    if reduction not in ZICO_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {ZICO_REDUCTIONS}, got {reduction!r}.")
    values = []
    for name, grads in gradients.items():
        if len(grads) < 2:
            raise ValueError(f"`gradients`[{name!r}] holds {len(grads)} gradient(s); ZiCo needs D >= 2 mini-batches.")
        if any(g.shape != grads[0].shape for g in grads):
            raise ValueError(f"`gradients`[{name!r}]: the gradients have different shapes "
                             f"{[tuple(g.shape) for g in grads]}.")
        stacked = torch.stack([g.detach().to(torch.float64) for g in grads])
        varies = (stacked != stacked[0]).any(dim=0)
        if not varies.any():
            continue
        mean_abs = stacked.abs().mean(dim=0)[varies]
        std = stacked.std(dim=0, correction=0)[varies]
        total = (mean_abs / std).sum().item()
        if total > 0:
            values.append(math.log(total))
    if not values:
        return -math.inf
    return math.fsum(values) / (len(values) if reduction == "mean" else 1)


def _zico_gradients(model, objective: Objective, batches, seed: int) -> dict[str, list[torch.Tensor]]:
    # ZiCo is defined on layer weights: those of every Linear and Conv2d (named_modules lists shared modules once)
    layers = _trainable((name, module.weight) for name, module in model.named_modules()
                        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)))
    generator = torch.Generator().manual_seed(seed)
    gradients: dict[str, list[torch.Tensor]] = {}
    for latents, labels in batches:
        noised = _noised(objective, latents, generator, latents.device)
        loss = objective.loss(_forward(model, noised, labels), latents.float(), noised).mean()
        grads = torch.autograd.grad(loss, [w for _, w in layers], allow_unused=True)
        for (name, _), g in zip(layers, grads):
            if g is not None:  # layers of skipped blocks receive no gradient
                gradients.setdefault(name, []).append(g.detach())
    return gradients


def zico(model, objective: Objective, batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
         skip_blocks: Sequence[int] = (), seed: int = 0, reduction: str = "mean") -> float:
    """ZiCo of the model with ``skip_blocks`` skipped, over D = ``len(batches)`` >= 2 mini-batches.

    For each (latents, labels) batch: seeded noise (one generator continued through the batches), the batch loss
    ``objective.loss(...).mean()`` and its gradient w.r.t. the weight of every Linear and Conv2d that receives one;
    then `zico_from_gradients`. Memory: the D gradients of those weights are held (D * P_weights * dtype bytes).
    """
    batches = list(batches)
    if len(batches) < 2:
        raise ValueError(f"`batches` must hold D >= 2 mini-batches (ZiCo needs a spread across batches), got "
                         f"{len(batches)}.")
    if reduction not in ZICO_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {ZICO_REDUCTIONS}, got {reduction!r}.")
    batches = [_check_batch(model, x, y, "batches") for x, y in batches]
    skip = _check_skip(model, skip_blocks, "skip_blocks")
    with _scoring(model, skip):
        gradients = _zico_gradients(model, objective, batches, seed)
    return zico_from_gradients(gradients, reduction)


# ---------------------------------------------------------------------------------------------------- candidates


def score_candidates(model, objective: Objective, candidates: list[list[int]],
                     ntk_batch: tuple[torch.Tensor, torch.Tensor],
                     zico_batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 0,
                     zico_reduction: str = "mean", progress: bool = False) -> list[ProxyScores]:
    """Both proxies for every candidate (a list of original block indices to skip; ``[]`` = drop nothing).

    Every candidate gets the same ``seed``, hence the same noise and timesteps (common random numbers), so
    differences between candidates come from the sub-networks, not from the draws. All candidates are checked
    before any is scored: each index must be a block still in the model (not pruned), listed once, and a candidate
    must leave at least one block.
    """
    from tqdm.auto import tqdm

    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise TypeError(f"`candidates` must be a list of lists of block indices, got {candidates!r}.")
    candidates = [_check_skip(model, c, "candidates") for c in candidates]
    if len(zico_batches) < 2:
        raise ValueError(f"`zico_batches` must hold D >= 2 mini-batches, got {len(zico_batches)}.")
    if zico_reduction not in ZICO_REDUCTIONS:
        raise ValueError(f"`zico_reduction` must be one of {ZICO_REDUCTIONS}, got {zico_reduction!r}.")
    latents, labels = ntk_batch
    if len(latents) < 2:
        raise ValueError(f"`ntk_batch` must hold at least 2 samples (B >= 2), got {len(latents)}.")
    results = []
    for skip in tqdm(candidates, desc="proxies", disable=not progress):
        kappa = ntk_condition_number(model, objective, latents, labels, skip_blocks=skip, seed=seed)
        value = zico(model, objective, zico_batches, skip_blocks=skip, seed=seed, reduction=zico_reduction)
        results.append(ProxyScores(skipped_blocks=list(skip), ntk_condition_number=kappa, zico=value))
    return results
