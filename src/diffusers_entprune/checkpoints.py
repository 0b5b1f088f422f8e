"""Training checkpoints that can be trusted after a crash: a manifest of every file, checked before resuming.

A checkpoint folder is written under a temporary name and renamed into place when complete, so a crash mid-save
leaves no ``checkpoint-N``. That does not protect against what happens later (a disk that fills, a copy cut short,
bit rot), so the state file also lists every file's size and SHA-256; `verify_checkpoint` checks them, and
`latest_intact_checkpoint` falls back to the newest checkpoint that passes.

A checkpoint is only written when the training state is finite (the script checks it first), and its state file
records that (`FINITE_KEY`), so a divergence error can name a checkpoint that is really good (`last_good_checkpoint`).
A write that fails because the disk or quota is full is reported as such (`is_disk_full`, `disk_full_message`).
"""

import errno
import hashlib
import json
import logging
import os
import shutil

logger = logging.getLogger(__name__)

STATE_NAME = "entprune_state.json"  # pruning state and the file manifest, written last into every checkpoint
STAGING_PREFIXES = (".checkpoint-", ".export-")  # what an interrupted save or export leaves in output_dir
FINITE_KEY = "checked_finite"  # in the state file: weights, optimizer state and EMA were all finite when saved
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
