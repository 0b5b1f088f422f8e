"""Two CPU processes (gloo) must give the scores of one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from test_cli import source_pipeline  # noqa: F401  (fixture)

from diffusers_entprune.cli import main
from diffusers_entprune.embedded import DIGITS_DIR


def score_in_one_and_two_processes(tmp_path, common: list[str]) -> tuple[dict, dict]:
    """`entprune score` with the arguments ``common``, in this process and under a 2-process gloo launch; the two
    scores.json."""
    assert main([*common, "--output_dir", str(tmp_path / "one")]) == 0
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    entprune = shutil.which("entprune", path=os.path.dirname(sys.executable))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", entprune, *common,
                             "--output_dir", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.load(open(tmp_path / "one" / "scores.json")), json.load(open(tmp_path / "two" / "scores.json"))


@pytest.mark.parametrize("method", ["ced", "loss"])
def test_two_processes_score_like_one(tmp_path, source_pipeline, method):  # noqa: F811
    common = ["score", "--pretrained_model_name_or_path", source_pipeline, "--method", method,
              "--num_samples", "40", "--batch_size", "12", "--train_data_dir", os.path.join(DIGITS_DIR, "downstream")]
    one, two = score_in_one_and_two_processes(tmp_path, common)
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["num_samples"] == one["num_samples"] == 40
    # float32 forwards of differently composed batches round differently; loss ablation is a small difference
    # of two losses, so it gets an absolute tolerance on the loss scale
    assert two["scores"] == pytest.approx(one["scores"], rel=1e-4, abs=1e-6)
    assert two["ranking"] == one["ranking"]
