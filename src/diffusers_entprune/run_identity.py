"""What makes a training run the run it is: stored in every checkpoint, compared when the run is resumed.

A resumed run must be the run that its report describes. So every checkpoint records the run's settings (every
script argument that can change the weights or the pruning decisions), a fingerprint of the source weights and a
fingerprint of the training data; resuming compares them with the new command line and refuses any difference,
listing each one (old -> new). Settings that do not change the result (logging, checkpointing, validation, where the
model or data now lie, ...) may change; `--max_train_steps` may grow when nothing else depends on it; a new
`--learning_rate` or `--max_grad_norm` applies from the resumed step on (the way out of a divergence). Those changes
are recorded in the checkpoints that follow and in the report.
"""

import hashlib
import json
import logging
import os

logger = logging.getLogger(__name__)

# May differ on resume: they change where things are written, what is logged or sampled for viewing, how fast it
# runs, or where the inputs lie (the inputs themselves are compared through their fingerprints).
MAY_CHANGE_ON_RESUME = frozenset({
    "report_to", "logging_dir", "validation_steps",
    "validation_class_labels", "checkpointing_steps", "checkpoints_total_limit", "dataloader_num_workers", "cache_dir",
    "push_to_hub", "hub_model_id", "hub_private", "save_fp16", "speed_batch_size", "speed_repeats", "guidance_scale",
    "num_inference_steps", "sampler", "gradient_checkpointing", "allow_tf32", "pretrained_model_name_or_path",
    "revision", "source", "source_name", "dataset_name", "train_data_dir",
    "class_mapping_file",  # its content is compared: `class_mapping`, the mapping it gave
    "teacher_model_name_or_path",  # its weights are compared: `teacher_weights_sha256` (--distill_* may not change)
    # per process: the global batch (`global_batch_size`) is what the run is made of, and it is compared
    "train_batch_size",
    # the same latents from the cache as from the images (latent_cache.py); where the cache lies
    "cache_latents", "latent_cache_dir",
})
# May only grow, and only while every other setting, the resolved `pruning_steps` and the learning-rate schedule
# included, stays the same (a schedule that decays over max_train_steps is a result setting, see `_schedule_fixed`).
MAY_GROW_ON_RESUME = frozenset({"max_train_steps"})
SCHEDULES_INDEPENDENT_OF_LENGTH = ("constant", "constant_with_warmup")
# May differ on resume although they change the result from the resumed step on: the way out of a divergence
# (resume from the last good checkpoint with a lower rate or tighter clipping). The new values really apply (the
# script resets the restored schedule's base rate) and the report lists them with the step they took effect.
APPLIED_FROM_RESUME = frozenset({"learning_rate", "max_grad_norm"})
# Settings added after checkpoints began to record their run, with the value that reproduces what runs did before
# them: a record without the setting is the same run exactly when the setting has that value now.
INTRODUCED_SETTINGS = {"ced_estimator": "entropy", "ced_signal": "prediction",
                       # EntPrunerConfig's CED options that only `entprune score` had before
                       "ced_per_class": True, "ced_signed": False, "ced_timestep_range": [0.0, 1.0],
                       "ced_num_timestep_buckets": 4}
# Not part of the record: how this invocation found the run, not what the run is.
NOT_RECORDED = frozenset({"output_dir", "overwrite_output_dir", "resume_from_checkpoint"})


class RunMismatchError(ValueError):
    """A checkpoint resumed with settings, source weights or data other than those of its run."""


def fingerprint_weights(model) -> str:
    """SHA-256 over the config and every tensor (name, dtype, shape, bytes) of ``model``'s state dict.

    Two checkpoints of one architecture with different weights differ here, which a config or shape check cannot
    see. About 1-2 s per GB of weights on a CPU core.
    """
    import torch

    digest = hashlib.sha256(json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")},
                                       sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update((tensor.view(torch.uint8) if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes())
    return digest.hexdigest()


def _value_bytes(value) -> bytes:
    if isinstance(value, dict):  # an image column read with `datasets.Image(decode=False)`: {"bytes", "path"}
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        path = value.get("path")
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                return f.read()
        return repr(path).encode()
    if hasattr(value, "tobytes"):  # a decoded PIL image or an array
        return f"{getattr(value, 'mode', '')}{getattr(value, 'size', '')}".encode() + value.tobytes()
    return repr(value).encode()


def fingerprint_dataset(dataset, name: str | None, split: str, config_name: str | None, image_column: str,
                        label_column: str, num_rows: int = 64) -> dict:
    """Identify a training dataset by its content: split, number of rows (None when streamed) and the SHA-256 of
    its first ``num_rows`` rows (image bytes and labels, read without decoding). ``name`` is kept for the record."""
    from datasets import Image, IterableDataset

    rows = dataset.select_columns([image_column, label_column])
    if isinstance(rows.features.get(image_column) if rows.features else None, Image):
        rows = rows.cast_column(image_column, Image(decode=False))  # raw file bytes: cheap, and never fails to decode
    head = rows.take(num_rows) if isinstance(rows, IterableDataset) else rows.select(range(min(num_rows, len(rows))))
    digest = hashlib.sha256()
    for row in head:
        digest.update(_value_bytes(row[image_column]))
        digest.update(repr(row[label_column]).encode())
    return {"name": name, "split": split, "config": config_name,
            "num_rows": None if isinstance(dataset, IterableDataset) else len(dataset),
            "first_rows_sha256": digest.hexdigest()}


def _plain(value):
    return json.loads(json.dumps(value, default=str))  # the form it takes in a checkpoint's JSON


def run_identity(settings: dict, source_fingerprint: str, dataset_fingerprint: dict) -> dict:
    """The record a checkpoint keeps: ``settings`` (plain values only; secrets and objects are left out), the
    source weights' fingerprint and the dataset's."""
    def is_plain(value):
        if value is None or isinstance(value, (bool, int, float, str)):
            return True
        if isinstance(value, (list, tuple)):
            return all(is_plain(x) for x in value)
        return isinstance(value, dict) and all(isinstance(k, (str, int)) and is_plain(v) for k, v in value.items())

    plain = {k: v for k, v in settings.items() if k not in NOT_RECORDED and is_plain(v)}
    return _plain({"settings": plain, "source_weights_sha256": source_fingerprint, "dataset": dataset_fingerprint})


def _schedule_fixed(settings: dict) -> bool:
    return settings.get("lr_scheduler") in SCHEDULES_INDEPENDENT_OF_LENGTH


def compare_run_identity(saved: dict, current: dict, checkpoint: str) -> dict:
    """Refuse to resume ``checkpoint`` (its record: ``saved``) under ``current`` when anything that changes the
    result differs; return the allowed changes, {setting: [old, new]}.

    Raises `RunMismatchError` listing every difference as ``name: old -> new``, with the way out.
    """
    old, new = saved.get("settings", {}), current["settings"]
    refused, allowed = [], {}
    for name in sorted(set(old) | set(new)):
        before, after = old.get(name, INTRODUCED_SETTINGS.get(name)), new.get(name)
        if before == after:
            continue
        if name in MAY_CHANGE_ON_RESUME or name in APPLIED_FROM_RESUME:
            allowed[name] = [before, after]
        elif name in MAY_GROW_ON_RESUME and isinstance(before, int) and isinstance(after, int) and after > before:
            if _schedule_fixed(new):
                allowed[name] = [before, after]
            else:
                refused.append(f"--{name}: {before} -> {after} (the --lr_scheduler {new.get('lr_scheduler')!r} "
                               "decays over --max_train_steps; only a constant schedule lets a run grow)")
        else:
            refused.append(f"--{name}: {before!r} -> {after!r}")
    if saved.get("source_weights_sha256") != current["source_weights_sha256"]:
        old_sha, new_sha = str(saved.get("source_weights_sha256"))[:12], current["source_weights_sha256"][:12]
        refused.append(f"source model weights (--pretrained_model_name_or_path): sha256 {old_sha}... -> {new_sha}...")
    if saved.get("teacher_weights_sha256") != current.get("teacher_weights_sha256"):  # distillation's teacher
        old_sha, new_sha = (str(x)[:12] if x else "none" for x in (saved.get("teacher_weights_sha256"),
                                                                    current.get("teacher_weights_sha256")))
        refused.append(f"distillation teacher weights (--teacher_model_name_or_path): sha256 {old_sha}... -> "
                       f"{new_sha}...")
    old_data, new_data = saved.get("dataset", {}), current["dataset"]
    for key in ("split", "config", "num_rows", "first_rows_sha256"):
        if old_data.get(key) != new_data.get(key):
            refused.append(f"dataset {key}: {old_data.get(key)!r} -> {new_data.get(key)!r} (dataset "
                           f"{old_data.get('name')!r} -> {new_data.get('name')!r})")
    if refused:
        lines = "\n  ".join(refused)
        raise RunMismatchError(
            f"`--resume_from_checkpoint`: {checkpoint!r} belongs to a run with other settings, weights or data than "
            f"this command's:\n  {lines}\nA resumed run must be the run its report describes. Resume with the "
            "checkpoint's settings (the old values above), or start a new run in another `--output_dir`.")
    return allowed


def resume_run_identity(identity: dict, saved: dict, checkpoint: str) -> dict:
    """Resume ``identity`` (this command's record) from a checkpoint's saved state: refuse what changes the result
    (`compare_run_identity`), carry over the earlier resumes and add this one to ``identity["resumes"]``. Returns the
    allowed changes, {setting: [old, new]}. A checkpoint older than these records is accepted with a warning."""
    if "run_identity" not in saved:
        logger.warning(f"{checkpoint!r} was written before checkpoints recorded their run's settings: they cannot be "
                       "compared with this command's. Make sure they are the same.")
        return {}
    changed = compare_run_identity(saved["run_identity"], identity, checkpoint)
    identity["resumes"] = saved["run_identity"].get("resumes", []) + [
        {"step": saved["global_step"], "checkpoint": os.path.abspath(checkpoint), "changed": changed}]
    for name, (old, new) in changed.items():
        logger.info(f"Resuming with --{name} changed: {old!r} -> {new!r}")
    return changed
