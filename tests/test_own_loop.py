"""README's "Prune inside your own training loop": the block runs exactly as printed, reaches the target depth,
exports a folder plain diffusers loads, and decides at step 0 what examples/prune_dit.py decides on the same seed
and data (later stages follow each loop's own training, which differs)."""

import json
import os

import pytest
import torch
from script_runner import run_prune_script

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")
MARKER = "<!-- own-loop: tests/test_own_loop.py runs the next block -->\n```python\n"


def own_loop_snippet() -> str:
    text = open(README).read()
    assert MARKER in text, "README.md lost its own-loop block (or its marker)"
    return text.split(MARKER, 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def own_loop_run(tmp_path_factory):
    from accelerate.state import AcceleratorState

    folder = tmp_path_factory.mktemp("own-loop")
    code, cwd = own_loop_snippet(), os.getcwd()
    AcceleratorState._reset_state(reset_partial_state=True)
    os.chdir(folder)
    try:
        exec(compile(code, "README.md (own loop)", "exec"), {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
        AcceleratorState._reset_state(reset_partial_state=True)
    return folder / "my-pruned-dit"


def test_snippet_is_about_forty_lines():
    lines = [line for line in own_loop_snippet().splitlines() if line.strip()]
    assert len(lines) <= 45


def test_own_loop_reaches_the_target_and_exports_a_plain_pipeline(own_loop_run):
    from diffusers import DiTPipeline

    report = json.load(open(own_loop_run / "entprune_report.json"))
    assert report["original_num_layers"] == 12 and report["num_layers"] == 6
    assert [d["step"] for d in report["stages"]] == [0, 50, 100, 150]
    assert sorted(b for d in report["stages"] for b in d["pruned_blocks"]) == report["pruned_block_indices"]
    assert report["pruning_config"]["target_prune_ratio"] == 0.5 and report["ranking"] == "ced"
    pipe = DiTPipeline.from_pretrained(own_loop_run)
    assert type(pipe.transformer).__name__ == "DiTTransformer2DModel" and pipe.transformer.config.num_layers == 6
    images = pipe(class_labels=[3], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and torch.isfinite(torch.from_numpy(images)).all()


def test_own_loop_decides_at_step_zero_as_the_script_does(own_loop_run, tmp_path):
    # the script on the embedded base and data with the snippet's pruning settings; a small batch keeps it quick
    # (step 0 ranks the untouched base on the calibration pool, which the batch size does not change)
    out = tmp_path / "script"
    run_prune_script(["--output_dir", str(out), "--max_train_steps", "200", "--pruning_steps", "200",
                      "--pruning_stages", "4", "--ced_num_samples", "256", "--train_batch_size", "2",
                      "--validation_steps", "0", "--speed_batch_size", "0", "--checkpointing_steps", "1000",
                      "--num_inference_steps", "2"])
    script, own = (json.load(open(folder / "entprune_report.json")) for folder in (out, own_loop_run))
    assert script["pruning_config"] == own["pruning_config"]
    assert own["stages"][0] == script["stages"][0]  # CED scores, every candidate's proxies, the choice
    assert own["num_layers"] == script["num_layers"] == 6
