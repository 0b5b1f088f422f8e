import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import make_scheduler, make_tiny_dit, make_tiny_vae
from diffusers import DiTPipeline

from diffusers_entprune.export import REPORT_NAME, save_pruned_pipeline
from diffusers_entprune.models import EntPrunedTransformer2DModel

ID2LABEL = {0: "zero", 1: "one", 2: "two", 3: "three"}


def pruned_model(blocks):
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit()).eval()
    model.prune_blocks(blocks)
    return model


def sample(pipe, seed=0):
    return pipe(class_labels=[1, 3], guidance_scale=4.0, num_inference_steps=4,
                generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("blocks", [[0], [5], [2, 3], [0, 3, 5]])
def test_round_trip_through_plain_dit_pipeline_is_bit_exact(tmp_path, model_inputs, blocks):
    model = pruned_model(blocks)
    vae, scheduler = make_tiny_vae(), make_scheduler()
    out = save_pruned_pipeline(str(tmp_path / "pruned"), model, vae, scheduler, id2label=ID2LABEL)

    reloaded = DiTPipeline.from_pretrained(out)
    assert type(reloaded.transformer).__name__ == "DiTTransformer2DModel"
    assert reloaded.transformer.config.num_layers == 6 - len(blocks)
    reloaded.transformer.eval()
    with torch.no_grad():
        assert torch.equal(reloaded.transformer(*model_inputs).sample, model(*model_inputs).sample)
    in_memory = DiTPipeline(transformer=model, vae=vae, scheduler=make_scheduler())
    assert np.array_equal(sample(reloaded), sample(in_memory))

    kept = [i for i in range(6) if i not in blocks]
    assert reloaded.transformer.config["_entprune_kept_block_indices"] == kept
    report = json.loads((tmp_path / "pruned" / REPORT_NAME).read_text())
    assert report["kept_block_indices"] == kept and report["pruned_block_indices"] == sorted(blocks)
    assert report["original_num_layers"] == 6
    assert reloaded.get_label_ids(["three"]) == [3]
    # reloading into our class restores the bookkeeping
    again = EntPrunedTransformer2DModel.from_pretrained(out, subfolder="transformer")
    assert again.kept_block_indices == kept and again.original_num_layers == 6


def test_fp16_storage_halves_size_and_keeps_the_callers_model(tmp_path):
    model = pruned_model([1])
    vae = make_tiny_vae()
    save_pruned_pipeline(str(tmp_path / "fp16"), model, vae, make_scheduler(), dtype=torch.float16)
    assert model.dtype == torch.float32 and vae.dtype == torch.float32
    reloaded = DiTPipeline.from_pretrained(tmp_path / "fp16")
    assert reloaded.transformer.dtype == torch.float32  # diffusers loads float32 by default
    ref = model.proj_out_2.weight.half().float()
    assert torch.equal(reloaded.transformer.proj_out_2.weight, ref)


def test_saved_folder_loads_and_samples_without_this_package(tmp_path):
    model = pruned_model([0, 4])
    out = save_pruned_pipeline(str(tmp_path / "pruned"), model, make_tiny_vae(), make_scheduler(), id2label=ID2LABEL)
    expected = sample(DiTPipeline.from_pretrained(out))
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "diffusers_entprune":
                    raise ImportError("diffusers_entprune is blocked in this process")
        sys.meta_path.insert(0, Block())
        import numpy as np, torch
        from diffusers import DiTPipeline
        try:
            import diffusers_entprune
            raise SystemExit("diffusers_entprune should not be importable here")
        except ImportError:
            pass
        pipe = DiTPipeline.from_pretrained({out!r})
        images = pipe(class_labels=[1, 3], guidance_scale=4.0, num_inference_steps=4,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
        assert "diffusers_entprune" not in sys.modules
        assert np.array_equal(images, np.load({str(tmp_path / 'expected.npy')!r})), "different samples"
        print("OK", pipe.transformer.config.num_layers)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            cwd=str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "OK 4" in result.stdout


def test_output_dir_holding_another_model_is_refused_and_kept(tmp_path):
    first = save_pruned_pipeline(str(tmp_path / "out"), pruned_model([1]), make_tiny_vae(), make_scheduler())
    before = sorted(os.listdir(first))
    with pytest.raises(FileExistsError, match="output_dir"):
        save_pruned_pipeline(first, pruned_model([2, 3]), make_tiny_vae(), make_scheduler())
    assert sorted(os.listdir(first)) == before
    assert DiTPipeline.from_pretrained(first).transformer.config.num_layers == 5

    save_pruned_pipeline(first, pruned_model([2, 3]), make_tiny_vae(), make_scheduler(), overwrite=True)
    assert DiTPipeline.from_pretrained(first).transformer.config.num_layers == 4
    assert sorted(os.listdir(tmp_path)) == ["out"], "no temporary folders may be left behind"


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("data")
    with pytest.raises(ValueError, match="output_dir.*is a file"):
        save_pruned_pipeline(str(path), pruned_model([1]), make_tiny_vae(), make_scheduler())
    assert path.read_text() == "data"


def test_failed_save_leaves_no_half_written_folder_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = save_pruned_pipeline(str(tmp_path / "out"), pruned_model([1]), make_tiny_vae(), make_scheduler())

    def crash(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(DiTPipeline, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        save_pruned_pipeline(str(tmp_path / "new"), pruned_model([2]), make_tiny_vae(), make_scheduler())
    with pytest.raises(OSError, match="disk full"):
        save_pruned_pipeline(out, pruned_model([2]), make_tiny_vae(), make_scheduler(), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.undo()
    assert DiTPipeline.from_pretrained(out).transformer.config.num_layers == 5


def test_report_counts_parameters_as_saved_and_as_the_original_dit_counts(tmp_path):
    model = pruned_model([1, 2])
    save_pruned_pipeline(str(tmp_path / "out"), model, make_tiny_vae(), make_scheduler())
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    saved = DiTPipeline.from_pretrained(tmp_path / "out").transformer
    assert report["transformer_parameters"] == sum(p.numel() for p in saved.parameters())
    assert report["transformer_parameters_one_embedder"] == sum(p.numel() for p in model.parameters())  # tied


def test_the_report_is_one_schema_from_pruner_to_model_card(tmp_path):
    """`PruningReport` round-trips entprune_report.json (unknown keys kept), its set fields win when merged onto the
    saved model's part, and the model card reads the same object."""
    from diffusers_entprune import PruningReport

    stages = [{"stage": 0, "step": 0, "ced_scores": {"2": 0.1}, "pruned_blocks": [2], "num_blocks_after": 5,
               "candidates": [{"num_blocks": 1, "blocks": [2], "ntk_condition_number": 3.0, "zico": 1.5,
                               "combined": 0.5}]}]
    report = PruningReport(pruning_mode="adaptive", ranking="ced", stages=stages, source="my-base",
                           training={"max_train_steps": 7}, extra={"my_note": "kept"})
    assert PruningReport.from_dict(report.to_dict()) == report
    assert "pipeline" not in report.to_dict()  # unset fields are left out
    model = pruned_model([2])
    out = save_pruned_pipeline(str(tmp_path / "pruned"), model, make_tiny_vae(), make_scheduler(), report=report)
    written = json.load(open(os.path.join(out, REPORT_NAME)))
    assert written["kept_block_indices"] == [0, 1, 3, 4, 5] and written["pruned_block_indices"] == [2]
    assert written["stages"] == stages and written["my_note"] == "kept" and written["pipeline"] == "DiTPipeline"
    card = open(os.path.join(out, "README.md")).read()
    assert "Fine-tuned for 7 steps" in card and "| 0 | 0 | [2] | 5 | 1: 3 / 1.5 |" in card
    # a dict of the same fields writes the same report
    again = save_pruned_pipeline(str(tmp_path / "dict"), model, make_tiny_vae(), make_scheduler(),
                                 report=report.to_dict())
    assert json.load(open(os.path.join(again, REPORT_NAME))) == written
