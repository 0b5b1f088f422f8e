"""Faults: the pruning script killed with SIGKILL at several points, then resumed, ends like an uninterrupted run;
nothing an interrupted run leaves behind passes for a finished checkpoint or model; damaged checkpoints are refused
with a clear error, and `--resume_from_checkpoint latest` falls back to the newest intact one."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from test_cli import source_pipeline  # noqa: F401  (fixture)
from test_prune_dit_script import prune_dit, tiny_args, weights

from diffusers_entprune.checkpoints import (
    CorruptCheckpointError,
    file_manifest,
    latest_intact_checkpoint,
    list_checkpoints,
    read_state,
    write_state,
)

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_runner.py")
# three pruning stages at steps 0, 3, 6; a checkpoint every 3 steps; 12 steps; EMA on
EXTRA = ["--pruning_stages", "3", "--pruning_steps", "9", "--checkpointing_steps", "3", "--use_ema",
         "--validation_steps", "0", "--speed_batch_size", "0"]


def run(point: str, count: int, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    return subprocess.run([sys.executable, RUNNER, point, str(count), "--", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def outcome(folder):
    """(entprune_report.json, the exported transformer's weights) of a finished run."""
    return json.load(open(os.path.join(folder, "entprune_report.json"))), weights(folder)


def assert_same_run(a, b):
    (report_a, weights_a), (report_b, weights_b) = a, b
    assert report_b["kept_blocks"] == report_a["kept_blocks"]  # architecture
    assert report_b["stages"] == report_a["stages"]  # decisions, CED scores, proxy values
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # bit-identical on CPU


@pytest.fixture
def uninterrupted(tmp_path, source_pipeline):  # noqa: F811
    out = tmp_path / "whole"
    result = run("none", 0, tiny_args(source_pipeline, out, *EXTRA))
    assert result.returncode == 0, result.stderr[-3000:]
    return source_pipeline, out


@pytest.mark.parametrize("point, count, resumes_from", [
    ("mid_step", 5, "checkpoint-3"),  # step 5's update never happened
    ("mid_checkpoint", 2, "checkpoint-3"),  # checkpoint-6's files written, never completed
    ("after_stage", 1, "stage"),  # the first stage that pruned anything did so, then the process died
    ("during_export", 1, "checkpoint-12"),  # the transformer is in output_dir, the rest of the pipeline is not
])
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, point, count, resumes_from):
    source, whole = uninterrupted
    if resumes_from == "stage":  # the checkpoint saved just before that stage's step (none before step 0)
        pruning_steps = [stage["step"] for stage in outcome(whole)[0]["stages"] if stage["pruned_blocks"]]
        resumes_from = f"checkpoint-{pruning_steps[count - 1]}" if pruning_steps[count - 1] > 0 else None
    out = tmp_path / "killed"
    killed = run(point, count, tiny_args(source, out, *EXTRA))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    # what is left: every checkpoint-N is complete and verifies; no model index, so no loadable half-model
    left = list_checkpoints(str(out))
    assert (os.path.basename(left[-1]) if left else None) == resumes_from
    for folder in left:
        read_state(folder)
    assert not (out / "model_index.json").exists()

    resumed = run("none", 0, tiny_args(source, out, *EXTRA, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (f"Resuming from {out / resumes_from}" if resumes_from else "No checkpoint in") in resumed.stderr
    assert_same_run(outcome(whole), outcome(out))
    assert not [name for name in os.listdir(out) if name.startswith(".")]  # staging folders cleaned up


def test_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, uninterrupted):
    source, whole = uninterrupted
    out = tmp_path / "damaged"
    shutil.copytree(whole, out)
    shutil.rmtree(out / "transformer")
    os.remove(out / "model_index.json")
    newest = out / "checkpoint-12" / "model.safetensors"
    with open(newest, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(newest) // 2)

    with pytest.raises(CorruptCheckpointError, match="--resume_from_checkpoint.*model.safetensors.*truncated"):
        prune_dit.main(tiny_args(source, out, *EXTRA, "--resume_from_checkpoint", str(out / "checkpoint-12")))

    resumed = run("none", 0, tiny_args(source, out, *EXTRA, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipping a damaged checkpoint" in resumed.stderr and f"Resuming from {out / 'checkpoint-9'}" in \
        resumed.stderr
    assert_same_run(outcome(whole), outcome(out))


def test_manifest_catches_truncation_corruption_and_missing_files(tmp_path):
    folder = tmp_path / "checkpoint-1"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "sub" / "optimizer.bin").write_bytes(b"y" * 10)
    write_state(str(folder), {"global_step": 1})
    state = read_state(str(folder))
    assert state["global_step"] == 1 and set(state["files"]) == {"model.safetensors", os.path.join("sub",
                                                                                                    "optimizer.bin")}
    assert file_manifest(str(folder)) == state["files"]

    (folder / "model.safetensors").write_bytes(b"x" * 99 + b"z")  # same size, one byte flipped
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*SHA-256"):
        read_state(str(folder))
    (folder / "model.safetensors").write_bytes(b"x" * 50)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*50 bytes.*100"):
        read_state(str(folder))
    os.remove(folder / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*missing"):
        read_state(str(folder))
    (folder / "entprune_state.json").write_text('{"global_step": 1, "fi')  # a state file cut short
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        read_state(str(folder))


def test_all_checkpoints_damaged_is_an_error_and_none_is_a_fresh_start(tmp_path):
    assert latest_intact_checkpoint(str(tmp_path)) is None
    for step in (1, 2):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
        write_state(str(folder), {"global_step": step})
        os.remove(folder / "model.safetensors")
    with pytest.raises(CorruptCheckpointError, match="Every checkpoint.*damaged.*--overwrite_output_dir"):
        latest_intact_checkpoint(str(tmp_path))


def test_a_truncated_weights_file_gives_a_clear_error(tmp_path):
    from diffusers_entprune.embedded import TINY_DIT_DIR
    from diffusers_entprune.models import EntPrunedTransformer2DModel

    folder = tmp_path / "model"
    shutil.copytree(TINY_DIT_DIR, folder)
    weights_file = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(weights_file, "r+b") as f:
        f.truncate(os.path.getsize(weights_file) // 2)
    with pytest.raises(OSError, match="pretrained_model_name_or_path.*truncated or corrupted.*Re-download"):
        EntPrunedTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
