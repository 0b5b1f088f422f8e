"""Training checkpoints that can be trusted after a crash: a manifest of every file, checked before resuming.

A checkpoint folder is written under a temporary name and renamed into place when complete, so a crash mid-save
leaves no ``checkpoint-N``. That does not protect against what happens later (a disk that fills, a copy cut short,
bit rot), so the state file also lists every file's size and SHA-256; `verify_checkpoint` checks them, and
`latest_intact_checkpoint` falls back to the newest checkpoint that passes.

A checkpoint is only written when the training state is finite (the script checks it first), and its state file
records that (`FINITE_KEY`), so a divergence error can name a checkpoint that is really good (`last_good_checkpoint`).
A write that fails because the disk or quota is full is reported as such (`is_disk_full`, `disk_full_message`).

`RunCheckpoints` is all of this for one training run: it saves, finds, verifies and restores the ``checkpoint-N``
folders of one output folder, and knows nothing of what the run trains (its caller passes a state dict).
"""

import errno
import hashlib
import json
import logging
import os
import shutil

from .output_dir import replace_folder
from .run_identity import RunMismatchError

logger = logging.getLogger(__name__)

STATE_NAME = "entprune_state.json"  # pruning state and the file manifest, written last into every checkpoint
STAGING_PREFIXES = (".checkpoint-", ".export-")  # what an interrupted save or export leaves in output_dir
FINITE_KEY = "checked_finite"  # in the state file: weights, optimizer state and EMA were all finite when saved
EMA_WEIGHTS_NAME = "ema.safetensors"  # in every checkpoint of a run with an EMA
RESERVED_KEYS = ("global_step", "ema", FINITE_KEY, "files")  # written by `RunCheckpoints.save` itself
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# what torch's zip writer (torch.save) and safetensors raise instead of an OSError when a write fails
DISK_FULL_MESSAGES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed", "No space left on device",
                      "Disk quota exceeded", "StorageFull", "QuotaExceeded")


class CorruptCheckpointError(ValueError):
    """A checkpoint folder whose files do not match its manifest (truncated, altered or missing)."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written because the disk (or the quota) is full."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_manifest(folder: str) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file in ``folder`` except the state file itself."""
    manifest = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != STATE_NAME:
                manifest[relative] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
    return dict(sorted(manifest.items()))


def write_state(folder: str, state: dict) -> None:
    """Write ``state`` plus the manifest of ``folder`` as its state file (through a temporary name)."""
    manifest = file_manifest(folder)
    tmp = os.path.join(folder, STATE_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump({**state, "files": manifest}, f, indent=2)
    os.replace(tmp, os.path.join(folder, STATE_NAME))


def read_state(folder: str, verify: bool = True) -> dict:
    """The state of a verified checkpoint; `CorruptCheckpointError` naming the first bad file otherwise
    (``verify=False``: read the state file only, for a checkpoint verified just before)."""
    path = os.path.join(folder, STATE_NAME)
    if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{folder!r} has no {STATE_NAME}: not a complete checkpoint of this script.")
    try:
        with open(path) as f:
            state = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CorruptCheckpointError(f"{path!r} is not valid JSON ({error}); the checkpoint is damaged.") from None
    files = state.get("files")
    if not verify:
        return state
    if files is None:  # written before manifests existed: nothing to check against
        logger.warning(f"{folder!r} has no file manifest; resuming from it unverified.")
        return state
    for relative, expected in files.items():
        file_path = os.path.join(folder, relative)
        if not os.path.isfile(file_path):
            raise CorruptCheckpointError(f"{file_path!r} is missing from the checkpoint.")
        size = os.path.getsize(file_path)
        if size != expected["bytes"]:
            raise CorruptCheckpointError(f"{file_path!r} has {size} bytes, the checkpoint recorded "
                                         f"{expected['bytes']}: it was truncated or replaced.")
        if _sha256(file_path) != expected["sha256"]:
            raise CorruptCheckpointError(f"{file_path!r} does not match its recorded SHA-256: it is corrupted.")
    return state


def verify_checkpoint(folder: str) -> None:
    read_state(folder)


def list_checkpoints(output_dir: str) -> list[str]:
    """``checkpoint-N`` folders in ``output_dir``, oldest first (intact or not: see `latest_intact_checkpoint`)."""
    if not os.path.isdir(output_dir):
        return []
    names = [d for d in os.listdir(output_dir)
             if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit() and
             os.path.isdir(os.path.join(output_dir, d))]
    return [os.path.join(output_dir, d) for d in sorted(names, key=lambda d: int(d.split("-")[1]))]


def latest_intact_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint in ``output_dir`` that passes `verify_checkpoint`; damaged newer ones are reported and
    skipped (left on disk for inspection). None when there are no checkpoints; an error when all are damaged."""
    found = list_checkpoints(output_dir)
    problems = []
    for folder in reversed(found):
        try:
            verify_checkpoint(folder)
        except CorruptCheckpointError as error:
            logger.warning(f"Skipping a damaged checkpoint: {error}")
            problems.append(str(error))
            continue
        return folder
    if problems:
        raise CorruptCheckpointError(
            f"Every checkpoint in {output_dir!r} is damaged ({'; '.join(problems)}). Start afresh with "
            "`--overwrite_output_dir`, or restore a checkpoint from a copy.")
    return None


def remove_stale_staging(output_dir: str) -> list[str]:
    """Remove what an interrupted checkpoint save or export left behind (never a finished checkpoint)."""
    if not os.path.isdir(output_dir):
        return []
    stale = [os.path.join(output_dir, d) for d in os.listdir(output_dir) if d.startswith(STAGING_PREFIXES)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    return stale


def last_good_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint whose state file records that its training state was checked finite when saved
    (checkpoints of older versions of the script were not checked, and may hold what diverged). Its files are not
    hashed here: this names a checkpoint in an error message; resuming verifies it."""
    for folder in reversed(list_checkpoints(output_dir)):
        try:
            if read_state(folder, verify=False).get(FINITE_KEY):
                return folder
        except CorruptCheckpointError:
            continue
    return None


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says that a write failed for lack of space or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in DISK_FULL_MESSAGES):
            return True
        error = error.__cause__ or error.__context__
    return False


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _gigabytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


def disk_full_message(staging: str, final: str, output_dir: str, total_limit: int | None) -> str:
    """What to tell the user when writing the checkpoint ``final`` through ``staging`` ran out of space (call it
    after removing ``staging``: the free space it reports is what is left)."""
    try:
        free = f"{_gigabytes(shutil.disk_usage(output_dir).free)} free now"
    except OSError:
        free = "free space unknown"
    return (f"Could not write {os.path.basename(final)}: the disk is probably full (or the quota used up) on the "
            f"filesystem mounted at {_mount_point(output_dir)}, which holds `--output_dir` {output_dir} ({free}). The "
            f"incomplete {os.path.basename(staging)} was removed and never renamed into place, so "
            "`--resume_from_checkpoint latest` will not use it; older checkpoints are untouched. Free some space "
            f"there, or keep fewer checkpoints with a lower `--checkpoints_total_limit` (now {total_limit}), then "
            "continue with the same arguments plus `--resume_from_checkpoint latest`.")


def is_checkpoint_of(path: str, output_dir: str) -> bool:
    """Whether ``path`` is a checkpoint folder directly inside ``output_dir`` (symlinks resolved): resuming from one
    continues that folder's run, in that folder."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(output_dir)


def check_run_output_dir(output_dir: str, resume_path: str | None, overwrite: bool, inputs: dict,
                         extra_names: tuple = (), argument: str = "--output_dir") -> bool:
    """A training run's output folder, checked before any heavy work (nothing is deleted here): it may not be,
    contain or lie inside an input, must be writable, and unless the run continues from one of its own checkpoints
    it must be empty or an earlier run's output with ``overwrite``. Returns whether the run continues this folder's
    own run (then files of the user's beside it are left alone).

    Args:
        inputs (`dict`): {flag: path} of everything the run reads; a checkpoint of another folder is added.
        extra_names (`tuple`, *optional*): entries besides checkpoints that an earlier run left (e.g. its logs).
    """
    from .output_dir import check_not_an_input, check_not_locked, check_output_dir, check_writable

    check_not_locked(output_dir, argument)  # a live run there: say so, whatever else is wrong
    if resume_path is not None and is_checkpoint_of(resume_path, output_dir):
        check_not_an_input(output_dir, inputs, argument)
        check_writable(output_dir, argument)
        return True
    if resume_path is not None:  # a checkpoint of another folder is an input like the others
        inputs = {**inputs, "--resume_from_checkpoint": resume_path}
    hint = "Continue that run with `--resume_from_checkpoint latest`. " if list_checkpoints(output_dir) else ""
    check_output_dir(output_dir, overwrite, argument, inputs=inputs, kind="training", extra_names=extra_names,
                     hint=hint)
    return False


def save_ema(ema, folder: str) -> dict:
    """EMA shadows as safetensors (by position, the model's parameter order); returns its scalar settings."""
    from safetensors.torch import save_file

    state = ema.state_dict()
    shadows = state.pop("shadow_params")
    save_file({f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(shadows)},
              os.path.join(folder, EMA_WEIGHTS_NAME))
    return state


def load_ema(ema, folder: str, settings: dict | None) -> None:
    """Restore what `save_ema` wrote (``settings``: the scalars kept in the checkpoint's state file)."""
    from safetensors.torch import load_file

    path = os.path.join(folder, EMA_WEIGHTS_NAME)
    if not os.path.isfile(path) or settings is None:
        raise ValueError(f"`--resume_from_checkpoint`: {folder!r} has no {EMA_WEIGHTS_NAME}, but `--use_ema` is set. "
                         "Resume without `--use_ema` (the EMA restarts from the weights) or from a checkpoint of a "
                         "run that used it.")
    shadows = load_file(path)
    ema.load_state_dict({**settings, "shadow_params": [shadows[f"shadow.{i}"] for i in range(len(shadows))]})


def write_or_disk_full(write) -> BaseException | None:
    """Run ``write``; return its error when the disk or quota is full (every other error propagates)."""
    try:
        write()
    except Exception as error:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        if not is_disk_full(error):
            raise
        return error
    return None


class RunCheckpoints:
    """The checkpoints of one training run: ``checkpoint-N`` folders in ``output_dir``, each written whole or not at
    all (staged as ``.checkpoint-N.tmp``, renamed into place by `replace_folder`), with a manifest of its files, and
    only from a finite training state.

    A checkpoint holds ``accelerator.save_state`` (model, optimizer, scheduler, RNG states of every process), the EMA
    shadows (``ema.safetensors``, never a pickle) and the state file (`STATE_NAME`): ``{"global_step", **state,
    "ema": <EMA settings or None>, FINITE_KEY: True, "files": <manifest>}``, where ``state`` is the caller's (JSON).
    This class knows nothing of what the run trains: the caller passes its state to `save` and reads it back from
    `read` / `restore` (an older checkpoint's state may use older keys; that is the caller's business).

    Save: ``checkpoints.save(step, state, model=model, optimizer=optimizer, ema=ema)`` on every process (it has
    collectives). Resume: ``path = RunCheckpoints.resolve(arg, output_dir)`` before anything heavy, ``state =
    checkpoints.read(path)`` to rebuild the model's shape, ``accelerator.prepare(...)``, then
    ``checkpoints.restore(path, ema)`` on every process.

    Args:
        output_dir (`str`): the run's folder.
        accelerator (`accelerate.Accelerator`): the run's accelerator (every method with collectives runs on every
            process).
        total_limit (`int`, *optional*, defaults to `None`): keep at most this many checkpoints (the oldest go, once
            the new one is complete); None keeps all.
        learning_rate (`float`, *optional*), max_grad_norm (`float`, *optional*): the run's settings, named in the
            divergence error as what to lower.
    """

    def __init__(self, output_dir: str, accelerator, total_limit: int | None = None,
                 learning_rate: float | None = None, max_grad_norm: float | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"`total_limit` must be >= 1 (or None), got {total_limit}.")
        self.output_dir, self.accelerator, self.total_limit = output_dir, accelerator, total_limit
        self.learning_rate, self.max_grad_norm = learning_rate, max_grad_norm

    # ------------------------------------------------------------------------------------------- finding

    @staticmethod
    def resolve(resume_from_checkpoint: str | None, output_dir: str) -> str | None:
        """The checkpoint to resume from, verified against its manifest: None for None; with ``"latest"`` the newest
        intact one in ``output_dir`` (None when there is none); else the path given, which must be a checkpoint."""
        if resume_from_checkpoint is None:
            return None
        if resume_from_checkpoint == "latest":
            return latest_intact_checkpoint(output_dir)
        path = resume_from_checkpoint
        if not os.path.isfile(os.path.join(path, STATE_NAME)):
            raise ValueError(f"`--resume_from_checkpoint`={path!r} is not a checkpoint of this script (no {STATE_NAME} "
                             f"in it). Pass a `checkpoint-N` folder from a previous run's output_dir, or 'latest'.")
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as error:
            raise CorruptCheckpointError(f"`--resume_from_checkpoint`: {error} Pass an older checkpoint, or 'latest' "
                                         "to take the newest intact one.") from None
        return path

    def read(self, path: str) -> dict:
        """The state file of ``path`` as `save` wrote it (not verified again: `resolve` did)."""
        return read_state(path, verify=False)

    # ------------------------------------------------------------------------------------------- saving

    def save(self, global_step: int, state: dict, *, model, optimizer, ema=None) -> str:
        """Write ``checkpoint-<global_step>`` on every process; returns its path.

        Refuses a non-finite training state first (`check_finite`). Then ``accelerator.save_state`` into
        ``.checkpoint-N.tmp`` (every process writes its RNG state), the EMA and the state file with the manifest
        (main process, last), the rename into place, and only then ``total_limit`` (never removing the new one). A
        full disk on any process removes the staging folder and raises `CheckpointWriteError` on every process.
        """
        reserved = [k for k in RESERVED_KEYS if k in state]
        if reserved:
            raise ValueError(f"`state` may not hold {reserved}: `RunCheckpoints.save` writes them itself.")
        accelerator = self.accelerator
        self.check_finite(global_step, model, optimizer, ema)
        final = os.path.join(self.output_dir, f"checkpoint-{global_step}")
        staging = os.path.join(self.output_dir, f".checkpoint-{global_step}.tmp")
        if accelerator.is_main_process and os.path.exists(staging):
            shutil.rmtree(staging)
        accelerator.wait_for_everyone()
        failure = write_or_disk_full(lambda: accelerator.save_state(staging))  # every process writes its RNG state
        self._raise_if_disk_full(failure, staging, final)  # also waits for every process
        if accelerator.is_main_process:  # the state and the manifest of every file go in last
            def write_run_state():
                ema_settings = save_ema(ema, staging) if ema is not None else None
                write_state(staging, {"global_step": global_step, **state, "ema": ema_settings, FINITE_KEY: True})
            failure = write_or_disk_full(write_run_state)
        self._raise_if_disk_full(failure, staging, final)
        if accelerator.is_main_process:
            replace_folder(staging, final)
            if self.total_limit is not None:
                for old in list_checkpoints(self.output_dir)[: -self.total_limit]:
                    if os.path.abspath(old) != os.path.abspath(final):
                        shutil.rmtree(old)
            logger.info(f"Saved {final}")
        accelerator.wait_for_everyone()
        return final

    def _raise_if_disk_full(self, failure, staging: str, final: str) -> None:
        """Every process learns whether any ran out of space (one tiny all-reduce, which also lines them up); then
        the main process removes the incomplete staging folder, and all raise `CheckpointWriteError`."""
        from .preemption import any_process

        if any_process(self.accelerator, failure is not None):
            if self.accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            self.accelerator.wait_for_everyone()
            raise CheckpointWriteError(disk_full_message(staging, final, self.output_dir,
                                                         self.total_limit)) from failure

    # ------------------------------------------------------------------------------------------- resuming

    def restore(self, path: str, ema=None) -> dict:
        """On every process, after ``accelerator.prepare``: load model, optimizer, scheduler and RNG states from
        ``path`` (`RunMismatchError` when they do not fit), and the EMA when ``ema`` is given (a `ValueError` when
        the checkpoint has none). Returns the checkpoint's state (as `read`)."""
        state = self.read(path)
        try:
            self.accelerator.load_state(path)
        except (RuntimeError, ValueError, KeyError) as error:  # checkpoints without a run identity get here
            raise RunMismatchError(f"`--resume_from_checkpoint`: {path!r} does not fit this model and "
                                   "optimizer (another --pretrained_model_name_or_path, --use_lora, --lora_rank or "
                                   f"target?): {str(error).splitlines()[0]} Resume with the checkpoint's own settings, "
                                   "or start a new run in another `--output_dir`.") from error
        if ema is not None:
            load_ema(ema, path, state.get("ema"))
        return state

    # ------------------------------------------------------------------------------------------- divergence

    def check_finite(self, global_step: int, model, optimizer, ema=None) -> None:
        """Raise the divergence error, on every process, when any holds a non-finite weight, optimizer state or EMA
        weight (one tiny all-reduce). The loss was finite: a non-finite loss stops the step before its update."""
        from .preemption import any_process
        from .training_state import nonfinite_training_state

        bad = nonfinite_training_state(self.accelerator.unwrap_model(model), optimizer, ema)
        if any_process(self.accelerator, bool(bad)):
            what = (f"The {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")) if bad else \
                "The training state of another process"
            raise self.divergence_error(f"{what} is not finite after the update of step {global_step}, though the "
                                        "loss was finite: a gradient or the update overflowed, and training diverged.")

    def divergence_error(self, what: str) -> RuntimeError:
        """The error for a run whose loss or weights stopped being finite, naming the newest checkpoint that was
        checked finite when saved (an older version of the script saved without checking)."""
        good = last_good_checkpoint(self.output_dir)
        resume = f"the last good checkpoint is {good}. Resume from it with `--resume_from_checkpoint {good}` and" \
            if good else "there is no checkpoint checked finite to resume from. Start again with"
        return RuntimeError(f"{what} Nothing was saved from that step on; {resume} a lower `--learning_rate` (now "
                            f"{self.learning_rate}) or `--max_grad_norm` (now {self.max_grad_norm}), or with "
                            "`--mixed_precision bf16` instead of fp16.")
