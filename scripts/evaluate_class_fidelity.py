"""Measure the class fidelity of a digits `DiTPipeline` or `SiTPipeline`: the share of samples the digit classifier
assigns to the requested class, at one or more guidance scales, with a fixed seed. Also reports the model's
denoising loss (eps MSE for DiT, velocity MSE for SiT; times and noise drawn with the same seed) on the held-out
digits of each style: the gap between the two styles is the distribution shift that downstream fine-tuning has to
close.

Reproduce the figure recorded for the embedded base (examples/README.md):

    python scripts/evaluate_class_fidelity.py --num_samples 1000 --guidance_scale 4.0 1.5 \
        --output_json build/tiny-dit-digits-fidelity.json
    python scripts/evaluate_class_fidelity.py --model_type sit --num_samples 1000 --guidance_scale 4.0 1.5 \
        --output_json build/tiny-sit-digits-fidelity.json
"""

import argparse
import json
import time

import torch

from diffusers_entprune.classifier import class_fidelity, load_digits_classifier
from diffusers_entprune.embedded import DIGITS_STYLES, digits_to_tensors, load_digits_dataset
from diffusers_entprune.model_types import MODEL_TYPES, objective_for, pipeline_class, resolve_source
from diffusers_entprune.pipelines.pipeline_sit import SAMPLERS


@torch.no_grad()
def denoising_loss(pipe, model_type: str, style: str, seed: int, repeats: int = 8) -> float:
    images, labels = digits_to_tensors(load_digits_dataset(style, split="test"))
    latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
    objective = objective_for(model_type, pipe.transformer.config, pipe.scheduler)
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
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="Default: the embedded base.")
    parser.add_argument("--model_type", choices=MODEL_TYPES, default=None, help="Read from the folder if given.")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="SiT only (default euler).")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--guidance_scale", type=float, nargs="+", default=[4.0])
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args()

    model_type, source, source_name = resolve_source(args.pretrained_model_name_or_path, args.model_type)
    pipe = pipeline_class(model_type).from_pretrained(source)
    call_kwargs = {"sampler": args.sampler or "euler"} if model_type == "sit" else {}
    pipe.set_progress_bar_config(disable=True)
    classifier = load_digits_classifier()
    results = []
    for scale in args.guidance_scale:
        start = time.time()
        result = class_fidelity(pipe, classifier, args.num_samples, guidance_scale=scale,
                                num_inference_steps=args.num_inference_steps, seed=args.seed, **call_kwargs)
        result["seconds"] = round(time.time() - start, 1)
        results.append(result)
        print(f"guidance {scale}: class accuracy {result['class_accuracy']:.3f} over {args.num_samples} samples "
              f"(worst class {min(result['per_class_accuracy']):.2f}; {result['seconds']} s)", flush=True)
    losses = {style: denoising_loss(pipe, model_type, style, args.seed) for style in DIGITS_STYLES}
    target = "velocity" if model_type == "sit" else "eps"
    print(f"{target} MSE on held-out digits: " + ", ".join(f"{k} {v:.4f}" for k, v in losses.items()))
    summary = {"pretrained_model_name_or_path": source_name, "model_type": model_type,
               "torch": torch.__version__, "results": results, f"test_{target}_mse": losses}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
