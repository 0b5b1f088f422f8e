"""`PruningReport`: the one schema of ``entprune_report.json``.

Three writers fill it and one reader reads it: `EntPruner.report` (how the model was pruned: every stage's scores,
candidates, proxy values and choice, and the config), a training script (the run: source, data, training settings,
timings, resumes), `save_pruned_pipeline` (what the saved model is: kept blocks, parameter counts), and the model
card (`hub.write_model_card`) reads the result. Entries outside the schema are kept under their own keys (``extra``),
so a caller can record more without changing it.
"""

import dataclasses
from dataclasses import dataclass, field


@dataclass
class PruningReport:
    """What a pruned pipeline folder records about itself (``entprune_report.json``). Every field is optional; the
    JSON holds the ones that are set.

    Args:
        original_num_layers, num_layers, kept_block_indices, pruned_block_indices (`int` / `list[int]`):
            the depth before and after, by original block index (written by `save_pruned_pipeline`).
        transformer_parameters, transformer_parameters_one_embedder (`int`): parameters as saved (every block has
            its own copy of the conditioning embedder) and as the original DiT counts them (one embedder).
        entprune_version, model_type, pipeline (`str`): who wrote it and how to load it (``dit``/``sit``,
            ``DiTPipeline``/``SiTPipeline``).
        pruning_mode, ranking (`str`), pruned_by (`dict`), stages (`list[dict]`), pruning_stage_seconds
            (`list[float]`), pruning_stage_breakdown (`list[dict]`: each stage's ``ranking``, ``proxies`` and
            ``surgery`` seconds), pruning_config (`dict`): how blocks were chosen (written by `EntPruner.report`;
            ``stages`` are `controller.StageDecision.to_dict` entries, ``pruning_config`` `EntPrunerConfig.to_dict`).
        source, dataset (`str`), training, class_mapping, skipped_bad_images, run_identity, distillation,
        sampling_speed (`dict`), train_step_seconds_by_stage (`list[dict]`): the training run (a script).
        extra (`dict`): anything else, written as top-level keys.
    """

    entprune_version: str | None = None
    model_type: str | None = None
    pipeline: str | None = None
    original_num_layers: int | None = None
    num_layers: int | None = None
    kept_block_indices: list[int] | None = None
    pruned_block_indices: list[int] | None = None
    transformer_parameters: int | None = None
    transformer_parameters_one_embedder: int | None = None
    source: str | None = None
    dataset: str | None = None
    pruning_mode: str | None = None
    ranking: str | None = None
    pruned_by: dict | None = None
    stages: list[dict] | None = None
    pruning_stage_seconds: list[float] | None = None
    pruning_stage_breakdown: list[dict] | None = None
    pruning_config: dict | None = None
    training: dict | None = None
    train_step_seconds_by_stage: list[dict] | None = None
    class_mapping: dict | None = None
    skipped_bad_images: dict | None = None
    run_identity: dict | None = None
    distillation: dict | None = None
    sampling_speed: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "PruningReport":
        """The report of a parsed ``entprune_report.json`` (unknown keys go to ``extra``)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in names},
                   extra={k: v for k, v in data.items() if k not in names})

    def to_dict(self) -> dict:
        """The JSON object: the fields that are set, in schema order, then ``extra``."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**{k: v for k, v in values.items() if v is not None}, **self.extra}

    def merged(self, other: "PruningReport | dict | None") -> "PruningReport":
        """A copy with ``other``'s set entries on top (``other`` wins where both have one)."""
        if other is None:
            return dataclasses.replace(self, extra=dict(self.extra))
        other = other if isinstance(other, PruningReport) else PruningReport.from_dict(other)
        return PruningReport.from_dict({**self.to_dict(), **other.to_dict()})
