"""Cost of CED scoring: prefix-cached vs naive block ablation (time, equal scores), and peak memory against N.

Random weights (the cost does not depend on them), random latents and labels, DDPM objective with learned sigma.

    python bench/ced_cost.py --config s2 --num_samples 256 --batch_size 32          # time ratio, same run
    python bench/ced_cost.py --config xl --num_samples 8 --batch_size 4
    python bench/ced_cost.py --config tiny --memory_sweep 256 1024 4096 --batch_size 64  # one process per N
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel

from diffusers_entprune import EntPrunedTransformer2DModel
from diffusers_entprune.importance import compute_ced
from diffusers_entprune.objectives import DiffusionObjective

CONFIGS = {
    # the embedded base's size: 12 blocks, hidden 96, 8x8x4 latents (for the memory sweep over N)
    "tiny": dict(num_attention_heads=4, attention_head_dim=24, num_layers=12, sample_size=8),
    # DiT-S/2-like: 12 blocks, hidden 384 (6 x 64), on 16x16x4 latents
    "s2": dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=16),
    # the real DiT-XL/2-256 config: 28 blocks, hidden 1152 (16 x 72), 32x32x4 latents
    "xl": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32),
}


def build(config: str) -> EntPrunedTransformer2DModel:
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=1000,
                                **CONFIGS[config])
    with torch.no_grad():
        first = dit.transformer_blocks[0].norm1.emb.state_dict()
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(first)
            block.norm1.linear.weight.normal_(0, 0.02)  # non-zero gates, so every block matters
    return EntPrunedTransformer2DModel.from_transformer(dit).eval()


def data(config: str, num_samples: int, batch_size: int):
    g = torch.Generator().manual_seed(1)
    size = CONFIGS[config]["sample_size"]
    classes = max(1, min(10, num_samples // 4))  # enough samples per class for a variance
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        yield torch.randn(n, 4, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def run(config, num_samples, batch_size, prefix_cache):
    model = build(config)
    objective = DiffusionObjective.from_scheduler(DDIMScheduler(beta_schedule="linear", beta_start=1e-4,
                                                                beta_end=0.02))
    start = time.perf_counter()
    result = compute_ced(model, objective, data(config, num_samples, batch_size), num_samples,
                         prefix_cache=prefix_cache)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="s2")
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--mode", choices=("both", "cached", "naive"), default="both")
    parser.add_argument("--memory_sweep", type=int, nargs="*", default=None)
    args = parser.parse_args()

    if args.memory_sweep:
        rows = []
        for n in args.memory_sweep:
            out = subprocess.run([sys.executable, __file__, "--config", args.config, "--num_samples", str(n),
                                  "--batch_size", str(args.batch_size), "--mode", "cached"],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"N={n:>5}: {rows[-1]['cached_seconds']:8.1f} s, peak RSS {rows[-1]['peak_rss_gib']:.3f} GiB",
                  flush=True)
        return

    report = {"config": args.config, "num_samples": args.num_samples, "batch_size": args.batch_size,
              "threads": torch.get_num_threads()}
    results = {}
    for mode in (("cached", "naive") if args.mode == "both" else (args.mode,)):
        results[mode], report[f"{mode}_seconds"] = run(args.config, args.num_samples, args.batch_size,
                                                       prefix_cache=mode == "cached")
    if args.mode == "both":
        a, b = torch.tensor(results["cached"].scores), torch.tensor(results["naive"].scores)
        report["time_ratio_cached_over_naive"] = round(report["cached_seconds"] / report["naive_seconds"], 3)
        report["max_relative_score_difference"] = ((a - b).abs().max() / b.abs().max()).item()
        report["same_ranking"] = results["cached"].ranking == results["naive"].ranking
    report["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
