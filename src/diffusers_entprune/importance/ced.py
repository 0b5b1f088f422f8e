"""Conditional Entropy Deviation (CED): how far the model's conditional output distribution moves when one block
is skipped.

For block i, ``CED_i = |H(Y | C) - H(Y_skip_i | C)|`` where Y is the model's prediction (DiT: the eps channels;
SiT: the velocity), ``H(Y | C) = sum_c p(c) H(Y | C = c)``, and each ``H(Y | C = c)`` is the differential entropy
of a Gaussian fitted to the predictions of class c. The lowest CED is the least important block.

The estimate uses N fixed draws of (x0, class, t, noise), the same for the full model and for every skipped block
(common random numbers). Statistics are float64 sums per (variant, timestep bucket, class, feature), so memory does
not grow with N, and sums from several processes add up to the single-process result.

Options the paper leaves open (documented defaults):

- ``variance``: ``"channel"`` (one variance per output channel, shared by its spatial positions; default),
  ``"scalar"`` (one variance for every element) or ``"diag"`` (one per element; memory grows with C*H*W*classes).
- ``signed``: report ``H_skip - H_full`` instead of its absolute value (a rise is drift towards noise, a fall is
  collapse); the ranking always uses the magnitude.
- ``per_class``: condition on the class (default) or pool all classes into one Gaussian.
- ``timestep_range``: the fraction of the training time range to draw t from (default all of it), split into
  ``num_timestep_buckets`` equal buckets that are reported beside the aggregate.
"""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch

from .draws import fixed_draws
from .result import ImportanceResult

VARIANCE_GRANULARITIES = ("scalar", "channel", "diag")


@dataclass
class CEDOptions:
    variance: str = "channel"
    signed: bool = False
    per_class: bool = True
    timestep_range: tuple[float, float] = (0.0, 1.0)
    num_timestep_buckets: int = 4

    def __post_init__(self):
        if self.variance not in VARIANCE_GRANULARITIES:
            raise ValueError(f"`variance` must be one of {VARIANCE_GRANULARITIES}, got {self.variance!r}.")
        low, high = self.timestep_range
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"`timestep_range` must satisfy 0 <= low < high <= 1, got {self.timestep_range}.")
        if int(self.num_timestep_buckets) < 1:
            raise ValueError(f"`num_timestep_buckets` must be >= 1, got {self.num_timestep_buckets}.")


class GaussianEntropyAccumulator:
    """Streaming float64 sums of predictions, per (variant, timestep bucket, class, feature).

    Variant 0 is the full model; variant ``1 + k`` is the model with its k-th kept block skipped.
    """

    def __init__(self, num_variants: int, num_buckets: int, num_classes: int, prediction_shape, variance: str,
                 device=None):
        channels, height, width = prediction_shape
        features = {"scalar": 1, "channel": channels, "diag": channels * height * width}[variance]
        self.variance = variance
        # prediction elements that share one variance: they all contribute to the entropy with that variance
        self.elements_per_feature = channels * height * width // features
        shape = (num_variants, num_buckets, num_classes, features)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros(shape[:3], dtype=torch.float64, device=device)  # samples per cell

    def _features(self, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = prediction.to(torch.float64)
        n = x.shape[0]
        if self.variance == "scalar":
            x = x.reshape(n, 1, -1)
        elif self.variance == "channel":
            x = x.reshape(n, x.shape[1], -1)
        else:
            x = x.reshape(n, -1, 1)
        return x.sum(dim=2), (x * x).sum(dim=2)

    def update(self, variant: int, prediction: torch.Tensor, classes: torch.Tensor, buckets: torch.Tensor):
        s, ss = self._features(prediction)
        cells = buckets * self.count.shape[2] + classes  # flat (bucket, class) index
        flat_sum = self.sum[variant].view(-1, self.sum.shape[-1])
        flat_sum_sq = self.sum_sq[variant].view(-1, self.sum.shape[-1])
        flat_sum.index_add_(0, cells, s)
        flat_sum_sq.index_add_(0, cells, ss)
        self.count[variant].view(-1).index_add_(0, cells, torch.ones_like(cells, dtype=torch.float64))

    def state(self) -> list[torch.Tensor]:
        """The tensors to sum across processes (e.g. ``accelerator.reduce(t, "sum")``)."""
        return [self.sum, self.sum_sq, self.count]

    def load_state(self, tensors: list[torch.Tensor]):
        self.sum, self.sum_sq, self.count = tensors

    @staticmethod
    def _conditional_entropy(total, total_sq, count, elements_per_feature) -> torch.Tensor:
        """H(Y|C) per variant from sums over (variant, class, feature) cells."""
        n = (count * elements_per_feature)[..., None]  # elements behind each feature's variance
        valid = count >= 2  # a class seen once has no variance; it gets no weight
        mean = total / n.clamp(min=1)
        var = (total_sq / n.clamp(min=1) - mean * mean).clamp(min=1e-30)
        entropy_per_class = elements_per_feature * 0.5 * torch.log(2 * math.pi * math.e * var).sum(dim=-1)
        weights = torch.where(valid, count, torch.zeros_like(count))
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1)
        return (weights * torch.where(valid, entropy_per_class, torch.zeros_like(entropy_per_class))).sum(dim=-1)

    def conditional_entropy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(aggregate H(Y|C) per variant, H(Y|C) per variant and timestep bucket)."""
        e = self.elements_per_feature
        per_bucket = self._conditional_entropy(self.sum, self.sum_sq, self.count, e)
        aggregate = self._conditional_entropy(self.sum.sum(1), self.sum_sq.sum(1), self.count.sum(1), e)
        return aggregate, per_bucket


@dataclass
class CEDResult(ImportanceResult):
    bucket_scores: list[list[float]] = field(default_factory=list)  # [block][timestep bucket]
    entropy_full: float = 0.0
    entropy_skipped: list[float] = field(default_factory=list)

    def _importance(self, k: int) -> float:
        return abs(self.scores[k])  # signed scores rank by magnitude

    def to_dict(self) -> dict:
        return {**super().to_dict(), "bucket_scores": self.bucket_scores, "entropy_full": self.entropy_full,
                "entropy_skipped": self.entropy_skipped}


def _block_outputs_prefix_cached(model, tokens, timesteps, labels):
    """Yield the final tokens of the full model, then of the model with each kept block skipped, in order.

    Blocks before i see unchanged inputs, so the full forward stores every block's input once; skipping block i
    then runs only the blocks after it, starting from block i's input. About half the block calls of the naive way.
    Outputs are yielded one at a time, so only the block inputs are held.
    """
    inputs, h = [], tokens
    for position in range(model.num_blocks):
        inputs.append(h)
        h = model.run_blocks(h, timesteps, labels, start=position, end=position + 1)
    yield h
    for position in range(model.num_blocks):
        yield model.run_blocks(inputs[position], timesteps, labels, start=position + 1)


def _block_outputs_naive(model, tokens, timesteps, labels):
    yield model.run_blocks(tokens, timesteps, labels)
    for index in model.kept_block_indices:
        with model.skipping([index]):
            yield model.run_blocks(tokens, timesteps, labels)


@torch.no_grad()
def compute_ced(
    model,
    objective,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_samples: int = 1024,
    options: CEDOptions | None = None,
    seed: int = 0,
    prefix_cache: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    reduce=None,
    progress: bool = False,
) -> CEDResult:
    """Score every kept block of ``model`` (an `EntPrunedTransformer2DModel`) by CED.

    Args:
        batches: an iterable of (clean latents, class labels); consumed until ``num_samples`` samples are used.
        objective: draws timesteps and noise and names the prediction channels (e.g. `DiffusionObjective`).
        seed: seeds the (timestep, noise) draws. They are made up front for all ``num_samples`` samples, so the
            scores do not depend on the batch size; with several processes, process p takes the draws of samples
            p, p + P, p + 2P, ... (pass ``process_index``, ``num_processes`` and a ``reduce`` that sums a tensor
            across processes, e.g. ``lambda t: accelerator.reduce(t, "sum")``).
        prefix_cache: run only the blocks after the skipped one (same scores, about half the block calls).
    """
    options = options or CEDOptions()
    if num_samples < 2:
        raise ValueError(f"`num_samples` must be >= 2 to estimate a variance, got {num_samples}.")
    device = next(model.parameters()).device
    low, high = options.timestep_range
    buckets_n = int(options.num_timestep_buckets)
    num_classes = model.config.num_embeds_ada_norm + 1 if options.per_class else 1
    accumulator = None  # created at the first batch, when the prediction's shape is known
    runner = _block_outputs_prefix_cached if prefix_cache else _block_outputs_naive

    for draw in fixed_draws(model, objective, batches, num_samples, seed, options.timestep_range, process_index,
                            num_processes, progress_desc="CED" if progress else None):
        t, labels = draw.noised.timesteps, draw.labels
        buckets = ((draw.fractions - low) / (high - low) * buckets_n).long().clamp(max=buckets_n - 1).to(device)
        classes = labels if options.per_class else torch.zeros_like(labels)
        tokens = model.embed(draw.noised.noisy.to(model.dtype))
        for variant, final_tokens in enumerate(runner(model, tokens, t, labels)):
            prediction = objective.prediction(model.head(final_tokens, t, labels))
            if accumulator is None:
                accumulator = GaussianEntropyAccumulator(1 + model.num_blocks, buckets_n, num_classes,
                                                         prediction.shape[1:], options.variance, device=device)
            accumulator.update(variant, prediction, classes, buckets)
    seen = int(accumulator.count[0].sum().item())
    if reduce is not None:
        accumulator.load_state([reduce(t) for t in accumulator.state()])
        seen = int(accumulator.count[0].sum().item())

    aggregate, per_bucket = accumulator.conditional_entropy()
    deviation = aggregate[1:] - aggregate[0]
    bucket_deviation = per_bucket[1:] - per_bucket[0]
    if not options.signed:
        deviation, bucket_deviation = deviation.abs(), bucket_deviation.abs()
    return CEDResult(
        method="ced",
        block_indices=list(model.kept_block_indices),
        scores=deviation.tolist(),
        bucket_scores=bucket_deviation.tolist(),
        entropy_full=aggregate[0].item(),
        entropy_skipped=aggregate[1:].tolist(),
        num_samples=seen,
        options={**asdict(options), "prefix_cache": prefix_cache, "seed": seed},
    )
