"""`EntPrunerConfig`: every pruning setting in one dataclass, with one name per concept.

The field names are the flag names of examples/prune_dit.py (a run records ``vars(args)`` in its checkpoints, and
those must keep resuming), and `entprune score` takes the same flags. ``__post_init__`` is the one place these
values are checked; its messages name the field in backticks (`proxy_batch_size` must be >= 2 ...), and
`config_from_args` rewrites those names to the flags (--proxy_batch_size) for command-line users.

    config = EntPrunerConfig(target_num_blocks=6, ranking="ced", ced_estimator="residual")
    num_to_prune = config.num_blocks_to_prune(transformer)

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)                        # --target_prune_ratio ... --zico_reduction
    args = parser.parse_args()
    config = config_from_args(args, error=parser.error)  # resolved values written back into args
"""

import argparse
import dataclasses
import numbers
import re
import types
import typing
from dataclasses import dataclass, field

from .controller import PRUNING_MODES, decision_steps, resolve_target
from .importance.ced import ESTIMATORS, SIGNALS, VARIANCE_GRANULARITIES, CEDOptions
from .importance.learned import LearnedRankingOptions
from .importance.ranking import RANKING_METHODS
from .proxies import ZICO_REDUCTIONS

TARGET_FIELDS = ("target_prune_ratio", "target_num_blocks", "target_num_params")
LEARNED_FIELDS = ("learned_steps", "learned_group_size", "learned_lora_rank", "learned_batch_size")
DEFAULT_PRUNE_RATIO = 0.5

_LEARNED_DEFAULTS = LearnedRankingOptions()


@dataclass
class EntPrunerConfig:
    """Every setting of EntPruner's pruning: the target, the schedule, the ranking (CED or a baseline), and the
    zero-shot proxies. See each field's ``metadata["help"]`` (also the flags' help of `add_config_arguments`).

    Filled in by ``__post_init__``: ``target_prune_ratio`` = 0.5 when no target is given and not ``fine_tune_only``;
    ``ranking_seed`` = ``seed`` when None; the ``learned_*`` fields = `LearnedRankingOptions`' defaults when
    ``ranking`` is ``"learned"`` (they must stay None for any other ranking).
    """

    # ---- the target (at most one; none: target_prune_ratio 0.5)
    target_prune_ratio: float | None = field(
        default=None, metadata={"help": f"Fraction of the blocks to remove (default {DEFAULT_PRUNE_RATIO})."})
    target_num_blocks: int | None = field(default=None, metadata={"help": "Number of blocks to remove."})
    target_num_params: int | None = field(
        default=None,
        metadata={"help": "Parameter budget (unique parameters, one shared embedder as in the original DiT): remove "
                          "the fewest blocks that bring the model within it."})
    fine_tune_only: bool = field(
        default=False,
        metadata={"help": "Prune nothing: the same fine-tuning, export and report for the unpruned model (the "
                          "ceiling a pruned model is compared with)."})
    # ---- the schedule
    pruning_mode: str = field(
        default="adaptive",
        metadata={"help": "adaptive: zero-shot proxies decide how many blocks each stage drops; fixed: equal amounts "
                          "per stage; one_shot: everything at step 0.", "choices": PRUNING_MODES})
    pruning_stages: int = field(default=4, metadata={"help": "Stages of the pruning schedule."})
    pruning_steps: int | None = field(
        default=None,
        metadata={"help": "Stage boundaries are spread over the first N steps (default: half of max_train_steps)."})
    rank_once: bool = field(
        default=False, metadata={"help": "Rank the blocks by CED once at the start instead of at every stage."})
    # ---- the ranking
    ranking: str = field(
        default="ced",
        metadata={"help": "How blocks are ranked at each stage: ced (EntPruner) or a baseline to compare with "
                          "(random, magnitude, taylor, block_influence, loss, uniform); see `entprune score`. learned "
                          "(TinyFusion-style: learns which blocks to keep with adapters standing in for the "
                          "fine-tuning, see --learned_*) chooses the set for the whole remaining target at once: use "
                          "it with --pruning_mode one_shot.", "choices": RANKING_METHODS})
    seed: int = field(default=0, metadata={"help": "Seed of the run (and, by default, of the ranking's draws)."})
    ranking_seed: int | None = field(
        default=None, metadata={"help": "Seed of the ranking's draws (and of the random ranking); default --seed."})
    ced_num_samples: int = field(default=1024, metadata={"help": "Fixed (x0, t, noise) draws for the ranking."})
    ced_batch_size: int = field(default=64, metadata={"help": "Samples per forward pass of the ranking."})
    ced_variance: str = field(
        default="channel",
        metadata={"help": "CED's Gaussian: one variance per output channel (channel), for every element (scalar), "
                          "or per element (diag).", "choices": VARIANCE_GRANULARITIES})
    ced_estimator: str = field(
        default="entropy",
        metadata={"help": "How --ranking ced compares the skipped model with the full one: entropy (the paper's "
                          "|H(Y|C) - H(Y_skip|C)|), residual (H(Y_skip | Y_full, C), what the skip adds that the "
                          "full output does not explain), kl or w2 (divergences of the per-class Gaussians); see "
                          "importance/ced.py.", "choices": ESTIMATORS})
    ced_signal: str = field(
        default="prediction",
        metadata={"help": "What --ranking ced measures: the prediction (the paper's) or the condition's "
                          "contribution, prediction(class) - prediction(null class) (twice the block work).",
                  "choices": SIGNALS})
    ced_per_class: bool = field(
        default=True,
        metadata={"help": "Pool all classes into one Gaussian instead of one per class.",
                  "negative_flag": "--ced_pooled"})
    ced_signed: bool = field(
        default=False,
        metadata={"help": "Report H_skip - H_full instead of its magnitude (the ranking uses the magnitude); "
                          "--ced_estimator entropy only."})
    ced_timestep_range: tuple[float, float] = field(
        default=(0.0, 1.0),
        metadata={"help": "Fractions of the training time range to draw t from.", "metavar": ("LOW", "HIGH")})
    ced_num_timestep_buckets: int = field(
        default=4, metadata={"help": "Equal timestep buckets reported beside the aggregate score."})
    learned_steps: int | None = field(
        default=None,
        metadata={"help": "--ranking learned: optimisation steps of the mask logits and adapters, each a forward and "
                          f"backward pass of every block on one batch (default {_LEARNED_DEFAULTS.num_steps})."})
    learned_group_size: int | None = field(
        default=None,
        metadata={"help": "--ranking learned: blocks per group; each group keeps its share of the blocks and learns "
                          f"which (default {_LEARNED_DEFAULTS.group_size})."})
    learned_lora_rank: int | None = field(
        default=None,
        metadata={"help": "--ranking learned: rank of the adapters trained with the masks; 0: no adapters, i.e. "
                          "judge the masks by the loss of the model as it is, for ablation (default "
                          f"{_LEARNED_DEFAULTS.lora_rank})."})
    learned_batch_size: int | None = field(
        default=None,
        metadata={"help": "--ranking learned: samples per step, over all processes (default "
                          f"{_LEARNED_DEFAULTS.batch_size})."})
    # ---- the zero-shot proxies (--pruning_mode adaptive)
    proxy_batch_size: int = field(
        default=8,
        metadata={"help": "Samples in the NTK batch and in each ZiCo batch (NTK memory: this many gradients)."})
    zico_num_batches: int = field(
        default=2,
        metadata={"help": "Mini-batches of ZiCo (>= 2: it divides gradient means by their deviation across them)."})
    zico_reduction: str = field(
        default="mean",
        metadata={"help": "Combine ZiCo's layers by sum (its definition; favours deeper candidates) or mean.",
                  "choices": ZICO_REDUCTIONS})

    def __post_init__(self):
        for name in ("pruning_mode", "ranking", "ced_variance", "ced_estimator", "ced_signal", "zico_reduction"):
            choices = _metadata(name)["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {getattr(self, name)!r}.")
        for name in ("fine_tune_only", "rank_once", "ced_per_class", "ced_signed"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")

        # the target
        given = [name for name in TARGET_FIELDS if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"Give at most one target, got {_names(given)}.")
        if self.fine_tune_only and given:
            raise ValueError(f"`fine_tune_only` prunes nothing; drop {_names(given)}.")
        if self.target_prune_ratio is not None:
            ratio = self.target_prune_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0.0 < ratio < 1.0:  # nan fails
                raise ValueError(f"`target_prune_ratio` is the fraction of the blocks to remove and must lie strictly "
                                 f"between 0 and 1, got {ratio}; use `target_num_blocks` for a number of blocks.")
            self.target_prune_ratio = float(ratio)
        for name in ("target_num_blocks", "target_num_params", "pruning_steps"):
            if getattr(self, name) is not None:
                _check_int(self, name, 1)
        if not given and not self.fine_tune_only:
            self.target_prune_ratio = DEFAULT_PRUNE_RATIO

        # the schedule, the ranking and the proxies
        _check_int(self, "pruning_stages", 1)
        if self.pruning_steps is not None:  # checked here, not first when the schedule is made after loading
            decision_steps(self.pruning_stages, self.pruning_steps, self.pruning_mode)
        _check_int(self, "ced_num_samples", 2, " (a variance needs two samples)")
        _check_int(self, "ced_batch_size", 1)
        _check_int(self, "ced_num_timestep_buckets", 1)
        _check_int(self, "proxy_batch_size", 2, " (the NTK of one sample has no condition number)")
        if not (_is_int(self.zico_num_batches) and self.zico_num_batches >= 2):
            raise ValueError(f"`zico_num_batches` must be >= 2, got {self.zico_num_batches!r}: ZiCo divides each "
                             "gradient's mean over its mini-batches by its standard deviation across them, which "
                             "needs two.")
        for name in ("seed", "ranking_seed"):
            value = getattr(self, name)
            if value is not None and not (_is_int(value) and 0 <= value < 2**32):
                raise ValueError(f"`{name}` must lie in [0, 2**32), got {value!r}.")
        if self.ranking_seed is None:
            self.ranking_seed = self.seed
        timestep_range = self.ced_timestep_range
        try:
            low, high = (float(x) for x in timestep_range)
        except (TypeError, ValueError):
            raise ValueError(f"`ced_timestep_range` must be two numbers LOW HIGH, got {timestep_range!r}.") from None
        if not 0.0 <= low < high <= 1.0:  # nan fails
            raise ValueError(f"`ced_timestep_range` LOW HIGH must satisfy 0 <= LOW < HIGH <= 1 (fractions of the "
                             f"training time range), got {low} {high}.")
        self.ced_timestep_range = (low, high)
        if self.ced_signed and self.ced_estimator != "entropy":
            raise ValueError(f"`ced_signed` applies to `ced_estimator` 'entropy' only, got {self.ced_estimator!r}: "
                             "the other estimators have no sign to keep.")

        # the learned ranking's settings: its own, filled in only for it
        if self.ranking != "learned":
            given = [name for name in LEARNED_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{_names(given)} apply to the learned ranking only; set `ranking` to 'learned' or "
                                 "drop them.")
        else:
            defaults = {"learned_steps": _LEARNED_DEFAULTS.num_steps,
                        "learned_group_size": _LEARNED_DEFAULTS.group_size,
                        "learned_lora_rank": _LEARNED_DEFAULTS.lora_rank,
                        "learned_batch_size": _LEARNED_DEFAULTS.batch_size}
            for name in LEARNED_FIELDS:
                if getattr(self, name) is None:
                    setattr(self, name, defaults[name])
                if name == "learned_lora_rank":
                    _check_int(self, name, 0, " (0: no adapters)")
                else:
                    _check_int(self, name, 1)

    # ------------------------------------------------------------------------------------------- derived settings

    @property
    def ced_options(self) -> CEDOptions:
        """The `CEDOptions` of the ``ced_*`` fields."""
        return CEDOptions(variance=self.ced_variance, signed=self.ced_signed, per_class=self.ced_per_class,
                          timestep_range=tuple(self.ced_timestep_range),
                          num_timestep_buckets=self.ced_num_timestep_buckets, estimator=self.ced_estimator,
                          signal=self.ced_signal)

    @property
    def learned_options(self) -> LearnedRankingOptions | None:
        """The `LearnedRankingOptions` of the ``learned_*`` fields with ``ranking="learned"``, else None
        (``learned_lora_rank`` 0: no adapters, ``use_lora=False``)."""
        if self.ranking != "learned":
            return None
        return LearnedRankingOptions(group_size=self.learned_group_size, num_steps=self.learned_steps,
                                     batch_size=self.learned_batch_size, lora_rank=max(self.learned_lora_rank, 1),
                                     use_lora=self.learned_lora_rank > 0)

    @property
    def calibration_pool_size(self) -> int:
        """Samples of the fixed pool that the ranking and the proxies draw from: the ranking's ``ced_num_samples``,
        and the NTK batch plus ``zico_num_batches`` ZiCo batches of ``proxy_batch_size``."""
        return max(self.ced_num_samples, self.proxy_batch_size * (1 + self.zico_num_batches))

    def num_blocks_to_prune(self, model) -> int:
        """How many of ``model``'s present blocks the target removes (0 with ``fine_tune_only``); ``model`` has
        `parameter_counts` (`EntPrunedTransformer2DModel`; for a run, the unpruned source). A parameter target
        needs blocks of one size."""
        if self.fine_tune_only:
            return 0
        outside, per_block = model.parameter_counts()
        if self.target_num_params is not None and len(set(per_block)) != 1:
            raise ValueError(f"`target_num_params` needs blocks of one size; this model's are "
                             f"{sorted(set(per_block))}.")
        return resolve_target(len(per_block), self.target_prune_ratio, self.target_num_blocks, self.target_num_params,
                              per_block[0] if per_block else None, outside)

    # ---------------------------------------------------------------------------------------------- serialisation

    def to_dict(self) -> dict:
        """The fields as plain JSON values (``ced_timestep_range`` a list)."""
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "EntPrunerConfig":
        """The config of ``d`` (e.g. `to_dict`'s output); a key that is no field is an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} keys {unknown}; the fields are {sorted(names)}.")
        return cls(**d)


def _metadata(name: str) -> dict:
    return EntPrunerConfig.__dataclass_fields__[name].metadata


def _names(names) -> str:
    return ", ".join(f"`{name}`" for name in names)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(config, name: str, minimum: int, meaning: str = "") -> None:
    value = getattr(config, name)
    if not _is_int(value):
        raise ValueError(f"`{name}` must be an integer >= {minimum}{meaning}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}{meaning}, got {value}.")


# ------------------------------------------------------------------------------------------------- argparse bridge


def _flag_type(annotation):
    """(base type, number of values) of a field's annotation: ``int | None`` -> (int, 1), ``tuple[float, float]``
    -> (float, 2)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        args = typing.get_args(annotation)
        return args[0], len(args)
    return annotation, 1


def _find_group(parser, title):
    for group in parser._action_groups:
        if group.title == title:
            return group
    return parser.add_argument_group(title)


def add_config_arguments(parser: argparse.ArgumentParser, config_cls=EntPrunerConfig, fields=None, aliases=None,
                         group_title: str | None = "pruning"):
    """Add one flag ``--<field>`` per field of ``config_cls`` (``fields``: only these, default all) to ``parser``,
    in the group ``group_title`` (reused when the parser has it; None: the parser itself). Type, choices and help
    come from the fields; a bool field defaulting to False is a ``store_true`` flag, one defaulting to True a
    ``store_false`` flag named by its metadata's ``negative_flag`` (default ``--no_<field>``); a tuple takes its
    values (``nargs``). Every flag defaults to the field's default (None where ``__post_init__`` fills it in), so
    `config_from_args` gives the dataclass's config. The targets (and ``fine_tune_only``) are mutually exclusive.
    ``aliases``: {field: [extra option strings]}, e.g. ``{"ranking": ["--method"]}``. Returns the group."""
    all_fields = {f.name: f for f in dataclasses.fields(config_cls)}
    names = list(all_fields) if fields is None else list(fields)
    unknown = [name for name in [*names, *(aliases or {})] if name not in all_fields]
    if unknown:
        raise ValueError(f"{unknown} are not fields of {config_cls.__name__}.")
    names = [name for name in all_fields if name in names]  # the dataclass's order
    aliases = aliases or {}
    hints = typing.get_type_hints(config_cls)
    group = parser if group_title is None else _find_group(parser, group_title)
    exclusive = [name for name in (*TARGET_FIELDS, "fine_tune_only") if name in names]
    target_group = group.add_mutually_exclusive_group() if len(exclusive) > 1 else group
    for name in names:
        f = all_fields[name]
        metadata = dict(f.metadata)
        kwargs = {"dest": name, "default": f.default, "help": metadata.get("help")}
        base, count = _flag_type(hints[name])
        if base is bool:
            if f.default:
                option = metadata.get("negative_flag", f"--no_{name}")
                kwargs.update(action="store_false")
            else:
                option = f"--{name}"
                kwargs.update(action="store_true")
        else:
            option = f"--{name}"
            kwargs["type"] = base
            if count > 1:
                kwargs["nargs"] = count
            for key in ("choices", "metavar"):
                if key in metadata:
                    kwargs[key] = metadata[key]
        (target_group if name in exclusive else group).add_argument(option, *aliases.get(name, ()), **kwargs)
    return group


WRITTEN_BACK = ("target_prune_ratio", "ranking_seed", *LEARNED_FIELDS)


def config_from_args(args: argparse.Namespace, config_cls=EntPrunerConfig, error=None):
    """``config_cls`` from the namespace's attributes named like its fields (the others keep their defaults). The
    values ``__post_init__`` resolves (``target_prune_ratio``, ``ranking_seed``, ``learned_*``) are written back into
    ``args`` where it has them, so a run records what it used. A bad value: ``error(message)`` (e.g.
    ``parser.error``) with each field name in backticks rewritten to its flag (`seed` -> --seed); without ``error``
    the `ValueError` (field names as they are) propagates."""
    names = [f.name for f in dataclasses.fields(config_cls)]
    try:
        config = config_cls(**{name: getattr(args, name) for name in names if hasattr(args, name)})
    except ValueError as exception:
        if error is None:
            raise
        message = flag_message(str(exception), names)
        error(message)
        raise ValueError(message) from None  # an `error` that returns
    for name in WRITTEN_BACK:
        if name in names and hasattr(args, name):
            setattr(args, name, getattr(config, name))
    return config


def flag_message(message: str, names) -> str:
    """``message`` with each of the field ``names`` in backticks rewritten to its flag: "`seed` must ..." ->
    "--seed must ..."."""
    names = set(names)
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: f"--{m.group(1)}" if m.group(1) in names else m.group(0),
                  message)


_RULES = {">= 1": lambda v: v >= 1, ">= 0": lambda v: v >= 0, "> 0": lambda v: v > 0,
          "in [0, 1)": lambda v: 0 <= v < 1}


def checked(kind, rule: str, meaning: str = ""):
    """An argparse ``type`` for a number flag: converts with ``kind`` and refuses a value that breaks ``rule`` (">= 1",
    ">= 0", "> 0" or "in [0, 1)"; nan breaks every rule), so the check sits beside the flag and argparse names it:
    ``argument --train_batch_size: must be >= 1, got 0``. ``meaning`` explains a special value, e.g. " (0: never)"."""
    holds = _RULES[rule]

    def convert(text: str):
        value = kind(text)  # a ValueError here is argparse's "invalid int value: '2.5'"
        if not holds(value):
            verb = "lie" if rule.startswith("in") else "be"
            raise argparse.ArgumentTypeError(f"must {verb} {rule}{meaning}, got {text}")
        return value

    convert.__name__ = kind.__name__
    return convert
