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
  collapse); the ranking always uses the magnitude. Only for ``estimator="entropy"``.
- ``per_class``: condition on the class (default) or pool all classes into one Gaussian.
- ``timestep_range``: the fraction of the training time range to draw t from (default all of it), split into
  ``num_timestep_buckets`` equal buckets that are reported beside the aggregate.

Estimators beside the paper's (``estimator``). All use the same per-cell Gaussians (cell = timestep bucket x
class; k runs over the variance features, each shared by ``n_k`` prediction elements), weight the classes by
``p(c)`` as above, and score higher = more important:

- ``"entropy"`` (the paper's): ``|H(Y | C) - H(Y_skip | C)|``. It compares variances only: it reacts strongly to a
  rescaling of the output (what skipping a late block does, and fine-tuning undoes cheaply) and weakly to added
  error (what skipping block 0 does).
- ``"residual"``: the residual conditional entropy ``H(Y_skip | Y_full, C) =
  sum_c p(c) sum_k (n_k / 2) log(2 pi e Var(Y_skip,k | c) (1 - rho_k,c^2))``, with rho the correlation of the
  skipped and the full prediction on the same draws. It measures what the skip adds that the full model's output
  does not explain: a rescaling (rho = 1) scores the minimum, added independent error of variance s^2 scores
  ``(n_k / 2) log(2 pi e s^2)``. ``1 - rho^2`` is clamped to `RESIDUAL_FLOOR` (1e-12) so that an exact copy or
  rescaling keeps a finite score: the floor lies above float64 round-off of the moments and below any difference
  a float32 model can make. It needs one more sum per cell (of ``y_full * y_skip``).
- ``"kl"``: ``sum_c p(c) sum_k n_k KL(N(mu_full, var_full) || N(mu_skip, var_skip))``: sees mean shifts, which an
  entropy difference cannot.
- ``"w2"``: the same weighting of the squared 2-Wasserstein distance of the 1-D Gaussians,
  ``(mu_full - mu_skip)^2 + (sigma_full - sigma_skip)^2``.

What is measured (``signal``):

- ``"prediction"`` (the paper's): the prediction itself. On a DiT most of its variance is the input noise echoed
  back, and little depends on the class.
- ``"condition"``: the condition's contribution, ``prediction(x_t, t, c) - prediction(x_t, t, null class)`` on the
  same noised inputs (the conditional and the null label run as one concatenated batch through the same blocks:
  twice the block work, one pass). Draws whose label already is the null class (``model.null_class_label``) carry
  no condition and are left out; ``num_samples`` in the result counts the draws used. A model that ignores the
  class gives a zero signal: its variances hit the floor of 1e-30, so "entropy", "kl" and "w2" score every block 0
  and "residual" scores every block alike (ties rank by index), never NaN.

Variances below 1e-30 are raised to it everywhere (a class seen once has no variance and gets no weight).

Named presets (`CED_PRESETS`, `CEDOptions.from_preset(name, **overrides)`): ``"paper"`` is the paper's estimator
and the default; ``"residual"``, ``"kl"`` and ``"w2"`` swap the estimator; ``"condition"`` and
``"residual_condition"`` measure the condition's contribution with the paper's and the residual estimator.
"""

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace

import torch

from ..models.entpruned_transformer_2d import EntPrunedTransformer2DModel
from ..objectives import Objective
from ..randomness import Reduce
from .draws import fixed_draws
from .result import ImportanceResult

VARIANCE_GRANULARITIES = ("scalar", "channel", "diag")
ESTIMATORS = ("entropy", "residual", "kl", "w2")
SIGNALS = ("prediction", "condition")
VARIANCE_FLOOR = 1e-30  # keeps log(var) finite for constant features
RESIDUAL_FLOOR = 1e-12  # the least 1 - rho^2 the residual estimator uses (see the module docstring)


@dataclass
class CEDOptions:
    variance: str = "channel"
    signed: bool = False
    per_class: bool = True
    timestep_range: tuple[float, float] = (0.0, 1.0)
    num_timestep_buckets: int = 4
    estimator: str = "entropy"
    signal: str = "prediction"

    def __post_init__(self):
        if self.variance not in VARIANCE_GRANULARITIES:
            raise ValueError(f"`variance` must be one of {VARIANCE_GRANULARITIES}, got {self.variance!r}.")
        low, high = self.timestep_range
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"`timestep_range` must satisfy 0 <= low < high <= 1, got {self.timestep_range}.")
        if int(self.num_timestep_buckets) < 1:
            raise ValueError(f"`num_timestep_buckets` must be >= 1, got {self.num_timestep_buckets}.")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {self.estimator!r}.")
        if self.signal not in SIGNALS:
            raise ValueError(f"`signal` must be one of {SIGNALS}, got {self.signal!r}.")
        if self.signed and self.estimator != "entropy":
            raise ValueError(f"`signed` applies to `estimator`='entropy' only; {self.estimator!r} has no sign "
                             "to keep.")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CEDOptions":
        """The options of preset ``name`` (see `CED_PRESETS`), with ``overrides`` replacing some of its fields."""
        if name not in CED_PRESETS:
            raise ValueError(f"`name` must be one of the CED presets {tuple(CED_PRESETS)}, got {name!r}.")
        return replace(CED_PRESETS[name], **overrides)


CED_PRESETS = {
    "paper": CEDOptions(),
    "residual": CEDOptions(estimator="residual"),
    "kl": CEDOptions(estimator="kl"),
    "w2": CEDOptions(estimator="w2"),
    "condition": CEDOptions(signal="condition"),
    "residual_condition": CEDOptions(estimator="residual", signal="condition"),
}


class GaussianEntropyAccumulator:
    """Streaming float64 sums of predictions, per (variant, timestep bucket, class, feature).

    Variant 0 is the full model; variant ``1 + k`` is the model with its k-th kept block skipped. With
    ``cross=True`` it also sums ``y_full * y_variant`` (the ``reference`` passed to `update`), which the residual
    estimator needs for the correlation of each variant with the full model.
    """

    def __init__(self, num_variants: int, num_buckets: int, num_classes: int, prediction_shape, variance: str,
                 device=None, cross: bool = False):
        channels, height, width = prediction_shape
        features = {"scalar": 1, "channel": channels, "diag": channels * height * width}[variance]
        self.variance = variance
        # prediction elements that share one variance: they all contribute to the entropy with that variance
        self.elements_per_feature = channels * height * width // features
        shape = (num_variants, num_buckets, num_classes, features)
        self.sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(shape, dtype=torch.float64, device=device)
        self.count = torch.zeros(shape[:3], dtype=torch.float64, device=device)  # samples per cell
        self.sum_cross = torch.zeros(shape, dtype=torch.float64, device=device) if cross else None

    def _feature_sums(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float64 -> (N, features): the sum over the elements that share each feature."""
        # channel-major layout: scalar (N, 1, CHW), channel (N, C, HW), diag (N, CHW, 1)
        return x.reshape(x.shape[0], self.sum.shape[-1], self.elements_per_feature).sum(dim=2)

    def update(self, variant: int, prediction: torch.Tensor, classes: torch.Tensor, buckets: torch.Tensor,
               reference: torch.Tensor | None = None):
        """Add a batch of one variant. ``reference``: the full model's prediction on the same draws (needed, and
        only used, with ``cross=True``; for variant 0 it is ``prediction`` itself)."""
        x = prediction.to(torch.float64)
        cells = buckets * self.count.shape[2] + classes  # flat (bucket, class) index
        features = self.sum.shape[-1]
        self.sum[variant].view(-1, features).index_add_(0, cells, self._feature_sums(x))
        self.sum_sq[variant].view(-1, features).index_add_(0, cells, self._feature_sums(x * x))
        if self.sum_cross is not None:
            if reference is None:
                raise ValueError("`reference` (the full model's prediction on the same draws) is needed when the "
                                 "accumulator sums cross moments (`cross=True`).")
            cross = self._feature_sums(x * reference.to(torch.float64))
            self.sum_cross[variant].view(-1, features).index_add_(0, cells, cross)
        self.count[variant].view(-1).index_add_(0, cells, torch.ones_like(cells, dtype=torch.float64))

    def state(self) -> list[torch.Tensor]:
        """The tensors to sum across processes (e.g. ``accelerator.reduce(t, "sum")``)."""
        tensors = [self.sum, self.sum_sq, self.count]
        return tensors if self.sum_cross is None else [*tensors, self.sum_cross]

    def load_state(self, tensors: list[torch.Tensor]):
        if len(tensors) != len(self.state()):
            raise ValueError(f"`tensors` must hold {len(self.state())} tensors (see `state()`), got {len(tensors)}.")
        self.sum, self.sum_sq, self.count = tensors[:3]
        if self.sum_cross is not None:
            self.sum_cross = tensors[3]

    # ------------------------------------------------------------------ estimates

    @staticmethod
    def _class_average(per_class: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """sum_c p(c) value_c over the classes seen at least twice (a class seen once has no variance)."""
        valid = count >= 2
        weights = torch.where(valid, count, torch.zeros_like(count))
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp(min=1)
        return (weights * torch.where(valid, per_class, torch.zeros_like(per_class))).sum(dim=-1)

    def _estimate(self, estimator: str, total, total_sq, count, total_cross) -> torch.Tensor:
        """One value per variant (and bucket, if the sums have that dim) from sums over (..., class, feature)."""
        e = self.elements_per_feature
        n = (count * e)[..., None].clamp(min=1)  # elements behind each feature's moments
        mean = total / n
        raw_var = total_sq / n - mean * mean
        var = raw_var.clamp(min=VARIANCE_FLOOR)
        if estimator == "entropy":  # H(Y | C) of each variant
            per_class = 0.5 * e * torch.log(2 * math.pi * math.e * var).sum(dim=-1)
        elif estimator == "residual":  # H(Y_skip | Y_full, C)
            mean_full, raw_var_full = mean[:1], raw_var[:1]
            covariance = total_cross / n - mean_full * mean
            # no correlation is defined for a constant feature: it explains nothing (rho = 0)
            defined = (raw_var_full > VARIANCE_FLOOR) & (raw_var > VARIANCE_FLOOR)
            rho_sq = torch.where(defined, covariance**2 / (raw_var_full * raw_var).clamp(min=VARIANCE_FLOOR**2),
                                 torch.zeros_like(covariance))
            residual_var = (var * (1 - rho_sq).clamp(min=RESIDUAL_FLOOR)).clamp(min=VARIANCE_FLOOR)
            per_class = 0.5 * e * torch.log(2 * math.pi * math.e * residual_var).sum(dim=-1)
        elif estimator == "kl":  # KL(N(full) || N(variant)), per element
            mean_full, var_full = mean[:1], var[:1]
            kl = 0.5 * (torch.log(var / var_full) + (var_full + (mean_full - mean) ** 2) / var - 1)
            per_class = e * kl.sum(dim=-1)
        elif estimator == "w2":  # squared 2-Wasserstein distance of N(full) and N(variant), per element
            w2 = (mean[:1] - mean) ** 2 + (var[:1].sqrt() - var.sqrt()) ** 2
            per_class = e * w2.sum(dim=-1)
        else:
            raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
        return self._class_average(per_class, count)

    def estimate(self, estimator: str = "entropy") -> tuple[torch.Tensor, torch.Tensor]:
        """(aggregate value per variant, value per variant and timestep bucket) of ``estimator``.

        ``"entropy"`` gives H(Y|C) of each variant; ``"residual"`` H(Y_variant | Y_full, C) (variant 0 sits at the
        floor); ``"kl"`` and ``"w2"`` the divergence of each variant from the full model (0 for variant 0).
        """
        if estimator == "residual" and self.sum_cross is None:
            raise ValueError("`estimator`='residual' needs the cross moments: build the accumulator with "
                             "`cross=True`.")
        cross = self.sum_cross
        per_bucket = self._estimate(estimator, self.sum, self.sum_sq, self.count, cross)
        aggregate = self._estimate(estimator, self.sum.sum(1), self.sum_sq.sum(1), self.count.sum(1),
                                   None if cross is None else cross.sum(1))
        return aggregate, per_bucket

    def conditional_entropy(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(aggregate H(Y|C) per variant, H(Y|C) per variant and timestep bucket)."""
        return self.estimate("entropy")


@dataclass
class CEDResult(ImportanceResult):
    bucket_scores: list[list[float]] = field(default_factory=list)  # [block][timestep bucket]
    entropy_full: float = 0.0
    entropy_skipped: list[float] = field(default_factory=list)

    def _importance(self, k: int) -> float:
        if self.options.get("estimator", "entropy") == "entropy":
            return abs(self.scores[k])  # signed scores rank by magnitude
        return self.scores[k]  # residual entropies may be negative; lower is still less important

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
    model: EntPrunedTransformer2DModel,
    objective: Objective,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_samples: int = 1024,
    options: CEDOptions | None = None,
    seed: int = 0,
    prefix_cache: bool = True,
    process_index: int = 0,
    num_processes: int = 1,
    reduce: Reduce | None = None,
    progress: bool = False,
) -> CEDResult:
    """Score every kept block of ``model`` (an `EntPrunedTransformer2DModel`) by CED (or the estimator and signal
    that ``options`` name; see the module docstring).

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
    condition = options.signal == "condition"
    null_class = model.null_class_label
    side = model.config.sample_size
    prediction_shape = objective.prediction(torch.zeros(1, model.out_channels, side, side)).shape[1:]
    accumulator = GaussianEntropyAccumulator(1 + model.num_blocks, buckets_n, num_classes, prediction_shape,
                                             options.variance, device=device, cross=options.estimator == "residual")
    runner = _block_outputs_prefix_cached if prefix_cache else _block_outputs_naive

    for draw in fixed_draws(model, objective, batches, num_samples, seed, options.timestep_range, process_index,
                            num_processes, progress_desc="CED" if progress else None):
        noisy, t, labels = draw.noised.noisy, draw.noised.timesteps, draw.labels
        buckets = ((draw.fractions - low) / (high - low) * buckets_n).long().clamp(max=buckets_n - 1).to(device)
        if condition:
            real = labels != null_class  # a null-labelled draw has no condition to measure
            if not bool(real.all()):
                noisy, t, labels, buckets = noisy[real], t[real], labels[real], buckets[real]
            if len(labels) == 0:
                continue
        classes = labels if options.per_class else torch.zeros_like(labels)
        tokens = model.embed(noisy.to(model.dtype))
        run_t, run_labels = t, labels
        if condition:  # conditional and null label in one batch: same tokens and timesteps, one pass of blocks
            tokens, run_t = torch.cat([tokens, tokens]), torch.cat([t, t])
            run_labels = torch.cat([labels, torch.full_like(labels, null_class)])
        full = None
        for variant, final_tokens in enumerate(runner(model, tokens, run_t, run_labels)):
            prediction = objective.prediction(model.head(final_tokens, run_t, run_labels))
            if condition:
                conditional, unconditional = prediction.chunk(2)
                prediction = conditional.double() - unconditional.double()
            if variant == 0:
                full = prediction  # the runners yield the full model first: kept for the cross moments
            accumulator.update(variant, prediction, classes, buckets, reference=full)
    if reduce is not None:
        accumulator.load_state([reduce(t) for t in accumulator.state()])
    seen = int(accumulator.count[0].sum().item())
    if seen == 0:
        raise ValueError(f"`signal`='condition': every draw has the null class label ({null_class}); there is no "
                         "condition to measure.")

    entropy, entropy_per_bucket = accumulator.conditional_entropy()
    if options.estimator == "entropy":
        scores = entropy[1:] - entropy[0]
        bucket_scores = entropy_per_bucket[1:] - entropy_per_bucket[0]
        if not options.signed:
            scores, bucket_scores = scores.abs(), bucket_scores.abs()
    else:
        aggregate, per_bucket = accumulator.estimate(options.estimator)
        scores, bucket_scores = aggregate[1:], per_bucket[1:]
    return CEDResult(
        method="ced",
        block_indices=list(model.kept_block_indices),
        scores=scores.tolist(),
        bucket_scores=bucket_scores.tolist(),
        entropy_full=entropy[0].item(),
        entropy_skipped=entropy[1:].tolist(),
        num_samples=seen,
        options={**asdict(options), "prefix_cache": prefix_cache, "seed": seed},
    )
