"""Export scikit-learn's bundled handwritten digits as the embedded image dataset of diffusers-entprune.

The package ships two *styles* of the same ten classes, so that the embedded default has a real pretraining ->
downstream distribution shift to adapt to:

- ``pretrain`` ("chalk"): light grey strokes on a black background, the digits as scanned (bicubic upscale).
- ``downstream`` ("ink on paper"): dark blue-black strokes, thickened by a 3x3 max filter, on a pastel paper
  background whose hue is drawn per image. Polarity, colour, stroke width and background all change; the
  class structure does not.

The 1,797 source images (8x8, 17 grey levels) are split per class, with a fixed seed, into disjoint sets:
60% ``pretrain/train``, 30% ``downstream/train`` and 10% held out, rendered in both styles as
``pretrain/test`` and ``downstream/test`` (the same source digits). The images are upscaled to 32x32 RGB PNGs
and written as parquet files readable with ``datasets.load_dataset("parquet", ...)``, with an ``image`` column and
a ``label`` ``ClassLabel`` column whose names ("zero" ... "nine") become the pipelines' ``id2label``.

Reproduce (about 5 s):

    python scripts/build_digits_dataset.py --output_dir src/diffusers_entprune/assets/digits
"""

import argparse
import colorsys
import os

import numpy as np
from PIL import Image, ImageFilter

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
RESOLUTION = 32


def upscale(digit_8x8: np.ndarray) -> Image.Image:
    """0..16 grey levels -> 32x32 single-channel image, bicubic."""
    grey = Image.fromarray(np.round(digit_8x8 / 16.0 * 255.0).astype(np.uint8), mode="L")
    return grey.resize((RESOLUTION, RESOLUTION), Image.BICUBIC)


def render_chalk(digit_8x8: np.ndarray) -> Image.Image:
    grey = np.asarray(upscale(digit_8x8), dtype=np.float32) / 255.0
    rgb = grey[..., None] * np.array([0.95, 0.95, 0.92], dtype=np.float32)
    return Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB")


def render_ink_on_paper(digit_8x8: np.ndarray, rng: np.random.Generator) -> Image.Image:
    ink = np.asarray(upscale(digit_8x8).filter(ImageFilter.MaxFilter(3)), dtype=np.float32) / 255.0
    paper = np.array(colorsys.hsv_to_rgb(rng.uniform(0.0, 1.0), rng.uniform(0.15, 0.35), rng.uniform(0.88, 0.98)))
    ink_colour = np.array([0.08, 0.10, 0.30])
    rgb = (1.0 - ink[..., None]) * paper + ink[..., None] * ink_colour
    return Image.fromarray(np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8), mode="RGB")


def split_indices(labels: np.ndarray, seed: int):
    rng = np.random.default_rng(seed)
    pretrain, downstream, test = [], [], []
    for c in range(len(CLASS_NAMES)):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_pre, n_down = int(round(0.6 * len(idx))), int(round(0.3 * len(idx)))
        pretrain += idx[:n_pre].tolist()
        downstream += idx[n_pre : n_pre + n_down].tolist()
        test += idx[n_pre + n_down :].tolist()
    return sorted(pretrain), sorted(downstream), sorted(test)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="src/diffusers_entprune/assets/digits")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    pretrain, downstream, test = split_indices(labels, args.seed)
    ink_rng = np.random.default_rng(args.seed + 1)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASS_NAMES)})

    def write(style: str, split: str, indices):
        if style == "pretrain":
            rendered = [render_chalk(images[i]) for i in indices]
        else:
            rendered = [render_ink_on_paper(images[i], ink_rng) for i in indices]
        ds = Dataset.from_dict({"image": rendered, "label": labels[indices].tolist()}, features=features)
        path = os.path.join(args.output_dir, style, f"{split}.parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        ds.to_parquet(path)
        print(f"{path}: {len(ds)} images, {os.path.getsize(path) / 1e3:.0f} kB")

    write("pretrain", "train", pretrain)
    write("pretrain", "test", test)
    write("downstream", "train", downstream)
    write("downstream", "test", test)


if __name__ == "__main__":
    main()
