"""bench/gpu_check.py on the CPU at the tiny config: every section runs (the two-process one under gloo) and
reports sensible numbers, and a failing section is recorded without stopping the others. The GPU numbers
themselves (CUDA events, peak memory, NCCL) need a GPU; this checks the code paths that produce them."""

import json
import os

import pytest
from script_runner import ROOT, run_prune_script

SCRIPT = os.path.join(ROOT, "bench", "gpu_check.py")
SMALL = ["--config", "tiny", "--device", "cpu", "--train_batch_size", "4", "--train_warmup", "1", "--train_steps", "2",
         "--sample_batch_size", "2", "--sample_warmup", "1", "--sample_iters", "3", "--ced_num_samples", "16",
         "--ced_batch_size", "8", "--proxy_batch_size", "2", "--mp_steps", "1", "--mp_ced_num_samples", "8"]


def run(tmp_path, *extra) -> tuple[dict, str]:
    run_prune_script([*SMALL, "--output_dir", tmp_path, *extra], script=SCRIPT)
    with open(tmp_path / "gpu_check.json") as f, open(tmp_path / "gpu_check.md") as g:
        return json.load(f), g.read()


def test_every_section_runs_on_cpu_with_sensible_numbers(tmp_path):
    report, md = run(tmp_path, "--multiprocess_backend", "gloo")
    env, sections = report["env"], report["sections"]
    assert env["device"] == "cpu" and report["args"]["dtype"] == "float32" and "gpu_check.py" in env["command"]
    assert list(sections) == ["train", "sampling", "pruning_stage", "two_process"]
    assert all(s["status"] == "ok" for s in sections.values()), {k: s.get("error") for k, s in sections.items()}

    # training: 12 and 6 blocks (pruned mid-training), checkpointing off and on
    train = sections["train"]
    rows = train["rows"]
    assert [(r["blocks"], r["gradient_checkpointing"]) for r in rows] == [(12, False), (12, True), (6, False),
                                                                          (6, True)]
    for r in rows:
        assert r["checkpointing_active"] == r["gradient_checkpointing"]
        # checkpointing recomputes every block in the backward
        assert r["block_forwards_per_step"] == r["blocks"] * (2 if r["gradient_checkpointing"] else 1)
        assert len(r["step_seconds"]) == 2 and r["median_step_seconds"] > 0 and r["images_per_second"] > 0
        assert r["peak_allocated_gib"] is None  # no GPU memory to read on the CPU
    assert rows[2]["flops_ratio"] == pytest.approx(rows[3]["flops_ratio"]) and 1.8 < rows[2]["flops_ratio"] < 2.0
    assert train["losses_finite"] and len(train["kept_block_indices"]) == 6

    # sampling: full, half and a quarter of the blocks; the FLOPs ratio is just below the block ratio (the patch
    # embedding and the final layer stay)
    sampling = sections["sampling"]["rows"]
    assert [r["blocks"] for r in sampling] == [12, 6, 3]
    assert [len(r["removed_blocks"]) for r in sampling] == [0, 6, 9]
    for r in sampling:
        assert 0.9 * r["block_ratio"] <= r["flops_ratio"] <= r["block_ratio"]
        assert r["median_forward_seconds"] > 0 and r["speedup"] > 0 and r["forward_batch"] == 4
    assert sampling[2]["forward_gflops"] < sampling[1]["forward_gflops"] < sampling[0]["forward_gflops"]

    # one adaptive stage: CED on every block, then the proxies of the 3 candidates (0, the even share, twice it)
    stage = sections["pruning_stage"]
    decision = stage["decision"]
    assert stage["config"]["ced_num_samples"] == 16 and stage["config"]["pruning_mode"] == "adaptive"
    assert sorted(int(k) for k in decision["ced_scores"]) == list(range(12))
    assert [c["num_blocks"] for c in decision["candidates"]] == [0, 2, 4]
    assert all(c["zico"] is not None for c in decision["candidates"])
    assert stage["blocks_after"] == 12 - len(decision["pruned_blocks"])
    assert stage["parts"]["ced"]["seconds"] > 0 and stage["parts"]["proxies"]["seconds"] > 0
    assert stage["stage_seconds"] >= stage["parts"]["ced"]["seconds"] + stage["parts"]["proxies"]["seconds"]
    assert "ced_autocast" not in stage  # float32: no autocast to compare with

    # two gloo processes: DDP re-wrapped after pruning, every process with the same weights and blocks
    two = sections["two_process"]
    assert two["backend"] == "gloo" and two["num_processes"] == 2
    assert (two["blocks_before"], two["blocks_after"]) == (12, 6)
    assert two["wrapper"] == "DistributedDataParallel" and two["rewrapped_after_pruning"]
    assert two["weights_agree"] and two["rank_summaries"][0] == two["rank_summaries"][1]
    assert two["kept_block_indices_by_rank"][0] == two["kept_block_indices_by_rank"][1]
    assert two["median_step_seconds_before"] > 0 and two["median_step_seconds_after"] > 0

    for header in ("| blocks | gradient checkpointing |", "| blocks | GFLOP / forward |", "| part | settings |",
                   "| backend | blocks |"):
        assert header in md


def test_a_failing_section_is_recorded_and_the_next_still_runs(tmp_path):
    # a proxy batch of 1 has no NTK condition number: EntPrunerConfig refuses it inside the pruning section
    report, md = run(tmp_path, "--sections", "pruning_stage", "two_process", "--proxy_batch_size", "1")
    stage, two = report["sections"]["pruning_stage"], report["sections"]["two_process"]
    assert stage["status"] == "error" and "proxy_batch_size" in stage["error"]
    assert two["status"] == "skipped" and two["reason"].startswith("skipped: --device cpu")
    assert "train" not in report["sections"]
    assert "Sections that failed" in md and "skipped: --device cpu" in md


def test_cuda_without_a_gpu_fails_fast(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="sees no CUDA device"):
        run_prune_script(["--output_dir", tmp_path], script=SCRIPT)
    assert not os.path.exists(tmp_path / "gpu_check.json")
