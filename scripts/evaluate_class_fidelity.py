"""Measure the class fidelity of a digits `DiTPipeline`: the share of samples the digit classifier assigns to the
requested class, at one or more guidance scales, with a fixed seed. Also reports the model's denoising loss (eps MSE,
timesteps and noise drawn with the same seed) on the held-out digits of each style: the gap between the two styles
is the distribution shift that downstream fine-tuning has to close.

Reproduce the figure recorded for the embedded base (examples/README.md):

    python scripts/evaluate_class_fidelity.py --num_samples 1000 --guidance_scale 4.0 1.5 \
        --output_json build/tiny-dit-digits-fidelity.json
"""

import argparse
import json
import time

import torch
from diffusers import DiTPipeline

from diffusers_entprune.classifier import class_fidelity, load_digits_classifier
from diffusers_entprune.embedded import DIGITS_STYLES, TINY_DIT_DIR, digits_to_tensors, load_digits_dataset
from diffusers_entprune.objectives import DiffusionObjective


@torch.no_grad()
def denoising_loss(pipe: DiTPipeline, style: str, seed: int, repeats: int = 8) -> float:
    images, labels = digits_to_tensors(load_digits_dataset(style, split="test"))
    latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    config = pipe.transformer.config
    objective = DiffusionObjective.from_scheduler(pipe.scheduler,
                                                  learn_sigma=config.out_channels == 2 * config.in_channels)
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(repeats):
        batch = objective.add_noise(latents, torch.randn(latents.shape, generator=generator),
                                    objective.sample_timesteps(len(latents), generator))
        prediction = objective.prediction(pipe.transformer(batch.noisy, batch.timesteps, labels).sample)
        total += ((prediction - batch.target) ** 2).mean().item() / repeats
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained_model_name_or_path", default=TINY_DIT_DIR)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--guidance_scale", type=float, nargs="+", default=[4.0])
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()

    pipe = DiTPipeline.from_pretrained(args.pretrained_model_name_or_path)
    pipe.set_progress_bar_config(disable=True)
    classifier = load_digits_classifier()
    results = []
    for scale in args.guidance_scale:
        start = time.time()
        result = class_fidelity(pipe, classifier, args.num_samples, guidance_scale=scale,
                                num_inference_steps=args.num_inference_steps, seed=args.seed)
        result["seconds"] = round(time.time() - start, 1)
        results.append(result)
        print(f"guidance {scale}: class accuracy {result['class_accuracy']:.3f} over {args.num_samples} samples "
              f"(worst class {min(result['per_class_accuracy']):.2f}; {result['seconds']} s)", flush=True)
    losses = {style: denoising_loss(pipe, style, args.seed) for style in DIGITS_STYLES}
    print("eps MSE on held-out digits: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    summary = {"pretrained_model_name_or_path": str(args.pretrained_model_name_or_path),
               "torch": torch.__version__, "results": results, "test_eps_mse": losses}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
