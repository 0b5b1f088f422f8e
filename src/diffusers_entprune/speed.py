"""Measured sampling speed of a pruned pipeline against its original, and the FLOPs ratio that bounds it.

Depth pruning removes transformer blocks only: the patch embedding, the final layer and the VAE decode remain, so
the FLOPs ratio of one transformer forward is the physical limit of the speedup. Timings interleave the two
pipelines in every repeat, so drifting machine load hits both alike, and report medians.
"""

import statistics
import time

import torch


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that SDPA dispatches to (without this,
# attention, about 11% of a DiT-S/2 forward, would go uncounted on CPU).
FLOP_MAPPING = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def count_flops(fn) -> int:
    """FLOPs of ``fn()`` as torch counts them (matmuls, convolutions, attention; element-wise ops not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FLOP_MAPPING) as counter:
        fn()
    return int(counter.get_total_flops())


@torch.no_grad()
def transformer_flops(transformer, batch_size: int = 1) -> int:
    """FLOPs of one forward of ``transformer`` on ``batch_size`` latents (counted by torch, not estimated)."""
    config = transformer.config
    device, dtype = next(transformer.parameters()).device, next(transformer.parameters()).dtype
    latents = torch.zeros(batch_size, config.in_channels, config.sample_size, config.sample_size, device=device,
                          dtype=dtype)
    timesteps = torch.full((batch_size,), 500, device=device, dtype=torch.long)
    labels = torch.zeros(batch_size, device=device, dtype=torch.long)
    return count_flops(lambda: transformer(latents, timestep=timesteps, class_labels=labels))


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a wall-clock reading covers it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def compare_sampling_speed(original_pipe, pruned_pipe, class_labels: list[int], num_inference_steps: int = 50,
                           guidance_scale: float = 4.0, repeats: int = 3, warmup: int = 1, **call_kwargs) -> dict:
    """Time full pipeline calls (`DiTPipeline` or `SiTPipeline`; guidance doubles the batch; VAE decode included) of
    both pipelines; ``call_kwargs`` go to both calls (e.g. ``sampler="heun"``).

    Returns seconds per call (median), the speedup original / pruned, and the FLOPs ratio of one transformer
    forward at the batch the pipeline runs (twice the labels with guidance).
    """
    device = original_pipe.transformer.device

    def run(pipe):
        synchronize(device)
        start = time.perf_counter()
        pipe(class_labels=class_labels, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
             generator=torch.manual_seed(0), output_type="np", **call_kwargs)
        synchronize(device)
        return time.perf_counter() - start

    for _ in range(warmup):
        run(original_pipe), run(pruned_pipe)
    times = {"original": [], "pruned": []}
    for _ in range(repeats):
        times["original"].append(run(original_pipe))
        times["pruned"].append(run(pruned_pipe))
    original, pruned = statistics.median(times["original"]), statistics.median(times["pruned"])
    forward_batch = len(class_labels) * (2 if guidance_scale > 1 else 1)
    flops_original = transformer_flops(original_pipe.transformer, forward_batch)
    flops_pruned = transformer_flops(pruned_pipe.transformer, forward_batch)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} "
                                                                                    "threads)",
        "batch_size": len(class_labels), "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale, "repeats": repeats, **call_kwargs,
        "original_seconds": original, "pruned_seconds": pruned, "speedup": original / pruned,
        "flops_original": flops_original, "flops_pruned": flops_pruned, "flops_ratio": flops_original / flops_pruned,
    }


class StageTimer:
    """Training-step wall times, summarised per pruning stage (``train_step_seconds_by_stage`` of the report):
    `start` before a step, `stop` after its update (so checkpoints, validation and pruning stages are left out),
    `close` when the model changes. Each stage's median skips its first 3 steps (warm-up, allocator)."""

    def __init__(self, stages: list | None = None):
        self.stages = list(stages or [])  # restored from a checkpoint
        self._times: list[float] = []
        self._start = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> float:
        seconds = time.perf_counter() - self._start
        self._times.append(seconds)
        return seconds

    def close(self, num_blocks: int) -> None:
        if self._times:
            settled = sorted(self._times[min(3, len(self._times) - 1):])
            self.stages.append({"num_blocks": num_blocks, "steps": len(self._times),
                                "median_step_seconds": settled[len(settled) // 2]})
            self._times.clear()
