"""Faults: the pruning script killed with SIGKILL at several points, then resumed, ends like an uninterrupted run;
nothing an interrupted run leaves behind passes for a finished checkpoint or model; damaged checkpoints are refused
with a clear error, and `--resume_from_checkpoint latest` falls back to the newest intact one."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from test_cli import source_pipeline  # noqa: F401  (fixture)
from test_prune_dit_script import run_prune_script, tiny_args, weights

from diffusers_entprune.checkpoints import (
    FINITE_KEY,
    STAGING_PREFIXES,
    CorruptCheckpointError,
    file_manifest,
    is_disk_full,
    latest_intact_checkpoint,
    list_checkpoints,
    read_state,
    write_state,
)
from diffusers_entprune.preemption import EXIT_STATUS, Preempted, handle_sigterm

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
    assert report_b["kept_block_indices"] == report_a["kept_block_indices"]  # architecture
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
    assert not [name for name in os.listdir(out) if name.startswith(STAGING_PREFIXES)]  # staging folders cleaned up


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
        run_prune_script(tiny_args(source, out, *EXTRA, "--resume_from_checkpoint", str(out / "checkpoint-12")))

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


# ---------------------------------------------------------------------------------------------- SIGTERM (preemption)


def stage_steps_with_a_choice(report) -> list[int]:
    """Steps of the stages that scored candidates (where `sigterm_in_stage` counts its calls)."""
    return [s["step"] for s in report["stages"] if any(c.get("ntk_condition_number") is not None
                                                       for c in s["candidates"])]


@pytest.mark.parametrize("point, count, stops_after", [
    ("sigterm_mid_step", 5, 5),  # step 5 finishes, then checkpoint-5 (not a regular checkpointing step)
    ("sigterm_mid_step", 6, 6),  # step 6 is a checkpointing step: checkpoint-6 is written once, not twice
    ("sigterm_in_stage", 2, "stage"),  # the stage finishes, and the step after it, then checkpoint-<that step>
])
def test_sigterm_saves_a_checkpoint_and_resumes_to_the_uninterrupted_result(tmp_path, uninterrupted, point, count,
                                                                            stops_after):
    source, whole = uninterrupted
    if stops_after == "stage":
        stops_after = stage_steps_with_a_choice(outcome(whole)[0])[count - 1] + 1
    out = tmp_path / "terminated"
    stopped = run(point, count, tiny_args(source, out, *EXTRA))
    assert stopped.returncode == EXIT_STATUS == 143, stopped.stderr[-3000:]
    checkpoint = out / f"checkpoint-{stops_after}"
    assert f"Stopped by SIGTERM after step {stops_after}" in stopped.stderr
    assert f"`--resume_from_checkpoint {checkpoint}`" in stopped.stderr and "resume_from_checkpoint latest" in \
        stopped.stderr
    assert stopped.stderr.count(f"Saved {checkpoint}") == 1
    assert list_checkpoints(str(out))[-1] == str(checkpoint)
    assert read_state(str(checkpoint))[FINITE_KEY] is True  # verifies, and was checked finite
    assert not (out / "model_index.json").exists()

    resumed = run("none", 0, tiny_args(source, out, *EXTRA, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}" in resumed.stderr
    assert_same_run(outcome(whole), outcome(out))


def test_sigterm_on_one_of_two_processes_stops_both_after_the_same_step(tmp_path, source_pipeline):  # noqa: F811
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    out = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "FAULT_RANK": "1"}  # only the second process receives SIGTERM, after its 4th backward
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", RUNNER, "sigterm_mid_step", "4", "--",
               *tiny_args(source_pipeline, out, *EXTRA, "--train_batch_size", "3")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert "Stopped by SIGTERM after step 4" in result.stderr, result.stderr[-3000:]
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-3", "checkpoint-4"]
    read_state(str(out / "checkpoint-4"))
    assert (out / "checkpoint-4" / "random_states_1.pkl").exists()  # the second process took part in the save


def test_sigterm_handler_is_restored_and_stops_setup_at_once():
    def setup():
        assert signal.getsignal(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)  # before training: nothing to save, stop now
        raise AssertionError("SIGTERM did not stop the setup")

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="before training started") as stopped:
        handle_sigterm(setup)()
    assert stopped.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is previous


# ---------------------------------------------------------------------------------------------- divergence


def test_a_non_finite_update_is_never_checkpointed_and_the_error_names_a_good_checkpoint(tmp_path, uninterrupted):
    source, whole = uninterrupted
    out = tmp_path / "diverged"
    # step 6's loss is finite, its update writes inf into a weight (and so into the EMA), and step 6 checkpoints
    diverged = run("inf_update", 6, tiny_args(source, out, *EXTRA))
    assert diverged.returncode == 1
    assert "is not finite after the update of step 6, though the loss was finite" in diverged.stderr, \
        diverged.stderr[-3000:]
    good = out / "checkpoint-3"
    assert f"the last good checkpoint is {good}. Resume from it with `--resume_from_checkpoint {good}`" in \
        diverged.stderr
    assert list_checkpoints(str(out)) == [str(good)]  # no checkpoint-6
    assert not [name for name in os.listdir(out) if name.startswith(STAGING_PREFIXES)]
    assert read_state(str(good))[FINITE_KEY] is True

    resumed = run("none", 0, tiny_args(source, out, *EXTRA, "--resume_from_checkpoint", str(good)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(outcome(whole), outcome(out))


def test_nonfinite_training_state_names_weights_optimizer_state_and_ema(tiny_dit):
    from diffusers.training_utils import EMAModel

    from diffusers_entprune.training_state import nonfinite_training_state

    optimizer = torch.optim.AdamW(tiny_dit.parameters(), lr=1e-3)
    tiny_dit.proj_out_2.weight.sum().backward()
    optimizer.step()
    ema = EMAModel(list(tiny_dit.parameters()))
    assert nonfinite_training_state(tiny_dit, optimizer, ema) == []
    with torch.no_grad():
        optimizer.state[tiny_dit.proj_out_2.weight]["exp_avg_sq"][0, 0] = float("nan")
        ema.shadow_params[-1][0] = float("inf")  # proj_out_2.bias, the last parameter
    assert nonfinite_training_state(tiny_dit, optimizer, ema) == [
        "optimizer state 'exp_avg_sq' of proj_out_2.weight", "EMA weight of proj_out_2.bias"]


# ---------------------------------------------------------------------------------------------- disk full


@pytest.mark.parametrize("point", ["disk_full", "torch_write_fail"])
def test_a_full_disk_mid_checkpoint_is_reported_and_older_checkpoints_stay(tmp_path, source_pipeline,  # noqa: F811
                                                                             point):
    out = tmp_path / "full"
    # checkpoint-3 is written; checkpoint-6's save_state writes its files, then the disk is full. With a limit of one
    # checkpoint, checkpoint-3 would go once checkpoint-6 were complete: it must stay.
    failed = run(point, 2, tiny_args(source_pipeline, out, *EXTRA, "--checkpoints_total_limit", "1"))
    assert failed.returncode == 1
    message = failed.stderr[failed.stderr.index("CheckpointWriteError"):]
    for part in ("Could not write checkpoint-6: the disk is probably full", "free now)",
                 "The incomplete .checkpoint-6.tmp was removed and never renamed into place",
                 "`--checkpoints_total_limit` (now 1)", "`--resume_from_checkpoint latest`", str(out)):
        assert part in message, (part, message)
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-3")]
    assert not [name for name in os.listdir(out) if name.startswith(STAGING_PREFIXES)]
    state = read_state(str(out / "checkpoint-3"))  # every file as its SHA-256 was recorded when it was written
    assert file_manifest(str(out / "checkpoint-3")) == state["files"]  # and nothing added or removed


@pytest.mark.parametrize("error, full", [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4160 vs 4054"), True),
    (RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), True),
    (Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on '
               'device" })'), True),  # safetensors
    (OSError(errno.EACCES, "Permission denied"), False),
    (RuntimeError("CUDA out of memory"), False),
])
def test_disk_full_errors_are_recognised(error, full):
    assert is_disk_full(error) is full
    try:  # also when raised from another error
        try:
            raise error
        except Exception as inner:
            raise ValueError("wrapped") from inner
    except ValueError as wrapped:
        assert is_disk_full(wrapped) is full
