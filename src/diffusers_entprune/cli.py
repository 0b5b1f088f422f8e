"""The ``entprune`` command.

    entprune prune --prune_blocks 0 5 11 --output_dir tiny-pruned   # embedded base, no network needed
    entprune prune --pretrained_model_name_or_path facebook/DiT-XL-2-256 --prune_blocks ... --output_dir OUT

``prune`` loads a DiT pipeline, removes the given blocks (original indices), writes a plain `DiTPipeline` folder
with ``entprune_report.json``, reloads it with an unmodified `DiTPipeline.from_pretrained`, checks that the reloaded
model gives the same output as the in-memory pruned one, and saves a grid of samples from the original (top rows)
and the pruned model (bottom rows) with the same seeds.
"""

import argparse
import json
import os
import sys


def _parse_prune_args(argv):
    parser = argparse.ArgumentParser(prog="entprune prune", description="Remove DiT blocks and export a pipeline.")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="DiT pipeline folder or Hub id (default: the embedded tiny digits base).")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--prune_blocks", type=int, nargs="+", required=True,
                        help="Original indices of the blocks to remove, e.g. `--prune_blocks 0 5 11`.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace an existing, non-empty output_dir.")
    parser.add_argument("--save_fp16", action="store_true", help="Store weights in float16 (half the size).")
    parser.add_argument("--num_samples_per_row", type=int, default=8, help="Samples per row of the grid (0: none).")
    parser.add_argument("--class_labels", type=int, nargs="+", default=None,
                        help="Classes to sample (default: the first `num_samples_per_row` classes).")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_samples_per_row < 0:
        parser.error("--num_samples_per_row must be >= 0.")
    if args.num_inference_steps < 1:
        parser.error("--num_inference_steps must be >= 1.")
    return args


def prune_command(argv) -> int:
    args = _parse_prune_args(argv)
    import torch
    from diffusers import DiTPipeline
    from diffusers.utils import make_image_grid

    from .embedded import TINY_DIT_DIR
    from .export import check_output_dir, load_id2label, save_pruned_pipeline
    from .models import EntPrunedTransformer2DModel

    check_output_dir(args.output_dir, args.overwrite_output_dir)
    source = args.pretrained_model_name_or_path or TINY_DIT_DIR
    transformer = EntPrunedTransformer2DModel.from_pretrained(
        source, subfolder="transformer", revision=args.revision
    ).eval()
    pipe = DiTPipeline.from_pretrained(source, transformer=transformer, revision=args.revision)
    id2label = load_id2label(source, revision=args.revision)
    labels = args.class_labels or list(range(args.num_samples_per_row))

    def sample(p):
        return p(class_labels=labels, guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                 generator=torch.Generator().manual_seed(args.seed)).images

    original_images = sample(pipe) if args.num_samples_per_row else []
    removed = transformer.prune_blocks(args.prune_blocks)
    print(f"removed blocks {removed}; kept {transformer.kept_block_indices} "
          f"({transformer.num_blocks}/{transformer.original_num_layers})")
    save_pruned_pipeline(args.output_dir, transformer, pipe.vae, pipe.scheduler, id2label=id2label,
                         overwrite=args.overwrite_output_dir,
                         dtype=torch.float16 if args.save_fp16 else None,
                         report={"source": str(args.pretrained_model_name_or_path or "embedded:tiny-dit-digits")})

    # The saved folder must load with plain diffusers and reproduce the in-memory pruned model exactly.
    reloaded = DiTPipeline.from_pretrained(args.output_dir)
    latents = torch.randn(2, transformer.config.in_channels, transformer.config.sample_size,
                          transformer.config.sample_size, generator=torch.Generator().manual_seed(args.seed))
    t, y = torch.tensor([10, 500]), torch.tensor([labels[0], transformer.null_class_label])
    with torch.no_grad():
        difference = (reloaded.transformer.eval()(latents, t, y).sample - transformer(latents, t, y).sample).abs().max()
    print(f"reloaded with DiTPipeline.from_pretrained: max |difference| to the in-memory model = {difference.item():.3g}")

    if args.num_samples_per_row:
        pruned_images = sample(reloaded)
        grid = make_image_grid(original_images + pruned_images, rows=2, cols=len(labels))
        size = max(256, grid.width)
        grid = grid.resize((size, size * grid.height // grid.width))
        grid.save(os.path.join(args.output_dir, "samples.png"))
        print(f"sample grid (top: original, bottom: pruned): {os.path.join(args.output_dir, 'samples.png')}")
    with open(os.path.join(args.output_dir, "entprune_report.json")) as f:
        print(json.dumps({k: v for k, v in json.load(f).items() if k != "entprune_version"}))
    return 0


COMMANDS = {"prune": prune_command}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: entprune {{{','.join(COMMANDS)}}} [options]   (entprune <command> --help for details)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
