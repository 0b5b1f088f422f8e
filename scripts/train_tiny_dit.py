"""Train the embedded tiny DiT (or SiT) base on the *pretraining* style of the embedded digits.

The model mirrors DiT-XL/2's design at toy scale: a class-conditional `DiTTransformer2DModel` with 12 blocks,
hidden size 96 (4 heads of 24), patch size 2 on 8x8x4 latents, learned sigma (8 output channels), 1000 label
embeddings plus the null class (so `DiTPipeline`'s guidance works unchanged), DiT's adaLN-Zero initialisation, one
conditioning embedder shared by all blocks during training (written as identical copies), label dropout 0.1 once
per sample, the hybrid eps-MSE + variational-bound loss, AdamW at a constant 1e-3 after a warm-up (DiT-XL uses 1e-4;
a tiny model trained for minutes needs more), and an EMA of the weights (decay 0.999 with warm-up), which is what
ships. The latents are posterior means of the tiny VAE on the training images
shifted by -2, 0 or +2 pixels in each direction (9 views per image), times the VAE's scaling factor.

With ``--model_type sit`` the same backbone is trained as SiT is: the linear flow interpolant with velocity
prediction (`FlowObjective`), t ~ U[0, 1] fed raw to the transformer, 8 output channels of which only the first 4
are trained (SiT keeps DiT's learned-sigma head and ignores it), no variational bound; it is evaluated and saved
as a `SiTPipeline` (ODE Euler, 50 steps, for the evaluation).

Every ``--eval_steps`` steps the EMA model samples ``--num_eval_samples`` images (DDIM, 50 steps, guidance 4,
fixed seed); the digit classifier (trained on real images only) reports the share assigned to the requested class,
and the pipeline is written to ``--output_dir`` (atomically), so an interrupted run still leaves its last good base.

Reproduce (run in the background; the shipped base used exactly this command):

    python scripts/train_tiny_vae.py --output_dir build/tiny-vae
    python scripts/train_tiny_dit.py --vae_dir build/tiny-vae --output_dir build/tiny-dit-digits \
        --seed 0 --max_train_minutes 85

then copy ``build/tiny-dit-digits`` to ``src/diffusers_entprune/assets/tiny-dit-digits``. The SiT base:

    python scripts/train_tiny_dit.py --model_type sit --vae_dir build/tiny-vae --output_dir build/tiny-sit-digits \
        --seed 0 --max_train_minutes 45

copied to ``src/diffusers_entprune/assets/tiny-sit-digits``. Seed, step count,
training time and the measured class accuracy are written to ``training_info.json`` in the output folder.
"""

import argparse
import copy
import json
import os
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

from diffusers_entprune.classifier import class_fidelity, load_digits_classifier
from diffusers_entprune.embedded import digits_to_tensors, load_digits_dataset
from diffusers_entprune.export import staged_output_dir
from diffusers_entprune.models.initialization import initialize_dit_weights
from diffusers_entprune.objectives import DiffusionObjective, FlowObjective
from diffusers_entprune.pipelines import SiTPipeline

NULL_CLASS = 1000


def build_tiny_dit(num_layers: int = 12) -> DiTTransformer2DModel:
    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=24,
        in_channels=4,
        out_channels=8,
        num_layers=num_layers,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )


def dit_scheduler() -> DDIMScheduler:
    # DiT's schedule: 1000 linear betas from 1e-4 to 0.02; no sample clipping, since these are latents.
    return DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                         clip_sample=False, set_alpha_to_one=True)


def build_pipeline(model_type: str, transformer, vae, id2label):
    if model_type == "sit":
        return SiTPipeline(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                           id2label=id2label)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=dit_scheduler(), id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # DiTPipeline saves id2label only when registered
    return pipe


def shifted_views(images: torch.Tensor, shift: int) -> torch.Tensor:
    padded = F.pad(images, (shift,) * 4, mode="replicate")
    h, w = images.shape[-2:]
    views = [padded[:, :, dy : dy + h, dx : dx + w] for dy in (0, shift, 2 * shift) for dx in (0, shift, 2 * shift)]
    return torch.cat(views)


def untied_copy(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """A copy in which every block owns an identical copy of the shared embedder (what safetensors can save)."""
    model = copy.deepcopy(model)
    shared = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb = copy.deepcopy(shared)
    return model


def save_pipeline_atomically(pipe: DiTPipeline, output_dir: str, info: dict):
    with staged_output_dir(output_dir) as tmp:
        pipe.save_pretrained(tmp)
        with open(os.path.join(tmp, "training_info.json"), "w") as f:
            json.dump(info, f, indent=2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_type", choices=("dit", "sit"), default="dit")
    parser.add_argument("--vae_dir", default="build/tiny-vae")
    parser.add_argument("--output_dir", default="build/tiny-dit-digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_layers", type=int, default=12)
    parser.add_argument("--max_train_steps", type=int, default=100_000)
    parser.add_argument("--max_train_minutes", type=float, default=85.0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--eval_steps", type=int, default=2000)
    parser.add_argument("--num_eval_samples", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    vae = AutoencoderKL.from_pretrained(args.vae_dir).eval()
    images, labels = digits_to_tensors(load_digits_dataset("pretrain", split="train"))
    views = shifted_views(images, shift=2)
    view_labels = labels.repeat(9)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.mean for x in views.split(512)]) * vae.config.scaling_factor
    print(f"{len(latents)} training latents {tuple(latents.shape[1:])}, std {latents.std():.3f}", flush=True)

    model = initialize_dit_weights(build_tiny_dit(args.num_layers))
    shared_embedder = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks:
        block.norm1.emb = shared_embedder  # one embedder, as in the original DiT
        block.norm1.emb.class_embedder.dropout_prob = 0.0  # label dropout happens once per sample, below
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    print(f"transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M trainable parameters "
          f"({sum(p.numel() for p in untied_copy(model).parameters()) / 1e6:.2f}M in diffusers format)", flush=True)

    if args.model_type == "sit":
        objective = FlowObjective(learn_sigma=True)
    else:
        objective = DiffusionObjective.from_scheduler(dit_scheduler(), learn_sigma=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.lr_warmup_steps))
    classifier = load_digits_classifier()
    id2label = {i: name for i, name in enumerate(load_digits_dataset("pretrain", split="test").features["label"].names)}

    history, start, step = [], time.time(), 0
    model.train()
    while step < args.max_train_steps and (time.time() - start) < args.max_train_minutes * 60:
        idx = torch.randint(0, len(latents), (args.batch_size,), generator=generator)
        x0, y = latents[idx], view_labels[idx]
        y = torch.where(torch.rand(len(y), generator=generator) < 0.1, NULL_CLASS, y)
        noise = torch.randn(x0.shape, generator=generator)
        batch = objective.add_noise(x0, noise, objective.sample_timesteps(len(x0), generator))
        output = model(batch.noisy, timestep=batch.timesteps, class_labels=y).sample
        loss = objective.loss(output, x0, batch).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        # EMA with warm-up (as diffusers' EMAModel): early on the average must not drag in the zero-output init.
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
        step += 1
        if step % 200 == 0:
            print(f"step {step} loss {loss.item():.4f} ({(time.time() - start) / step:.3f} s/step)", flush=True)
        done = step >= args.max_train_steps or (time.time() - start) >= args.max_train_minutes * 60
        if step % args.eval_steps == 0 or done:
            pipe = build_pipeline(args.model_type, untied_copy(ema), vae, id2label)
            acc = class_fidelity(pipe, classifier, args.num_eval_samples, guidance_scale=4.0,
                                 batch_size=args.num_eval_samples)["class_accuracy"]
            history.append({"step": step, "minutes": round((time.time() - start) / 60, 1), "loss": loss.item(),
                            "class_accuracy_cfg4": acc})
            print(f"eval {history[-1]}", flush=True)
            sampler_name = "euler" if args.model_type == "sit" else "ddim"
            info = {"command_args": vars(args), "train_steps": step, "train_minutes": history[-1]["minutes"],
                    f"class_accuracy_cfg4_{sampler_name}50": acc, "history": history}
            pipe.transformer.to(torch.float16)
            pipe.vae.to(torch.float16)
            save_pipeline_atomically(pipe, args.output_dir, info)
            vae.to(torch.float32)


if __name__ == "__main__":
    main()
