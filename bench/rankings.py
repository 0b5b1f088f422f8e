"""The six block rankings side by side on the embedded base and the embedded downstream digits, with the time
each took and their Spearman rank correlations. Every metric uses the same fixed draws.

    python bench/rankings.py --num_samples 1024 --output_json build/rankings.json
"""

import argparse
import json
import time

import torch
from diffusers import DiTPipeline

from diffusers_entprune import EntPrunedTransformer2DModel
from diffusers_entprune.data import LatentBatches, repeat_batches, vae_scale_factor
from diffusers_entprune.embedded import TINY_DIT_DIR, load_digits_dataset
from diffusers_entprune.importance import baselines, compute_ced
from diffusers_entprune.objectives import DiffusionObjective


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda k: x[k])
        r = [0.0] * len(x)
        for rank, k in enumerate(order):
            r[k] = float(rank)
        return torch.tensor(r)

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()

    model = EntPrunedTransformer2DModel.from_pretrained(TINY_DIT_DIR, subfolder="transformer").eval()
    pipe = DiTPipeline.from_pretrained(TINY_DIT_DIR, transformer=model)
    objective = DiffusionObjective.from_scheduler(pipe.scheduler)
    stream = LatentBatches(load_digits_dataset("downstream", split="train"), pipe.vae,
                           model.config.sample_size * vae_scale_factor(pipe.vae), args.batch_size,
                           num_classes=model.config.num_embeds_ada_norm)
    cached = list(stream)  # encode once; every metric then reads the same latents

    def batches():
        return repeat_batches(cached, args.num_samples)

    n, seed = args.num_samples, args.seed
    runs = {
        "ced": lambda: compute_ced(model, objective, batches(), n, seed=seed),
        "ced_naive": lambda: compute_ced(model, objective, batches(), n, seed=seed, prefix_cache=False),
        "loss": lambda: baselines.loss_ablation_scores(model, objective, batches(), n, seed=seed),
        "taylor": lambda: baselines.taylor_scores(model, objective, batches(), n, seed=seed),
        "block_influence": lambda: baselines.block_influence_scores(model, objective, batches(), n, seed=seed),
        "magnitude": lambda: baselines.magnitude_scores(model),
        "random": lambda: baselines.random_scores(model, seed=seed),
    }
    results, seconds = {}, {}
    for name, run in runs.items():
        start = time.perf_counter()
        results[name] = run()
        seconds[name] = time.perf_counter() - start
        print(f"{name:<16} {seconds[name]:7.2f} s  least -> most important: {results[name].ranking}", flush=True)

    names = [k for k in results if k != "ced_naive"]
    print("\nSpearman rank correlation of the block scores (CED by magnitude):")
    importance = {k: [abs(s) for s in results[k].scores] for k in names}
    print(" " * 16 + "".join(f"{k:>16}" for k in names))
    matrix = {}
    for a in names:
        matrix[a] = {b: spearman(importance[a], importance[b]) for b in names}
        print(f"{a:<16}" + "".join(f"{matrix[a][b]:16.2f}" for b in names))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"num_samples": n, "seed": seed, "seconds": seconds, "spearman": matrix,
                       "results": {k: v.to_dict() for k, v in results.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
