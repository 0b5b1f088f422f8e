"""Model cards and Hub uploads for pruned pipeline folders."""

import os

from huggingface_hub import HfApi, ModelCard, ModelCardData

CARD_TEMPLATE = """---
{card_data}
---

# {title}

{intro}

```python
import torch
{import_line}

pipe = {pipeline}.from_pretrained("{repo_id}")
images = pipe(class_labels=[0], num_inference_steps=50, guidance_scale=4.0,
              generator=torch.manual_seed(0)).images
```

## Pruning

| | |
|---|---|
| base model | {base_model} |
| blocks | {num_layers} of {original_num_layers} kept |
| kept blocks (original indices) | {kept} |
| removed blocks | {pruned} |
| transformer parameters (as saved / with one shared embedder) | {params} / {params_one} |
| how the blocks were chosen | {pruned_by} |

{training}
## Licence

{licence}

`entprune_report.json` in this repository holds the full record.
"""

# Licences of well-known bases; any other base's own licence applies and is named as such.
KNOWN_LICENCES = {"facebook/DiT-": "cc-by-nc-4.0"}


def _licence(base_model: str | None) -> tuple[str | None, str]:
    for prefix, licence in KNOWN_LICENCES.items():
        if base_model and base_model.startswith(prefix):
            return licence, (f"A derivative of `{base_model}`, released under its licence ({licence}: "
                             "non-commercial use only).")
    if base_model and base_model.startswith("embedded:"):
        return "apache-2.0", "The embedded tiny base of diffusers-entprune (Apache-2.0)."
    return None, (f"A derivative of `{base_model or 'an unrecorded base model'}`: the base model's licence applies; "
                  "check it before use or redistribution.")


def _training_section(report: dict) -> str:
    """Stage decisions and measured speed, when the folder comes from `examples/prune_dit.py` (or prune_sit.py)."""
    lines = []
    stages = report.get("stages")
    if stages:
        lines += ["## How it was pruned", "",
                  f"Fine-tuned for {report.get('training', {}).get('max_train_steps', '?')} steps on "
                  f"`{report.get('dataset', '?')}` while pruning in {len(stages)} stages "
                  f"({report.get('pruning_mode', '?')} schedule):", "",
                  "| stage | step | blocks dropped (original indices) | blocks after "
                  "| candidates (m: NTK kappa / ZiCo) |",
                  "|---|---|---|---|---|"]
        for stage in stages:
            scored = [c for c in stage["candidates"] if c.get("combined") is not None]
            candidates = ", ".join(f"{c['num_blocks']}: {c['ntk_condition_number']:.3g} / {c['zico']:.4g}"
                                   for c in scored) or "no choice"
            lines.append(f"| {stage['stage']} | {stage['step']} | {stage['pruned_blocks'] or 'none'} | "
                         f"{stage['num_blocks_after']} | {candidates} |")
        lines.append("")
    speed = report.get("sampling_speed")
    if speed:
        lines += ["## Measured speed", "",
                  f"Sampling {speed['batch_size']} images with {speed['num_inference_steps']} steps (guidance "
                  f"{speed['guidance_scale']}) on {speed['device']}: {speed['original_seconds']:.3g} s for the "
                  f"original, {speed['pruned_seconds']:.3g} s pruned, a {speed['speedup']:.2f}x speedup (the FLOPs "
                  f"ratio of one transformer forward, its limit, is {speed['flops_ratio']:.2f}x).", ""]
    return "\n".join(lines)


INTROS = {
    "DiTPipeline": ("A depth-pruned [DiT](https://huggingface.co/papers/2212.09748) made with diffusers-entprune "
                    "(EntPruner, [arXiv 2511.21122](https://arxiv.org/abs/2511.21122)).\nIt is a plain diffusers "
                    "`DiTPipeline`: nothing beyond diffusers is needed to use it.",
                    "from diffusers import DiTPipeline"),
    "SiTPipeline": ("A depth-pruned [SiT](https://huggingface.co/papers/2401.08740) made with diffusers-entprune "
                    "(EntPruner, [arXiv 2511.21122](https://arxiv.org/abs/2511.21122)).\nIts transformer is a plain "
                    "diffusers `DiTTransformer2DModel` trained as a flow (velocity prediction, t = 0 noise, t = 1 "
                    "data); diffusers has no SiT sampler, so sampling uses `SiTPipeline` from diffusers-entprune "
                    "(`sampler=\"euler\"`, `\"heun\"`, `\"dopri5\"` or `\"sde\"`).",
                    "from diffusers_entprune import SiTPipeline"),
}


def write_model_card(folder: str, report, repo_id: str | None = None, title: str | None = None) -> str:
    """Write ``README.md`` (a model card) into a pruned pipeline folder from its `PruningReport` (or the dict of
    its ``entprune_report.json``). ``title`` defaults to ``repo_id``, else the folder's name."""
    from .report import PruningReport

    report = (report if isinstance(report, PruningReport) else PruningReport.from_dict(report)).to_dict()
    base_model = report.get("source")
    licence, licence_text = _licence(base_model)
    pipeline = report.get("pipeline", "DiTPipeline")
    intro, import_line = INTROS[pipeline]
    data = ModelCardData(library_name="diffusers", license=licence,
                         tags=["diffusers", pipeline, "entprune", "pruned"],
                         base_model=base_model if base_model and not base_model.startswith(("embedded:", "/"))
                         else None)
    card = ModelCard(CARD_TEMPLATE.format(
        card_data=data.to_yaml(), intro=intro, import_line=import_line, pipeline=pipeline,
        title=title or repo_id or os.path.basename(os.path.abspath(folder)),
        repo_id=repo_id or "path/to/this/folder", base_model=base_model or "unknown",
        num_layers=report["num_layers"], original_num_layers=report["original_num_layers"],
        kept=report["kept_block_indices"], pruned=report["pruned_block_indices"] or "none",
        params=f"{report['transformer_parameters'] / 1e6:.2f}M",
        params_one=f"{report['transformer_parameters_one_embedder'] / 1e6:.2f}M",
        pruned_by=_describe(report.get("pruned_by")), training=_training_section(report), licence=licence_text))
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path


def _describe(pruned_by) -> str:
    if not pruned_by:
        return "not recorded"
    if isinstance(pruned_by, dict):
        return ", ".join(f"{key}: {value}" for key, value in pruned_by.items())
    return str(pruned_by)


class Secret:
    """A value (a Hub token) that does not print: its repr and str hide it, and it is not a ``str``, so code that
    logs or records plain settings (e.g. a tracker's run config built from ``vars(args)``) leaves it out. `reveal`
    gives it back to the one call that needs it."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


def reveal(value):
    """The value inside a `Secret`; anything else is returned as it is."""
    return value._value if isinstance(value, Secret) else value


def push_pruned_pipeline(folder: str, repo_id: str, token: str | Secret | None = None, private: bool = False,
                         commit_message: str = "Upload depth-pruned DiT pipeline (diffusers-entprune)",
                         ignore_patterns: list[str] | None = None) -> str:
    """Create ``repo_id`` if needed and upload the folder (less ``ignore_patterns``, e.g. training checkpoints).
    The token is passed to huggingface_hub only, never logged; without one, the login of `hf auth login` is
    used."""
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ValueError(f"`folder`={folder!r} is not a pipeline folder (no model_index.json).")
    api = HfApi(token=reveal(token))
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    from .output_dir import LOCK_NAME, MARKER_NAME  # bookkeeping of this machine's folder, not of the model

    commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=commit_message,
                               ignore_patterns=list(ignore_patterns or []) + [MARKER_NAME, LOCK_NAME])
    return getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}"


def check_can_push(argument: str = "--push_to_hub") -> None:
    """Fail before any work when the Hub cannot be reached by configuration (offline mode)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ValueError(f"`{argument}` needs the Hub, but HF_HUB_OFFLINE is set; unset it or drop `{argument}`.")
