"""Run examples/prune_dit.py through its command line, in this process.

`run_prune_script(argv)` is ``python examples/prune_dit.py ARGV`` without a new interpreter (whose torch/diffusers
imports would cost seconds per run): `runpy` executes the script's file as ``__main__`` with ``sys.argv`` set, so
the script is never imported as a module and tests reach it only through its flags and its outputs. Faults and
tripwires go through package seams (module attributes of ``diffusers_entprune``), which the script's ``from ...
import`` lines pick up because they run afresh each time.
"""

import os
import runpy
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCRIPT = os.path.join(ROOT, "examples", "prune_dit.py")
SIT_SCRIPT = os.path.join(ROOT, "examples", "prune_sit.py")


def run_prune_script(argv, script: str = SCRIPT) -> None:
    """Run ``script`` with ``argv`` as its command line; its exceptions (and argparse's SystemExit) propagate."""
    from accelerate.state import AcceleratorState

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *(str(a) for a in argv)]
    sys.path.insert(0, os.path.dirname(script))  # as `python script` puts the script's folder first
    AcceleratorState._reset_state(reset_partial_state=True)  # each run is a new process in real use
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        AcceleratorState._reset_state(reset_partial_state=True)
