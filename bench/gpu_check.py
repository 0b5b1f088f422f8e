"""One GPU check: everything about DiT-XL/2 pruning that a CPU cannot measure, in one command of a few minutes.

Random weights with the DiT-XL/2-256 transformer config (28 blocks, hidden 1152, 4x32x32 latents; nothing is
downloaded), random latents and labels. Sections, each timed, each recorded even when another fails (an OOM or any
error is written into the JSON and the next section runs):

1. ``train``: training step time and peak memory at ``--train_batch_size`` (32) with and without gradient
   checkpointing, at 28 blocks and, after pruning evenly spaced blocks mid-training with `prune_training_state`
   (optimizer moments and EMA carried over, as in a run), at 14. The step is examples/prune_dit.py's: fp32 master
   weights, the forward under accelerate's bf16 autocast (``Accelerator(mixed_precision="bf16")``, as
   ``--mixed_precision bf16`` gives; the safe choice, what DiT trainers do), DiffusionObjective loss (eps MSE + the
   learned-sigma bound), ``accelerator.backward``, gradient clipping at 1.0, AdamW, EMA step (diffusers `EMAModel`
   on the device). Block forwards per step are counted, so checkpointing's recompute is seen to happen.
2. ``sampling``: one transformer forward at the classifier-free-guidance-doubled batch (2 x ``--sample_batch_size``)
   of the full model and of pruned exports at 14 and 7 blocks (plain `DiTTransformer2DModel`s, weights in the
   ``--dtype``, as a user samples), interleaved rounds, CUDA events; speedup against the FLOPs ratio.
3. ``pruning_stage``: the first stage of EntPruner's default schedule (adaptive, 4 stages, target 14 blocks
   removed) run by `EntPruner.step` on a model that has taken one training step (optimizer and EMA state
   resident): CED ranking on ``--ced_num_samples`` (256) draws at the config's CED batch, the proxies (NTK
   condition number, ZiCo) of its 3 candidates at the config's proxy batch, and the surgery; time and peak memory
   of each part. Beside it, CED once more under bf16 autocast: a bf16 run's CED does not run under autocast
   (`compute_ced` calls ``embed``/``run_blocks``/``head``, not the autocast-patched ``forward``), so this says
   what autocast would save and whether it ranks alike.
4. ``two_process``: with >= 2 GPUs, ``accelerate launch`` of 2 NCCL processes: DDP training steps (different data
   per process, gradient checkpointing on), an `EntPruner.step` that prunes half the blocks (CED reduced across
   processes, decision broadcast, DDP re-wrapped by `reprepare_model`), more steps; then every process's weights,
   EMA, optimizer moments and kept blocks are compared (they must agree bit for bit). Else "skipped: N GPUs".

Writes ``gpu_check.json`` (device, versions, command, date, every number) and ``gpu_check.md`` (tables for
bench/RESULTS.md) into ``--output_dir``, the JSON after every section. On a GPU machine (expected: 2-4 minutes
on one H100/H200; the budget is 8):

    python bench/gpu_check.py --output_dir build/gpu-check

On CPU, for a smoke test (float32, wall-clock times, no GPU memory; gloo stands in for NCCL):

    python bench/gpu_check.py --config tiny --device cpu --multiprocess_backend gloo --output_dir /tmp/gpu-check
"""

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback

import accelerate
import diffusers
import torch
from accelerate import Accelerator
from diffusers import DDIMScheduler, DiTTransformer2DModel
from diffusers.training_utils import EMAModel
from speedup import S2_CONFIG, XL_CONFIG, device_name, evenly_spaced

from diffusers_entprune import EntPrunedTransformer2DModel
from diffusers_entprune.config import EntPrunerConfig
from diffusers_entprune.importance import score_blocks
from diffusers_entprune.objectives import DiffusionObjective
from diffusers_entprune.pruner import EntPruner
from diffusers_entprune.speed import synchronize, transformer_flops
from diffusers_entprune.training_state import prune_training_state, reprepare_model

CONFIGS = {
    # the embedded base's size (12 blocks, hidden 96, 8x8x4 latents): the CPU smoke test
    "tiny": dict(num_attention_heads=4, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=12,
                 sample_size=8, patch_size=2, num_embeds_ada_norm=1000),
    "s2": S2_CONFIG,
    "xl": XL_CONFIG,
}
SECTIONS = ("train", "sampling", "pruning_stage", "two_process")
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = EntPrunerConfig()  # ced_batch_size, proxy_batch_size, zico_num_batches, pruning_stages as a run has them
GIB = 2**30


# ------------------------------------------------------------------------------------------------------- helpers


def build_source(config: str) -> EntPrunedTransformer2DModel:
    """Random-weight DiT of ``config`` on the CPU, wrapped; every section copies it."""
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(**CONFIGS[config])
    with torch.no_grad():
        first = dit.transformer_blocks[0].norm1.emb.state_dict()
        for block in dit.transformer_blocks:
            block.norm1.emb.load_state_dict(first)  # identical copies, as in converted checkpoints
            block.norm1.linear.weight.normal_(0, 0.02)  # non-zero gates: every block matters to CED and the proxies
    return EntPrunedTransformer2DModel.from_transformer(dit, embedder_copies="tie_to_first")


def make_objective() -> DiffusionObjective:
    # DiT's schedule: linear betas 1e-4 .. 0.02 over 1000 steps, learned sigma
    return DiffusionObjective.from_scheduler(DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))


def kept_after_removing(kept: list[int], depth: int) -> list[int]:
    """Original indices of evenly spaced blocks among ``kept`` to remove so that ``depth`` remain."""
    return [kept[p] for p in evenly_spaced(len(kept), len(kept) - depth)] if depth < len(kept) else []


class Timer:
    """Per-interval times: CUDA events on a GPU (no host sync inside the timed loop), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def start(self):
        self._start = self._mark()

    def stop(self):
        self.marks.append((self._start, self._mark()))

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> list[float]:
        if not self.cuda:
            return [b - a for a, b in self.marks]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in self.marks]


def forward_flops(model, batch_size: int) -> int:
    """`transformer_flops` with attention on SDPA's math backend: its two matmuls are then counted as such on every
    device, whatever fused kernel (flash, cuDNN, ...) the GPU would pick and the FLOP counter may not know."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        return transformer_flops(model, batch_size)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def memory(device) -> dict:
    """Allocated now and the peak since `reset_peak` (GiB); None on the CPU (the process's RSS peak never resets)."""
    if device.type != "cuda":
        return {"allocated_gib": None, "peak_allocated_gib": None, "peak_reserved_gib": None}
    torch.cuda.synchronize(device)
    return {"allocated_gib": torch.cuda.memory_allocated(device) / GIB,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


def release(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_record(error: BaseException) -> dict:
    text = f"{type(error).__name__}: {error}"
    return {"status": "error", "error": text[:2000], "traceback": traceback.format_exc()[-4000:]}


def median(values):
    return statistics.median(values) if values else None


# ------------------------------------------------------------------------------------------------------ training


class Trainer:
    """examples/prune_dit.py's training step on random latents: accelerate-prepared model and AdamW, EMA."""

    def __init__(self, accelerator: Accelerator, model: EntPrunedTransformer2DModel, batch_size: int, seed: int = 0):
        self.accelerator, self.device = accelerator, accelerator.device
        self.model = model.to(self.device).train()
        self.objective = make_objective()
        # the example's defaults: lr 1e-4 (its XL command), betas (0.9, 0.999), no weight decay, eps 1e-8
        optimizer = torch.optim.AdamW(self.trainable(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
        self.ema = EMAModel(self.trainable(), decay=0.9999)
        self.prepared, self.optimizer = accelerator.prepare(self.model, optimizer)
        self.ema.to(self.device)
        config = self.model.config
        shape = (batch_size, config.in_channels, config.sample_size, config.sample_size)
        generator = torch.Generator().manual_seed(seed)
        self.batches = []  # two batches on the device, alternated: data loading is not what is measured
        for _ in range(2):
            x0 = torch.randn(shape, generator=generator)
            labels = torch.randint(0, config.num_embeds_ada_norm + 1, (batch_size,), generator=generator)  # + null
            t = self.objective.sample_timesteps(batch_size, generator=generator)
            noise = torch.randn(shape, generator=generator)
            self.batches.append(tuple(v.to(self.device) for v in (x0, labels, t, noise)))
        self.losses = []
        self._count = 0

    def trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self):
        x0, labels, t, noise = self.batches[self._count % 2]
        self._count += 1
        noised = self.objective.add_noise(x0, noise, t)
        output = self.prepared(noised.noisy, timestep=t, class_labels=labels).sample.float()
        loss = self.objective.loss(output, x0, noised).mean()
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.trainable(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.step(self.trainable())
        self.losses.append(loss.detach())

    def timed_steps(self, n: int) -> list[float]:
        timer = Timer(self.device)
        for _ in range(n):
            timer.start()
            self.step()
            timer.stop()
        return timer.seconds()

    def block_forwards_per_step(self) -> int:
        """Block forward calls in one step: the depth, twice that when checkpointing recomputes in the backward."""
        calls = [0]

        def count(*_):
            calls[0] += 1

        # pre-hooks: checkpointing's recompute stops early, once it has what the backward needs, so a block's
        # forward hook would not fire for it
        hooks = [block.register_forward_pre_hook(count) for block in self.model.transformer_blocks]
        try:
            self.step()
        finally:
            for hook in hooks:
                hook.remove()
        return calls[0]

    def prune(self, blocks: list[int]):
        prune_training_state(self.model, blocks, self.optimizer, self.ema)
        self.prepared = reprepare_model(self.accelerator, self.prepared, self.model)

    def set_checkpointing(self, enabled: bool):
        if enabled:
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()

    def finite_losses(self) -> bool:
        return bool(torch.isfinite(torch.stack(self.losses)).all()) if self.losses else True


def run_train(args, accelerator, source) -> dict:
    device = accelerator.device
    num_blocks = source.num_blocks
    depths = [num_blocks, args.train_depth or num_blocks // 2]
    trainer = Trainer(accelerator, copy.deepcopy(source), args.train_batch_size)
    rows = []
    for depth in depths:
        drop = kept_after_removing(trainer.model.kept_block_indices, depth)
        if drop:  # mid-training, the way a run prunes
            trainer.prune(drop)
            release(device)
        flops = forward_flops(trainer.model, args.train_batch_size)
        for checkpointing in (False, True):
            row = {"blocks": trainer.model.num_blocks, "gradient_checkpointing": checkpointing,
                   "batch_size": args.train_batch_size, "forward_gflops": flops / 1e9}
            print(f"  train: {row['blocks']} blocks, checkpointing {'on' if checkpointing else 'off'}", flush=True)
            try:
                trainer.set_checkpointing(checkpointing)
                row["checkpointing_active"] = bool(trainer.model.gradient_checkpointing)
                reset_peak(device)
                for _ in range(args.train_warmup):
                    trainer.step()
                row["block_forwards_per_step"] = trainer.block_forwards_per_step()
                times = trainer.timed_steps(args.train_steps)
                row.update(memory(device), step_seconds=times, median_step_seconds=median(times),
                           min_step_seconds=min(times), images_per_second=args.train_batch_size / median(times),
                           status="ok")
            except Exception as error:  # an OOM at one setting still lets the others run
                row.update(error_record(error))
            if row.get("status") != "ok":  # out of the except block: its traceback no longer holds the tensors
                trainer.optimizer.zero_grad(set_to_none=True)
                release(device)
            rows.append(row)
    trainer.set_checkpointing(False)
    base = {row["gradient_checkpointing"]: row for row in rows if row["blocks"] == num_blocks}
    for row in rows:
        ref = base[row["gradient_checkpointing"]]
        row["flops_ratio"] = ref["forward_gflops"] / row["forward_gflops"]
        if row.get("status") == "ok" and ref.get("status") == "ok":
            row["speedup"] = ref["median_step_seconds"] / row["median_step_seconds"]
    result = {"status": "ok" if all(r.get("status") == "ok" for r in rows) else "partial",
              "rows": rows, "losses_finite": trainer.finite_losses(),
              "kept_block_indices": trainer.model.kept_block_indices,
              "precision": "float32 throughout" if args.dtype == "float32" else
                           f"fp32 weights, AdamW and EMA, forward under accelerate's {MIXED_PRECISION[args.dtype]} "
                           "autocast"}
    accelerator.free_memory()
    del trainer
    release(device)
    return result


# ------------------------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def run_sampling(args, accelerator, source) -> dict:
    device, dtype = accelerator.device, DTYPES[args.dtype]
    num_blocks = source.num_blocks
    depths = [num_blocks] + [d for d in (args.sample_depths or [num_blocks // 2, num_blocks // 4])]
    models = []
    for depth in depths:
        wrapper = copy.deepcopy(source)
        removed = kept_after_removing(wrapper.kept_block_indices, depth)
        if removed:
            wrapper.prune_blocks(removed)
        # what a user samples with: the exported plain DiT, weights in the sampling dtype
        plain = wrapper.to_dit_transformer(share_weights=True).to(device).eval()
        if dtype != torch.float32:  # (diffusers warns on any dtype cast, float32 included)
            plain.to(dtype=dtype)
        models.append((depth, removed, plain))
        del wrapper
    config = source.config
    batch = 2 * args.sample_batch_size  # conditional + null labels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, config.in_channels, config.sample_size, config.sample_size, generator=g)
    t = torch.randint(0, 1000, (args.sample_batch_size,), generator=g).repeat(2)
    y = torch.cat([torch.randint(0, config.num_embeds_ada_norm, (args.sample_batch_size,), generator=g),
                   torch.full((args.sample_batch_size,), config.num_embeds_ada_norm)])
    x, t, y = x.to(device=device, dtype=dtype), t.to(device), y.to(device)
    reset_peak(device)
    rows = []
    for depth, removed, model in models:
        rows.append({"blocks": depth, "removed_blocks": removed, "forward_batch": batch,
                     "forward_gflops": forward_flops(model, batch) / 1e9})
    timers = [Timer(device) for _ in models]
    for _ in range(args.sample_warmup):
        for _, _, model in models:
            model(x, timestep=t, class_labels=y)
    synchronize(device)
    for r in range(args.sample_iters):  # rounds, order rotated: drifting clocks or load hit all models alike
        order = list(range(len(models)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            timers[i].start()
            models[i][2](x, timestep=t, class_labels=y)
            timers[i].stop()
    for row, timer in zip(rows, timers):
        row["forward_seconds"] = timer.seconds()
        row["median_forward_seconds"] = median(row["forward_seconds"])
        row["achieved_tflops_per_second"] = row["forward_gflops"] / 1e3 / row["median_forward_seconds"]
    base = rows[0]
    for row in rows:
        row["flops_ratio"] = base["forward_gflops"] / row["forward_gflops"]
        row["block_ratio"] = num_blocks / row["blocks"]
        row["speedup"] = base["median_forward_seconds"] / row["median_forward_seconds"]
        paired = [a / b for a, b in zip(base["forward_seconds"], row["forward_seconds"])]
        row["paired_speedup_range"] = [min(paired), max(paired)]
        row["speedup_over_flops_ratio"] = row["speedup"] / row["flops_ratio"]
    result = {"status": "ok", "rows": rows, "dtype": args.dtype, "sample_batch_size": args.sample_batch_size,
              "memory": memory(device)}
    del models
    release(device)
    return result


# ------------------------------------------------------------------------------------------------- pruning stage


def calibration_pool(config, num_samples: int, seed: int = 1):
    """Random clean latents and labels (10 classes: enough samples per class for CED's per-class variances)."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_samples, config.in_channels, config.sample_size, config.sample_size)
    return torch.randn(shape, generator=g), torch.randint(0, 10, (num_samples,), generator=g)


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        r = torch.empty(len(v))
        r[torch.tensor(v).argsort()] = torch.arange(len(v), dtype=torch.float32)
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def run_pruning_stage(args, accelerator, source) -> dict:
    device = accelerator.device
    trainer = Trainer(accelerator, copy.deepcopy(source), args.train_batch_size)
    trainer.step()  # AdamW moments and EMA resident, as at any stage boundary of a run
    model, num_blocks = trainer.model, trainer.model.num_blocks
    config = EntPrunerConfig(target_num_blocks=num_blocks // 2, pruning_mode="adaptive",
                             pruning_stages=DEFAULTS.pruning_stages, pruning_steps=DEFAULTS.pruning_stages,
                             ced_num_samples=args.ced_num_samples, ced_batch_size=args.ced_batch_size,
                             proxy_batch_size=args.proxy_batch_size, zico_num_batches=args.zico_num_batches)
    pool = calibration_pool(model.config, config.calibration_pool_size)
    pruner = EntPruner(config, model, trainer.objective, pool, accelerator)
    pruner.calibration_pool()  # a run collects (encodes) it before training starts
    result = {"config": config.to_dict(), "blocks_before": num_blocks}

    # CED under autocast first, while the model is whole (the stage may prune it)
    if args.dtype != "float32":
        print("  pruning stage: CED under autocast (comparison)", flush=True)
        try:
            model.eval()
            reset_peak(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=DTYPES[args.dtype]):
                autocast_ced = score_blocks("ced", model, trainer.objective,
                                            zip(pool[0].split(config.ced_batch_size),
                                                pool[1].split(config.ced_batch_size)),
                                            config.ced_num_samples, seed=config.ranking_seed,
                                            ced_options=config.ced_options)
            synchronize(device)
            result["ced_autocast"] = {"seconds": time.perf_counter() - start, **memory(device),
                                      "scores": dict(zip(autocast_ced.block_indices, autocast_ced.scores))}
        except Exception as error:
            result["ced_autocast"] = error_record(error)
        finally:
            model.train()
            release(device)

    parts = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            reset_peak(device)
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                synchronize(device)
                parts[name] = {"seconds": time.perf_counter() - start, **memory(device)}
        return wrapper

    # the stage itself, EntPruner.step unchanged; its two costly parts timed where it calls them
    pruner._rank = timed("ced", pruner._rank)
    pruner._score_candidates = timed("proxies", pruner._score_candidates)
    print("  pruning stage: EntPruner.step (CED, proxies, surgery)", flush=True)
    reset_peak(device)
    start = time.perf_counter()
    try:
        trainer.prepared = pruner.step(0, trainer.prepared, trainer.optimizer, trainer.ema)
        synchronize(device)
    except Exception as error:  # keep what was measured before it (e.g. the CED part when the proxies run out)
        result.update(error_record(error), parts=parts)
    if result.get("status") == "error":
        accelerator.free_memory()
        del trainer, pruner, model
        release(device)
        return result
    stage_seconds = time.perf_counter() - start
    stage_memory = memory(device)  # the peak since the last part began; the parts' own peaks come in below
    for key in ("peak_allocated_gib", "peak_reserved_gib"):
        if stage_memory[key] is not None:
            stage_memory[key] = max([stage_memory[key], *(p[key] for p in parts.values())])
    decision = pruner.controller.decisions[-1].to_dict()
    result.update(status="ok", stage_seconds=stage_seconds, stage_memory=stage_memory, parts=parts,
                  other_seconds=stage_seconds - sum(p["seconds"] for p in parts.values()),
                  blocks_after=model.num_blocks, decision=decision,
                  pruner_stage_breakdown=list(getattr(pruner, "stage_breakdown", [])))  # EntPruner's own timing
    if "scores" in result.get("ced_autocast", {}):
        fp32 = {int(k): v for k, v in decision["ced_scores"].items()}
        half = result["ced_autocast"]["scores"]
        blocks = sorted(fp32)
        a, b = [fp32[i] for i in blocks], [half[i] for i in blocks]
        k = num_blocks // 2
        low = set(sorted(blocks, key=fp32.get)[:k]) & set(sorted(blocks, key=half.get)[:k])
        result["ced_autocast"].update(spearman_vs_stage=spearman(a, b), lowest_half_overlap=f"{len(low)}/{k}",
                                      time_ratio_vs_stage=result["ced_autocast"]["seconds"] / parts["ced"]["seconds"])
    accelerator.free_memory()
    del trainer, pruner, model
    release(device)
    return result


# ------------------------------------------------------------------------------------------------- two processes


def worker(args) -> None:
    """One of the processes `run_two_process` launches; the main one writes ``args._worker`` (JSON)."""
    from accelerate.utils import gather_object

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    source = build_source(args.config)  # the same seed everywhere (DDP also broadcasts rank 0's weights)
    num_blocks = source.num_blocks
    trainer = Trainer(accelerator, source, args.mp_batch_size or args.train_batch_size, seed=100 + rank)
    trainer.set_checkpointing(True)  # as the recommended XL command trains
    config = EntPrunerConfig(target_num_blocks=num_blocks // 2, pruning_mode="fixed", pruning_stages=1,
                             pruning_steps=1, ced_num_samples=args.mp_ced_num_samples,
                             ced_batch_size=min(args.ced_batch_size, args.mp_ced_num_samples))
    pool = calibration_pool(trainer.model.config, config.calibration_pool_size)  # the same pool on every process
    pruner = EntPruner(config, trainer.model, trainer.objective, pool, accelerator)
    wrapper_before = type(trainer.prepared).__name__
    for _ in range(args.train_warmup):
        trainer.step()
    before = trainer.timed_steps(args.mp_steps)
    old = trainer.prepared
    start = time.perf_counter()
    trainer.prepared = pruner.step(0, trainer.prepared, trainer.optimizer, trainer.ema)
    synchronize(accelerator.device)
    stage_seconds = time.perf_counter() - start
    rewrapped = trainer.prepared is not old
    for _ in range(args.train_warmup):
        trainer.step()
    after = trainer.timed_steps(args.mp_steps)

    params = trainer.trainable()
    state = trainer.optimizer.optimizer.state
    with torch.no_grad():
        summary = torch.tensor(
            [float(trainer.model.num_blocks), sum(p.double().sum().item() for p in params),
             sum(p.double().abs().sum().item() for p in params),
             sum(s.double().sum().item() for s in trainer.ema.shadow_params),
             sum(state[p]["exp_avg"].double().sum().item() for p in params),
             sum(state[p]["exp_avg_sq"].double().sum().item() for p in params)],
            dtype=torch.float64, device=accelerator.device)
    summaries = accelerator.gather(summary[None]).cpu()
    kept = gather_object([list(trainer.model.kept_block_indices)])
    finite = gather_object([trainer.finite_losses()])
    times = gather_object([{"before": before, "after": after, "stage_seconds": stage_seconds}])
    if accelerator.is_main_process:
        report = {
            "num_processes": world, "backend": str(torch.distributed.get_backend()),
            "device": str(accelerator.device), "mixed_precision": accelerator.mixed_precision,
            "wrapper": wrapper_before, "rewrapped_after_pruning": rewrapped,
            "blocks_before": num_blocks, "blocks_after": trainer.model.num_blocks,
            "kept_block_indices_by_rank": kept, "losses_finite_by_rank": finite,
            "rank_summaries": summaries.tolist(),
            "weights_agree": bool(torch.equal(summaries, summaries[:1].expand_as(summaries))),
            "max_abs_summary_difference": float((summaries - summaries[:1]).abs().max()),
            "step_seconds_by_rank": times,
            "median_step_seconds_before": median(before), "median_step_seconds_after": median(after),
            "stage_seconds": stage_seconds, "pruning_decision": pruner.controller.decisions[-1].to_dict(),
        }
        with open(args._worker, "w") as f:
            json.dump(report, f, indent=2)
    accelerator.wait_for_everyone()
    # Skip the interpreter's teardown: destroying the last DDP reducer's gloo group there can hang (see
    # tests/pruner_worker.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_two_process(args, device) -> dict:
    backend = args.multiprocess_backend
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if backend == "none":
        return {"status": "skipped", "reason": "--multiprocess_backend none"}
    if backend == "auto":
        if device.type != "cuda":
            return {"status": "skipped", "reason": "skipped: --device cpu (--multiprocess_backend gloo runs it)"}
        if gpus < 2:
            return {"status": "skipped", "reason": f"skipped: {gpus} GPU{'s' if gpus != 1 else ''}"}
        backend = "nccl"
    if backend == "nccl" and gpus < 2:
        return {"status": "skipped", "reason": f"skipped: {gpus} GPUs (NCCL needs 2)"}
    out = os.path.join(os.path.abspath(args.output_dir), "two_process_worker.json")
    if os.path.exists(out):
        os.remove(out)
    with socket.socket() as s:  # a free port, not accelerate's default one that another launch may hold
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate_bin = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    launcher = [accelerate_bin, "launch"] if accelerate_bin else [sys.executable, "-m", "accelerate.commands.launch"]
    env = dict(os.environ)
    if backend == "gloo":  # CPU processes: gloo is accelerate's backend for them
        env["ACCELERATE_USE_CPU"] = "true"
        mixed_precision, where = "no", []
    else:
        mixed_precision, where = MIXED_PRECISION[args.dtype], ["--gpu_ids", "0,1"]
    command = [*launcher, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", mixed_precision, "--dynamo_backend", "no", "--main_process_port", str(port),
               *where, os.path.abspath(__file__), "--_worker", out, "--config", args.config,
               "--train_batch_size", str(args.train_batch_size), "--train_warmup", str(args.train_warmup),
               "--mp_steps", str(args.mp_steps), "--mp_ced_num_samples", str(args.mp_ced_num_samples),
               "--ced_batch_size", str(args.ced_batch_size), "--dtype", args.dtype]
    if args.mp_batch_size:
        command += ["--mp_batch_size", str(args.mp_batch_size)]
    start = time.perf_counter()
    # a session of its own, so that a timeout ends the launcher's worker processes too
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=args.mp_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        return {"status": "error", "backend": backend, "error": f"timed out after {args.mp_timeout} s",
                "output_tail": output[-4000:]}
    result = {"backend": backend, "launch_seconds": time.perf_counter() - start, "returncode": process.returncode}
    if process.returncode != 0 or not os.path.exists(out):
        return {**result, "status": "error", "error": "the launched processes failed", "output_tail": output[-4000:]}
    with open(out) as f:
        report = json.load(f)
    ok = report["weights_agree"] and report["rewrapped_after_pruning"] and all(report["losses_finite_by_rank"]) \
        and report["kept_block_indices_by_rank"][0] == report["kept_block_indices_by_rank"][1] \
        and report["backend"] == backend
    return {**result, **report, "status": "ok" if ok else "failed"}


# ------------------------------------------------------------------------------------------------------ reports


def fmt(value, spec=".3g", unit="", none="-"):
    return none if value is None else f"{value:{spec}}{unit}"


def markdown(report: dict) -> str:
    env, args, sections = report["env"], report["args"], report["sections"]
    lines = [f"## GPU check: DiT-XL/2-config pruning on {env['device_name']}" if args["config"] == "xl" else
             f"## GPU check ({args['config']} config) on {env['device_name']}", "",
             f"Machine: {env['device_name']} ({env['gpu_count']} GPU(s), {fmt(env.get('gpu_memory_gib'), '.0f')} GiB); "
             f"torch {env['torch']} (CUDA {env['cuda']}), diffusers {env['diffusers']}, accelerate "
             f"{env['accelerate']}; {args['dtype']}. Date: {env['date']}. Random weights, random latents; "
             f"{env['total_seconds']:.0f} s in all.", "", f"    {env['command']}", ""]
    train = sections.get("train", {})
    if train.get("rows"):
        lines += [f"Training step (batch {args['train_batch_size']}; {train['precision']}; AdamW, EMA, "
                  f"clipping; median of {args['train_steps']} steps after {args['train_warmup']} warm-up):", "",
                  "| blocks | gradient checkpointing | block forwards / step | median step | images/s | speedup | "
                  "FLOPs ratio | peak memory (allocated) | peak reserved |", "|---|---|---|---|---|---|---|---|---|"]
        for r in train["rows"]:
            if r.get("status") != "ok":
                lines.append(f"| {r['blocks']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                             f"{r.get('error', '')[:100]} | | | | {r['flops_ratio']:.2f} | | |")
                continue
            lines.append(f"| {r['blocks']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                         f"{r['block_forwards_per_step']} | {r['median_step_seconds'] * 1e3:.1f} ms | "
                         f"{r['images_per_second']:.1f} | {fmt(r.get('speedup'), '.2f')} | {r['flops_ratio']:.2f} | "
                         f"{fmt(r['peak_allocated_gib'], '.1f', ' GiB')} | "
                         f"{fmt(r['peak_reserved_gib'], '.1f', ' GiB')} |")
        lines.append("")
    sampling = sections.get("sampling", {})
    if sampling.get("rows"):
        lines += [f"Sampling: one transformer forward at batch {2 * args['sample_batch_size']} (guidance doubles "
                  f"{args['sample_batch_size']} labels), exported plain DiTs in {args['dtype']}, median of "
                  f"{args['sample_iters']} interleaved rounds:", "",
                  "| blocks | GFLOP / forward | FLOPs ratio | median forward | speedup (paired range) | "
                  "speedup / FLOPs ratio | TFLOP/s |", "|---|---|---|---|---|---|---|"]
        for r in sampling["rows"]:
            low, high = r["paired_speedup_range"]
            lines.append(f"| {r['blocks']} | {r['forward_gflops']:.4g} | {r['flops_ratio']:.2f} | "
                         f"{r['median_forward_seconds'] * 1e3:.2f} ms | {r['speedup']:.2f} ({low:.2f}-{high:.2f}) | "
                         f"{r['speedup_over_flops_ratio']:.2f} | {r['achieved_tflops_per_second']:.3g} |")
        lines.append("")
    stage = sections.get("pruning_stage", {})
    if stage.get("status") == "ok":
        c = stage["config"]
        d = stage["decision"]
        chosen = f"dropped {len(d['pruned_blocks'])} ({stage['blocks_before']} -> {stage['blocks_after']} blocks)"
        lines += [f"One pruning stage (`EntPruner.step`, adaptive, first of {c['pruning_stages']}; model after one "
                  f"training step, optimizer and EMA resident): {chosen}.", "",
                  "| part | settings | time | peak memory (allocated) |", "|---|---|---|---|"]
        ced, proxies = stage["parts"].get("ced"), stage["parts"].get("proxies")
        if ced:
            lines.append(f"| CED ranking (as a run computes it) | {c['ced_num_samples']} draws, batch "
                         f"{c['ced_batch_size']} | {ced['seconds']:.2f} s | "
                         f"{fmt(ced['peak_allocated_gib'], '.1f', ' GiB')} |")
        if proxies:
            amounts = [cand["num_blocks"] for cand in d["candidates"]]
            lines.append(f"| proxies (NTK, ZiCo) | {len(amounts)} candidates {amounts}, batch {c['proxy_batch_size']}, "
                         f"{c['zico_num_batches']} ZiCo batches | {proxies['seconds']:.2f} s | "
                         f"{fmt(proxies['peak_allocated_gib'], '.1f', ' GiB')} |")
        lines.append(f"| rest (surgery, bookkeeping) | | {stage['other_seconds']:.2f} s | |")
        lines.append(f"| the whole stage | | {stage['stage_seconds']:.2f} s | "
                     f"{fmt(stage['stage_memory']['peak_allocated_gib'], '.1f', ' GiB')} |")
        auto = stage.get("ced_autocast", {})
        if "seconds" in auto:
            lines.append(f"| CED under {args['dtype']} autocast (not what a run does) | same draws | "
                         f"{auto['seconds']:.2f} s | {fmt(auto['peak_allocated_gib'], '.1f', ' GiB')} |")
            lines += ["", f"CED under autocast vs as run: Spearman {auto['spearman_vs_stage']:.3f}, lowest-half "
                          f"overlap {auto['lowest_half_overlap']}."]
        lines.append("")
    elif stage:
        lines += [f"One pruning stage: {stage.get('status')}: {stage.get('error', '')[:300]}", ""]
    two = sections.get("two_process", {})
    if two:
        if two.get("status") in ("ok", "failed"):
            lines += ["Two processes (DDP, gradient checkpointing, `EntPruner.step` pruning half, re-wrap):", "",
                      "| backend | blocks | median step before / after | stage | re-wrapped | weights agree | result |",
                      "|---|---|---|---|---|---|---|",
                      f"| {two['backend']} | {two['blocks_before']} -> {two['blocks_after']} | "
                      f"{two['median_step_seconds_before'] * 1e3:.1f} / {two['median_step_seconds_after'] * 1e3:.1f} ms"
                      f" | {two['stage_seconds']:.2f} s | {two['rewrapped_after_pruning']} | {two['weights_agree']} | "
                      f"{two['status']} |", ""]
        else:
            lines += [f"Two processes: {two.get('reason') or two.get('status')}"
                      f"{': ' + two['error'] if two.get('error') else ''}", ""]
    failed = [name for name, s in sections.items() if s.get("status") == "error"]
    if failed:
        lines += [f"Sections that failed (see gpu_check.json): {', '.join(failed)}.", ""]
    return "\n".join(lines)


def environment(args, device) -> dict:
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(
        ["python", *[a if " " not in a else repr(a) for a in sys.argv]]), "python": platform.python_version(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
        "device": str(device), "device_name": device_name(device), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu_count": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_memory_gib=props.total_memory / GIB, compute_capability=f"{props.major}.{props.minor}",
                   gpu_names=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


# --------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="xl")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke test)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="training autocast / sampling weights (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--output_dir", default="build/gpu-check")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads")
    train = parser.add_argument_group("training step")
    train.add_argument("--train_batch_size", type=int, default=32)
    train.add_argument("--train_warmup", type=int, default=3)
    train.add_argument("--train_steps", type=int, default=10, help="timed steps per setting")
    train.add_argument("--train_depth", type=int, default=None, help="blocks after pruning (default: half)")
    sample = parser.add_argument_group("sampling")
    sample.add_argument("--sample_batch_size", type=int, default=32,
                        help="class labels; the forward runs twice as many")
    sample.add_argument("--sample_depths", type=int, nargs="+", default=None,
                        help="pruned block counts (default: half and a quarter: 14 7 at XL)")
    sample.add_argument("--sample_warmup", type=int, default=3)
    sample.add_argument("--sample_iters", type=int, default=20, help="timed rounds (one forward per model each)")
    stage = parser.add_argument_group("pruning stage")
    stage.add_argument("--ced_num_samples", type=int, default=256)
    stage.add_argument("--ced_batch_size", type=int, default=DEFAULTS.ced_batch_size)
    stage.add_argument("--proxy_batch_size", type=int, default=DEFAULTS.proxy_batch_size)
    stage.add_argument("--zico_num_batches", type=int, default=DEFAULTS.zico_num_batches)
    multi = parser.add_argument_group("two processes")
    multi.add_argument("--multiprocess_backend", choices=("auto", "nccl", "gloo", "none"), default="auto",
                       help="auto: NCCL when --device cuda and >= 2 GPUs, else skipped; gloo: 2 CPU processes "
                            "(smoke test of the same code)")
    multi.add_argument("--mp_steps", type=int, default=5, help="timed steps before and after pruning")
    multi.add_argument("--mp_batch_size", type=int, default=None, help="per process (default --train_batch_size)")
    multi.add_argument("--mp_ced_num_samples", type=int, default=64)
    multi.add_argument("--mp_timeout", type=int, default=240,
                       help="seconds before the launch is killed (a hung collective must not eat the session)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    if args._worker:
        return worker(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device (built for CUDA "
                 f"{torch.version.cuda}). Run on a GPU machine, or pass --device cpu for a smoke test.")
    os.makedirs(args.output_dir, exist_ok=True)
    t0 = time.perf_counter()
    accelerator = Accelerator(mixed_precision=MIXED_PRECISION[args.dtype], cpu=device.type == "cpu")
    device = accelerator.device
    report = {"env": environment(args, device), "args": vars(args), "sections": {}}
    json_path, md_path = (os.path.join(args.output_dir, name) for name in ("gpu_check.json", "gpu_check.md"))

    def write():
        report["env"]["total_seconds"] = time.perf_counter() - t0
        if device.type == "cpu":
            report["env"]["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
        with open(md_path, "w") as f:
            f.write(markdown(report))

    print(f"gpu_check: {args.config} config on {report['env']['device_name']} ({args.dtype}); sections "
          f"{', '.join(args.sections)}", flush=True)
    source = build_source(args.config)
    print(f"[{time.perf_counter() - t0:6.1f} s] built the {args.config} model ({source.num_blocks} blocks, "
          f"{sum(p.numel() for p in source.parameters()) / 1e6:.1f}M parameters)", flush=True)
    runners = {"train": lambda: run_train(args, accelerator, source),
               "sampling": lambda: run_sampling(args, accelerator, source),
               "pruning_stage": lambda: run_pruning_stage(args, accelerator, source),
               "two_process": lambda: run_two_process(args, device)}
    for name in SECTIONS:
        if name not in args.sections:
            continue
        start = time.perf_counter()
        print(f"[{start - t0:6.1f} s] {name}", flush=True)
        try:
            result = runners[name]()
        except Exception as error:  # the point is to learn as much as possible from one GPU session
            result = error_record(error)
        if result.get("status") == "error":  # out of the except block: its traceback no longer holds the tensors
            accelerator.free_memory()
            release(device)
        result["section_seconds"] = time.perf_counter() - start
        report["sections"][name] = result
        print(f"[{time.perf_counter() - t0:6.1f} s] {name}: {result.get('status')}"
              f"{' (' + result['error'][:200] + ')' if result.get('error') else ''}"
              f"{' (' + result['reason'] + ')' if result.get('reason') else ''}", flush=True)
        write()
    write()
    print(f"\n{markdown(report)}\nwrote {json_path} and {md_path} ({report['env']['total_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
