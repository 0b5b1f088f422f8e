"""Preemption: SIGTERM ends a training run at a step boundary with a checkpoint, instead of killing it mid-step.

SLURM (at the time limit, ``scancel``, preemption), Kubernetes (pod eviction) and torchrun (forwarding its own
SIGTERM) send SIGTERM, then SIGKILL after a grace period (SLURM's KillWait, 30 s by default; Kubernetes'
terminationGracePeriodSeconds, 30 s; torchrun, 30 s). While a function decorated with `handle_sigterm` runs:

- before `phase("training")` (arguments, model and data loading): SIGTERM raises `Preempted` at once, so ``finally``
  blocks run; there is nothing to save yet.
- during training: SIGTERM only sets a flag. The loop calls `stop_requested` once per optimizer step, so the step in
  progress finishes (a pruning stage in progress finishes too, and the step after it: a stage cannot be interrupted
  halfway, and when the grace period is shorter than a stage, the SIGKILL leaves the previous checkpoint, from which
  the stage is redone identically). The script then saves ``checkpoint-<step>`` and raises `Preempted`.
- during the export (training is over, there is no step to stop at): SIGTERM is logged and the export finishes.

`Preempted` exits with status 143 (128 + SIGTERM, what a shell reports for a process ended by SIGTERM), so job
scripts and retry policies (e.g. a Kubernetes podFailurePolicy on exit code 143) can tell a preemption from a crash
(status 1). Under ``accelerate launch`` the launcher reports its own status for a failed worker.

A repeated SIGTERM changes nothing: under SLURM and torchrun together a worker receives it twice (from each). SIGINT
(Ctrl-C) keeps Python's default: whoever types it wants the process to stop now, and the last checkpoint is there.
"""

import functools
import logging
import os
import signal
import threading

import torch

logger = logging.getLogger(__name__)

EXIT_STATUS = 128 + signal.SIGTERM  # 143


class Preempted(SystemExit):
    """The run stopped on SIGTERM; uncaught, the process exits with status 143."""

    def __init__(self, message: str):
        super().__init__(EXIT_STATUS)
        self.message = message

    def __str__(self):
        return self.message


class _State:
    pid = None  # the process that installed the handler; a forked DataLoader worker inherits it and must ignore it
    phase = None  # None (setting up), "training" or "export"
    received = False


_state = _State()


def _on_sigterm(signum, frame):
    if os.getpid() != _state.pid:  # a DataLoader worker: the training process shuts it down when it stops
        return
    if _state.phase is None:
        raise Preempted("Stopped by SIGTERM before training started: nothing was saved. Run the same command again "
                        "(with `--resume_from_checkpoint latest` if the output folder already has checkpoints).")
    if not _state.received:
        logger.warning("SIGTERM received: finishing the current optimizer step, then saving a checkpoint and stopping."
                       if _state.phase == "training" else "SIGTERM received during the export: finishing it.")
    _state.received = True


def handle_sigterm(fn):
    """Run ``fn`` with SIGTERM handled as described in this module; the previous handler is restored afterwards
    (the script's `main` is also called in-process, by tests and by other scripts)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            return fn(*args, **kwargs)
        saved = (_state.pid, _state.phase, _state.received)
        _state.pid, _state.phase, _state.received = os.getpid(), None, False
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            return fn(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)  # None: set outside Python
            _state.pid, _state.phase, _state.received = saved

    return wrapper


def phase(name: str) -> None:
    """Enter "training" (SIGTERM now waits for the step boundary) or "export" (SIGTERM is only logged).
    Enter "training" before the DataLoader starts its workers, so that they inherit a handler that ignores it."""
    _state.phase = name


def any_process(accelerator, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any: one one-element all-reduce (none with one process)."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def stop_requested(accelerator) -> bool:
    """Whether any process received SIGTERM. Called by every process once per optimizer step, so that all stop
    after the same step (none is left waiting in a gradient all-reduce for a peer that stopped)."""
    return any_process(accelerator, _state.received)


def preempted(accelerator, checkpoint: str, global_step: int) -> Preempted:
    """Log where to resume from, end the accelerator's trackers, and return the `Preempted` to raise."""
    message = (f"Stopped by SIGTERM after step {global_step}; the run is saved in {checkpoint}. Continue it with the "
               f"same arguments plus `--resume_from_checkpoint latest` (or `--resume_from_checkpoint {checkpoint}`). "
               f"Exit status {EXIT_STATUS}.")
    if accelerator.is_main_process:
        logger.warning(message)
    accelerator.end_training()
    return Preempted(message)
