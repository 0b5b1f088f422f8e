"""Real-size check of the model class on CPU: DiT-XL/2 config (random weights), wrap without copying, prune 14 of
28 blocks, export a plain DiTPipeline folder, reload it. Reports time and resident memory after each stage.

    python bench/xl_wrap_export.py --output_dir /tmp/xl-d14
"""

import argparse
import resource
import shutil
import time

import psutil
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffusers_entprune import EntPrunedTransformer2DModel, save_pruned_pipeline


def rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="/tmp/xl-d14")
    args = parser.parse_args()
    shutil.rmtree(args.output_dir, ignore_errors=True)
    rows = []

    def stage(name, start):
        rows.append((name, time.time() - start, rss_gb()))
        print(f"{name:<44} {rows[-1][1]:7.1f} s   RSS {rows[-1][2]:5.2f} GiB", flush=True)

    start = time.time()
    dit = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    first = dit.transformer_blocks[0].norm1.emb.state_dict()
    for block in dit.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)  # converted checkpoints hold identical copies
    stage(f"build DiT-XL/2 ({sum(p.numel() for p in dit.parameters()) / 1e6:.1f}M params)", start)
    start = time.time()
    model = EntPrunedTransformer2DModel.from_transformer(dit).eval()
    stage(f"wrap (tied: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M unique params)", start)
    start = time.time()
    model.prune_blocks(list(range(1, 28, 2)))
    del dit
    stage("prune 14 of 28 blocks", start)
    start = time.time()
    save_pruned_pipeline(args.output_dir, model, AutoencoderKL(), DDIMScheduler(clip_sample=False))
    stage("export DiTPipeline folder", start)
    start = time.time()
    pipe = DiTPipeline.from_pretrained(args.output_dir)
    stage(f"reload ({sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.1f}M params)", start)
    x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([10, 900]), torch.tensor([207, 1000])
    with torch.no_grad():
        diff = (pipe.transformer.eval()(x, t, y).sample - model(x, t, y).sample).abs().max().item()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"max |reloaded - in-memory| = {diff}; peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
