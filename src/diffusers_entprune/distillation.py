"""Knowledge distillation while pruning and fine-tuning: the pruned student also regresses a frozen teacher.

The idea is TinyFusion's (arXiv 2412.01199): a depth-pruned DiT recovers better when, besides the ground truth, it
matches the outputs and the hidden states of an unpruned teacher. Per sample:

    loss = (1 - w) * L_gt + w * L_out + beta(step) * L_feat

- ``L_gt``: the objective's own loss (`objectives.py`), unchanged.
- ``L_out`` (output distillation, weight ``w = output_weight`` in [0, 1]): the mean squared difference between the
  student's and the teacher's outputs on the same noised latents, timesteps and class labels (after the
  classifier-free-guidance label dropout, so the teacher also teaches the unconditional prediction). For a DiT,
  every output channel: epsilon and, with learned sigma, the variance channels (the student keeps a variance head,
  and the teacher's is the best target it has). For a SiT, the velocity channels only (a learned-sigma SiT's second
  half is used by neither its objective nor its sampler).
- ``L_feat`` (hidden-state distillation, weight ``beta``): see `feature_distillation_loss`. Block matching: the
  student's block with *original* index ``k`` is matched with the hidden state after the teacher's block ``k``.
  Depth pruning keeps original indices, so ``k`` names the same depth of the original model: the student, which has
  lost some of the blocks before ``k``, is asked to reach there what the original reached with all of them. Only the
  indices present in both models count (a pruned teacher lacks some); with none in common distillation is refused.
- ``beta(step) = feature_weight * max(0, 1 - step / feature_decay_steps)``: the hidden-state term decays linearly to
  0, so that it guides the student while blocks leave it and the end of training fits the outputs alone (TinyFusion
  decays its representation term too). ``feature_decay_steps=0``: no decay.

`Distiller` runs this in a training loop: hooks capture the hidden states, the teacher is called only while one of
its terms has weight, the terms are averaged for logging and the teacher's time is measured. The teacher is a
separate frozen model, never prepared by accelerate nor saved in checkpoints; a resumed run loads it again.
"""

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from .models.entpruned_transformer_2d import KEPT_INDICES_KEY, ORIGINAL_LAYERS_KEY, EntPrunedTransformer2DModel
from .objectives import FlowObjective

logger = logging.getLogger(__name__)

# what a teacher must share with its student for the output term (same latent space, same classes) and, for the
# hidden-state term, also the width and the original depth (block k must name the same depth in both)
OUTPUT_KEYS = ("in_channels", "out_channels", "sample_size", "patch_size", "num_embeds_ada_norm")
VARIANCE_EPS = 1e-6  # keeps the layer normalisation finite for a constant hidden state


def check_distillation_settings(output_weight: float, feature_weight: float, feature_decay_steps: int,
                                mask_sigma: float, names: dict | None = None) -> None:
    """Raise a `ValueError` naming the bad setting (``names`` maps the field names to e.g. script flags)."""
    names = {k: f"`{k}`" for k in ("output_weight", "feature_weight", "feature_decay_steps", "mask_sigma")} | \
        (names or {})
    # written `not ... ` so that nan fails too
    if not 0.0 <= output_weight <= 1.0:
        raise ValueError(f"{names['output_weight']} must lie in [0, 1] (the share of the output-distillation term; "
                         f"the ground-truth loss gets the rest; 0: off), got {output_weight}.")
    if not 0.0 <= feature_weight < math.inf:
        raise ValueError(f"{names['feature_weight']} must be >= 0 and finite (the initial weight of the "
                         f"hidden-state term; 0: off), got {feature_weight}.")
    if isinstance(feature_decay_steps, bool) or not isinstance(feature_decay_steps, int) or feature_decay_steps < 0:
        raise ValueError(f"{names['feature_decay_steps']} must be an integer >= 0 (steps over which the "
                         f"hidden-state weight decays to 0; 0: no decay), got {feature_decay_steps!r}.")
    if not mask_sigma >= 0.0:
        raise ValueError(f"{names['mask_sigma']} must be >= 0 (outlier threshold in standard deviations; 0: no "
                         f"mask), got {mask_sigma}.")


@dataclass
class DistillationConfig:
    """Settings of knowledge distillation (see the module docstring for the loss they define).

    Args:
        output_weight: ``w`` in [0, 1]; the loss is ``(1 - w) * ground truth + w * output distillation``. 0: off.
        feature_weight: ``beta0 >= 0``, the initial weight of the hidden-state term, added on top. 0: off.
        feature_decay_steps: ``beta`` decays linearly from ``beta0`` at step 0 to 0 at this step (and stays 0).
            0: no decay.
        mask_sigma: hidden-state elements of the teacher farther than this many standard deviations from the mean
            of their sample and layer are left out of the hidden-state term (the massive activations of DiTs).
            0: no mask.
    """

    output_weight: float = 0.0
    feature_weight: float = 0.0
    feature_decay_steps: int = 0
    mask_sigma: float = 2.0

    def __post_init__(self):
        check_distillation_settings(self.output_weight, self.feature_weight, self.feature_decay_steps,
                                    self.mask_sigma)

    @property
    def enabled(self) -> bool:
        return self.output_weight > 0 or self.feature_weight > 0

    def feature_weight_at(self, step: int) -> float:
        """``beta`` at optimizer step ``step`` (0-based)."""
        if not self.feature_decay_steps:
            return self.feature_weight
        return self.feature_weight * max(0.0, 1.0 - step / self.feature_decay_steps)

    def needs_teacher(self, step: int) -> bool:
        return self.output_weight > 0 or self.feature_weight_at(step) > 0

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------- loss terms


def distilled_channels(output: torch.Tensor, objective) -> torch.Tensor:
    """The output channels the output term compares: all of a DiT's (epsilon and learned variance), a SiT's
    velocity only."""
    return objective.prediction(output) if isinstance(objective, FlowObjective) else output


def output_distillation_loss(student_output: torch.Tensor, teacher_output: torch.Tensor, objective) -> torch.Tensor:
    """Per-sample mean squared difference of the distilled channels (`distilled_channels`), in float32."""
    student = distilled_channels(student_output, objective).float()
    teacher = distilled_channels(teacher_output, objective).float()
    return ((student - teacher) ** 2).mean(dim=tuple(range(1, student.ndim)))


def outlier_mask(teacher_hidden: torch.Tensor, mask_sigma: float) -> torch.Tensor:
    """True for the elements that count: ``|h - mean| <= mask_sigma * std``, where mean and (population) std are
    taken per sample over all tokens and channels of this hidden state. ``mask_sigma=0``: every element counts."""
    hidden = teacher_hidden.float()
    if not mask_sigma:
        return torch.ones_like(hidden, dtype=torch.bool)
    dims = tuple(range(1, hidden.ndim))
    mean = hidden.mean(dim=dims, keepdim=True)
    std = hidden.std(dim=dims, keepdim=True, correction=0)
    return (hidden - mean).abs() <= mask_sigma * std


def feature_distillation_loss(student_hidden: dict, teacher_hidden: dict, mask_sigma: float = 2.0) -> torch.Tensor:
    """Per-sample hidden-state distillation loss over the blocks (original indices) both dicts hold.

    For each common block and each sample: the squared differences over the elements kept by `outlier_mask` (of the
    teacher's hidden state), summed and divided by the number of kept elements (an MSE over them) and by the
    variance of the teacher's kept elements (so a layer scores 1 when the student is as far off as the teacher's
    own spread: deeper layers, whose activations are larger, weigh no more than shallow ones). The blocks' values
    are averaged.

    Why the mask: DiT hidden states hold a few "massive activations", elements hundreds of times larger than the
    rest. Unmasked, they dominate the squared error and drive the student to reproduce them exactly, and the
    hidden-state term diverges (TinyFusion reports NaN without the mask).
    """
    common = sorted(set(student_hidden) & set(teacher_hidden))
    if not common:
        raise ValueError(f"The student's blocks {sorted(student_hidden)} and the teacher's {sorted(teacher_hidden)} "
                         "have no original index in common: no hidden state to distil.")
    per_block = []
    for index in common:
        student, teacher = student_hidden[index].float(), teacher_hidden[index].float().detach()
        if student.shape != teacher.shape:
            raise ValueError(f"Block {index}: the student's hidden state has shape {tuple(student.shape)}, the "
                             f"teacher's {tuple(teacher.shape)}; they must match (same width and tokens).")
        keep = outlier_mask(teacher, mask_sigma).to(teacher.dtype)
        dims = tuple(range(1, teacher.ndim))
        count = keep.sum(dim=dims).clamp_min(1.0)
        mean = (teacher * keep).sum(dim=dims, keepdim=True) / count.view(-1, *([1] * (teacher.ndim - 1)))
        variance = (((teacher - mean) ** 2) * keep).sum(dim=dims) / count
        mse = (((student - teacher) ** 2) * keep).sum(dim=dims) / count
        per_block.append(mse / (variance + VARIANCE_EPS))
    return torch.stack(per_block).mean(dim=0)


# ---------------------------------------------------------------------------------------------- hidden states


def _transformer(model) -> EntPrunedTransformer2DModel:
    """The `EntPrunedTransformer2DModel` inside DDP / accelerate / torch.compile wrappers."""
    while not isinstance(model, EntPrunedTransformer2DModel):
        inner = getattr(model, "module", None)
        inner = getattr(model, "_orig_mod", None) if inner is None else inner
        if inner is None:
            raise TypeError(f"Expected an EntPrunedTransformer2DModel (possibly wrapped), got {type(model).__name__}.")
        model = inner
    return model


@contextlib.contextmanager
def capture_hidden_states(model, enabled: bool = True) -> Iterator[dict]:
    """Within the ``with`` block, record the output of every block that runs, by its original index.

    Hooks go on the blocks present *now* and come off on exit, so they follow pruning, work through DDP and
    accelerate wrappers, and do not fire again when gradient checkpointing recomputes the blocks in backward. The
    recorded tensors are part of the autograd graph (gradients flow through them to the student).
    """
    captured: dict[int, torch.Tensor] = {}
    if not enabled:
        yield captured
        return
    transformer = _transformer(model)
    handles = []
    for index, block in zip(transformer.kept_block_indices, transformer.transformer_blocks):
        def hook(module, inputs, output, index=index):
            captured[index] = output[0] if isinstance(output, tuple) else output
        handles.append(block.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- the teacher


def _kept_indices(config) -> list[int]:
    return [int(i) for i in (config.get(KEPT_INDICES_KEY) or range(config["num_layers"]))]


def _original_depth(config) -> int:
    return int(config.get(ORIGINAL_LAYERS_KEY) or config["num_layers"])


def check_teacher_config(teacher_config, student_config, features: bool,
                         argument: str = "teacher_model_name_or_path", teacher_name: str = "the teacher") -> None:
    """Refuse a teacher that does not fit the student, naming ``argument``: the output term needs the same latent
    space, patching and classes; the hidden-state term also the same width and original depth and at least one
    block (original index) in common. Works on configs, so a script can check before loading anything."""
    teacher_config, student_config = dict(teacher_config), dict(student_config)
    problems = [f"{key} {teacher_config.get(key)} (the student's: {student_config.get(key)})"
                for key in OUTPUT_KEYS if teacher_config.get(key) != student_config.get(key)]
    if features and not problems:
        width = {name: c["num_attention_heads"] * c["attention_head_dim"]
                 for name, c in (("teacher", teacher_config), ("student", student_config))}
        if width["teacher"] != width["student"]:
            problems.append(f"hidden size {width['teacher']} (the student's: {width['student']}), which the "
                            "hidden-state term compares")
        depth_t, depth_s = _original_depth(teacher_config), _original_depth(student_config)
        if depth_t != depth_s:
            problems.append(f"{depth_t} blocks originally (the student's: {depth_s}), so block k would not name "
                            "the same depth in both")
        elif not set(_kept_indices(teacher_config)) & set(_kept_indices(student_config)):
            problems.append(f"blocks {_kept_indices(teacher_config)}, none of which the student has "
                            f"({_kept_indices(student_config)}): no hidden state to match")
    if problems:
        raise ValueError(f"`{argument}`: {teacher_name} does not fit the student: it has " + "; ".join(problems) +
                         ". Distil from a model of the same architecture (e.g. the source model, the default, or "
                         "its fine-tuned copy)" + (", or drop the hidden-state term" if features else "") + ".")


@dataclass
class TeacherOutput:
    sample: torch.Tensor
    hidden_states: dict  # original block index -> hidden state after that block (empty unless asked for)


class Teacher:
    """A frozen teacher: eval mode, no gradients, run without autograd under the student's autocast.

    Args:
        model: an `EntPrunedTransformer2DModel` (load one with `Teacher.from_pretrained`). It is frozen in place.
        autocast_dtype: the student's mixed-precision dtype (``torch.bfloat16``/``torch.float16``), so the teacher
            computes as the student does; None: full precision.

    Every call is timed (``seconds``; on CUDA after a synchronisation, so the time is the teacher's own).
    """

    def __init__(self, model: EntPrunedTransformer2DModel, autocast_dtype: torch.dtype | None = None):
        if not isinstance(model, EntPrunedTransformer2DModel):
            raise TypeError(f"`model` must be an EntPrunedTransformer2DModel, got {type(model).__name__}.")
        self.model = model.eval().requires_grad_(False)
        self.autocast_dtype = autocast_dtype
        self.seconds: list[float] = []

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, device=None, revision: str | None = None,
                        autocast_dtype: torch.dtype | None = None) -> "Teacher":
        """Load the transformer of a DiT/SiT pipeline folder (or Hub id) as a teacher on ``device``."""
        model = EntPrunedTransformer2DModel.from_pretrained(pretrained_model_name_or_path, subfolder="transformer",
                                                            revision=revision)
        return cls(model.to(device) if device is not None else model, autocast_dtype=autocast_dtype)

    def check_fits(self, student, features: bool, argument: str = "teacher_model_name_or_path") -> None:
        """`check_teacher_config` on the loaded models (the student as it is now, pruned blocks gone)."""
        student = _transformer(student)
        teacher_config = {**self.model.config, "num_layers": self.model.num_blocks,
                          KEPT_INDICES_KEY: self.model.kept_block_indices,
                          ORIGINAL_LAYERS_KEY: self.model.original_num_layers}
        student_config = {**student.config, "num_layers": student.num_blocks,
                          KEPT_INDICES_KEY: student.kept_block_indices,
                          ORIGINAL_LAYERS_KEY: student.original_num_layers}
        check_teacher_config(teacher_config, student_config, features, argument)

    @torch.no_grad()
    def __call__(self, hidden_states, timestep, class_labels, capture_features: bool = False) -> TeacherOutput:
        device = hidden_states.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        autocast = torch.autocast(device.type, dtype=self.autocast_dtype) if self.autocast_dtype not in (
            None, torch.float32) else contextlib.nullcontext()
        with autocast, capture_hidden_states(self.model, enabled=capture_features) as captured:
            sample = self.model(hidden_states, timestep=timestep, class_labels=class_labels).sample
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds.append(time.perf_counter() - start)
        return TeacherOutput(sample=sample, hidden_states=captured)


# ---------------------------------------------------------------------------------------------- in a training loop


class Distiller:
    """Distillation inside a training loop::

        distiller = Distiller(DistillationConfig(output_weight=0.5, feature_weight=1.0, feature_decay_steps=N),
                              Teacher.from_pretrained(source, device=device))
        distiller.check_student(model)
        ...
        with distiller.capture(model, step) as student_hidden:
            output = model(noised.noisy, timestep=timesteps, class_labels=labels).sample
        loss = distiller.loss(objective, output.float(), latents, noised, labels, student_hidden, step).mean()
        ...
        logs.update(distiller.end_step())  # once per optimizer step: loss/ground_truth, loss/distill_* ...

    ``step`` is the optimizer step (it sets the hidden-state weight). The teacher runs only while a term has
    weight; once the hidden-state weight has decayed and ``output_weight`` is 0, training costs what it did.
    """

    def __init__(self, config: DistillationConfig, teacher: Teacher):
        if not config.enabled:
            raise ValueError("Distillation is off in this config (`output_weight` and `feature_weight` are 0).")
        self.config, self.teacher = config, teacher
        self._sums: dict[str, float] = {}
        self._micro_batches = 0
        self._teacher_calls_this_step = 0
        self.teacher_step_seconds: list[float] = []
        self.step_seconds: list[float] = []  # of the steps the teacher ran in
        self.warned_no_common_blocks = False
        self.feature_blocks: list[int] = []

    def check_student(self, student, argument: str = "teacher_model_name_or_path") -> None:
        self.teacher.check_fits(student, features=self.config.feature_weight > 0, argument=argument)

    def capture(self, model, step: int):
        """Record the student's hidden states during its forward (only while the hidden-state term has weight)."""
        return capture_hidden_states(model, enabled=self.config.feature_weight_at(step) > 0)

    def loss(self, objective, output, x0, noised, class_labels, student_hidden: dict, step: int) -> torch.Tensor:
        """Per-sample total loss: `objective.loss` mixed with the distillation terms (module docstring)."""
        ground_truth = objective.loss(output, x0, noised)
        parts = {"loss/ground_truth": ground_truth}
        total = ground_truth
        beta = self.config.feature_weight_at(step)
        if self.config.needs_teacher(step):
            teacher = self.teacher(noised.noisy, noised.timesteps, class_labels, capture_features=beta > 0)
            self._teacher_calls_this_step += 1
            output_term = output_distillation_loss(output, teacher.sample, objective)
            parts["loss/distill_output"] = output_term  # logged even at weight 0: how far from the teacher
            w = self.config.output_weight
            if w > 0:
                total = (1.0 - w) * ground_truth + w * output_term
            if beta > 0:
                common = sorted(set(student_hidden) & set(teacher.hidden_states))
                self.feature_blocks = common
                if common:
                    feature_term = feature_distillation_loss(student_hidden, teacher.hidden_states,
                                                             self.config.mask_sigma)
                    parts["loss/distill_feature"] = feature_term
                    total = total + beta * feature_term
                elif not self.warned_no_common_blocks:  # the student pruned every block the teacher has
                    logger.warning(
                        f"Step {step}: the student's blocks {sorted(student_hidden)} and the teacher's "
                        f"{sorted(teacher.hidden_states)} have no original index in common any more; the "
                        "hidden-state term is 0 from here on.")
                    self.warned_no_common_blocks = True
        for name, value in parts.items():
            self._sums[name] = self._sums.get(name, 0.0) + value.detach().float().mean().item()
        if self.config.feature_weight > 0:
            self._sums["distill/feature_weight"] = self._sums.get("distill/feature_weight", 0.0) + beta
        self._micro_batches += 1
        return total

    def end_step(self, step_seconds: float | None = None) -> dict:
        """Call once per optimizer step: returns the terms averaged over the step's micro-batches (for the tracker)
        and records the step's teacher time (and ``step_seconds``, the whole step's, when given)."""
        logs = {name: value / self._micro_batches for name, value in self._sums.items()} if self._micro_batches \
            else {}
        if self._teacher_calls_this_step:
            self.teacher_step_seconds.append(sum(self.teacher.seconds[-self._teacher_calls_this_step:]))
            if step_seconds is not None:
                self.step_seconds.append(step_seconds)
        self._sums, self._micro_batches, self._teacher_calls_this_step = {}, 0, 0
        return logs

    def report(self, warmup_steps: int = 3) -> dict:
        """The config, the blocks matched last, and the medians over the steps the teacher ran in of its time and
        of the whole step's (the first ``warmup_steps`` left out: allocation and caching make them slow)."""
        def median(times):
            settled = times[min(warmup_steps, max(len(times) - 1, 0)):]
            return statistics.median(settled) if settled else None

        teacher, step = median(self.teacher_step_seconds), median(self.step_seconds)
        return {**self.config.to_dict(), "feature_blocks": self.feature_blocks,
                "teacher_steps": len(self.teacher_step_seconds),
                "median_teacher_seconds_per_step": teacher, "median_step_seconds_with_teacher": step,
                "teacher_share_of_step": teacher / step if teacher is not None and step else None}

    def finish(self) -> dict:
        """`report`, then drop the teacher (its memory is free for what follows training)."""
        report = self.report()
        self.teacher = None
        return report


# ---------------------------------------------------------------------------------------------- command line

DISTILLATION_FLAGS = ("distill_output_weight", "distill_feature_weight", "distill_feature_decay_steps",
                      "distill_mask_sigma", "teacher_model_name_or_path")


def add_distillation_arguments(parser) -> None:
    """The ``--distill_*`` flags of examples/prune_dit.py. They default to None: a run without distillation records
    the same settings as before distillation existed, so its checkpoints resume under either version."""
    group = parser.add_argument_group(
        "knowledge distillation (diffusers_entprune/distillation.py; off by default): loss = (1 - w) * ground truth "
        "+ w * output KD + beta * hidden-state KD, beta decaying linearly from --distill_feature_weight to 0")
    group.add_argument("--distill_output_weight", type=float, default=None,
                       help="w in [0, 1]: the share of the output-distillation term (the student regresses the "
                            "teacher's output, learned-variance channels included; SiT: the velocity). Default 0: off.")
    group.add_argument("--distill_feature_weight", type=float, default=None,
                       help="beta0 >= 0: initial weight of the hidden-state term (after each kept block, matched to "
                            "the teacher's block of the same original index, outliers masked). Default 0: off.")
    group.add_argument("--distill_feature_decay_steps", type=int, default=None,
                       help="beta decays linearly to 0 over this many steps (0: no decay). Default: "
                            "--max_train_steps, so it guides the student while blocks leave it and is gone by the "
                            "end; give it explicitly to let a resumed run grow --max_train_steps.")
    group.add_argument("--distill_mask_sigma", type=float, default=None,
                       help="Leave out of the hidden-state term the teacher's elements farther than this many "
                            "standard deviations from their sample's mean (DiT's massive activations, which make "
                            "unmasked feature KD diverge). Default 2.0; 0: no mask.")
    group.add_argument("--teacher_model_name_or_path", default=None,
                       help="The teacher: a DiT/SiT pipeline folder or Hub id of the student's architecture. "
                            "Default: the source model, frozen before any pruning. Recommended: the output of a "
                            "--fine_tune_only run on the same data; a teacher that never saw the downstream data "
                            "pulls the student toward the pretraining distribution.")


def distillation_config_from_args(args, error) -> DistillationConfig | None:
    """Check the ``--distill_*`` flags, fill in their defaults in ``args`` (so the run records what it used) and
    return the config, or None without distillation (then the flags all stay None). ``error``: e.g. parser.error."""
    flags = {name: f"--distill_{name}" for name in ("output_weight", "feature_weight", "feature_decay_steps",
                                                    "mask_sigma")}
    try:
        check_distillation_settings(args.distill_output_weight or 0.0, args.distill_feature_weight or 0.0,
                                    args.distill_feature_decay_steps or 0,
                                    2.0 if args.distill_mask_sigma is None else args.distill_mask_sigma, flags)
    except ValueError as bad:
        error(str(bad))
    feature = (args.distill_feature_weight or 0.0) > 0
    if not (args.distill_output_weight or 0.0) > 0 and not feature:
        given = [f"--{name}" for name in DISTILLATION_FLAGS[2:] if getattr(args, name) is not None]
        if given:
            error(f"{', '.join(given)} set without distillation; pass --distill_output_weight or "
                  "--distill_feature_weight (> 0), or drop them.")
        args.distill_output_weight = args.distill_feature_weight = None  # an explicit 0 is "off" too
        return None
    args.distill_output_weight = args.distill_output_weight or 0.0
    args.distill_feature_weight = args.distill_feature_weight or 0.0
    if not feature:
        given = [f"--{name}" for name in DISTILLATION_FLAGS[2:4] if getattr(args, name) is not None]
        if given:
            error(f"{', '.join(given)} shape the hidden-state term, which is off; pass --distill_feature_weight "
                  "(> 0), or drop them.")
    else:
        if args.distill_feature_decay_steps is None:
            args.distill_feature_decay_steps = args.max_train_steps
        if args.distill_mask_sigma is None:
            args.distill_mask_sigma = 2.0
    return DistillationConfig(output_weight=args.distill_output_weight, feature_weight=args.distill_feature_weight,
                              feature_decay_steps=args.distill_feature_decay_steps or 0,
                              mask_sigma=2.0 if args.distill_mask_sigma is None else args.distill_mask_sigma)


def check_teacher(path: str, model_type: str, student_source: str, student_revision: str | None = None,
                  features: bool = False, argument: str = "--teacher_model_name_or_path") -> None:
    """Before any heavy work: the teacher at ``path`` must be a DiT/SiT pipeline of the student's family whose
    transformer fits the student's (same latents, patches and classes; for the hidden-state term also width,
    original depth and a block in common). The default teacher, the source model itself, fits by construction."""
    from .model_types import detect_model_type
    from .models.entpruned_transformer_2d import check_dit_config

    teacher_type = detect_model_type(path, argument=argument)
    if teacher_type != model_type:
        raise ValueError(f"`{argument}`={path!r} is a {teacher_type} pipeline, but the student is a {model_type} "
                         f"({student_source}): a teacher must predict what the student predicts. Pass a {model_type} "
                         "pipeline folder.")
    teacher_config = EntPrunedTransformer2DModel.load_config(path, subfolder="transformer")
    check_dit_config(teacher_config, argument=argument, source=path)
    student_config = EntPrunedTransformer2DModel.load_config(student_source, subfolder="transformer",
                                                             revision=student_revision)
    check_teacher_config(teacher_config, student_config, features=features, argument=argument,
                         teacher_name=f"the teacher {path!r}")
