"""Measure the class fidelity of a digits `DiTPipeline`: the share of samples the digit classifier assigns to the
requested class, at one or more guidance scales, with a fixed seed.

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
from diffusers_entprune.embedded import TINY_DIT_DIR


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
    summary = {"pretrained_model_name_or_path": str(args.pretrained_model_name_or_path),
               "torch": torch.__version__, "results": results}
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
