"""Real size on CPU: the DiT-XL/2-256 transformer config (random weights) through every step of a pruning run.

Each stage runs in a fresh process, so its peak resident memory is its own:

- ``ced``: CED scoring (prefix-cached) of the 28 blocks on a few samples;
- ``proxies``: one adaptive decision's proxies (NTK condition number + ZiCo) for two candidates (drop 0 / drop 7);
- ``train``: AdamW training steps (DiT objective with learned sigma) with and without gradient checkpointing, with
  EMA, on 28 and on 14 blocks; "state" is the memory of weights, gradients, AdamW moments and EMA before the
  step, "activations" what the step adds on top at this batch;
- ``prune_export``: a physical prune of 14 blocks, the plain `DiTPipeline` export, reload, and the check that the
  reloaded model computes what the pruned one does.

    python bench/xl_real_size.py                       # ~15 minutes on a 2-core CPU, peak ~20 GiB
    python bench/xl_real_size.py --stages train --batch_size 1 2
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import psutil
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
from ced_cost import build  # noqa: E402  (the XL/2 config, random weights, identical embedder copies, tied)

STAGES = ("ced", "proxies", "train", "prune_export")


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def objective():
    from diffusers import DDIMScheduler

    from diffusers_entprune.objectives import DiffusionObjective

    return DiffusionObjective.from_scheduler(DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))


def random_batch(batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 32, 32, generator=g), torch.randint(0, 1000, (batch,), generator=g)


def stage_ced(args) -> dict:
    from diffusers_entprune.importance import compute_ced

    model = build("xl")
    start = time.perf_counter()
    result = compute_ced(model, objective(), (random_batch(2, seed=s) for s in range(args.ced_num_samples // 2)),
                         args.ced_num_samples)
    return {"num_samples": args.ced_num_samples, "seconds": time.perf_counter() - start,
            "lowest_ced_blocks": result.ranking[:5]}


def stage_proxies(args) -> dict:
    from diffusers_entprune.proxies import score_candidates

    model = build("xl")
    candidates = [[], list(range(1, 15, 2))]
    start = time.perf_counter()
    scores = score_candidates(model, objective(), candidates, random_batch(args.proxy_batch_size),
                              [random_batch(args.proxy_batch_size, seed=2 + i) for i in range(2)],
                              zico_reduction="mean")
    return {"proxy_batch_size": args.proxy_batch_size, "candidates": [len(c) for c in candidates],
            "seconds": time.perf_counter() - start,
            "ntk_condition_numbers": [s.ntk_condition_number for s in scores], "zico": [s.zico for s in scores]}


def stage_train(args, batch: int, checkpointing: bool, num_blocks: int) -> dict:
    from diffusers.training_utils import EMAModel

    model = build("xl").train()
    if num_blocks < 28:
        model.prune_blocks(list(range(1, 28, 28 // (28 - num_blocks)))[: 28 - num_blocks])
    if checkpointing:
        model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    ema = EMAModel(model.parameters(), decay=0.9999)
    obj = objective()
    latents, labels = random_batch(batch)
    times = []
    for step in range(2):  # the first step allocates AdamW's moments: "state" is measured after it
        if step == 1:
            state_gib = rss_gib()
        start = time.perf_counter()
        t = obj.sample_timesteps(batch, generator=torch.Generator().manual_seed(step))
        noised = obj.add_noise(latents, torch.randn_like(latents), t)
        loss = obj.loss(model(noised.noisy, timestep=t, class_labels=labels).sample, latents, noised).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as they do across DDP steps
        ema.step(model.parameters())
        times.append(time.perf_counter() - start)
    parameters = sum(p.numel() for p in model.parameters())
    return {"batch_size": batch, "gradient_checkpointing": checkpointing, "num_blocks": num_blocks,
            "parameters_millions": parameters / 1e6, "step_seconds": times[1],
            "state_gib": state_gib, "peak_gib": peak_gib(), "activations_gib": peak_gib() - state_gib,
            "state_bytes_per_parameter": state_gib * 2**30 / parameters}


def stage_prune_export(args) -> dict:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from diffusers_entprune import save_pruned_pipeline

    model = build("xl")
    start = time.perf_counter()
    model.prune_blocks(list(range(1, 28, 2)))
    prune_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "xl-d14")
        start = time.perf_counter()
        save_pruned_pipeline(out, model, AutoencoderKL(block_out_channels=(32,), layers_per_block=1),
                             DDIMScheduler(clip_sample=False))
        export_seconds = time.perf_counter() - start
        size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
        start = time.perf_counter()
        pipe = DiTPipeline.from_pretrained(out)
        reload_seconds = time.perf_counter() - start
        x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), torch.tensor([207, 1000])
        with torch.no_grad():
            difference = (pipe.transformer.eval()(x, t, y).sample - model(x, t, y).sample).abs().max().item()
    return {"prune_seconds": prune_seconds, "export_seconds": export_seconds, "reload_seconds": reload_seconds,
            "folder_gib": size / 2**30, "kept_blocks": pipe.transformer.config.num_layers,
            "max_abs_difference_reloaded": difference, "peak_gib": peak_gib()}


def run_stage(name: str, args, **kwargs) -> dict:
    start = time.perf_counter()
    result = {"ced": stage_ced, "proxies": stage_proxies, "train": stage_train,
              "prune_export": stage_prune_export}[name](args, **kwargs)
    result.update(stage=name, wall_seconds=time.perf_counter() - start, peak_gib=peak_gib(),
                  threads=torch.get_num_threads())
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--ced_num_samples", type=int, default=4)
    parser.add_argument("--proxy_batch_size", type=int, default=2)
    parser.add_argument("--batch_size", type=int, nargs="+", default=[2], help="Training batch sizes to measure.")
    parser.add_argument("--results", default=os.path.join(BENCH, "results", "xl_real_size.jsonl"))
    parser.add_argument("--single", default=None, help=argparse.SUPPRESS)  # one stage in this process (JSON kwargs)
    args = parser.parse_args()
    if args.single:
        spec = json.loads(args.single)
        print(json.dumps(run_stage(spec.pop("stage"), args, **spec)))
        return
    jobs = []
    for name in args.stages:
        if name == "train":
            jobs += [dict(stage="train", batch=b, checkpointing=c, num_blocks=n) for b in args.batch_size
                     for n in (28, 14) for c in (False, True)]
        else:
            jobs.append(dict(stage=name))
    for job in jobs:
        command = [sys.executable, __file__, "--single", json.dumps(job), "--ced_num_samples",
                   str(args.ced_num_samples), "--proxy_batch_size", str(args.proxy_batch_size)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"{job} failed:\n{out.stderr[-3000:]}")
        row = {**json.loads(out.stdout.strip().splitlines()[-1]), "date": time.strftime("%Y-%m-%d"),
               "torch": torch.__version__, "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0]}
        print(json.dumps(row), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results, "a") as f:  # row by row: a long run that stops keeps what it measured
            f.write(json.dumps(row) + "\n")
    print(f"appended to {args.results}")


if __name__ == "__main__":
    main()
