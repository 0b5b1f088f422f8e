"""Run examples/prune_dit.py in this process and SIGKILL it at a named point: the fault tests' harness.

    python tests/fault_runner.py POINT N -- <script arguments>

POINT (N counts the calls, 1-based; "none" runs to the end):
  mid_step          after the N-th backward, before that step's optimizer update
  mid_checkpoint    after the N-th `save_state` has written its files, before the checkpoint is complete and renamed
  after_stage       right after the N-th pruning stage has removed blocks from the model, optimizer and EMA
  during_export     in the export's final move, after the N-th pipeline part (first "transformer") is in place
"""

import importlib.util
import os
import signal
import sys

import accelerate

point, count = sys.argv[1], int(sys.argv[2])
argv = sys.argv[sys.argv.index("--") + 1:]
spec = importlib.util.spec_from_file_location(
    "prune_dit", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "prune_dit.py"))
prune_dit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prune_dit)
calls = 0


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_call(fn, when=lambda *args, **kwargs: True):
    def wrapper(*args, **kwargs):
        global calls
        result = fn(*args, **kwargs)
        if when(*args, **kwargs):
            calls += 1
            if calls == count:
                die()
        return result
    return wrapper


class KillingOs:
    """The script's `os`, except that moving a pipeline part into the output folder may be the last thing it does."""

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
    prune_dit.prune_training_state = kill_after_call(prune_dit.prune_training_state,
                                                     when=lambda model, blocks, *a, **k: len(blocks) > 0)
elif point == "during_export":
    prune_dit.os = KillingOs()
elif point != "none":
    raise SystemExit(f"unknown fault point {point!r}")
prune_dit.main(argv)
