"""Write a pruned model as a plain diffusers `DiTPipeline` (or a `SiTPipeline`) folder, safely.

The folder holds only diffusers classes (`DiTTransformer2DModel`, `AutoencoderKL`, the scheduler), so
``DiTPipeline.from_pretrained(folder)`` works where this package is not installed (a SiT folder needs this
package's `SiTPipeline` to sample, but its transformer loads with diffusers alone). Beside ``model_index.json``,
``entprune_report.json`` records which original blocks were kept, and ``README.md`` is a model card. The folder
is written under a temporary name and renamed into place, so an interrupted save never leaves a half-written
folder under ``output_dir``.
"""

import copy
import json
import os

import torch
from diffusers import DiTPipeline, DiTTransformer2DModel

from . import __version__
from .hub import write_model_card
from .model_types import pipeline_class
from .models.entpruned_transformer_2d import EntPrunedTransformer2DModel
from .output_dir import check_output_dir, staged_output_dir  # noqa: F401  (the output-folder rules live there)
from .report import PruningReport

REPORT_NAME = "entprune_report.json"


def load_id2label(pretrained_model_name_or_path, **kwargs) -> dict[int, str] | None:
    """The pipeline's class names from its ``model_index.json`` (`DiTPipeline` does not keep them in its config)."""
    id2label = DiTPipeline.load_config(pretrained_model_name_or_path, **kwargs).get("id2label")
    return {int(k): v for k, v in id2label.items()} if id2label else None


def pruning_report(transformer, extra: "PruningReport | dict | None" = None) -> PruningReport:
    """What was kept and what it costs (the saved model's part of `PruningReport`), with ``extra`` (e.g.
    `EntPruner.report`, a script's run entries) on top."""
    if isinstance(transformer, EntPrunedTransformer2DModel):
        kept, original = list(transformer.kept_block_indices), transformer.original_num_layers
    else:
        kept = list(transformer.config.get("_entprune_kept_block_indices") or range(transformer.config.num_layers))
        original = int(transformer.config.get("_entprune_original_num_layers") or transformer.config.num_layers)
    saved = sum(v.numel() for v in transformer.state_dict().values())
    report = PruningReport(
        entprune_version=__version__, original_num_layers=original, num_layers=len(kept), kept_block_indices=kept,
        pruned_block_indices=[i for i in range(original) if i not in set(kept)],
        # as saved (every block carries an embedder copy), and as the original DiT counts (one embedder)
        transformer_parameters=saved, transformer_parameters_one_embedder=saved - (len(kept) - 1) * sum(
            p.numel() for p in transformer.transformer_blocks[0].norm1.emb.parameters()))
    return report.merged(extra)


def save_pruned_pipeline(
    output_dir: str,
    transformer: EntPrunedTransformer2DModel | DiTTransformer2DModel,
    vae,
    scheduler,
    id2label: dict | None = None,
    report: "PruningReport | dict | None" = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    repo_id: str | None = None,
    model_type: str = "dit",
    title: str | None = None,
) -> str:
    """Save ``transformer`` (pruned or not) with ``vae`` and ``scheduler`` as a `DiTPipeline` folder (``model_type``
    ``"dit"``) or a `SiTPipeline` folder (``"sit"``).

    Args:
        output_dir: destination folder; must be empty or absent unless ``overwrite``, which replaces only an earlier
            pipeline output there (never foreign files, never the folders the models were loaded from).
        id2label: class names, saved in ``model_index.json`` so that ``pipe.get_label_ids([...])`` works.
        report: what ``entprune_report.json`` records beside the saved model's part: a `PruningReport` (e.g.
            `EntPruner.report()`) or a dict of its fields (scores, decisions, training settings).
        dtype: optionally store the weights in this dtype (e.g. ``torch.float16`` to halve the size); the models
            passed in are never cast.
        repo_id: the Hub repository the folder is meant for, named in its model card (``README.md``).
        title: the model card's title (default: ``repo_id``, else the name of ``output_dir``, not of the temporary
            folder it is written in).

    Returns the output folder.
    """
    # the folders the models were loaded from are inputs: never written into, never replaced
    check_output_dir(output_dir, overwrite, inputs={
        "transformer (loaded from)": getattr(getattr(transformer, "config", None), "_name_or_path", None),
        "vae (loaded from)": getattr(getattr(vae, "config", None), "_name_or_path", None)})
    pipeline_cls = pipeline_class(model_type)
    if isinstance(transformer, EntPrunedTransformer2DModel):
        plain = transformer.to_dit_transformer(share_weights=True)
    elif isinstance(transformer, DiTTransformer2DModel):
        plain = transformer
    else:
        raise TypeError(f"`transformer` must be a DiT transformer, got {type(transformer).__name__}.")
    if dtype is not None:
        plain, vae = _copy_to_dtype(plain, dtype), _copy_to_dtype(vae, dtype)

    with staged_output_dir(output_dir, kind="pipeline", command="save_pruned_pipeline") as tmp:
        pipe = pipeline_cls(transformer=plain, vae=vae, scheduler=scheduler, id2label=id2label)
        if id2label is not None:
            pipe.register_to_config(id2label={int(k): v for k, v in id2label.items()})
        pipe.save_pretrained(tmp)
        _verify_saved_transformer(tmp, plain.config.num_layers)
        full_report = pruning_report(transformer, PruningReport(model_type=model_type,
                                                                pipeline=pipeline_cls.__name__).merged(report))
        with open(os.path.join(tmp, REPORT_NAME), "w") as f:
            json.dump(full_report.to_dict(), f, indent=2)
        write_model_card(tmp, full_report, repo_id=repo_id,
                         title=title or repo_id or os.path.basename(os.path.abspath(output_dir)))
    return output_dir


def _copy_to_dtype(module, dtype):
    return copy.deepcopy(module).to(dtype) if any(p.dtype != dtype for p in module.parameters()) else module


def _verify_saved_transformer(folder: str, num_layers: int) -> None:
    """Read back the block indices in the saved weights: they must match the config's ``num_layers``."""
    from safetensors import safe_open

    weights_dir = os.path.join(folder, "transformer")
    blocks = set()
    for name in os.listdir(weights_dir):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(weights_dir, name), framework="pt") as f:
                blocks |= {int(k.split(".")[1]) for k in f.keys() if k.startswith("transformer_blocks.")}
    if blocks != set(range(num_layers)):
        raise RuntimeError(f"Saved transformer holds blocks {sorted(blocks)} but its config says {num_layers}.")
