"""examples/prune_dit.py end to end on a tiny DiT and the embedded digits: output, resume, push, bad input."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file
from script_runner import SCRIPT, run_prune_script  # noqa: F401  (SCRIPT: for other test modules)
from test_cli import source_pipeline  # noqa: F401  (fixture)

import diffusers_entprune.hub as hub
from diffusers_entprune.checkpoints import STATE_NAME
from diffusers_entprune.embedded import DIGITS_DIR

DOWNSTREAM = os.path.join(DIGITS_DIR, "downstream")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each script run is a new process in real use: accelerate's process-wide state (e.g. the mixed precision of
    the first Accelerator) must not leak from one in-process run to the next."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def tiny_args(source, output_dir, *extra):
    # 6-block tiny DiT, half of it pruned in 2 stages over the first 8 of 12 steps
    return ["--pretrained_model_name_or_path", source, "--train_data_dir", DOWNSTREAM, "--output_dir", str(output_dir),
            "--max_train_steps", "12", "--pruning_stages", "2", "--pruning_steps", "8", "--train_batch_size", "5",
            "--ced_num_samples", "32", "--ced_batch_size", "16", "--proxy_batch_size", "4",
            "--checkpointing_steps", "6", "--validation_steps", "6", "--num_inference_steps", "2",
            "--speed_batch_size", "2", "--speed_repeats", "1", "--learning_rate", "1e-3", *extra]


def weights(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))


LOAD_WITHOUT_PACKAGE = textwrap.dedent("""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "diffusers_entprune":
                raise ImportError("diffusers_entprune is blocked in this process")
    sys.meta_path.insert(0, Block())
    import torch
    from diffusers import DiTPipeline
    pipe = DiTPipeline.from_pretrained(sys.argv[1])
    pipe(class_labels=[1], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np")
    assert "diffusers_entprune" not in sys.modules
    print("OK", pipe.transformer.config.num_layers)
""")


def assert_loads_without_package(folder, num_layers):
    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, str(folder)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"OK {num_layers}" in result.stdout


def test_one_process_end_to_end(tmp_path, source_pipeline):  # noqa: F811
    out = tmp_path / "out"
    run_prune_script(tiny_args(source_pipeline, out, "--use_ema"))
    report = json.load(open(out / "entprune_report.json"))
    assert report["original_num_layers"] == 6 and len(report["kept_block_indices"]) == 3
    assert "kept_blocks" not in report  # one name: kept_block_indices
    stages = report["stages"]
    assert [s["step"] for s in stages] == [0, 4]
    assert sorted(b for s in stages for b in s["pruned_blocks"]) == report["pruned_block_indices"]
    for stage in stages:  # every decision is recorded with its CED scores and candidates
        pruned_before = sum(len(s["pruned_blocks"]) for s in stages[: stage["stage"]])
        if pruned_before == 3:  # the target was met earlier: nothing to rank
            assert stage["ced_scores"] == {} and stage["pruned_blocks"] == []
            continue
        assert len(stage["ced_scores"]) == 6 - pruned_before
        chosen = [c for c in stage["candidates"] if c["blocks"] == stage["pruned_blocks"]]
        assert len(chosen) == 1
        lowest = sorted(stage["ced_scores"], key=lambda b: (stage["ced_scores"][b], int(b)))
        assert sorted(stage["pruned_blocks"]) == sorted(int(b) for b in lowest[: len(stage["pruned_blocks"])])
    assert stages[0]["candidates"][0]["ntk_condition_number"] is not None  # the first stage had a choice
    speed = report["sampling_speed"]
    assert speed["flops_ratio"] > 1.0 and speed["speedup"] > 0 and speed["batch_size"] == 2
    for name in ("ced.png", "samples.png", "README.md", "validation/step-000006.png", "checkpoint-12"):
        assert (out / name).exists(), name
    assert "3 of 6 kept" in (out / "README.md").read_text()
    # the exported weights are the EMA weights, not the last training weights
    trained = load_file(str(out / "checkpoint-12" / "model.safetensors"))
    exported = weights(out)
    key = "proj_out_2.weight"
    assert not torch.equal(trained[key], exported[key])
    assert_loads_without_package(out, 3)


def test_two_processes_end_to_end(tmp_path, source_pipeline):  # noqa: F811
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT,
               *tiny_args(source_pipeline, out, "--use_ema", "--checkpointing_steps", "4")]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    except subprocess.TimeoutExpired:
        # Seen once in about 40 two-process CPU launches this session: one gloo rank never exited after the run had
        # written everything (a teardown hang, not a training one). Retry once, loudly, rather than fail CI on it.
        warnings.warn("The two-process run hung at exit; retrying once (gloo teardown).", stacklevel=1)
        shutil.rmtree(out, ignore_errors=True)
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.load(open(out / "entprune_report.json"))
    assert len(report["kept_block_indices"]) == 3 and len(report["stages"]) == 2
    assert (out / "checkpoint-8" / "random_states_1.pkl").exists()  # each process saved its RNG state
    assert "Blocks and weights agree across 2 processes" in result.stderr  # DDP rebuilt after pruning kept sync
    assert_loads_without_package(out, 3)


def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, source_pipeline):  # noqa: F811
    """Stopped after the first of three pruning stages (steps 0, 3, 6): resumed from the checkpoint of step 3."""
    extra = ["--pruning_stages", "3", "--pruning_steps", "9", "--checkpointing_steps", "3", "--use_ema",
             "--validation_steps", "0", "--speed_batch_size", "0"]
    run_prune_script(tiny_args(source_pipeline, tmp_path / "whole", *extra))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    # what a crash after step 3 leaves behind: that run's checkpoint (made by the same code)
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", resumed / "checkpoint-3")
    # the EMA is saved as safetensors: resuming unpickles nothing of accelerate's custom objects
    assert (resumed / "checkpoint-3" / "ema.safetensors").exists()
    assert not list((resumed / "checkpoint-3").glob("custom_checkpoint_*"))
    state = json.load(open(resumed / "checkpoint-3" / STATE_NAME))
    assert state["global_step"] == 3 and len(state["pruner"]["controller"]["decisions"]) == 1  # one stage decided
    run_prune_script(tiny_args(source_pipeline, resumed, *extra, "--resume_from_checkpoint", "latest"))
    whole_report = json.load(open(tmp_path / "whole" / "entprune_report.json"))
    resumed_report = json.load(open(resumed / "entprune_report.json"))
    assert resumed_report["stages"] == whole_report["stages"]  # same decisions, CED scores and proxy values
    assert resumed_report["kept_block_indices"] == whole_report["kept_block_indices"]
    a, b = weights(tmp_path / "whole"), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_push_to_hub_uploads_the_pipeline_without_checkpoints(tmp_path, source_pipeline, monkeypatch):  # noqa: F811
    import huggingface_hub.constants
    from test_hub import FakeApi

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    FakeApi.calls.clear()
    out = tmp_path / "dit-tiny-pruned"
    run_prune_script(tiny_args(source_pipeline, out, "--push_to_hub", "--hub_model_id", "me/dit-tiny-pruned",
                             "--speed_batch_size", "0"))
    create = next(c for c in FakeApi.calls if c[0] == "create_repo")
    upload = next(c for c in FakeApi.calls if c[0] == "upload_folder")
    assert create[1] == upload[1] == "me/dit-tiny-pruned"
    assert {"model_index.json", "README.md", "entprune_report.json", "ced.png", "samples.png",
            "transformer", "vae", "scheduler"} <= set(upload[2])
    assert "checkpoint-*" in upload[3]["ignore_patterns"]
    assert 'DiTPipeline.from_pretrained("me/dit-tiny-pruned")' in (out / "README.md").read_text()


def test_push_refused_offline_and_existing_output_kept(tmp_path, source_pipeline, monkeypatch):  # noqa: F811
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="push_to_hub.*HF_HUB_OFFLINE"):
        run_prune_script(tiny_args(source_pipeline, out, "--push_to_hub"))
    assert os.listdir(out) == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("extra, error, match", [
    (["--target_num_blocks", "6"], ValueError, "removes all 6 blocks"),
    (["--target_prune_ratio", "0.01"], ValueError, "removes no block"),
    (["--target_num_params", "10"], ValueError, "target_num_params.*removes all 6 blocks"),
    (["--image_column", "picture"], ValueError, "image_column.*picture"),
    (["--resume_from_checkpoint", "/no/such/checkpoint"], ValueError, "resume_from_checkpoint"),
])
def test_bad_input_is_refused_before_anything_is_written(tmp_path, source_pipeline, extra, error, match):  # noqa: F811
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        run_prune_script(tiny_args(source_pipeline, out, *extra))
    assert not out.exists()


def test_labels_outside_the_models_classes_are_refused(tmp_path, source_pipeline):  # noqa: F811
    from datasets import Dataset
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    Dataset.from_dict({"image": [Image.new("RGB", (32, 32))] * 4, "label": [0, 1, 1500, 2]}).to_parquet(
        str(data / "train.parquet"))
    args = tiny_args(source_pipeline, tmp_path / "out")
    args[args.index("--train_data_dir") + 1] = str(data)
    with pytest.raises(ValueError, match=r"label_column.*1500.*0\.\.999"):
        run_prune_script(args)
    assert not (tmp_path / "out").exists()


def test_non_empty_output_dir_needs_resume_or_overwrite(tmp_path, source_pipeline):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        run_prune_script(tiny_args(source_pipeline, out))
    (out / "checkpoint-6").mkdir()  # an interrupted run's checkpoint: resuming is the other way out
    with pytest.raises(FileExistsError, match="resume_from_checkpoint latest"):
        run_prune_script(tiny_args(source_pipeline, out))
    assert (out / "model_index.json").read_text() == "{}"


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, source_pipeline,  # noqa: F811
                                                                         monkeypatch):
    from diffusers_entprune.objectives import DiffusionObjective

    real_loss, calls = DiffusionObjective.loss, {"training": 0}

    def loss_that_diverges(self, model_output, x0, batch):
        loss = real_loss(self, model_output, x0, batch)
        if len(x0) == 5:  # training batches (the proxies use 4)
            calls["training"] += 1
            if calls["training"] > 7:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(DiffusionObjective, "loss", loss_that_diverges)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"loss is nan at step 7.*checkpoint-6.*learning_rate"):
        run_prune_script(tiny_args(source_pipeline, out, "--validation_steps", "0"))
    assert sorted(os.listdir(out)) == [".entprune_output.json", "checkpoint-6"]  # the last good checkpoint only
    assert (out / "checkpoint-6" / STATE_NAME).exists()


def test_lora_fine_tunes_adapters_only_and_exports_merged_weights(tmp_path, source_pipeline):  # noqa: F811
    out = tmp_path / "lora"
    run_prune_script(tiny_args(source_pipeline, out, "--use_lora", "--lora_rank", "2", "--use_ema",
                             "--speed_batch_size", "0"))
    exported, source = weights(out), weights(source_pipeline)
    assert not any("lora" in k for k in exported)
    assert torch.equal(exported["proj_out_2.weight"], source["proj_out_2.weight"])  # frozen: not an adapted layer
    report = json.load(open(out / "entprune_report.json"))
    assert report["training"]["use_lora"] is True
    kept = report["kept_block_indices"]
    position = 0  # block 'position' of the export holds original block kept[0]
    q_new = exported[f"transformer_blocks.{position}.attn1.to_q.weight"]
    q_old = source[f"transformer_blocks.{kept[0]}.attn1.to_q.weight"]
    assert not torch.equal(q_new, q_old)  # the merged adapter changed an adapted layer
    assert_loads_without_package(out, 3)


def test_bf16_mixed_precision_trains_samples_and_exports_float32(tmp_path, source_pipeline):  # noqa: F811
    out = tmp_path / "bf16"
    run_prune_script(tiny_args(source_pipeline, out, "--mixed_precision", "bf16", "--use_ema"))
    assert (out / "validation" / "step-000006.png").exists()  # the bf16 VAE decodes float32 latents
    assert all(v.dtype == torch.float32 for v in weights(out).values())
    report = json.load(open(out / "entprune_report.json"))
    assert report["training"]["mixed_precision"] == "bf16" and report["sampling_speed"]["speedup"] > 0


@pytest.mark.parametrize("ranking", ["magnitude", "random", "uniform"])
def test_baseline_rankings_drive_the_same_schedule(tmp_path, source_pipeline, ranking):  # noqa: F811
    from diffusers_entprune.importance import magnitude_scores, random_scores, uniform_scores
    from diffusers_entprune.models import EntPrunedTransformer2DModel

    out = tmp_path / "out"
    run_prune_script(tiny_args(source_pipeline, out, "--pruning_mode", "one_shot", "--ranking", ranking,
                             "--ranking_seed", "7", "--validation_steps", "0", "--speed_batch_size", "0"))
    report = json.load(open(out / "entprune_report.json"))
    source = EntPrunedTransformer2DModel.from_pretrained(source_pipeline, subfolder="transformer")
    expected = {"magnitude": lambda: magnitude_scores(source), "random": lambda: random_scores(source, seed=7),
                "uniform": lambda: uniform_scores(source, num_to_prune=3)}[ranking]()
    assert report["ranking"] == ranking and report["pruning_config"]["ranking_seed"] == 7
    assert report["stages"][0]["pruned_blocks"] == sorted(expected.ranking[:3])
    assert report["stages"][0]["ced_scores"] == {str(k): v for k, v in zip(expected.block_indices, expected.scores)}
    assert "baseline" in report["pruned_by"]["method"]


def test_taylor_ranking_with_lora_is_refused(tmp_path, source_pipeline):  # noqa: F811
    with pytest.raises(SystemExit):
        run_prune_script(tiny_args(source_pipeline, tmp_path / "out", "--ranking", "taylor", "--use_lora"))
    assert not (tmp_path / "out").exists()


def test_fine_tune_only_trains_the_whole_model_and_exports_it(tmp_path, source_pipeline):  # noqa: F811
    out = tmp_path / "out"
    run_prune_script(tiny_args(source_pipeline, out, "--fine_tune_only", "--validation_steps", "0"))
    report = json.load(open(out / "entprune_report.json"))
    assert report["kept_block_indices"] == list(range(6)) and report["pruned_block_indices"] == []
    assert all(s["pruned_blocks"] == [] and s["ced_scores"] == {} for s in report["stages"])
    assert report["sampling_speed"]["flops_ratio"] == pytest.approx(1.0) and not (out / "ced.png").exists()
    before, after = weights(source_pipeline), weights(out)
    assert not torch.equal(before["transformer_blocks.0.attn1.to_q.weight"],
                           after["transformer_blocks.0.attn1.to_q.weight"])  # it trained
    assert_loads_without_package(out, 6)
