"""Sampling speedup of depth-pruned DiTs, measured against the FLOPs ratio (its physical limit).

For one config, builds the original transformer and pruned copies that remove a fraction of the blocks, then on
the same machine, with the same batch, number of steps and seed, measures for each model:

- FLOPs of one transformer forward at the pipeline's batch (classifier-free guidance doubles it), counted with
  `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and attention; element-wise ops, norms and the
  scheduler are not counted), and per sampling call: steps x forward + VAE decode;
- wall time of the transformer forward alone at the doubled batch (mean over ``--forward_iters`` forwards, the
  models alternating forward by forward), and of a full `DiTPipeline` call
  (``pipe(class_labels, num_inference_steps, guidance_scale, generator=torch.manual_seed(0), output_type="np")``:
  guidance, scheduler steps and VAE decode included).

Warm-up runs come first; then ``--repeats`` rounds, each timing every model once, in an order rotated from round to
round, so that drift in machine load hits all models alike. Times are medians over the rounds; the speedup is
original / pruned of the medians, the range beside it spans the per-round (paired) ratios, and the speedup of the
fastest rounds is printed too (load from other processes only ever adds time).

Which blocks go does not matter for speed (every DiT block has the same shape), so evenly spaced blocks are removed.
The pruned models are what a user gets back: `EntPrunedTransformer2DModel.from_transformer(...).prune_blocks(...)`,
exported as plain `DiTTransformer2DModel`s (``--model entpruned`` times the wrapper class itself instead).
The patch embedding, the final layer and the VAE are not pruned, so the FLOPs ratio is below the block-count ratio.

Configs: ``embedded``: the tiny pretrained pipeline shipped with the package (its own VAE and scheduler).
``s2``: a DiT-S/2-like transformer (12 blocks, hidden 384 = 6 x 64, patch 2, 4x32x32 latents, 256 px), random
weights, DDIM; ``xl``: the same with DiT-XL/2-256's transformer config (28 blocks, hidden 1152 = 16 x 72). Their VAE
is by default a minimal one-level `AutoencoderKL` (no upsampling, negligible cost: the pipeline column is then
essentially the sampling loop) and with ``--s2_vae sd`` an SD-VAE-sized one (random weights,
256 px decode; slow on CPU).

    python bench/speedup.py --config embedded --num_threads 1 --repeats 11 --output_json build/speedup-embedded.json
    python bench/speedup.py --config s2 --num_threads 1 --output_json build/speedup-s2.json   # batch 2, 10 steps
    python bench/speedup.py --config xl --num_threads 2 --repeats 3     # DiT-XL/2 config: batch 1, 2 steps
    python bench/speedup.py --config s2 --device cuda --dtype float16 --batch_size 8 --num_inference_steps 50  # GPU
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffusers_entprune import EntPrunedTransformer2DModel
from diffusers_entprune.embedded import load_embedded_pipeline
from diffusers_entprune.speed import count_flops, synchronize

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
S2_CONFIG = dict(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
                 sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
XL_CONFIG = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                 sample_size=32, patch_size=2, num_embeds_ada_norm=1000)  # facebook/DiT-XL-2-256's transformer
RANDOM_CONFIGS = {"s2": S2_CONFIG, "xl": XL_CONFIG}
DEFAULTS = {  # batch (class labels), inference steps
    "embedded": dict(batch_size=8, num_inference_steps=50),
    "s2": dict(batch_size=2, num_inference_steps=10),
    "xl": dict(batch_size=1, num_inference_steps=2),
}


def evenly_spaced(num_blocks: int, num_remove: int) -> list[int]:
    return sorted({int((i + 0.5) * num_blocks / num_remove) for i in range(num_remove)})


def build_original(args, device, dtype) -> DiTPipeline:
    if args.config == "embedded":
        pipe = load_embedded_pipeline()
    else:
        torch.manual_seed(0)
        dit = DiTTransformer2DModel(**RANDOM_CONFIGS[args.config])
        with torch.no_grad():
            first = dit.transformer_blocks[0].norm1.emb.state_dict()
            for block in dit.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)  # as in converted checkpoints (lets the wrapper tie them)
                block.norm1.linear.weight.normal_(0, 0.02)  # non-zero gates: a generic, not a zero-init, DiT
        if args.s2_vae == "sd":
            levels = ("DownEncoderBlock2D",) * 4, ("UpDecoderBlock2D",) * 4
            vae = AutoencoderKL(down_block_types=levels[0], up_block_types=levels[1], layers_per_block=2,
                                block_out_channels=(128, 256, 512, 512), sample_size=256, scaling_factor=0.18215)
        else:
            vae = AutoencoderKL(block_out_channels=(32,), layers_per_block=1, mid_block_add_attention=False)
        scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
        pipe = DiTPipeline(transformer=dit, vae=vae, scheduler=scheduler)
    pipe.to(device)
    if dtype != torch.float32:  # (diffusers warns on any dtype cast, float32 included)
        pipe.to(dtype=dtype)
    pipe.transformer.eval()
    pipe.vae.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_variants(pipe: DiTPipeline, fractions, model_kind: str):
    """[(name, removed original indices, pipeline)] for the original and each pruned copy (weights shared)."""
    original = pipe.transformer
    num_blocks = len(original.transformer_blocks)
    variants = []
    for fraction in [0.0, *fractions]:
        num_remove = round(fraction * num_blocks)
        if num_remove >= num_blocks:
            raise ValueError(f"--fractions: {fraction} removes all {num_blocks} blocks.")
        removed = evenly_spaced(num_blocks, num_remove) if num_remove else []
        if num_remove == 0 and model_kind == "plain":
            transformer = original
        else:
            wrapper = EntPrunedTransformer2DModel.from_transformer(original)
            if removed:
                wrapper.prune_blocks(removed)
            transformer = wrapper if model_kind == "entpruned" else wrapper.to_dit_transformer(share_weights=True)
        transformer.eval()
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        variant = DiTPipeline(transformer=transformer, vae=pipe.vae, scheduler=scheduler)
        variant.set_progress_bar_config(disable=True)
        name = "original" if not removed else f"-{fraction:.0%}"
        variants.append((name, removed, variant))
    return variants


def forward_inputs(pipe: DiTPipeline, labels, device, dtype):
    """What the pipeline feeds the transformer at one step: doubled batch (conditional + null labels)."""
    config = pipe.transformer.config
    batch = len(labels)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * batch, config.in_channels, config.sample_size, config.sample_size, generator=g)
    t = torch.full((2 * batch,), 500, dtype=torch.long)
    y = torch.tensor(list(labels) + [config.num_embeds_ada_norm] * batch)
    return x.to(device=device, dtype=dtype), t.to(device), y.to(device)


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=("embedded", *RANDOM_CONFIGS), default="embedded")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="fractions of the blocks to remove (evenly spaced blocks)")
    parser.add_argument("--batch_size", type=int, default=None, help="class labels per call (embedded 8, s2 2, xl 1)")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="embedded 50, s2 10, xl 2")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds; medians are reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed pipeline calls per model before timing")
    parser.add_argument("--forward_iters", type=int, default=None,
                        help="forwards per timed forward measurement (default: the number of inference steps)")
    parser.add_argument("--model", choices=("plain", "entpruned"), default="plain",
                        help="plain: exported DiTTransformer2DModel (what from_pretrained gives back); entpruned: "
                             "the EntPrunedTransformer2DModel wrapper, original wrapped too")
    parser.add_argument("--s2_vae", choices=("minimal", "sd"), default="minimal")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--num_threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()
    for key, value in DEFAULTS[args.config].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.forward_iters = args.forward_iters or args.num_inference_steps
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    load_start = os.getloadavg()

    pipe = build_original(args, device, dtype)
    num_classes = 10 if args.config == "embedded" else pipe.transformer.config.num_embeds_ada_norm
    labels = [i % num_classes for i in range(args.batch_size)]
    variants = build_variants(pipe, args.fractions, args.model)
    x, t, y = forward_inputs(pipe, labels, device, dtype)
    num_blocks = len(pipe.transformer.transformer_blocks)

    def forward(variant):
        return variant.transformer(x, timestep=t, class_labels=y).sample

    def sample(variant, steps=args.num_inference_steps):
        return variant(class_labels=labels, num_inference_steps=steps, guidance_scale=args.guidance_scale,
                       generator=torch.manual_seed(0), output_type="np").images

    @torch.no_grad()
    def time_forwards(indices):
        """Seconds per forward of each model, the models alternating forward by forward (finest interleave)."""
        totals = dict.fromkeys(indices, 0.0)
        for _ in range(args.forward_iters):
            for i in indices:
                synchronize(device)
                start = time.perf_counter()
                forward(variants[i][2])
                synchronize(device)
                totals[i] += time.perf_counter() - start
        return {i: total / args.forward_iters for i, total in totals.items()}

    def time_sample(variant):
        synchronize(device)
        start = time.perf_counter()
        sample(variant)
        synchronize(device)
        return time.perf_counter() - start

    # FLOPs: one forward at the doubled batch, and the VAE decode of the final latents (same for every model).
    config = pipe.transformer.config
    latents = torch.randn(args.batch_size, config.in_channels, config.sample_size, config.sample_size)
    vae_flops = count_flops(lambda: pipe.vae.decode(latents.to(device=device, dtype=dtype)))
    rows = []
    for name, removed, variant in variants:
        flops = count_flops(lambda: forward(variant))
        rows.append(dict(model=name, kept_blocks=num_blocks - len(removed), removed_blocks=removed,
                         forward_flops=flops, sampling_flops=args.num_inference_steps * flops + vae_flops,
                         forward_seconds=[], sampling_seconds=[]))
    if args.model == "plain":  # the exported copies compute exactly what the pruned wrappers compute
        for (name, removed, variant), row in zip(variants[1:], rows[1:]):
            wrapper = EntPrunedTransformer2DModel.from_transformer(pipe.transformer)
            wrapper.prune_blocks(removed)
            with torch.no_grad():
                row["export_max_abs_diff"] = (wrapper(x, t, y).sample - forward(variant)).abs().max().item()

    print(f"{args.config}: {len(variants)} models, batch {args.batch_size} (x2 guidance), "
          f"{args.num_inference_steps} steps, {args.device} {args.dtype}, {torch.get_num_threads()} threads; warm-up",
          flush=True)
    for _ in range(args.warmup):
        for _, _, variant in variants:
            sample(variant)
        time_forwards(range(len(variants)))
    for r in range(args.repeats):
        order = list(range(len(variants)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            rows[i]["sampling_seconds"].append(time_sample(variants[i][2]))
        for i, seconds in time_forwards(order).items():
            rows[i]["forward_seconds"].append(seconds)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{row['model']} {row['sampling_seconds'][-1]:.3f} s" for row in rows), flush=True)

    base = rows[0]
    for row in rows:
        for kind in ("forward", "sampling"):
            times = row[f"{kind}_seconds"]
            row[f"{kind}_median_s"] = statistics.median(times)
            row[f"{kind}_flops_ratio"] = base[f"{kind}_flops"] / row[f"{kind}_flops"]
            row[f"{kind}_speedup"] = base[f"{kind}_median_s"] / row[f"{kind}_median_s"]
            row[f"{kind}_paired_speedups"] = [a / b for a, b in zip(base[f"{kind}_seconds"], times)]
            row[f"{kind}_speedup_of_minima"] = min(base[f"{kind}_seconds"]) / min(times)
        row["block_ratio"] = num_blocks / row["kept_blocks"]

    env = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, diffusers=diffusers.__version__,
               device=args.device, device_name=device_name(device), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), dtype=args.dtype, python=platform.python_version(),
               loadavg_start=load_start, loadavg_end=os.getloadavg())
    vae_share = vae_flops / base["sampling_flops"]
    what = dict(
        embedded="pipeline = the embedded DiTPipeline: guidance, DDIM steps and the embedded VAE decode to 32 px",
        s2=("pipeline = DiTPipeline: guidance, DDIM steps and "
            + ("an SD-VAE-sized decode to 256 px (random weights)" if args.s2_vae == "sd"
               else "a minimal one-level VAE decode (no upsampling), i.e. essentially the sampling loop")),
    )
    what["xl"] = what["s2"]
    what = what[args.config]
    print(f"\n{env['date']}, torch {env['torch']}, diffusers {env['diffusers']}, {env['device']} "
          f"({env['device_name']}, {env['cpu_count']} CPUs, {env['torch_threads']} threads), {args.dtype}; "
          f"load average {load_start[0]:.2f} at start, {env['loadavg_end'][0]:.2f} at end")
    print(f"{args.config}, {args.model} transformer, batch {args.batch_size} (forward at {2 * args.batch_size} with "
          f"guidance), {args.num_inference_steps} steps, median of {args.repeats}; {what}; VAE decode = "
          f"{vae_share:.1%} of the original's sampling FLOPs\n")
    print("| model | blocks | removed | block ratio | GFLOP / forward | FLOPs ratio | forward | speedup "
          "| GFLOP / call | FLOPs ratio | pipeline call | speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["model"], f"{row['kept_blocks']}/{num_blocks}",
                 ", ".join(map(str, row["removed_blocks"])) or "-", f"{row['block_ratio']:.2f}"]
        for kind, unit, scale in (("forward", "ms", 1e3), ("sampling", "s", 1.0)):
            paired = row[f"{kind}_paired_speedups"]
            speedup = f"{row[f'{kind}_speedup']:.2f}"
            if row is not base:
                speedup += f" ({min(paired):.2f}-{max(paired):.2f})"
            cells += [f"{row[f'{kind}_flops'] / 1e9:.3g}", f"{row[f'{kind}_flops_ratio']:.2f}",
                      f"{row[f'{kind}_median_s'] * scale:.3g} {unit}", speedup]
        print("| " + " | ".join(cells) + " |")
    print("\nspeedups from each model's fastest round (load from other processes only adds time): forward "
          + ", ".join(f"{row['forward_speedup_of_minima']:.2f}" for row in rows[1:]) + "; pipeline call "
          + ", ".join(f"{row['sampling_speedup_of_minima']:.2f}" for row in rows[1:]))
    diffs = [row["export_max_abs_diff"] for row in rows if "export_max_abs_diff" in row]
    if diffs:
        print(f"\nexported plain models vs pruned wrappers: max abs output difference {max(diffs):.3g}")

    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        report = dict(env=env, args=vars(args), pipeline=what, vae_decode_flops=vae_flops, rows=rows)
        with open(args.output_json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
