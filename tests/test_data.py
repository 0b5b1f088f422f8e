import os

import numpy as np
import pytest
import torch
from conftest import make_tiny_vae
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from diffusers_entprune.data import (
    LatentBatches,
    center_crop_resize,
    images_to_tensor,
    load_image_dataset,
    repeat_batches,
)
from diffusers_entprune.embedded import DIGITS_DIR


def tiny_dataset(n=10, size=(20, 16), labels=None, mode="RGB"):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
              for _ in range(n)]
    labels = labels if labels is not None else [i % 3 for i in range(n)]
    return Dataset.from_dict({"image": images, "label": labels},
                             features=Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b", "c"])}))


def test_local_parquet_folder_and_imagefolder_load(tmp_path):
    parquet = load_image_dataset(train_data_dir=os.path.join(DIGITS_DIR, "downstream"))
    assert len(parquet) == 539 and parquet.features["label"].names[3] == "three"  # train.parquet only
    for label in ("cat", "dog"):
        os.makedirs(tmp_path / "folder" / label)
        for i in range(3):
            Image.new("RGB", (24, 24), (i * 40, 0, 0)).save(tmp_path / "folder" / label / f"{i}.png")
    folder = load_image_dataset(train_data_dir=str(tmp_path / "folder"))
    assert len(folder) == 6 and folder.features["label"].names == ["cat", "dog"]
    streamed = next(iter(load_image_dataset(train_data_dir=str(tmp_path / "folder"), streaming=True)))
    assert streamed["image"].size == (24, 24)
    test_split = load_image_dataset(train_data_dir=os.path.join(DIGITS_DIR, "downstream"), split="test")
    assert len(test_split) == 180
    with pytest.raises(ValueError, match="split.*other splits"):
        load_image_dataset(train_data_dir=os.path.join(DIGITS_DIR, "downstream"), split="validation")
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset()
    with pytest.raises(ValueError, match="train_data_dir"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))


def test_dit_preprocessing_crops_the_centre_and_converts_to_rgb():
    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 48, 32))  # a white centre square
    out = center_crop_resize(image, 16)
    assert out.size == (16, 16) and np.asarray(out).min() > 200
    for mode in ("L", "RGBA"):
        assert center_crop_resize(Image.new(mode, (20, 20)), 16).mode == "RGB"
    tensor = images_to_tensor([Image.new("RGB", (16, 16), (255, 0, 0))], 16)
    assert tensor.shape == (1, 3, 16, 16) and tensor[0, 0].eq(1).all() and tensor[0, 1].eq(-1).all()
    with pytest.raises(ValueError, match="resolution"):
        center_crop_resize(Image.new("RGB", (8, 8)), 16)


def test_latents_are_scaled_vae_means_and_the_cache_skips_the_vae(tmp_path):
    vae = make_tiny_vae()
    vae.register_to_config(scaling_factor=0.5)
    dataset = tiny_dataset(n=10)
    calls = {"n": 0}
    original = vae.encode

    def counting_encode(x):
        calls["n"] += 1
        return original(x)

    vae.encode = counting_encode
    stream = LatentBatches(dataset, vae, 16, batch_size=4, num_classes=3, cache_dir=str(tmp_path / "cache"))
    first = list(stream)
    assert [len(x) for x, _ in first] == [4, 4, 2] and first[0][0].shape[1:] == (4, 8, 8)
    with torch.no_grad():
        expected = original(images_to_tensor(dataset["image"][:4], 16)).latent_dist.mean * 0.5
    assert torch.allclose(first[0][0], expected, atol=1e-6)
    assert first[0][1].tolist() == [0, 1, 2, 0]
    encoded = calls["n"]
    second = list(stream)
    assert calls["n"] == encoded, "the second pass must read the cache"
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    assert len(os.listdir(tmp_path / "cache")) == 1
    other = make_tiny_vae()
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(1.0)  # same config, different weights: a different cache entry
        other.encoder.conv_in.bias.add_(1.0)
    other.register_to_config(scaling_factor=0.5)
    assert LatentBatches(dataset, other, 16, num_classes=3, cache_dir=str(tmp_path / "cache")).cache_path != \
        stream.cache_path


def test_bad_columns_and_labels_are_refused():
    vae = make_tiny_vae()
    with pytest.raises(ValueError, match="image_column.*'img'"):
        LatentBatches(tiny_dataset(), vae, 16, image_column="img")
    with pytest.raises(ValueError, match="label_column.*'class'"):
        LatentBatches(tiny_dataset(), vae, 16, label_column="class")
    with pytest.raises(ValueError, match="3 classes but the model knows 2"):
        LatentBatches(tiny_dataset(), vae, 16, num_classes=2)
    unlabeled = Dataset.from_dict({"image": tiny_dataset(2)["image"], "label": [None, 1]},
                                  features=Features({"image": ImageFeature(), "label": ClassLabel(names=["a", "b"])}))
    with pytest.raises(ValueError, match="missing labels"):
        list(LatentBatches(unlabeled, vae, 16))
    raw = Dataset.from_dict({"image": tiny_dataset(2)["image"], "label": [0, 7]},
                            features=Features({"image": ImageFeature(), "label": Value("int64")}))
    with pytest.raises(ValueError, match=r"labels \[7\] outside the model's classes 0..4"):
        list(LatentBatches(raw, vae, 16, num_classes=5))
    with pytest.raises(ValueError, match="resolution"):
        list(LatentBatches(tiny_dataset(size=(8, 8)), vae, 16))


def test_repeat_batches_cycles_and_refuses_an_empty_dataset():
    batches = [(torch.zeros(4, 1), torch.zeros(4)), (torch.zeros(3, 1), torch.zeros(3))]
    assert [len(x) for x, _ in repeat_batches(batches, 12)] == [4, 3, 4, 3]
    with pytest.raises(ValueError, match="empty"):
        list(repeat_batches([], 5))


def test_shard_batches_matches_global_sample_indices_whatever_the_batch_boundaries():
    from diffusers_entprune.randomness import shard_batches

    batches = [(torch.arange(a, b), torch.arange(a, b)) for a, b in [(0, 5), (5, 7), (7, 15), (15, 16)]]
    for p in range(3):
        got = torch.cat([x for x, _ in shard_batches(batches, p, 3)]).tolist()
        assert got == list(range(p, 16, 3))


def test_shuffled_shard_sampler_resumes_exactly_and_shards_cover_each_epoch():
    import itertools

    from diffusers_entprune.data import ShuffledShardSampler

    def take(sampler, n):
        return list(itertools.islice(iter(sampler), n))

    full = take(ShuffledShardSampler(10, seed=3), 35)
    assert take(ShuffledShardSampler(10, seed=3, start=17), 18) == full[17:]  # resume = same order from there
    for epoch in range(3):
        assert sorted(full[10 * epoch: 10 * (epoch + 1)]) == list(range(10))
    assert full[:10] != full[10:20]  # each epoch reshuffles
    assert take(ShuffledShardSampler(10, seed=4), 10) != full[:10]
    shards = [take(ShuffledShardSampler(10, seed=3, process_index=p, num_processes=3), 4) for p in range(3)]
    assert sorted(shards[0][:4] + shards[1][:3] + shards[2][:3]) == list(range(10))  # epoch 0: disjoint shares
    # P processes interleave into the one-process stream, across epoch boundaries too (10 is not a multiple of 3)
    assert [shards[i % 3][i // 3] for i in range(12)] == full[:12]
    resumed = [take(ShuffledShardSampler(10, seed=3, process_index=p, num_processes=3, start=2), 2) for p in range(3)]
    assert [resumed[i % 3][i // 3] for i in range(6)] == full[6:12]  # 2 samples per process = 6 global


def test_pixel_collate_refuses_labels_outside_the_model():
    from PIL import Image

    from diffusers_entprune.data import PixelCollate

    collate = PixelCollate(16, num_classes=10)
    pixels, labels = collate([{"image": Image.new("RGB", (20, 20)), "label": 3}])
    assert pixels.shape == (1, 3, 16, 16) and labels.tolist() == [3]
    with pytest.raises(ValueError, match=r"label_column.*\[12\].*0\.\.9"):
        collate([{"image": Image.new("RGB", (20, 20)), "label": 12}])


@pytest.mark.parametrize("streaming", [False, True])
def test_training_dataloader_resumes_where_it_stopped(streaming):
    import itertools

    from diffusers_entprune.data import PixelCollate, training_dataloader
    from diffusers_entprune.embedded import load_digits_dataset

    dataset = load_digits_dataset("downstream", split="test", streaming=streaming)
    collate = PixelCollate(16, num_classes=10)

    def labels(skip, batches, process_index=0, num_processes=1):
        loader = training_dataloader(dataset, collate, batch_size=7, seed=3, process_index=process_index,
                                     num_processes=num_processes, skip_samples=skip, shuffle_buffer_size=50)
        return [b[1].tolist() for b in itertools.islice(iter(loader), batches)]

    whole = labels(0, 30)  # 210 samples: past the end of the 180 test digits
    assert labels(7 * 20, 10) == whole[20:]  # a resumed run reads on exactly where it stopped
    assert labels(0, 10, 1, 2) != whole[:10]  # a second process reads other samples
