"""Cost of one adaptive pruning decision's proxies at real model sizes: time and peak memory of `score_candidates`.

Random weights (the cost does not depend on them), random latents; three candidates as the controller forms them at
the first stage (drop 0, the even share, twice that). Peak resident memory is read per run in a fresh process, so
each row is one configuration alone.

    python bench/proxy_cost.py --config xl --proxy_batch_size 2 4
    python bench/proxy_cost.py --config s2 --proxy_batch_size 8
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from ced_cost import CONFIGS, build
from diffusers import DDIMScheduler

from diffusers_entprune.controller import candidate_amounts
from diffusers_entprune.objectives import DiffusionObjective
from diffusers_entprune.proxies import score_candidates


def run(config: str, batch: int, zico_batches: int) -> dict:
    model = build(config)
    size = CONFIGS[config]["sample_size"]
    g = torch.Generator().manual_seed(1)

    def draw():
        return torch.randn(batch, 4, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)

    objective = DiffusionObjective.from_scheduler(DDIMScheduler(beta_schedule="linear"))
    blocks = model.kept_block_indices
    amounts = candidate_amounts(len(blocks) // 2, 4)  # the first of 4 stages of a 50% target
    candidates = [blocks[1: 1 + m] for m in amounts]  # which blocks does not change the cost much
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    scores = score_candidates(model, objective, candidates, draw(), [draw() for _ in range(zico_batches)],
                              zico_reduction="mean")  # as examples/prune_dit.py
    seconds = time.perf_counter() - start
    return {"config": config, "proxy_batch_size": batch, "zico_num_batches": zico_batches,
            "candidates": amounts, "seconds": round(seconds, 1),
            "parameters_millions": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "peak_rss_gib_before": round(rss_before, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "ntk_condition_numbers": [round(s.ntk_condition_number, 3) for s in scores],
            "zico": [round(s.zico, 4) for s in scores], "threads": torch.get_num_threads()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="s2")
    parser.add_argument("--proxy_batch_size", type=int, nargs="+", default=[8])
    parser.add_argument("--zico_num_batches", type=int, default=2)
    parser.add_argument("--single", action="store_true", help=argparse.SUPPRESS)  # one run, JSON on stdout
    args = parser.parse_args()
    if args.zico_num_batches < 2:  # ZiCo's deviation across mini-batches needs two
        parser.error(f"--zico_num_batches must be >= 2, got {args.zico_num_batches}.")
    if args.single:
        print(json.dumps(run(args.config, args.proxy_batch_size[0], args.zico_num_batches)))
        return
    print("| config | parameters | proxy batch | candidates (blocks dropped) | time | peak RSS (model alone) |")
    print("|---|---|---|---|---|---|")
    for batch in args.proxy_batch_size:
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--proxy_batch_size", str(batch),
                              "--zico_num_batches", str(args.zico_num_batches), "--single"],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(f"| {row['config']} | {row['parameters_millions']}M | {batch} | {row['candidates']} | "
              f"{row['seconds']} s | {row['peak_rss_gib']} GiB ({row['peak_rss_gib_before']} GiB) |", flush=True)
        print(json.dumps(row), file=sys.stderr)


if __name__ == "__main__":
    main()
