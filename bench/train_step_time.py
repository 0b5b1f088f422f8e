"""Training step time before and after each pruning stage, through the real mid-training pruning path.

One model trains with AdamW (and an EMA) on random latents; after ``--steps`` timed steps at each depth, the next
blocks are removed with `prune_training_state` (optimizer moments and EMA carried over, as in
examples/prune_dit.py) and timing continues. Reported: the median step time at each depth, its speedup over the
unpruned model, and the FLOPs ratio of one training forward (the limit of the speedup; backward costs scale alike).

    python bench/train_step_time.py --config embedded --num_threads 1
    python bench/train_step_time.py --config s2 --num_threads 1 --batch_size 4 --steps 5
"""

import argparse
import datetime
import json
import os
import statistics
import time

import diffusers
import torch
from diffusers import DiTTransformer2DModel
from diffusers.training_utils import EMAModel
from speedup import S2_CONFIG, evenly_spaced

from diffusers_entprune import EntPrunedTransformer2DModel
from diffusers_entprune.embedded import load_embedded_pipeline
from diffusers_entprune.objectives import DiffusionObjective
from diffusers_entprune.speed import transformer_flops
from diffusers_entprune.training_state import prune_training_state


def build(config: str):
    if config == "embedded":
        pipe = load_embedded_pipeline()
        return EntPrunedTransformer2DModel.from_transformer(pipe.transformer), pipe.scheduler
    from diffusers import DDIMScheduler

    torch.manual_seed(0)
    # random weights: each block got its own random embedder copy, so tie them all to block 0's
    model = DiTTransformer2DModel(**S2_CONFIG)
    return (EntPrunedTransformer2DModel.from_transformer(model, embedder_copies="tie_to_first"),
            DDIMScheduler(beta_schedule="linear"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["embedded", "s2"], default="embedded")
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 8, 6, 3],
                        help="Block counts, in the order a progressive run visits them.")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="Timed steps per depth (after 3 warm-up steps).")
    parser.add_argument("--num_threads", type=int, default=None)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, scheduler = build(args.config)
    if args.depths[0] != model.num_blocks or sorted(args.depths, reverse=True) != args.depths:
        parser.error(f"--depths must start at the model's {model.num_blocks} blocks and decrease.")
    model.train()
    objective = DiffusionObjective.from_scheduler(scheduler)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMAModel(model.parameters(), decay=0.999)
    config = model.config
    shape = (args.batch_size, config.in_channels, config.sample_size, config.sample_size)
    generator = torch.Generator().manual_seed(0)

    def step():
        x0 = torch.randn(shape, generator=generator)
        labels = torch.randint(0, 10, (args.batch_size,), generator=generator)
        t = objective.sample_timesteps(args.batch_size, generator=generator)
        noised = objective.add_noise(x0, torch.randn(shape, generator=generator), t)
        start = time.perf_counter()
        out = model(noised.noisy, timestep=t, class_labels=labels).sample
        objective.loss(out, x0, noised).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())
        return time.perf_counter() - start

    rows = []
    for depth in args.depths:
        if depth < model.num_blocks:  # drop evenly spaced remaining blocks, mid-training
            kept = model.kept_block_indices
            drop = [kept[p] for p in evenly_spaced(len(kept), len(kept) - depth)]
            prune_training_state(model, drop, optimizer, ema)
        for _ in range(3):
            step()
        times = [step() for _ in range(args.steps)]
        rows.append({"blocks": model.num_blocks, "kept": list(model.kept_block_indices),
                     "median_step_seconds": statistics.median(times), "min_step_seconds": min(times),
                     "forward_gflops": transformer_flops(model, args.batch_size) / 1e9})
    base = rows[0]
    for row in rows:
        row["speedup"] = base["median_step_seconds"] / row["median_step_seconds"]
        row["flops_ratio"] = base["forward_gflops"] / row["forward_gflops"]
    meta = {"config": args.config, "batch_size": args.batch_size, "steps": args.steps,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "date": datetime.date.today().isoformat()}
    print(f"{meta}\n")
    print("| blocks | kept (original indices) | median step | speedup | FLOPs ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['blocks']} | {row['kept'] if row['blocks'] < base['blocks'] else 'all'} | "
              f"{row['median_step_seconds'] * 1000:.1f} ms | {row['speedup']:.2f} | {row['flops_ratio']:.2f} |")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
