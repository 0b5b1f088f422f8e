"""Never destroy an input, never mix two runs (issue 12): the output-folder rule, the lock and resume identity.

Every case that could lose data snapshots its inputs (every file's SHA-256) first and asserts they are
byte-identical afterwards. The rule is tested through the pruning script and every ``entprune`` command that
writes a folder, and through the Python API.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import make_scheduler, make_tiny_dit, make_tiny_vae
from diffusers import DiTTransformer2DModel
from test_prune_dit_script import DOWNSTREAM, fresh_accelerator_state, run_prune_script, tiny_args, weights  # noqa: F401

from diffusers_entprune import cli
from diffusers_entprune.export import save_pruned_pipeline
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.output_dir import (
    LOCK_NAME,
    MARKER_NAME,
    OutputDirLock,
    OutputDirLockedError,
    check_output_dir,
    clear_output_dir,
)
from diffusers_entprune.run_identity import RunMismatchError, compare_run_identity, run_identity

FAST = ["--validation_steps", "0", "--speed_batch_size", "0"]


def snapshot(path) -> dict:
    """{relative path: sha256} of every file under ``path`` (or of the file itself)."""
    path = str(path)
    if os.path.isfile(path):
        return {"": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            found[os.path.relpath(full, path)] = hashlib.sha256(open(full, "rb").read()).hexdigest()
    return found


def tiny_pipeline(folder, seed=0, transformer=None) -> str:
    return save_pruned_pipeline(str(folder), transformer or make_tiny_dit(seed=seed), make_tiny_vae(),
                                make_scheduler(), id2label={i: f"class{i}" for i in range(10)})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(source pipeline, output folder of a finished 12-step run with checkpoint-6 and checkpoint-12)."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("finished")
    source = tiny_pipeline(root / "source")
    out = root / "run"
    AcceleratorState._reset_state(reset_partial_state=True)
    run_prune_script(tiny_args(source, out, *FAST))
    AcceleratorState._reset_state(reset_partial_state=True)
    return source, out


@pytest.fixture
def run_copy(tmp_path, finished_run):
    """A private copy of the finished run (and its source), so a case may resume or fail in it."""
    source, out = finished_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    return source, copy


# ------------------------------------------------------------------------------------ an output is never an input


def dataset_copy(tmp_path) -> str:
    target = tmp_path / "data"
    shutil.copytree(DOWNSTREAM, target)
    return str(target)


@pytest.mark.parametrize("where", ["source", "inside_source", "symlink_to_source", "source_with_overwrite",
                                  "resume_explicit_into_source", "data", "inside_data", "contains_data"])
def test_script_never_writes_into_an_input(tmp_path, finished_run, where):
    source_done, run = finished_run
    source = str(tmp_path / "source")
    shutil.copytree(source_done, source)
    data = dataset_copy(tmp_path)
    extra = list(FAST)
    data_dir = data
    if where in ("source", "source_with_overwrite", "resume_explicit_into_source"):
        out = source
    elif where == "inside_source":
        out = os.path.join(source, "transformer", "pruned")
    elif where == "symlink_to_source":
        out = str(tmp_path / "link")
        os.symlink(source, out)
    elif where == "data":
        out = data
    elif where == "inside_data":  # its plots would become a class of the dataset on resume
        out = os.path.join(data, "runs")
    else:  # the output folder holds the dataset
        out = str(tmp_path / "out")
        data_dir = os.path.join(out, "data")
        shutil.copytree(data, data_dir)
    if where == "source_with_overwrite":
        extra.append("--overwrite_output_dir")
    if where == "resume_explicit_into_source":  # skipped the folder check before: the export replaced the source
        checkpoint = str(tmp_path / "checkpoint-6")
        shutil.copytree(os.path.join(run, "checkpoint-6"), checkpoint)
        extra += ["--resume_from_checkpoint", checkpoint]
    before = {p: snapshot(p) for p in (source, data, data_dir)}
    args = tiny_args(source, out, *extra)
    args[args.index("--train_data_dir") + 1] = data_dir
    relation = r"`--output_dir`=.*(is|lies inside|contains) `--(pretrained_model_name_or_path|train_data_dir)`"
    with pytest.raises(ValueError, match=relation + ".*outside every input"):
        run_prune_script(args)
    assert {p: snapshot(p) for p in before} == before


def test_eval_and_score_with_overwrite_never_delete_their_input(tmp_path, finished_run):
    source = str(tmp_path / "model")
    shutil.copytree(finished_run[0], source)
    data = dataset_copy(tmp_path)
    before = snapshot(source), snapshot(data)
    with pytest.raises(ValueError, match="`--output_dir`=.* is `--pretrained_model_name_or_path`"):
        cli.main(["eval", "--pretrained_model_name_or_path", source, "--output_dir", source, "--overwrite_output_dir",
                  "--num_samples", "4"])
    with pytest.raises(ValueError, match="`--output_dir`=.* is `--train_data_dir`"):
        cli.main(["score", "--train_data_dir", data, "--output_dir", data, "--overwrite_output_dir"])
    with pytest.raises(ValueError, match="`--output_dir`=.* lies inside `--reference`"):
        cli.main(["eval", "--reference", data, "--output_dir", os.path.join(data, "eval"), "--num_samples", "4"])
    with pytest.raises(ValueError, match="`--output_dir`=.* is `--pretrained_model_name_or_path`"):
        cli.main(["prune", "--pretrained_model_name_or_path", source, "--prune_blocks", "1", "--output_dir", source,
                  "--overwrite_output_dir"])
    checkpoint = os.path.join(str(tmp_path), "ckpt", "model.pt")
    os.makedirs(os.path.dirname(checkpoint))
    open(checkpoint, "wb").write(b"not a checkpoint, but an input")
    with pytest.raises(ValueError, match="`--output_dir`=.* contains `--checkpoint`"):
        cli.main(["convert", "--checkpoint", checkpoint, "--vae", os.path.join(source, "vae"), "--output_dir",
                  os.path.dirname(checkpoint), "--overwrite_output_dir"])
    assert (snapshot(source), snapshot(data)) == before
    assert open(checkpoint, "rb").read() == b"not a checkpoint, but an input"


def test_api_never_saves_over_the_folder_a_model_was_loaded_from(tmp_path):
    source = tiny_pipeline(tmp_path / "source")
    before = snapshot(source)
    transformer = EntPrunedTransformer2DModel.from_pretrained(source, subfolder="transformer")
    transformer.prune_blocks([1])
    with pytest.raises(ValueError, match="transformer \\(loaded from\\)"):
        save_pruned_pipeline(source, transformer, make_tiny_vae(), make_scheduler(), overwrite=True)
    assert snapshot(source) == before


# ---------------------------------------------------------------------------------------------- only our own files go


def test_overwrite_replaces_only_an_earlier_output_of_the_same_command(tmp_path):
    out = tmp_path / "scores"
    out.mkdir()
    (out / "scores.json").write_text("{}")
    check_output_dir(str(out), overwrite=True, kind="scores")  # an earlier `entprune score` output: fine
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match=r"did not write \(thesis.tex\)"):
        check_output_dir(str(out), overwrite=True, kind="scores")
    other = tmp_path / "metrics"
    other.mkdir()
    (other / "metrics.json").write_text("{}")
    (other / MARKER_NAME).write_text(json.dumps({"kind": "metrics", "command": "entprune eval"}))
    with pytest.raises(FileExistsError, match="did not write"):  # same-looking names, another command's folder
        check_output_dir(str(other), overwrite=True, kind="pipeline")
    assert (out / "thesis.tex").read_text() == "years of work"
    # clear_output_dir removes the command's names only, whatever it is given
    run = tmp_path / "run"
    (run / "checkpoint-6").mkdir(parents=True)
    (run / "README.md").write_text("an earlier run's card")
    (run / "transformer").mkdir()
    (run / "model_index.json").write_text("{}")
    (run / "notes.txt").write_text("mine")
    removed = clear_output_dir(str(run), "training", "test")
    # the index first: killed halfway, the folder never holds an index beside a half-removed model
    assert [os.path.basename(p) for p in removed] == ["model_index.json", "README.md", "checkpoint-6", "transformer"]
    assert sorted(os.listdir(run)) == [MARKER_NAME, "notes.txt"]


def test_cli_overwrite_refuses_foreign_files_and_replaces_its_own(tmp_path, finished_run):
    source = finished_run[0]
    out = tmp_path / "pruned"
    args = ["prune", "--pretrained_model_name_or_path", source, "--prune_blocks", "1", "--output_dir", str(out),
            "--num_samples_per_row", "0"]
    assert cli.main(args) == 0
    assert json.loads((out / MARKER_NAME).read_text())["kind"] == "pipeline"
    (out / "my_notes.md").write_text("keep me")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match="my_notes.md"):
        cli.main(args + ["--overwrite_output_dir"])
    assert snapshot(out) == before
    os.remove(out / "my_notes.md")
    args[args.index("--prune_blocks") + 1] = "2"
    assert cli.main(args + ["--overwrite_output_dir"]) == 0
    assert json.loads((out / "entprune_report.json").read_text())["pruned_block_indices"] == [2]


def test_script_overwrite_deletes_nothing_before_every_argument_is_checked(run_copy):
    source, out = run_copy
    before = snapshot(out)
    with pytest.raises(ValueError, match="label_column"):
        run_prune_script(tiny_args(source, out, *FAST, "--overwrite_output_dir", "--label_column", "no_such_column"))
    assert snapshot(out) == before  # the finished run's checkpoints and model are all still there
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        run_prune_script(tiny_args(source, out, *FAST, "--overwrite_output_dir"))
    assert (out / "thesis.tex").read_text() == "years of work"


# ---------------------------------------------------------------------------------------------- unwritable folders


@contextlib.contextmanager
def read_only(folder):
    """Make ``folder`` refuse new files, for root too (chattr +i) or by permissions for other users."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a folder read-only for root here (chattr +i refused)")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        os.chmod(folder, 0o555)
        try:
            yield
        finally:
            os.chmod(folder, 0o755)


def test_read_only_or_dangling_output_is_refused_before_training(tmp_path, finished_run):
    source = finished_run[0]
    locked = tmp_path / "read-only"
    locked.mkdir()
    with read_only(locked):
        with pytest.raises(PermissionError, match="`--output_dir`=.*cannot write"):
            run_prune_script(tiny_args(source, locked, *FAST))
        with pytest.raises(PermissionError, match="`--output_dir`=.*cannot write"):  # a folder to be made inside it
            run_prune_script(tiny_args(source, locked / "run", *FAST))
    assert os.listdir(locked) == []
    dangling = tmp_path / "dangling"
    os.symlink(tmp_path / "gone", dangling)
    with pytest.raises(ValueError, match="symlink.*does not exist"):
        run_prune_script(tiny_args(source, dangling, *FAST))


# ---------------------------------------------------------------------------------------------- one run per folder


def test_a_second_run_in_a_locked_folder_is_refused_and_touches_nothing(run_copy):
    source, out = run_copy
    staging = out / ".checkpoint-18.tmp"  # the live staging folder of the first run
    staging.mkdir()
    (staging / "model.safetensors").write_bytes(b"being written")
    before = snapshot(out)
    with OutputDirLock(str(out), command="the first run"):
        for extra in ([], ["--resume_from_checkpoint", "latest"], ["--overwrite_output_dir"]):
            with pytest.raises(OutputDirLockedError, match=f"{os.getpid()}.*the first run.*another folder"):
                run_prune_script(tiny_args(source, out, *FAST, *extra))
        assert {k: v for k, v in snapshot(out).items() if k != LOCK_NAME} == before
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(run_copy, caplog):
    source, out = run_copy
    (out / LOCK_NAME).write_text(json.dumps({"pid": 999999, "host": "node-7", "started": "yesterday"}))
    run_prune_script(tiny_args(source, out, *FAST, "--resume_from_checkpoint", "latest"))
    assert "stale lock" in caplog.text and "999999" in caplog.text
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_lock_removes_a_folder_it_created_when_the_run_is_refused(tmp_path, finished_run):
    out = tmp_path / "new"
    with pytest.raises(ValueError, match="label_column"):
        run_prune_script(tiny_args(finished_run[0], out, *FAST, "--label_column", "nope"))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- resume identity


def resume_args(source, out, *extra):
    return tiny_args(source, out, *FAST, "--resume_from_checkpoint", str(out / "checkpoint-6"), *extra)


@pytest.mark.parametrize("extra, listed", [
    (["--seed", "1"], [r"--seed: 0 -> 1"]),
    (["--adam_beta2", "0.99"], [r"--adam_beta2: 0\.999 -> 0\.99"]),
    (["--train_batch_size", "4", "--ranking", "magnitude"], [r"--global_batch_size: 5 -> 4",
                                                             r"--ranking: 'ced' -> 'magnitude'"]),
    (["--use_lora"], [r"--use_lora: False -> True"]),
    (["--max_train_steps", "10"], [r"--max_train_steps: 12 -> 10"]),  # only growing is safe
    (["--lr_scheduler", "cosine", "--class_dropout_prob", "0.2"], [r"--lr_scheduler: 'constant' -> 'cosine'",
                                                                    r"--class_dropout_prob: 0\.1 -> 0\.2"]),
])
def test_resume_with_other_settings_is_refused_listing_each_difference(run_copy, extra, listed):
    source, out = run_copy
    before = snapshot(out)
    with pytest.raises(RunMismatchError) as error:
        run_prune_script(resume_args(source, out, *extra))
    for pattern in listed:
        assert re.search(pattern, str(error.value)), (pattern, str(error.value))
    assert "Resume with the checkpoint's settings" in str(error.value)
    assert snapshot(out) == before


def test_resume_with_other_source_weights_data_or_width_is_refused(tmp_path, run_copy):
    source, out = run_copy
    before = snapshot(out)
    same_shape = tiny_pipeline(tmp_path / "same-shape", seed=123)  # same config, other weights
    with pytest.raises(RunMismatchError, match="source model weights"):
        run_prune_script(resume_args(same_shape, out))
    wide = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                 num_layers=6, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    for block in wide.transformer_blocks[1:]:  # one embedder, as in a converted DiT
        block.norm1.emb.load_state_dict(wide.transformer_blocks[0].norm1.emb.state_dict())
    wider = tiny_pipeline(tmp_path / "wider", transformer=wide)
    with pytest.raises(RunMismatchError, match="source model weights"):  # not a raw state_dict error
        run_prune_script(resume_args(wider, out))
    data = dataset_copy(tmp_path)
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(data, "train.parquet"))
    pq.write_table(table.slice(1), os.path.join(data, "train.parquet"))  # one image fewer, the first rows change
    args = resume_args(source, out)
    args[args.index("--train_data_dir") + 1] = data
    with pytest.raises(RunMismatchError, match="dataset"):
        run_prune_script(args)
    assert snapshot(out) == before


def test_resume_with_safe_changes_is_allowed_and_recorded(run_copy):
    source, out = run_copy
    whole = weights(out)
    run_prune_script(resume_args(source, out, "--checkpoints_total_limit", "3", "--validation_steps", "5",
                               "--max_train_steps", "12"))
    report = json.loads((out / "entprune_report.json").read_text())
    (resume,) = report["run_identity"]["resumes"]
    assert resume["step"] == 6 and resume["checkpoint"].endswith("checkpoint-6")
    assert resume["changed"] == {"checkpoints_total_limit": [None, 3], "validation_steps": [0, 5]}
    after = weights(out)
    assert all((whole[k] == after[k]).all() for k in whole)  # the same run: the same weights
    state = json.loads((out / "checkpoint-12" / "entprune_state.json").read_text())
    assert state["run_identity"]["resumes"] == report["run_identity"]["resumes"]  # carried into later checkpoints


def test_resume_may_grow_max_train_steps_only_under_a_constant_schedule(run_copy):
    source, out = run_copy
    run_prune_script(resume_args(source, out, "--max_train_steps", "14"))
    report = json.loads((out / "entprune_report.json").read_text())
    assert report["run_identity"]["resumes"][0]["changed"] == {"max_train_steps": [12, 14]}
    assert report["training"]["max_train_steps"] == 14
    # a schedule that decays over max_train_steps would change every later learning rate: refused
    old = run_identity({"lr_scheduler": "cosine", "max_train_steps": 12}, "a", {"split": "train"})
    new = run_identity({"lr_scheduler": "cosine", "max_train_steps": 14}, "a", {"split": "train"})
    with pytest.raises(RunMismatchError, match="max_train_steps: 12 -> 14 .*decays"):
        compare_run_identity(old, new, "checkpoint-6")
    assert compare_run_identity(old, old, "checkpoint-6") == {}


def test_resume_from_a_checkpoint_elsewhere_writes_a_fresh_folder_and_keeps_the_checkpoint(tmp_path, run_copy):
    source, run = run_copy
    checkpoint = tmp_path / "backup" / "checkpoint-6"
    shutil.copytree(run / "checkpoint-6", checkpoint)
    before = snapshot(checkpoint)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    args = tiny_args(source, taken, *FAST, "--resume_from_checkpoint", str(checkpoint))
    with pytest.raises(FileExistsError, match="notes.txt"):  # an explicit checkpoint does not skip the folder check
        run_prune_script(args)
    out = tmp_path / "fresh"
    run_prune_script(tiny_args(source, out, *FAST, "--resume_from_checkpoint", str(checkpoint)))
    whole, resumed = weights(run), weights(out)
    assert all((whole[k] == resumed[k]).all() for k in whole)
    assert snapshot(checkpoint) == before


def test_a_new_learning_rate_on_resume_is_applied_and_recorded(run_copy, monkeypatch):
    """The way out of a divergence: resume from the last good checkpoint with a lower rate. Before, the restored
    schedule silently kept the old rate while the report showed the new one."""
    import torch

    source, out = run_copy
    rates, real_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run_prune_script(resume_args(source, out, "--learning_rate", "0.0005", "--max_grad_norm", "0.5"))
    assert rates and set(rates) == {0.0005}  # every step after the resume ran at the new rate
    report = json.loads((out / "entprune_report.json").read_text())
    assert report["run_identity"]["resumes"][0]["changed"] == {"learning_rate": [0.001, 0.0005],
                                                               "max_grad_norm": [1.0, 0.5]}
    assert report["training"]["learning_rate"] == 0.0005


def test_a_setting_introduced_later_resumes_old_checkpoints_only_at_its_old_behaviour():
    # a checkpoint written before --ced_estimator existed ran the paper's estimator
    old = run_identity({"ranking": "ced"}, "a", {"split": "train"})
    same = run_identity({"ranking": "ced", "ced_estimator": "entropy", "ced_signal": "prediction"}, "a",
                        {"split": "train"})
    assert compare_run_identity(old, same, "checkpoint-6") == {}
    other = run_identity({"ranking": "ced", "ced_estimator": "residual", "ced_signal": "prediction"}, "a",
                         {"split": "train"})
    with pytest.raises(RunMismatchError, match="ced_estimator: 'entropy' -> 'residual'"):
        compare_run_identity(old, other, "checkpoint-6")
