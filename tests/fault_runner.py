"""Run examples/prune_dit.py in this process and SIGKILL it (or inject another fault) at a named point: the fault
tests' harness.

    python tests/fault_runner.py POINT N -- <script arguments>

POINT (N counts the calls, 1-based; "none" runs to the end):
  mid_step          after the N-th backward, before that step's optimizer update
  mid_checkpoint    after the N-th `save_state` has written its files, before the checkpoint is complete and renamed
  after_stage       right after the N-th pruning stage has removed blocks from the model, optimizer and EMA
  during_export     in the export's final move, after the N-th pipeline part (first "transformer") is in place
Other faults:
  sigterm_mid_step  SIGTERM (not SIGKILL) to itself after the N-th backward, before that step's optimizer update
  sigterm_in_stage  SIGTERM to itself in the middle of a pruning stage, after the N-th candidate scoring (proxies)
  inf_update        the N-th optimizer update writes inf into a weight (the loss of that step was finite)
  disk_full         the N-th `save_state` writes its files, then fails with OSError ENOSPC
  torch_write_fail  the N-th `save_state` writes its files, then fails as torch's zip writer does on a full disk
With FAULT_RANK set (several processes), only the process of that RANK is hit.
"""

import errno
import os
import signal
import sys

import accelerate
import accelerate.optimizer
import torch
from script_runner import run_prune_script

import diffusers_entprune.output_dir as output_dir
import diffusers_entprune.pruner as pruner

point, count = sys.argv[1], int(sys.argv[2])
argv = sys.argv[sys.argv.index("--") + 1:]
calls = 0


def die(*args, **kwargs):
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)


def targeted() -> bool:
    """Whether this process is the one to hit (RANK is set by accelerate launch)."""
    return os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) == os.environ.get("RANK", "0")


def kill_after_call(fn, when=lambda *args, **kwargs: True, fault=die):
    def wrapper(*args, **kwargs):
        global calls
        result = fn(*args, **kwargs)
        if when(*args, **kwargs) and targeted():
            calls += 1
            if calls == count:
                fault(*args, **kwargs)
        return result
    return wrapper


def write_inf(optimizer, *args, **kwargs):
    with torch.no_grad():
        optimizer.optimizer.param_groups[0]["params"][0].view(-1)[0] = float("inf")


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def torch_write_fail(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054")


class KillingOs:
    """`os` for diffusers_entprune.output_dir, except that moving a pipeline part into the output folder may be the
    last thing it does."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def replace(src, dst):
        os.replace(src, dst)
        if os.path.basename(dst) in ("transformer", "vae", "scheduler", "model_index.json"):
            global calls
            calls += 1
            if calls == count:
                die()


if point == "mid_step":
    accelerate.Accelerator.backward = kill_after_call(accelerate.Accelerator.backward)
elif point == "mid_checkpoint":
    accelerate.Accelerator.save_state = kill_after_call(accelerate.Accelerator.save_state)
elif point == "after_stage":
    pruner.prune_training_state = kill_after_call(pruner.prune_training_state,
                                                  when=lambda model, blocks, *a, **k: len(blocks) > 0)
elif point == "during_export":
    output_dir.os = KillingOs()  # the export moves the pipeline's parts in with output_dir.move_into
elif point == "sigterm_mid_step":
    accelerate.Accelerator.backward = kill_after_call(accelerate.Accelerator.backward, fault=sigterm)
elif point == "sigterm_in_stage":
    pruner.score_candidates = kill_after_call(pruner.score_candidates, fault=sigterm)
elif point == "inf_update":
    accelerate.optimizer.AcceleratedOptimizer.step = kill_after_call(accelerate.optimizer.AcceleratedOptimizer.step,
                                                                     fault=write_inf)
elif point in ("disk_full", "torch_write_fail"):
    accelerate.Accelerator.save_state = kill_after_call(accelerate.Accelerator.save_state, fault=globals()[point])
elif point != "none":
    raise SystemExit(f"unknown fault point {point!r}")
run_prune_script(argv)
