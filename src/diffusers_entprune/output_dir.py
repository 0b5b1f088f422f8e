"""The output folder of every command: never one of its inputs, only its own files replaced, one run at a time.

The rules, the same for the pruning script, every ``entprune`` command and the Python API:

- An output folder may not be, contain, or lie inside any input of the command (model folder, dataset folder,
  checkpoint to resume from, reference data, a file it reads). Paths are compared after resolving symlinks.
- A folder that already holds files is taken only with ``overwrite``, and then only when everything in it was
  written by an earlier run of the same kind of command: recognised by the marker file that every command writes
  (`MARKER_NAME`) and by the names that command writes. A foreign file is never deleted; the folder is refused.
- The folder itself (or, when it does not exist yet, the folder it will be made in) must take a file: probed by
  writing one, since ``os.access`` says yes to root on a read-only mount.
- Checking deletes nothing. `clear_output_dir` removes the old outputs, and is called only once every argument has
  been validated and the run is about to start.
- `OutputDirLock`: a long run holds an exclusive lock on its folder for its lifetime, so that a second run started
  in the same folder is refused instead of mixing its files with the first one's; the lock of a process that died
  is taken over with a message (the operating system releases a dead process's lock).
- Every folder the package writes is written under a temporary name and put in place by `replace_folder` (or, for
  a pipeline moved beside a run's checkpoints, `move_into`), so that an interrupted write never leaves a
  half-written folder under the final name.
"""

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import socket
import tempfile
import time

logger = logging.getLogger(__name__)

MARKER_NAME = ".entprune_output.json"  # {"kind": ..., "command": ...}: who wrote this folder
LOCK_NAME = ".entprune.lock"  # held by a running training run; {"pid", "host", "started", "command"}

PIPELINE_NAMES = ("model_index.json", "transformer", "vae", "scheduler", "entprune_report.json", "README.md",
                  "samples.png", "ced.png")
# What each kind of command writes into its output folder (fnmatch patterns). A training run's folder holds a
# pipeline folder too, plus its checkpoints, validation grids, tracker logs and interrupted stagings.
OUTPUT_NAMES = {
    "pipeline": PIPELINE_NAMES,  # save_pruned_pipeline, `entprune prune`, `entprune convert`
    "training": PIPELINE_NAMES + ("checkpoint-*", ".checkpoint-*", ".export-*", "validation", "logs"),
    "scores": ("scores.json", "scores.png"),  # `entprune score`
    "metrics": ("metrics.json", "samples.png"),  # `entprune eval`
}
ALWAYS_OURS = (MARKER_NAME, LOCK_NAME)


class OutputDirLockedError(RuntimeError):
    """Another live process holds the output folder's lock."""


def _is_within(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_not_an_input(output_dir: str, inputs: dict, argument: str = "output_dir") -> None:
    """Refuse an ``output_dir`` that is, contains, or lies inside one of ``inputs`` ({argument name: path or None}).

    Inputs that are not local paths (Hub ids, None) are skipped. Symlinks are resolved on both sides.
    """
    out = os.path.realpath(output_dir)
    for name, path in inputs.items():
        if not path or not os.path.exists(path):
            continue
        real = os.path.realpath(path)
        if out == real:
            relation = "is"
        elif _is_within(out, real):
            relation = "lies inside"
        elif _is_within(real, out):
            relation = "contains"
        else:
            continue
        resolved = f" (resolved: {out!r} and {real!r})" if (out, real) != (os.path.abspath(output_dir),
                                                                           os.path.abspath(path)) else ""
        raise ValueError(f"`{argument}`={output_dir!r} {relation} `{name}`={path!r}{resolved}: the command would write "
                         f"into, and could delete, its own input. Choose an output folder outside every input.")


def own_names(kind: str, extra: tuple = ()) -> tuple:
    if kind not in OUTPUT_NAMES:
        raise ValueError(f"Unknown output kind {kind!r}; one of {sorted(OUTPUT_NAMES)}.")
    return OUTPUT_NAMES[kind] + tuple(extra) + ALWAYS_OURS


def read_marker(output_dir: str) -> dict | None:
    try:
        with open(os.path.join(output_dir, MARKER_NAME)) as f:
            marker = json.load(f)
        return marker if isinstance(marker, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: not proof of anything


def foreign_entries(output_dir: str, kind: str, extra_names: tuple = ()) -> list[str]:
    """Entries of ``output_dir`` that an earlier run of a ``kind`` command did not write (all of them when its
    marker names another kind)."""
    entries = sorted(os.listdir(output_dir))
    marker = read_marker(output_dir)
    if marker is not None and marker.get("kind") != kind:
        return [e for e in entries if e not in ALWAYS_OURS]
    patterns = own_names(kind, extra_names)
    return [e for e in entries if not any(fnmatch.fnmatchcase(e, p) for p in patterns)]


def _probe_writable(folder: str, argument: str, output_dir: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".entprune-write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise PermissionError(f"`{argument}`={output_dir!r}: cannot write in {folder!r} ({error.strerror or error}). "
                              "Pass a writable folder, or fix its permissions / mount.") from None


def check_output_dir(output_dir: str, overwrite: bool = False, argument: str = "output_dir", hint: str = "",
                     inputs: dict | None = None, kind: str = "pipeline", extra_names: tuple = (),
                     overwrite_flag: str | None = None) -> None:
    """Fail, before any heavy work and without deleting anything, if ``output_dir`` cannot receive a new output.

    Args:
        output_dir (`str`): the folder to write.
        overwrite (`bool`, *optional*, defaults to `False`): accept a folder that holds an earlier output of the same
            ``kind`` (it is replaced when the run starts; see `clear_output_dir`). Foreign files are never accepted.
        argument (`str`): the argument's name, for messages.
        hint (`str`): another way out, added to the message when the folder is taken.
        inputs (`dict`, *optional*): {argument name: path} of everything the command reads; ``output_dir`` may not
            be, contain or lie inside any of them.
        kind (`str`, *optional*, defaults to `"pipeline"`): what the command writes (a key of `OUTPUT_NAMES`).
        extra_names (`tuple`): more names (fnmatch patterns) the command writes, e.g. a configurable log folder.
        overwrite_flag (`str`, *optional*): how the caller spells ``overwrite`` (default ``--overwrite_output_dir``).
    """
    flag = overwrite_flag or "`--overwrite_output_dir` (`overwrite=True` in Python)"
    check_not_an_input(output_dir, inputs or {}, argument)
    check_writable(output_dir, argument)
    if os.path.isdir(output_dir):
        entries = [e for e in os.listdir(output_dir) if e not in ALWAYS_OURS]
        if entries:
            foreign = foreign_entries(output_dir, kind, extra_names)
            if foreign:
                shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
                raise FileExistsError(
                    f"`{argument}`={output_dir!r} holds files that this command did not write ({shown}). {hint}"
                    f"Choose another folder: {flag} replaces only an earlier output of this command, never other "
                    "files.")
            if not overwrite:
                raise FileExistsError(f"`{argument}`={output_dir!r} already holds an earlier output of this command. "
                                      f"{hint}Choose another folder, or pass {flag} to replace it.")


def check_writable(output_dir: str, argument: str = "output_dir") -> None:
    """``output_dir`` is a folder that takes files, or can be made in one that does (a dangling symlink, a file, a
    read-only folder or mount are refused now rather than at the first checkpoint)."""
    if os.path.islink(output_dir) and not os.path.exists(output_dir):
        raise ValueError(f"`{argument}`={output_dir!r} is a symlink to {os.readlink(output_dir)!r}, which does not "
                         "exist. Create the target folder, remove the link, or pass another folder.")
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`{argument}`={output_dir!r} is a file; pass a folder path.")
    if os.path.isdir(output_dir):
        _probe_writable(output_dir, argument, output_dir)
        return
    probe = os.path.dirname(os.path.abspath(output_dir))
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"`{argument}`={output_dir!r}: {probe!r} is a file, so no folder can be made under it; pass a "
                         "folder path.")
    _probe_writable(probe, argument, output_dir)


def write_marker(folder: str, kind: str, command: str) -> None:
    with open(os.path.join(folder, MARKER_NAME), "w") as f:
        json.dump({"kind": kind, "command": command}, f)


def clear_output_dir(output_dir: str, kind: str, command: str, extra_names: tuple = ()) -> list[str]:
    """Remove an earlier output of a ``kind`` command from ``output_dir`` (what `check_output_dir` accepted with
    ``overwrite``), never anything else, and mark the folder as this command's. Returns what was removed."""
    os.makedirs(output_dir, exist_ok=True)
    patterns = own_names(kind, extra_names)
    removed = []
    # the index goes first: a run killed halfway leaves no model_index.json beside a half-removed old model
    for entry in sorted(os.listdir(output_dir), key=lambda e: (e != "model_index.json", e)):
        if entry in ALWAYS_OURS or not any(fnmatch.fnmatchcase(entry, p) for p in patterns):
            continue
        path = os.path.join(output_dir, entry)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        removed.append(path)
    write_marker(output_dir, kind, command)
    return removed


@contextlib.contextmanager
def staged_output_dir(output_dir: str, kind: str = "pipeline", command: str = "diffusers_entprune"):
    """Yield a temporary folder beside ``output_dir``; when the block finishes, it replaces ``output_dir``.

    An error inside the block leaves ``output_dir`` as it was and removes the temporary folder; a previous
    ``output_dir`` is removed only after the new one is in place, and only when it still holds nothing but an
    earlier output of ``kind`` (checked again at that moment: a file added meanwhile is not lost, the new output is
    then left in the temporary folder and named in the error). Call `check_output_dir` first.
    """
    parent = os.path.dirname(os.path.abspath(output_dir))
    name = os.path.basename(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    keep_tmp = False
    try:
        yield tmp
        write_marker(tmp, kind, command)
        if os.path.exists(output_dir):
            foreign = foreign_entries(output_dir, kind)
            if foreign:
                keep_tmp = True
                raise FileExistsError(f"{output_dir!r} received files from elsewhere while this command ran "
                                      f"({', '.join(foreign[:5])}); it was left untouched and the new output is in "
                                      f"{tmp!r}.")
        replace_folder(tmp, output_dir)
    finally:
        if not keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: str) -> None:
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def replace_folder(staging: str, final: str) -> None:
    """Put the finished ``staging`` (a folder, or a file) in place under the name ``final``, replacing what is there.

    ``staging`` must be on the filesystem of ``final`` (beside it, or inside the folder that holds it): the new
    content arrives by one `os.replace`, so ``final`` is never a half-written folder. A file replacing a file is
    atomic. When ``final`` is a folder (or either is one), the old ``final`` is first renamed aside, into a fresh
    folder beside ``staging`` (``<staging>.old-XXXX/old``), then ``staging`` is renamed to ``final``, then the old
    copy is deleted.

    Crash window: a process killed between those two renames leaves no ``final``; the old content is then in
    ``<staging>.old-XXXX/old`` and the new one still in ``staging``, both under names that start like ``staging``
    (so whatever removes an interrupted ``staging`` removes them too: e.g. `remove_stale_staging` for
    ``.checkpoint-N.tmp``). Nothing is ever deleted before the new content is in place.

    Fault injection: this function calls ``os.replace`` through this module's ``os`` (``diffusers_entprune.
    output_dir.os``), twice when ``final`` exists: first ``(final, <aside>)``, then ``(staging, final)``. A test that
    sets ``diffusers_entprune.output_dir.os`` to a proxy of `os` whose ``replace`` kills the process right after the
    call whose source is ``final`` stops it exactly inside the crash window (`move_into` goes through here too).
    """
    aside = None
    if os.path.lexists(final) and (os.path.isdir(staging) or (os.path.isdir(final) and not os.path.islink(final))):
        staging_abs = os.path.abspath(staging)
        aside = tempfile.mkdtemp(prefix=f"{os.path.basename(staging_abs)}.old-", dir=os.path.dirname(staging_abs))
        os.replace(final, os.path.join(aside, "old"))
    os.replace(staging, final)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def move_into(staging_folder: str, output_dir: str, last: tuple = ("model_index.json",),
              skip: tuple = (MARKER_NAME,)) -> list[str]:
    """Move every entry of ``staging_folder`` into ``output_dir`` (each through `replace_folder`), leaving the other
    entries of ``output_dir`` alone: for a pipeline exported into a training run's folder, beside its checkpoints.

    The entries named in ``last`` are removed from ``output_dir`` before anything moves and are moved in last, in
    that order: a crash mid-move leaves no ``model_index.json`` beside a half-replaced model, so nothing loads it
    as finished. The others move in name order; those named in ``skip`` stay behind. ``staging_folder`` must be on
    the filesystem of ``output_dir`` (e.g. a hidden folder inside it). Returns the paths moved into place.

    Fault injection: as `replace_folder` (patch ``diffusers_entprune.output_dir.os``; each entry arrives by an
    ``os.replace(<staging entry>, <output_dir entry>)``).
    """
    os.makedirs(output_dir, exist_ok=True)
    for name in last:
        target = os.path.join(output_dir, name)
        if os.path.lexists(target):
            _remove(target)
    names = [n for n in os.listdir(staging_folder) if n not in skip]
    order = sorted(n for n in names if n not in last) + [n for n in last if n in names]
    moved = []
    for name in order:
        target = os.path.join(output_dir, name)
        replace_folder(os.path.join(staging_folder, name), target)
        moved.append(target)
    return moved


def lock_output_dir(accelerator, output_dir: str, command: str, argument: str = "--output_dir"):
    """The main process takes ``output_dir``'s `OutputDirLock` for the run's lifetime (the caller releases it); every
    process learns if it could not, and then all raise the same `OutputDirLockedError`. Returns the lock on the main
    process, None on the others."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = OutputDirLock(output_dir, argument=argument, command=command).acquire()
        except OutputDirLockedError as refused:
            error = str(refused)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [error]
        broadcast_object_list(box)
        error = box[0]
    if error is not None:
        raise OutputDirLockedError(error)
    return lock


def check_not_locked(output_dir: str, argument: str = "output_dir") -> None:
    """Refuse at once a folder whose lock a live run holds (the run itself takes it later, with `OutputDirLock`), so
    that the user hears "in use" rather than a complaint about the files that run is writing."""
    import fcntl

    path = os.path.join(output_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except BlockingIOError:
        raise OutputDirLockedError(_in_use_message(output_dir, argument, _read_holder(fd))) from None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 65536).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _in_use_message(output_dir: str, argument: str, holder: dict) -> str:
    who = (f"process {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
           f"{': ' + holder['command'] if holder.get('command') else ''}") if holder else "another process"
    return (f"`{argument}`={output_dir!r} is in use by a running job ({who}). Two runs in one folder would mix their "
            "checkpoints, logs and model; wait for it to end, stop it, or choose another folder.")


class OutputDirLock:
    """An exclusive lock on an output folder for a run's lifetime (a context manager).

    The lock is an advisory ``flock`` on ``<output_dir>/.entprune.lock``, which also records who holds it. The
    operating system drops the lock of a process that dies, however it dies, so a lock file left by a killed run
    is stale and is taken over (with a message); a live holder makes `acquire` raise `OutputDirLockedError`.
    A folder that `acquire` created is removed again by `release` when nothing else was written into it.
    """

    def __init__(self, output_dir: str, argument: str = "--output_dir", command: str = "diffusers_entprune"):
        self.output_dir, self.argument, self.command = output_dir, argument, command
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fd, self._created = None, False

    def acquire(self) -> "OutputDirLock":
        import fcntl  # POSIX; training with accelerate on Windows is out of scope

        self._created = not os.path.isdir(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                self._remove_created_folder()
                raise OutputDirLockedError(_in_use_message(self.output_dir, self.argument, holder)) from None
            # the file may have been removed (and re-created) by its previous holder between open and flock
            try:
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        previous = _read_holder(fd)
        if previous:
            logger.warning(f"Taking over the stale lock of {self.output_dir!r}: process {previous.get('pid')} on "
                           f"{previous.get('host')} (started {previous.get('started')}) is no longer running.")
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": self.command})
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, record.encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)  # while still held: no one can take a lock on a file about to disappear
        os.close(self._fd)
        self._fd = None
        self._remove_created_folder()

    def _remove_created_folder(self) -> None:
        if self._created:  # a run refused early leaves no empty folder behind
            with contextlib.suppress(OSError):
                os.rmdir(self.output_dir)  # only if empty

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()
