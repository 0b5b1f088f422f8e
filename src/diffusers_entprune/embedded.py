"""The embedded default: a bundled dataset, a tiny pretrained DiT pipeline and a digit classifier.

Everything here ships inside the package so that the main job, the tests and the benchmarks run on a machine with
no network. The dataset is read through `datasets` exactly as a user's parquet dataset would be.

- ``digits``: scikit-learn's handwritten digits, upscaled to 32x32 RGB, in two styles of the same ten classes:
  ``pretrain`` (light strokes on black) and ``downstream`` (thick dark ink on pastel paper). See
  ``scripts/build_digits_dataset.py``.
- ``tiny-dit-digits``: a `DiTPipeline` (12-block class-conditional DiT with learned sigma, a tiny `AutoencoderKL`,
  `DDIMScheduler`) trained on the ``pretrain`` style only. See ``scripts/train_tiny_dit.py``.
- ``tiny-sit-digits``: a `SiTPipeline` with the same backbone and VAE, trained as SiT is (linear flow interpolant,
  velocity prediction) on the ``pretrain`` style. See ``scripts/train_tiny_dit.py --model_type sit``.
- ``digits-classifier``: a small CNN trained on real images of both styles, used to measure class fidelity of
  samples. See ``scripts/train_digits_classifier.py``.
"""

import os

ASSETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DIGITS_DIR = os.path.join(ASSETS_DIR, "digits")
TINY_DIT_DIR = os.path.join(ASSETS_DIR, "tiny-dit-digits")
TINY_SIT_DIR = os.path.join(ASSETS_DIR, "tiny-sit-digits")
DIGITS_CLASSIFIER_DIR = os.path.join(ASSETS_DIR, "digits-classifier")

DIGITS_STYLES = ("pretrain", "downstream")


def digits_data_files(style: str = "downstream") -> dict:
    """Parquet files of one style of the embedded digits, as ``data_files`` for ``datasets.load_dataset``."""
    if style not in DIGITS_STYLES:
        raise ValueError(f"`style` must be one of {DIGITS_STYLES}, got {style!r}.")
    return {split: os.path.join(DIGITS_DIR, style, f"{split}.parquet") for split in ("train", "test")}


def load_digits_dataset(style: str = "downstream", split: str | None = None, streaming: bool = False):
    """Load the embedded digits with `datasets` (columns ``image`` and ``label``; labels are a ``ClassLabel``)."""
    from datasets import load_dataset

    return load_dataset("parquet", data_files=digits_data_files(style), split=split, streaming=streaming)


def digits_to_tensors(dataset):
    """Whole (small) dataset -> images in [-1, 1] of shape (N, 3, H, W) and int64 labels of shape (N,)."""
    import numpy as np
    import torch

    images = np.stack([np.asarray(example["image"].convert("RGB"), dtype=np.float32) for example in dataset])
    images = torch.from_numpy(images).permute(0, 3, 1, 2) / 127.5 - 1.0
    labels = torch.tensor(dataset["label"], dtype=torch.long)
    return images, labels


def load_embedded_pipeline(model_type: str = "dit"):
    """The tiny pretrained `DiTPipeline` (``"dit"``) or `SiTPipeline` (``"sit"``) that ships with the package (stored
    in float16; diffusers loads float32)."""
    if model_type == "sit":
        from .pipelines import SiTPipeline

        return SiTPipeline.from_pretrained(TINY_SIT_DIR)
    if model_type != "dit":
        raise ValueError(f"`model_type` must be 'dit' or 'sit', got {model_type!r}.")
    from diffusers import DiTPipeline

    return DiTPipeline.from_pretrained(TINY_DIT_DIR)
