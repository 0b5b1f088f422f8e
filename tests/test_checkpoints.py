"""`RunCheckpoints` driven directly (one CPU process, a tiny DiT, AdamW, an EMA), and the folder helpers it writes
through: round trip, total limit, full disk, divergence, damaged checkpoints, the crash window of `replace_folder`,
`move_into`'s order, and `lock_output_dir`."""

import errno
import json
import os

import pytest
import torch
from accelerate import Accelerator
from conftest import make_tiny_dit
from diffusers.training_utils import EMAModel

import diffusers_entprune.checkpoints as checkpoints
import diffusers_entprune.output_dir as output_dir_module
from diffusers_entprune.checkpoints import (
    EMA_WEIGHTS_NAME,
    FINITE_KEY,
    STATE_NAME,
    CheckpointWriteError,
    CorruptCheckpointError,
    RunCheckpoints,
    is_checkpoint_of,
    list_checkpoints,
    read_state,
    remove_stale_staging,
)
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.output_dir import (
    MARKER_NAME,
    OutputDirLockedError,
    lock_output_dir,
    move_into,
    replace_folder,
)
from diffusers_entprune.run_identity import RunMismatchError

STATE = {"pruner": {"decisions": [{"step": 0, "pruned_blocks": [1]}]}, "stage_times": [{"num_blocks": 2}],
         "run_identity": {"seed": 0}, "bad_images": {"a.png": 2}}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def training_run(seed=0, num_layers=3):
    """(accelerator, prepared model, prepared optimizer, EMA), with some steps taken so that every part has state."""
    accelerator = Accelerator(cpu=True)
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=num_layers, seed=seed)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMAModel(model.parameters(), decay=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, ema


def take_steps(model, optimizer, ema, steps=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(2, 4, 8, 8, generator=generator)
        out = model(x, timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 3])).sample
        out.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())


def saved_run(tmp_path, steps=(1,), total_limit=None, **kwargs):
    accelerator, model, optimizer, ema = training_run()
    run = RunCheckpoints(str(tmp_path / "out"), accelerator, total_limit=total_limit, learning_rate=1e-3,
                         max_grad_norm=1.0, **kwargs)
    for step in steps:
        take_steps(model, optimizer, ema, seed=step)
        run.save(step, STATE, model=model, optimizer=optimizer, ema=ema)
    return run, model, optimizer, ema


def staging_left(folder) -> list[str]:
    return [n for n in os.listdir(folder) if n.startswith(".checkpoint-")]


# ---------------------------------------------------------------------------------------------- round trip


def test_save_and_restore_round_trip(tmp_path):
    run, model, optimizer, ema = saved_run(tmp_path, steps=(1, 2))
    out = tmp_path / "out"
    path = str(out / "checkpoint-2")
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-1"), path]
    assert staging_left(out) == []
    state = read_state(path)  # the manifest verifies
    assert {k: state[k] for k in STATE} == STATE
    assert state["global_step"] == 2 and state[FINITE_KEY] is True
    assert state["ema"]["optimization_step"] == 4 and "shadow_params" not in state["ema"]
    assert EMA_WEIGHTS_NAME in state["files"]

    # a fresh run with other weights, optimizer state and EMA takes everything back
    accelerator, model2, optimizer2, ema2 = training_run(seed=7)
    take_steps(model2, optimizer2, ema2, steps=1, seed=99)
    resumed = RunCheckpoints(str(out), accelerator)
    assert RunCheckpoints.resolve("latest", str(out)) == path
    assert resumed.read(path) == state
    assert resumed.restore(path, ema=ema2) == state
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters()):
        assert torch.equal(p, p2), name
    base, base2 = optimizer.optimizer, optimizer2.optimizer
    for p, p2 in zip(model.parameters(), model2.parameters()):
        for key, value in base.state[p].items():
            assert torch.equal(value, base2.state[p2][key]), key
    assert ema2.optimization_step == ema.optimization_step == 4
    assert all(torch.equal(s, s2) for s, s2 in zip(ema.shadow_params, ema2.shadow_params))

    # and both continue identically
    take_steps(model, optimizer, ema, seed=3)
    take_steps(model2, optimizer2, ema2, seed=3)
    assert all(torch.equal(p, p2) for p, p2 in zip(model.parameters(), model2.parameters()))


def test_saving_a_step_again_replaces_its_checkpoint_and_state_keys_are_checked(tmp_path):
    run, model, optimizer, ema = saved_run(tmp_path, steps=(1,))
    path = tmp_path / "out" / "checkpoint-1"
    run.save(1, {"controller": {"old": True}}, model=model, optimizer=optimizer, ema=None)
    state = read_state(str(path))
    assert state["controller"] == {"old": True} and "pruner" not in state and state["ema"] is None
    assert not (path / EMA_WEIGHTS_NAME).exists()
    assert os.listdir(tmp_path / "out") == ["checkpoint-1"]  # nothing set aside is left behind
    with pytest.raises(ValueError, match="may not hold.*global_step"):
        run.save(2, {"global_step": 5}, model=model, optimizer=optimizer)


def test_restore_errors(tmp_path):
    run, *_ = saved_run(tmp_path)
    path = str(tmp_path / "out" / "checkpoint-1")
    accelerator, model, optimizer, _ = training_run(num_layers=2)  # another architecture
    with pytest.raises(RunMismatchError, match="--resume_from_checkpoint.*does not fit this model"):
        RunCheckpoints(str(tmp_path / "out"), accelerator).restore(path)

    other = tmp_path / "no_ema"
    accelerator, model, optimizer, ema = training_run()
    RunCheckpoints(str(other), accelerator).save(1, STATE, model=model, optimizer=optimizer)
    with pytest.raises(ValueError, match=f"has no {EMA_WEIGHTS_NAME}, but `--use_ema` is set"):
        RunCheckpoints(str(other), accelerator).restore(str(other / "checkpoint-1"), ema=ema)


def test_is_checkpoint_of(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "link").symlink_to(tmp_path / "out", target_is_directory=True)
    assert is_checkpoint_of(str(tmp_path / "out" / "checkpoint-3"), out)
    assert is_checkpoint_of(str(tmp_path / "link" / "checkpoint-3"), out)
    assert not is_checkpoint_of(str(tmp_path / "elsewhere" / "checkpoint-3"), out)
    assert not is_checkpoint_of(str(tmp_path / "out" / "checkpoint-3" / "sub"), out)


# ---------------------------------------------------------------------------------------------- total limit


def test_total_limit_removes_old_checkpoints_only_once_the_new_one_is_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    removed = []
    real_rmtree = checkpoints.shutil.rmtree

    def spy(path, *args, **kwargs):  # what existed when each old checkpoint went
        if os.path.basename(path).startswith("checkpoint-"):
            newest = max(int(n.split("-")[1]) for n in os.listdir(out) if n.startswith("checkpoint-"))
            removed.append((os.path.basename(path), newest, os.path.isfile(out / f"checkpoint-{newest}" / STATE_NAME)))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.shutil, "rmtree", spy)
    saved_run(tmp_path, steps=(1, 2, 3, 4), total_limit=2)
    assert [os.path.basename(p) for p in list_checkpoints(str(out))] == ["checkpoint-3", "checkpoint-4"]
    assert removed == [("checkpoint-1", 3, True), ("checkpoint-2", 4, True)]


def test_total_limit_never_removes_the_checkpoint_just_saved(tmp_path):
    run, model, optimizer, ema = saved_run(tmp_path, steps=(1, 5), total_limit=1)  # checkpoint-5 only
    run.save(3, STATE, model=model, optimizer=optimizer, ema=ema)  # resumed from an older step
    assert (tmp_path / "out" / "checkpoint-3" / STATE_NAME).is_file()
    with pytest.raises(ValueError, match="total_limit"):
        RunCheckpoints(str(tmp_path), run.accelerator, total_limit=0)


# ---------------------------------------------------------------------------------------------- disk full


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["save_state", "ema", "state_file"])
def test_a_full_disk_during_save_removes_the_staging_folder_and_keeps_older_checkpoints(tmp_path, monkeypatch, where):
    run, model, optimizer, ema = saved_run(tmp_path, steps=(1,), total_limit=1)
    out = tmp_path / "out"
    if where == "save_state":  # accelerate has written its files, then the disk is full
        real = run.accelerator.save_state

        def save_state_then_full(folder, *args, **kwargs):
            real(folder, *args, **kwargs)
            assert os.listdir(folder)
            enospc()

        monkeypatch.setattr(run.accelerator, "save_state", save_state_then_full)
    elif where == "ema":
        monkeypatch.setattr(checkpoints, "save_ema", enospc)
    else:
        monkeypatch.setattr(checkpoints, "write_state", enospc)
    take_steps(model, optimizer, ema)
    with pytest.raises(CheckpointWriteError, match=r"Could not write checkpoint-2: the disk is probably full.*"
                                                   r"The incomplete \.checkpoint-2\.tmp was removed.*"
                                                   r"`--checkpoints_total_limit` \(now 1\)") as raised:
        run.save(2, STATE, model=model, optimizer=optimizer, ema=ema)
    assert raised.value.__cause__.errno == errno.ENOSPC
    assert staging_left(out) == []
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-1")]
    read_state(str(out / "checkpoint-1"))


def test_an_error_other_than_a_full_disk_propagates_as_it_is(tmp_path, monkeypatch):
    run, model, optimizer, ema = saved_run(tmp_path, steps=())

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(checkpoints, "save_ema", denied)
    with pytest.raises(PermissionError):
        run.save(1, STATE, model=model, optimizer=optimizer, ema=ema)
    assert list_checkpoints(str(tmp_path / "out")) == []


# ---------------------------------------------------------------------------------------------- divergence


@pytest.mark.parametrize("what", ["weight", "ema"])
def test_a_non_finite_training_state_is_never_saved(tmp_path, what):
    run, model, optimizer, ema = saved_run(tmp_path, steps=(1,))
    with torch.no_grad():
        if what == "weight":
            model.proj_out_2.weight.view(-1)[0] = float("inf")
        else:
            ema.shadow_params[0].view(-1)[0] = float("nan")
    good = tmp_path / "out" / "checkpoint-1"
    named = r"weight proj_out_2\.weight" if what == "weight" else r"EMA weight of "
    with pytest.raises(RuntimeError, match=rf"The {named}.* is not finite after the update of step 2, though the loss "
                                           rf"was finite.*the last good checkpoint is {good}\. Resume from it with "
                                           rf"`--resume_from_checkpoint {good}`.*`--learning_rate` \(now 0\.001\) or "
                                           r"`--max_grad_norm` \(now 1\.0\)"):
        run.save(2, STATE, model=model, optimizer=optimizer, ema=ema)
    assert list_checkpoints(str(tmp_path / "out")) == [str(good)]
    assert staging_left(tmp_path / "out") == []


def test_divergence_error_without_a_good_checkpoint(tmp_path):
    run = RunCheckpoints(str(tmp_path), Accelerator(cpu=True), learning_rate=0.5, max_grad_norm=0.0)
    error = run.divergence_error("The training loss is nan at step 3: training diverged.")
    assert isinstance(error, RuntimeError)
    assert str(error).startswith("The training loss is nan at step 3: training diverged. Nothing was saved from that "
                                 "step on; there is no checkpoint checked finite to resume from. Start again with a "
                                 "lower `--learning_rate` (now 0.5) or `--max_grad_norm` (now 0.0)")


# ---------------------------------------------------------------------------------------------- resolve


def test_resolve_latest_skips_a_damaged_newest_checkpoint(tmp_path):
    saved_run(tmp_path, steps=(1, 2))
    out = tmp_path / "out"
    weights = out / "checkpoint-2" / "model.safetensors"
    with open(weights, "r+b") as f:  # a copy cut short
        f.truncate(os.path.getsize(weights) // 2)
    assert RunCheckpoints.resolve("latest", str(out)) == str(out / "checkpoint-1")
    with pytest.raises(CorruptCheckpointError, match="--resume_from_checkpoint.*model.safetensors.*truncated.*"
                                                     "Pass an older checkpoint, or 'latest'"):
        RunCheckpoints.resolve(str(out / "checkpoint-2"), str(out))
    assert RunCheckpoints.resolve(str(out / "checkpoint-1"), "/somewhere/else") == str(out / "checkpoint-1")
    assert RunCheckpoints.resolve(None, str(out)) is None
    assert RunCheckpoints.resolve("latest", str(tmp_path / "empty")) is None
    with pytest.raises(ValueError, match=f"is not a checkpoint of this script \\(no {STATE_NAME}"):
        RunCheckpoints.resolve(str(tmp_path), str(out))


# ---------------------------------------------------------------------------------------------- folders


class Killed(BaseException):
    pass


class OsKilledAfter:
    """`os`, except that the process "dies" right after the `os.replace` whose source is ``source``."""

    def __init__(self, source):
        self.source, self.calls = os.path.abspath(source), []

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        os.replace(src, dst)
        self.calls.append((os.path.abspath(src), os.path.abspath(dst)))
        if os.path.abspath(src) == self.source:
            raise Killed


def test_a_kill_between_setting_the_old_folder_aside_and_renaming_the_new_one_in(tmp_path, monkeypatch):
    run, model, optimizer, ema = saved_run(tmp_path, steps=(1, 2))
    out = tmp_path / "out"
    old_state = read_state(str(out / "checkpoint-2"))
    killing = OsKilledAfter(out / "checkpoint-2")
    monkeypatch.setattr(output_dir_module, "os", killing)
    take_steps(model, optimizer, ema)
    with pytest.raises(Killed):
        run.save(2, {**STATE, "stage_times": ["new"]}, model=model, optimizer=optimizer, ema=ema)
    monkeypatch.undo()
    # the window: no checkpoint-2; the old one set aside, the new one complete in its staging folder
    assert len(killing.calls) == 1
    assert list_checkpoints(str(out)) == [str(out / "checkpoint-1")]
    aside = [n for n in os.listdir(out) if n.startswith(".checkpoint-2.tmp.old-")]
    assert len(aside) == 1 and read_state(str(out / aside[0] / "old")) == old_state
    assert read_state(str(out / ".checkpoint-2.tmp"))["stage_times"] == ["new"]
    # a resumed run finds the last complete checkpoint and removes both leftovers
    assert RunCheckpoints.resolve("latest", str(out)) == str(out / "checkpoint-1")
    assert sorted(os.path.basename(p) for p in remove_stale_staging(str(out))) == sorted(aside + [".checkpoint-2.tmp"])


def test_replace_folder(tmp_path):
    staging, final = tmp_path / ".new", tmp_path / "final"
    staging.mkdir()
    (staging / "a").write_text("new")
    replace_folder(str(staging), str(final))  # nothing there yet
    assert (final / "a").read_text() == "new" and not staging.exists()
    staging.mkdir()
    (staging / "b").write_text("newer")
    replace_folder(str(staging), str(final))  # a folder replaced whole, nothing left set aside
    assert os.listdir(final) == ["b"] and sorted(os.listdir(tmp_path)) == ["final"]
    (tmp_path / "file").write_text("new file")
    replace_folder(str(tmp_path / "file"), str(final))  # a file over a folder
    assert final.read_text() == "new file" and sorted(os.listdir(tmp_path)) == ["final"]


def test_move_into_takes_the_index_out_first_and_puts_it_in_last(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for name in ("checkpoint-4", "transformer", "vae"):
        (out / name).mkdir(parents=True)
    (out / "transformer" / "old.safetensors").write_text("old")
    (out / "model_index.json").write_text("old index")
    (out / "notes.txt").write_text("mine")
    folder = out / ".export-x" / "pipeline"
    for name in ("transformer", "vae", "scheduler"):
        (folder / name).mkdir(parents=True)
        (folder / name / "new").write_text(name)
    for name in ("model_index.json", "README.md", MARKER_NAME):
        (folder / name).write_text("new")

    moves, index_seen = [], []

    class RecordingOs:
        def __getattr__(self, name):
            return getattr(os, name)

        def replace(self, src, dst):
            index_seen.append(os.path.exists(out / "model_index.json"))
            os.replace(src, dst)
            if os.path.dirname(os.path.abspath(dst)) == str(out):
                moves.append(os.path.basename(dst))

    monkeypatch.setattr(output_dir_module, "os", RecordingOs())
    moved = move_into(str(folder), str(out))
    assert moves == ["README.md", "scheduler", "transformer", "vae", "model_index.json"]
    assert moved == [str(out / n) for n in moves]
    assert not any(index_seen)  # the old index went before anything moved, the new one came last
    assert (out / "model_index.json").read_text() == "new"
    assert os.listdir(out / "transformer") == ["new"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "checkpoint-4").is_dir()
    assert not (out / MARKER_NAME).exists() and (folder / MARKER_NAME).exists()  # skipped
    assert sorted(os.listdir(folder)) == [MARKER_NAME]  # nothing set aside is left


def test_lock_output_dir(tmp_path):
    accelerator = Accelerator(cpu=True)
    lock = lock_output_dir(accelerator, str(tmp_path / "out"), "the first run")
    try:
        holder = json.loads((tmp_path / "out" / ".entprune.lock").read_text())
        assert holder["command"] == "the first run" and holder["pid"] == os.getpid()
        with pytest.raises(OutputDirLockedError, match="--output_dir.*is in use.*the first run"):
            lock_output_dir(accelerator, str(tmp_path / "out"), "a second run")
    finally:
        lock.release()
    lock_output_dir(accelerator, str(tmp_path / "out"), "a third run").release()
