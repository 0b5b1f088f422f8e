"""examples/prune_sit.py (prune_dit.py with --model_type sit) end to end on a tiny SiT: the flow path throughout."""

import importlib.util
import json
import os

import pytest
import torch
from conftest import make_scheduler, make_tiny_dit, make_tiny_vae
from diffusers import DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler
from test_prune_dit_script import fresh_accelerator_state, tiny_args  # noqa: F401  (autouse fixture)

from diffusers_entprune.export import save_pruned_pipeline
from diffusers_entprune.objectives import DiffusionObjective, FlowObjective
from diffusers_entprune.pipelines import SiTPipeline

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "prune_sit.py")
_spec = importlib.util.spec_from_file_location("prune_sit", SCRIPT)
prune_sit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prune_sit)


@pytest.fixture
def sit_source(tmp_path):
    return save_pruned_pipeline(str(tmp_path / "sit-source"), make_tiny_dit(), make_tiny_vae(),
                                FlowMatchEulerDiscreteScheduler(), id2label={i: f"class{i}" for i in range(10)},
                                model_type="sit")


@pytest.fixture
def dit_source(tmp_path):
    return save_pruned_pipeline(str(tmp_path / "dit-source"), make_tiny_dit(), make_tiny_vae(), make_scheduler())


def test_sit_pruning_end_to_end_uses_the_flow_objective_and_exports_a_sit_pipeline(tmp_path, sit_source,
                                                                                    monkeypatch):
    calls = {"flow_loss": 0, "flow_times": 0, "diffusion_loss": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(FlowObjective, "loss", counted("flow_loss", FlowObjective.loss))
    monkeypatch.setattr(FlowObjective, "timesteps_from_fraction",
                        counted("flow_times", FlowObjective.timesteps_from_fraction))
    monkeypatch.setattr(DiffusionObjective, "loss", counted("diffusion_loss", DiffusionObjective.loss))
    out = tmp_path / "out"
    prune_sit.sit_main(tiny_args(sit_source, out, "--use_ema", "--sampler", "heun"))

    # training and the proxies ran the flow loss, CED drew flow times; nothing touched the DDPM objective
    assert calls["flow_loss"] >= 12 and calls["flow_times"] > 0 and calls["diffusion_loss"] == 0
    report = json.load(open(out / "entprune_report.json"))
    assert report["model_type"] == "sit" and report["pipeline"] == "SiTPipeline"
    assert report["original_num_layers"] == 6 and len(report["kept_block_indices"]) == 3
    assert sorted(b for s in report["stages"] for b in s["pruned_blocks"]) == report["pruned_block_indices"]
    assert len(report["stages"][0]["ced_scores"]) == 6
    assert report["sampling_speed"]["sampler"] == "heun" and report["sampling_speed"]["flops_ratio"] > 1.0
    for name in ("ced.png", "samples.png", "validation/step-000006.png", "checkpoint-12"):
        assert (out / name).exists(), name
    card = (out / "README.md").read_text()
    assert "SiTPipeline.from_pretrained" in card and "3 of 6 kept" in card
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# out"  # titled after the output folder

    pipe = SiTPipeline.from_pretrained(out)
    assert type(pipe.transformer) is DiTTransformer2DModel and pipe.transformer.config.num_layers == 3
    assert type(pipe.scheduler) is FlowMatchEulerDiscreteScheduler
    assert pipe.get_label_ids(["class7"]) == [7]
    images = pipe(class_labels=[1, 2], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3)


def test_model_type_is_read_from_the_folder_and_contradictions_are_refused(tmp_path, sit_source, dit_source):
    with pytest.raises(ValueError, match=r"--model_type.*'dit'.*sit pipeline"):
        prune_sit.main(tiny_args(sit_source, tmp_path / "a", "--model_type", "dit"))
    with pytest.raises(ValueError, match=r"--model_type.*'sit'.*dit pipeline"):
        prune_sit.sit_main(tiny_args(dit_source, tmp_path / "b"))
    with pytest.raises(ValueError, match="--sampler.*SiT models only"):
        prune_sit.main(tiny_args(dit_source, tmp_path / "c", "--sampler", "heun"))
    assert not any((tmp_path / name).exists() for name in "abc")


def test_score_and_prune_commands_take_a_sit_folder(tmp_path, sit_source, capsys):
    from diffusers_entprune.cli import main
    from diffusers_entprune.embedded import DIGITS_DIR

    code = main(["score", "--pretrained_model_name_or_path", sit_source, "--train_data_dir",
                 os.path.join(DIGITS_DIR, "downstream"), "--num_samples", "16", "--batch_size", "8",
                 "--output_dir", str(tmp_path / "scores")])
    assert code == 0
    scores = json.load(open(tmp_path / "scores" / "scores.json"))
    assert scores["model_type"] == "sit" and sorted(scores["ranking"]) == list(range(6))
    out = tmp_path / "pruned"
    code = main(["prune", "--pretrained_model_name_or_path", sit_source, "--scores", str(tmp_path / "scores" /
                 "scores.json"), "--num_prune", "2", "--output_dir", str(out), "--num_samples_per_row", "2",
                 "--num_inference_steps", "2"])
    assert code == 0
    assert "reloaded with SiTPipeline.from_pretrained: max |difference| to the in-memory model = 0" in \
        capsys.readouterr().out
    report = json.load(open(out / "entprune_report.json"))
    assert report["pipeline"] == "SiTPipeline" and report["pruned_block_indices"] == sorted(scores["ranking"][:2])
    assert SiTPipeline.from_pretrained(out).transformer.config.num_layers == 4
