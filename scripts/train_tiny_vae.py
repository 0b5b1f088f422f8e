"""Train the tiny `AutoencoderKL` of the embedded base (32x32 RGB <-> 8x8x4 latents, about 1M parameters).

Like the VAE of a real latent diffusion model, it is a general-purpose image codec: it is trained on the training
images of *both* styles of the embedded digits (the DiT on top of it sees only the pretraining style). Its scaling
factor is set so that posterior means of the pretraining images have unit standard deviation.

Reproduce (seed 0, about 7 minutes on two CPU cores):

    python scripts/train_tiny_vae.py --output_dir build/tiny-vae
"""

import argparse
import json
import os
import time

import torch
from diffusers import AutoencoderKL

from diffusers_entprune.embedded import DIGITS_STYLES, digits_to_tensors, load_digits_dataset


def build_tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="build/tiny-vae")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_train_steps", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--kl_weight", type=float, default=1e-6)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train = {style: digits_to_tensors(load_digits_dataset(style, split="train"))[0] for style in DIGITS_STYLES}
    images = torch.cat(list(train.values()))

    vae = build_tiny_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.learning_rate, total_steps=args.max_train_steps)
    start = time.time()
    vae.train()
    for step in range(args.max_train_steps):
        batch = images[torch.randint(0, len(images), (args.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        mse = torch.nn.functional.mse_loss(reconstruction, batch)
        loss = mse + args.kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 250 == 0 or step == args.max_train_steps - 1:
            print(f"step {step} mse {mse.item():.5f} ({time.time() - start:.0f} s)", flush=True)

    vae.eval()
    info = {"seed": args.seed, "max_train_steps": args.max_train_steps, "train_seconds": round(time.time() - start)}
    with torch.no_grad():
        means = vae.encode(train["pretrain"]).latent_dist.mean
        info["scaling_factor"] = round(1.0 / means.std().item(), 5)
        for style in DIGITS_STYLES:
            test = digits_to_tensors(load_digits_dataset(style, split="test"))[0]
            posterior = vae.encode(test).latent_dist
            info[f"test_mse_{style}"] = torch.nn.functional.mse_loss(vae.decode(posterior.mean).sample, test).item()
            info[f"posterior_std_{style}"] = posterior.std.mean().item()
    vae.register_to_config(scaling_factor=info["scaling_factor"])
    vae.save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "training_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(info)


if __name__ == "__main__":
    main()
