"""``learned``: recoverability-aware block selection, after the idea of TinyFusion (arXiv 2412.01199).

A low loss right after pruning does not say how well the pruned model recovers once fine-tuned. So instead of
scoring blocks one at a time, this ranking *learns* which set to keep while light-weight adapters stand in for the
fine-tuning that will follow:

- The present blocks are split into consecutive groups of about ``group_size`` blocks, and each group keeps a fixed
  number of its blocks (`allocate_keeps`), so that the total kept is exactly ``num_blocks - num_to_prune``.
- Each group has learnable logits over all of its C(M, N) keep-masks. Every step samples one mask per group with
  straight-through Gumbel-softmax: the forward pass uses the hard (0/1) mask, the gradient flows through the soft
  sample at temperature ``tau`` (annealed from ``tau_start`` to ``tau_end``).
- A block's gate ``g`` (the sampled mask's entry) enters as ``h + g * (block(h) - h)``: a DiT block returns its
  input plus its residual update, so g = 0 is the block skipped and g = 1 the block as it is.
- LoRA adapters on the blocks' attention and MLP projections train jointly with the logits (Adam, the objective's
  training loss), so a mask is judged by what the model can become with it, not by what it is right after the cut.
- The decision is the most probable mask of each group.

This is our own implementation of the idea in the paper; it does not follow TinyFusion's code.

The caller's model is left exactly as it was: the adapters are forward hooks on its linear layers (removed
afterwards), the blocks are gated in a loop outside the model, and only the logits and adapters get gradients
(`torch.autograd.grad`, so no ``.grad`` of the model is written). Nothing is copied: the extra memory is the adapters,
their Adam state, and the activations of one training batch through all blocks.
"""

import itertools
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..lora import DIT_LORA_TARGETS
from ..models.entpruned_transformer_2d import EntPrunedTransformer2DModel
from ..objectives import Objective
from ..randomness import (
    LEARNED_GUMBEL_TAG,
    LEARNED_LORA_TAG,
    LEARNED_ORDER_TAG,
    LEARNED_STEP_TAG,
    Reduce,
    sample_generator,
    shard_indices,
)
from .result import ImportanceResult

# A group of M blocks keeping N has C(M, N) masks, each with a logit: C(8, 4) = 70, C(12, 6) = 924.
MAX_MASKS_PER_GROUP = 4096


@dataclass
class LearnedRankingOptions:
    """Options of the ``learned`` ranking (see the module docstring).

    Args:
        group_size: blocks per group (groups are consecutive and as equal as possible; see `split_into_groups`).
        num_steps: optimisation steps (the budget); each runs every block forward and backward on one batch.
        batch_size: samples per step, over all processes together.
        gate_learning_rate: Adam learning rate of the mask logits.
        lora_learning_rate: Adam learning rate of the adapters.
        lora_rank: rank of the adapters.
        use_lora: train adapters with the logits (False: the logits alone, i.e. judge the masks by the loss of the
            model as it is, without adaptation; for ablation).
        tau_start, tau_end: Gumbel-softmax temperature at the first and the last step.
        tau_schedule: ``"exponential"`` or ``"linear"`` interpolation between them.
    """

    group_size: int = 4
    num_steps: int = 100
    batch_size: int = 16
    gate_learning_rate: float = 0.05
    lora_learning_rate: float = 1e-3
    lora_rank: int = 8
    use_lora: bool = True
    tau_start: float = 4.0
    tau_end: float = 0.1
    tau_schedule: str = "exponential"

    def __post_init__(self):
        for name in ("group_size", "num_steps", "batch_size", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
        for name in ("gate_learning_rate", "lora_learning_rate", "tau_start", "tau_end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):  # nan fails too
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
        if self.tau_schedule not in ("exponential", "linear"):
            raise ValueError(f"`tau_schedule` must be 'exponential' or 'linear', got {self.tau_schedule!r}.")

    def tau(self, step: int) -> float:
        """The temperature at ``step`` (0-based): ``tau_start`` at the first step, ``tau_end`` at the last."""
        fraction = step / max(self.num_steps - 1, 1)
        if self.tau_schedule == "linear":
            return self.tau_start + (self.tau_end - self.tau_start) * fraction
        return self.tau_start * (self.tau_end / self.tau_start) ** fraction


@dataclass
class LearnedRankingResult(ImportanceResult):
    """`ImportanceResult` of the ``learned`` ranking. Scores: 1 + p for a kept block, p for a dropped one, with p the
    block's learned marginal keep probability (below 1), so `ranking`'s first ``num_to_prune`` are exactly the
    dropped blocks, the least wanted first."""

    groups: list[list[int]] = field(default_factory=list)  # original block indices of each group
    keep_per_group: list[int] = field(default_factory=list)
    keep_probabilities: list[float] = field(default_factory=list)  # per block, in `block_indices` order
    mask_probabilities: list[dict] = field(default_factory=list)  # per group: {"kept blocks": probability}, top 5
    loss_curve: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {**super().to_dict(), "groups": self.groups, "keep_per_group": self.keep_per_group,
                "keep_probabilities": self.keep_probabilities, "mask_probabilities": self.mask_probabilities,
                "loss_curve": self.loss_curve, "seconds": self.seconds}

    @property
    def pruned_block_indices(self) -> list[int]:
        return sorted(i for i, s in zip(self.block_indices, self.scores) if s < 1.0)


def split_into_groups(num_blocks: int, group_size: int) -> list[int]:
    """Sizes of ``ceil(num_blocks / group_size)`` consecutive groups, as equal as possible, larger ones first
    (12 by 4: 4, 4, 4; 10 by 4: 4, 3, 3; 6 by 4: 3, 3)."""
    num_groups = -(-num_blocks // group_size)
    base, extra = divmod(num_blocks, num_groups)
    return [base + (1 if g < extra else 0) for g in range(num_groups)]


def allocate_keeps(group_sizes: list[int], num_keep: int) -> list[int]:
    """How many blocks each group keeps, ``num_keep`` in total exactly.

    Cumulative proportional rounding: the first g groups together keep ``round(num_keep * (their blocks) /
    (all blocks))`` (halves round up). Each group then keeps its proportional share rounded one way or the other,
    never more than its size, and the remainders spread evenly along the depth (12 blocks in 3 groups of 4 keeping
    5: 2, 1, 2; 28 in 7 groups keeping 10: 1, 2, 1, 2, 1, 2, 1). Deterministic; integer arithmetic only.
    """
    total = sum(group_sizes)
    if not 0 <= num_keep <= total:
        raise ValueError(f"Cannot keep {num_keep} of {total} blocks.")
    keeps, cumulative, kept_before = [], 0, 0
    for size in group_sizes:
        cumulative += size
        kept_now = (2 * num_keep * cumulative + total) // (2 * total)  # round(num_keep * cumulative / total)
        keeps.append(kept_now - kept_before)
        kept_before = kept_now
    return keeps


class _LoRAHooks:
    """LoRA deltas ``scale * B(A(x))`` added by forward hooks to the outputs of the given linear layers.

    The layers (plain ``nn.Linear`` or layers that already carry peft adapters) are not modified; `remove` takes the
    hooks out again. B starts at zero, so the model starts as it is.
    """

    def __init__(self, modules: list[torch.nn.Module], rank: int, generator: torch.Generator, device):
        self.params: list[torch.Tensor] = []
        self.handles = []
        for module in modules:
            # A: Gaussian with std 1/sqrt(in) keeps A(x) on the scale of x; float32 whatever the model's dtype
            a = torch.randn(rank, module.in_features, generator=generator) / math.sqrt(module.in_features)
            a = a.to(device).requires_grad_(True)
            b = torch.zeros(module.out_features, rank, device=device, requires_grad=True)
            self.params += [a, b]
            self.handles.append(module.register_forward_hook(self._hook(a, b)))

    @staticmethod
    def _hook(a, b):
        def add_delta(module, inputs, output):
            x = inputs[0]
            return output + (x.to(a.dtype) @ a.T @ b.T).to(output.dtype)  # alpha = rank: scale 1

        return add_delta

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _lora_targets(model) -> list[torch.nn.Module]:
    """The attention and MLP projections of the present blocks (the layers `lora.add_lora` adapts). On a model with
    peft adapters these are the peft layers (base weight plus its adapter), so ours add to the model as it is."""
    targets = []
    for block in model.transformer_blocks:
        for name, module in block.named_modules():
            if any(name == t or name.endswith("." + t) for t in DIT_LORA_TARGETS):
                if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
                    raise TypeError(f"Cannot put an adapter on {name} ({type(module).__name__}): not a linear layer.")
                targets.append(module)
    return targets


def _collect_pool(batches, num_samples: int, process_index: int, num_processes: int):
    """This process's share of the first ``num_samples`` samples (global samples p, p + P, ...), as two tensors."""
    needed = len(shard_indices(num_samples, process_index, num_processes))
    latents, labels, seen = [], [], 0
    for x, y in batches:
        take = min(len(x), needed - seen)
        if take <= 0:
            break
        latents.append(x[:take])
        labels.append(y[:take])
        seen += take
    if seen < needed:
        raise ValueError(f"The data ran out after {seen} samples; `num_samples`={num_samples} asks for more "
                         "(repeat the data, e.g. with `diffusers_entprune.data.repeat_batches`).")
    return torch.cat(latents), torch.cat(labels)


def _global_batches(num_samples: int, batch_size: int, seed: int):
    """Endless global sample indices in batches: epoch e is a permutation keyed (seed, 1, e), read in order."""
    epoch, stream = 0, torch.empty(0, dtype=torch.long)
    while True:
        while len(stream) < batch_size:
            order = torch.randperm(num_samples, generator=sample_generator(seed, LEARNED_ORDER_TAG, epoch))
            stream = torch.cat([stream, order])
            epoch += 1
        yield stream[:batch_size]
        stream = stream[batch_size:]


def learned_scores(model: EntPrunedTransformer2DModel, objective: Objective, batches, num_samples: int,
                   num_to_prune: int, seed: int = 0, options: LearnedRankingOptions | None = None,
                   timestep_range=(0.0, 1.0), progress: bool = False, reduce: Reduce | None = None,
                   process_index: int = 0, num_processes: int = 1) -> LearnedRankingResult:
    """Learn which ``num_to_prune`` of the model's present blocks to remove; see the module docstring.

    Args:
        model: an `EntPrunedTransformer2DModel` (with or without peft adapters); it comes back unchanged.
        objective: its training objective (`DiffusionObjective` for DiT, `FlowObjective` for SiT).
        batches: (clean latents, labels) batches, this process's share; the first ``num_samples`` samples (over
            all processes) form the pool that training steps draw from, epoch after epoch.
        num_samples: size of the pool.
        num_to_prune: how many blocks to remove.
        seed: seeds the adapters, the batches, the noise and timesteps, and the Gumbel noise: one seed, one result.
        options: `LearnedRankingOptions` (default: its defaults).
        timestep_range: fractions of the training time range to draw t from.
        reduce: sums a tensor over processes. Each step's gradients are summed over processes before the update,
            and the Gumbel noise is the same everywhere, so every process holds the same logits and decides alike.

    Returns:
        `LearnedRankingResult`; ``ranking[:num_to_prune]`` is the dropped set.
    """
    from tqdm.auto import tqdm

    options = options if options is not None else LearnedRankingOptions()
    n = model.num_blocks
    if not 0 <= num_to_prune < n:
        raise ValueError(f"`num_to_prune` must lie in [0, {n - 1}] for the learned ranking, got {num_to_prune}.")
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    if model.skipped_block_indices:
        raise ValueError(f"Blocks {sorted(model.skipped_block_indices)} are skipped; restore them before scoring.")
    if num_processes > 1 and reduce is None:
        raise ValueError("With several processes the learned ranking needs `reduce` (a sum over processes) to keep "
                         "one set of logits.")
    start_time = time.perf_counter()
    device = next(model.parameters()).device

    # ---- groups and their masks
    sizes = split_into_groups(n, options.group_size)
    keeps = allocate_keeps(sizes, n - num_to_prune)
    groups, offset = [], 0
    for size in sizes:
        groups.append(list(range(offset, offset + size)))
        offset += size
    masks = []  # per group: (number of masks, group size) 0/1
    for positions, keep in zip(groups, keeps):
        count = math.comb(len(positions), keep)
        if count > MAX_MASKS_PER_GROUP:
            raise ValueError(f"`group_size`={options.group_size} gives a group of {len(positions)} blocks keeping "
                             f"{keep}: {count} masks (more than {MAX_MASKS_PER_GROUP}). Use a smaller group_size.")
        choices = list(itertools.combinations(range(len(positions)), keep))
        if model.embedder_copies == "keep" and positions[0] == 0:
            # the first block's embedder copy feeds the final layer: it cannot go (see `check_prunable`)
            choices = [c for c in choices if 0 in c]
            if not choices:
                raise ValueError("The first group would keep no block, but block 0 cannot be pruned with "
                                 "`embedder_copies='keep'`; use a larger group_size or prune fewer blocks.")
        mask = torch.zeros(len(choices), len(positions))
        for row, kept in enumerate(choices):
            mask[row, list(kept)] = 1.0
        masks.append(mask.to(device))
    logits = [torch.zeros(len(m), device=device, requires_grad=True) for m in masks]

    # ---- data: the pool, and the seeded draws of every step
    pool_latents, pool_labels = _collect_pool(batches, num_samples, process_index, num_processes)
    latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    if tuple(pool_latents.shape[1:]) != latent_shape:
        raise ValueError(f"Latents of shape {tuple(pool_latents.shape[1:])} do not fit the model ({latent_shape}); "
                         "check `resolution` and the VAE.")
    low, high = timestep_range
    batch_indices = _global_batches(num_samples, options.batch_size, seed)
    # the same on every process: one sampled mask everywhere
    gumbel_generator = sample_generator(seed, LEARNED_GUMBEL_TAG)

    hooks = _LoRAHooks(_lora_targets(model), options.lora_rank, sample_generator(seed, LEARNED_LORA_TAG), device) \
        if options.use_lora else None
    parameters = list(logits) + (hooks.params if hooks else [])
    param_groups = [{"params": list(logits), "lr": options.gate_learning_rate}]
    if hooks:
        param_groups.append({"params": hooks.params, "lr": options.lora_learning_rate})
    optimizer = torch.optim.Adam(param_groups)

    # nothing to choose (e.g. num_to_prune = 0): no training
    num_steps = options.num_steps if any(len(m) > 1 for m in masks) else 0
    losses, sampled_masks = [], []
    was_training = model.training
    model.eval()  # no dropout: the masks are compared on the model as it computes
    grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(True)  # callers may rank under no_grad; this ranking trains
    try:
        for step in tqdm(range(num_steps), desc="learned ranking", disable=not progress):
            tau = options.tau(step)
            # ---- one straight-through Gumbel-softmax mask per group -> a gate per block
            gates, chosen = [], []
            for group_logits, mask in zip(logits, masks):
                uniform = torch.rand(len(mask), generator=gumbel_generator).clamp(1e-10, 1 - 1e-10)
                noisy_logits = group_logits + (-torch.log(-torch.log(uniform))).to(device)
                soft = torch.softmax(noisy_logits / tau, dim=0)
                index = int(noisy_logits.argmax())
                hard = torch.zeros_like(soft)
                hard[index] = 1.0
                gates.append((hard - soft.detach() + soft) @ mask)  # value: the hard mask; gradient: the soft one
                chosen.append(index)
            gates = torch.cat(gates)
            sampled_masks.append(chosen)

            # ---- this process's part of the step's global batch, with seeded timesteps and noise
            indices = next(batch_indices)
            draw_generator = sample_generator(seed, LEARNED_STEP_TAG, step)
            fractions = low + (high - low) * torch.rand(len(indices), generator=draw_generator, dtype=torch.float64)
            noise = torch.randn(len(indices), *latent_shape, generator=draw_generator)
            mine = (indices % num_processes) == process_index
            local_loss = torch.zeros((), dtype=torch.float64)
            grads = [torch.zeros_like(p) for p in parameters]
            if mine.any():
                local = (indices[mine] - process_index) // num_processes
                x0 = pool_latents[local].to(device)
                labels = pool_labels[local].to(device)
                timesteps = objective.timesteps_from_fraction(fractions[mine]).to(device)
                noised = objective.add_noise(x0, noise[mine].to(device=device, dtype=x0.dtype), timesteps)
                loss = _gated_loss(model, objective, x0, labels, noised, gates, masks)
                found = torch.autograd.grad(loss, parameters, allow_unused=True)
                grads = [g if g is not None else z for g, z in zip(found, grads)]
                local_loss = loss.detach().double().cpu()
            # ---- the gradient of the mean loss over the global batch, the same on every process
            flat = torch.cat([g.reshape(-1) for g in grads] + [local_loss.to(grads[0]).reshape(1)])
            if reduce is not None:
                flat = reduce(flat).to(device)
            flat = flat / len(indices)
            used = 0
            for p in parameters:
                p.grad = flat[used: used + p.numel()].view_as(p).clone()
                used += p.numel()
            losses.append(flat[-1].item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        if hooks is not None:
            hooks.remove()
        model.train(was_training)
        torch.set_grad_enabled(grad_mode)

    # ---- the decision: the most probable mask of each group; scores from the marginal keep probabilities
    block_indices = list(model.kept_block_indices)
    scores, keep_probabilities, mask_probabilities = [0.0] * n, [0.0] * n, []
    final = []
    with torch.no_grad():
        for positions, group_logits, mask in zip(groups, logits, masks):
            probabilities = torch.softmax(group_logits.double().cpu(), dim=0)
            best = int(group_logits.argmax())
            final.append(best)
            marginal = probabilities @ mask.double().cpu()
            for column, position in enumerate(positions):
                p = min(float(marginal[column]), 1.0 - 1e-9)  # a tie-break in [0, 1)
                keep_probabilities[position] = float(marginal[column])
                scores[position] = (1.0 if mask[best, column] > 0 else 0.0) + p
            top = probabilities.argsort(descending=True)[:5]
            mask_probabilities.append({
                ",".join(str(block_indices[positions[c]]) for c in mask[int(k)].nonzero().flatten().tolist()):
                    float(probabilities[int(k)]) for k in top})
    # loss over training; final_mask_sampled: how often the last tenth of the steps sampled the final decision
    # in every group (1.0: the sampling had settled on it)
    loss_curve = {}
    if losses:
        tail = sampled_masks[-max(1, len(sampled_masks) // 10):]
        tenth = max(1, len(losses) // 10)
        loss_curve = {"first": float(np.mean(losses[:tenth])), "last": float(np.mean(losses[-tenth:])),
                      "every_tenth": [float(np.mean(c)) for c in np.array_split(losses, min(10, len(losses)))],
                      "final_mask_sampled": sum(sample == final for sample in tail) / len(tail)}
    seconds = time.perf_counter() - start_time
    return LearnedRankingResult(
        "learned", block_indices, scores, num_samples,
        options={**asdict(options), "seed": seed, "num_to_prune": num_to_prune, "timestep_range": list(timestep_range),
                 "seconds": round(seconds, 3)},
        groups=[[block_indices[p] for p in positions] for positions in groups], keep_per_group=keeps,
        keep_probabilities=keep_probabilities, mask_probabilities=mask_probabilities, loss_curve=loss_curve,
        seconds=round(seconds, 3))


def _gated_loss(model, objective: Objective, x0, labels, noised, gates, masks) -> torch.Tensor:
    """Sum over the samples of the objective's loss of the model with block i's residual update scaled by gates[i].

    A block whose gate cannot change (its group has a single mask) and is 0 is not run at all."""
    fixed = torch.cat([torch.full((m.shape[1],), m.shape[0] == 1) for m in masks]).tolist()
    t = noised.timesteps
    h = model.embed(noised.noisy.to(model.dtype))
    for position in range(model.num_blocks):
        gate = gates[position]
        if fixed[position] and float(gate.detach()) == 0.0:
            continue
        out = model.run_blocks(h, t, labels, start=position, end=position + 1)
        h = out if fixed[position] else h + gate.to(h.dtype) * (out - h)
    output = model.head(h, t, labels).float()
    return objective.loss(output, x0.float(), noised).sum()
