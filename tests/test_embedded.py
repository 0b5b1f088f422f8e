import json
import os

import numpy as np
import pytest
import torch
from diffusers import DiTPipeline

from diffusers_entprune.classifier import load_digits_classifier
from diffusers_entprune.embedded import (
    ASSETS_DIR,
    TINY_DIT_DIR,
    digits_data_files,
    digits_to_tensors,
    load_digits_dataset,
)

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_digits_load_through_datasets_like_a_user_dataset():
    from datasets import load_dataset

    for style in ("pretrain", "downstream"):
        ds = load_dataset("parquet", data_files=digits_data_files(style))
        assert set(ds) == {"train", "test"}
        assert ds["train"].features["label"].names == CLASS_NAMES
        image = ds["train"][0]["image"]
        assert image.mode == "RGB" and image.size == (32, 32)
        assert set(ds["train"]["label"]) == set(range(10))
    streamed = next(iter(load_digits_dataset("downstream", split="train", streaming=True)))
    assert streamed["image"].size == (32, 32)
    with pytest.raises(ValueError, match="style"):
        digits_data_files("imagenet")


def test_splits_are_disjoint_and_the_styles_really_differ():
    pre_train, _ = digits_to_tensors(load_digits_dataset("pretrain", split="train"))
    down_train, _ = digits_to_tensors(load_digits_dataset("downstream", split="train"))
    pre_test, labels_pre = digits_to_tensors(load_digits_dataset("pretrain", split="test"))
    _, labels_down = digits_to_tensors(load_digits_dataset("downstream", split="test"))
    assert len(pre_train) + len(down_train) + len(pre_test) == 1797  # scikit-learn's digits, each used once
    assert torch.equal(labels_pre, labels_down)  # the test split is the same digits in both styles
    # pretraining: black background and light strokes; downstream: light paper of varying hue, dark ink
    pre_corner, down_corner = pre_train[:, :, 0, 0], down_train[:, :, 0, 0]
    assert pre_corner.max() < -0.9 and down_corner.amax(dim=1).min() > 0.7
    assert down_corner.std(dim=0).min() > 0.05  # paper colours vary from image to image
    assert pre_train.amax(dim=(1, 2, 3)).mean() > 0.5 and down_train.amin(dim=(1, 2, 3)).mean() < -0.5


def test_classifier_recognises_real_digits_of_both_styles():
    classifier = load_digits_classifier()
    for style in ("pretrain", "downstream"):
        images, labels = digits_to_tensors(load_digits_dataset(style, split="test"))
        accuracy = (classifier.predict(images) == labels).float().mean().item()
        assert accuracy > 0.9, (style, accuracy)


def test_embedded_base_loads_with_plain_diffusers_and_its_samples_are_recognisable():
    pipe = DiTPipeline.from_pretrained(TINY_DIT_DIR)
    assert pipe.transformer.config.num_layers >= 12
    assert pipe.transformer.dtype == torch.float32
    assert pipe.get_label_ids(["three", "seven"]) == [3, 7]
    info = json.loads(open(os.path.join(TINY_DIT_DIR, "training_info.json")).read())
    labels = [i % 10 for i in range(100)]
    images = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=50,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (100, 32, 32, 3) and np.isfinite(images).all()
    accuracy = (load_digits_classifier().predict(images) == torch.tensor(labels)).float().mean().item()
    # a loose floor under the recorded figure: catches a broken or mismatched base, not sampling noise
    assert accuracy >= 0.8, (accuracy, info["class_accuracy_cfg4_ddim50"])


def test_assets_stay_small():
    total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(ASSETS_DIR) for f in files)
    assert total < 25e6, f"assets take {total / 1e6:.1f} MB"
