"""Wrong data accepted silently, or refused too late (issue 12).

- 16-bit images are scaled to 8 bits, not clipped white; float images are refused;
- ClassLabel ids follow the class *names* (an imagefolder numbers its folders alphabetically), ambiguous names are
  refused, ``--class_mapping_file`` says it explicitly;
- labels are checked before training (map-style: the whole column, rows named); an empty stream is refused;
- unreadable images name their row or file, and ``--skip_bad_images`` replaces them deterministically (a resumed
  run ends like an uninterrupted one and reports the same count);
- a DiT that `DiTPipeline` cannot sample (not 1000 classes), a pipeline folder missing a part, and
  ``--zico_num_batches 1`` are refused before any heavy work, as in tests/test_bad_input.py;
- pruning a block inside ``skipping()`` leaves no stale skip behind.
"""

import io
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
import torch
from conftest import make_scheduler, make_tiny_dit, make_tiny_vae
from datasets import ClassLabel, Dataset, Features, IterableDataset, Value
from datasets import Image as ImageFeature
from PIL import Image
from test_bad_input import guard_heavy_work, snapshot, tripwire
from test_prune_dit_script import fresh_accelerator_state, run_prune_script, tiny_args, weights  # noqa: F401

from diffusers_entprune import cli
from diffusers_entprune.data import (
    LatentBatches,
    PixelCollate,
    ShuffledShardSampler,
    UnreadableImageError,
    images_to_tensor,
    load_image_dataset,
    prepare_labels,
    training_dataloader,
    undecoded,
)
from diffusers_entprune.export import save_pruned_pipeline
from diffusers_entprune.models import EntPrunedTransformer2DModel

# ---------------------------------------------------------------------------------------------- 1. 16-bit images


def gradient_16bit(height=24, width=40):
    """A horizontal 0..65535 ramp with a vertical ripple, so the crop and resize both see structure."""
    ramp = np.linspace(0, 65535, width)[None, :] * (0.6 + 0.4 * np.cos(np.arange(height) / 3.0))[:, None]
    return np.round(ramp).astype(np.uint16)


def as_mode(values: np.ndarray, mode: str) -> Image.Image:
    height, width = values.shape
    if mode == "I;16":
        return Image.fromarray(values)
    if mode == "I;16B":
        return Image.frombytes("I;16B", (width, height), values.astype(">u2").tobytes())
    if mode == "I":
        return Image.fromarray(values.astype(np.int32))
    if mode == "png":  # a 16-bit grayscale PNG file, as datasets reads it
        buffer = io.BytesIO()
        Image.fromarray(values).save(buffer, "PNG")
        return Image.open(io.BytesIO(buffer.getvalue()))
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I", "png"])
def test_16_bit_grayscale_matches_its_8_bit_version(mode):
    values = gradient_16bit()
    image = as_mode(values, mode)
    assert image.mode == ("I;16" if mode == "png" else mode)
    eight_bit = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8))
    got, expected = images_to_tensor([image], 16), images_to_tensor([eight_bit], 16)
    assert got.max() - got.min() > 1.0  # a ramp, not the flat white that clipping at 255 made of it
    assert (got - expected).abs().max() <= 2 / 255 + 1e-6  # within one 8-bit level ([-1, 1] spans 255 levels)
    exact = as_mode(np.asarray(eight_bit).astype(np.uint16) * 257, mode)  # 16-bit v * 257 is 8-bit v exactly
    assert torch.equal(images_to_tensor([exact], 16), expected)


def test_16_bit_pngs_of_an_imagefolder_train_like_their_8_bit_copies(tmp_path):
    values = gradient_16bit()
    for name, image in (("deep", Image.fromarray(values)),
                        ("flat", Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8)))):
        os.makedirs(tmp_path / "data" / name)
        image.save(tmp_path / "data" / name / "0.png")
    dataset = load_image_dataset(train_data_dir=str(tmp_path / "data"))
    batch = PixelCollate(16, num_classes=1000)(list(undecoded(dataset, "image")))
    pixels, labels = batch
    assert labels.tolist() == [0, 1] and (pixels[0] - pixels[1]).abs().max() <= 2 / 255 + 1e-6


@pytest.mark.parametrize("image, match", [
    (Image.fromarray(np.full((20, 20), 0.5, dtype=np.float32)),
     r"mode 'F' \(32-bit floats\) has no agreed value range"),
    (Image.fromarray(np.full((20, 20), 70000, dtype=np.int32)),
     r"mode 'I' .* holds values 70000\.\.70000, outside the 16-bit range"),
    (Image.fromarray(np.full((20, 20), -5, dtype=np.int32)), r"mode 'I' .* outside the 16-bit range"),
])
def test_images_of_no_known_range_are_refused_naming_the_row(image, match):
    with pytest.raises(ValueError, match=match):
        images_to_tensor([image], 16)
    with pytest.raises(ValueError, match=r"^row 7: .*" + match):
        PixelCollate(16, num_classes=10)([{"image": image, "label": 1, "__entprune_row__": 7}])


# ---------------------------------------------------------------------------------------------- 2. class ids

IMAGENET_LIKE = {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", 2: "great white shark, white shark",
                 134: "crane", 517: "crane", 281: "tabby, tabby cat", 282: "tiger cat"}


def imagefolder(root, folders, per_folder=1, size=20):
    for folder in folders:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        for i in range(per_folder):
            Image.new("RGB", (size, size), (7 * i, 40, 90)).save(os.path.join(root, folder, f"{i}.png"))
    return str(root)


def labels_by_folder(dataset) -> dict:
    """{folder name: the labels its rows carry}."""
    found = {}
    for row in undecoded(dataset, "image"):
        found.setdefault(os.path.basename(os.path.dirname(row["image"]["path"])), set()).add(row["label"])
    return found


def class_label_dataset(names, labels=None):
    labels = list(range(len(names))) if labels is None else labels
    return Dataset.from_dict({"image": [Image.new("RGB", (20, 20))] * len(labels), "label": labels},
                             features=Features({"image": ImageFeature(), "label": ClassLabel(names=names)}))


@pytest.mark.parametrize("streaming", [False, True])
def test_folders_named_by_class_id_train_that_class(tmp_path, streaming):
    folders = ["0", "1", "10", "11", "2", "207", "999"]  # alphabetical ids would be 0, 1, 2, 3, 4, 5, 6
    dataset = load_image_dataset(train_data_dir=imagefolder(tmp_path, folders, per_folder=2), streaming=streaming)
    assert dataset.features["label"].names == folders
    logged = []
    mapped, mapping = prepare_labels(dataset, "label", 1000, IMAGENET_LIKE, log=logged.append)
    assert labels_by_folder(mapped) == {folder: {int(folder)} for folder in folders}
    assert mapping == {folder: int(folder) for folder in folders}
    assert "the names are the model's class ids" in logged[0] and '"207": 207' in logged[0]


def test_names_of_the_models_labels_take_their_ids_and_new_classes_keep_theirs():
    names = ["Goldfish", "tinca_tinca", "great white shark", "tabby_cat"]  # case, '_' and synonyms
    mapped, mapping = prepare_labels(class_label_dataset(names), "label", 1000, IMAGENET_LIKE, log=lambda m: None)
    assert list(mapped["label"]) == [1, 0, 2, 281] and mapping == dict(zip(names, [1, 0, 2, 281]))
    new = class_label_dataset(["black_footed_albatross", "laysan_albatross", "sooty_albatross"], [2, 0, 1, 1])
    kept, mapping = prepare_labels(new, "label", 1000, IMAGENET_LIKE, log=lambda m: None)
    assert list(kept["label"]) == [2, 0, 1, 1] and mapping == {"black_footed_albatross": 0, "laysan_albatross": 1,
                                                            "sooty_albatross": 2}
    # all 1000 WordNet ids of ImageNet's folders, sorted: ImageNet's own class order, so the ids are kept
    wordnet = [f"n{i:08d}" for i in range(1000)]
    assert prepare_labels(class_label_dataset(wordnet, [5]), "label", 1000, None, log=lambda m: None)[1][
        "n00000005"] == 5


@pytest.mark.parametrize("names, problem", [
    (["0", "1", "cat"], r"some names are class ids \(\['0', '1'\]\) and some are not \(\['cat'\]\)"),
    (["5", "1000"], r"names \['1000'\] are not class ids of the model, which has classes 0\.\.999"),
    (["7", "07"], r"names sharing one class: \['7', '07'\] -> 7"),
    (["crane", "goldfish"], r"names matching labels of several classes: 'crane' -> \['134: crane', '517: crane'\]"),
    (["goldfish", "rose"], r"names \['rose'\] are not the model's labels but \{\"goldfish\": 1\} are"),
    (["tench", "Tinca tinca"], r"names sharing one class: \['tench', 'Tinca tinca'\] -> 0"),
    (["n01440764", "n01443537"], r"WordNet ids \(ImageNet folders\), 2 of them, not the model's 1000 classes"),
])
def test_ambiguous_class_names_are_refused_with_the_mapping_found_and_the_way_out(names, problem):
    with pytest.raises(ValueError) as raised:
        prepare_labels(class_label_dataset(names), "label", 1000, IMAGENET_LIKE, log=lambda m: None)
    message = str(raised.value)
    assert re.search(problem, message), message
    assert "`label_column`='label': cannot tell which of the model's classes" in message
    assert "`--class_mapping_file`" in message and "new classes with the dataset's ids: {" in message


def test_an_explicit_class_mapping_file_is_applied_and_checked(tmp_path):
    def mapping_file(content):
        path = tmp_path / f"mapping{len(os.listdir(tmp_path))}.json"
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return str(path)

    dataset = class_label_dataset(["cats", "dogs", "crane"], [0, 1, 2, 1])
    mapped, mapping = prepare_labels(dataset, "label", 1000, IMAGENET_LIKE,
                                     mapping_file({"cats": 281, "dogs": 207, "crane": 134, "other": 5}),
                                     log=lambda m: None)
    assert list(mapped["label"]) == [281, 207, 134, 207] and mapping == {"cats": 281, "dogs": 207, "crane": 134}
    integers = Dataset.from_dict({"image": [Image.new("RGB", (20, 20))] * 3, "label": [3, 4, 3]})
    assert list(prepare_labels(integers, "label", 1000, None, mapping_file({"3": 207, "4": 0}),
                               log=lambda m: None)[0]["label"]) == [207, 0, 207]
    for content, match in [
        ({"cats": 281}, r"does not map the dataset's classes \['dogs', 'crane'\] \(2 of 3\)"),
        ("{cats: 1", r"`--class_mapping_file` .* is not a readable JSON file \(JSONDecodeError"),
        ({"cats": 281, "dogs": 1000, "crane": 1}, r"maps \{\"dogs\": 1000\} outside the model's classes 0\.\.999"),
        ({"cats": True, "dogs": 1, "crane": 2}, r"must hold a non-empty JSON object \{class name: model class id"),
        (["cats", "dogs"], r"must hold a non-empty JSON object"),
    ]:
        with pytest.raises(ValueError, match=match):
            prepare_labels(dataset, "label", 1000, IMAGENET_LIKE, mapping_file(content), log=lambda m: None)
    with pytest.raises(ValueError, match=r"does not map the labels \[5\] of `label_column`='label', in rows \[1\]"):
        prepare_labels(Dataset.from_dict({"image": [None, None], "label": [3, 5]}), "label", 1000, None,
                       mapping_file({"3": 1}), log=lambda m: None)
    with pytest.raises(ValueError, match=r"the keys must be those integers"):
        prepare_labels(integers, "label", 1000, None, mapping_file({"three": 1}), log=lambda m: None)


def test_the_script_trains_numeric_folders_as_their_class_and_reports_the_mapping(tmp_path, source_dit,
                                                                                 monkeypatch):
    data = imagefolder(tmp_path / "data", ["0", "10", "2", "207"], per_folder=3, size=24)
    seen = []

    class Recording(PixelCollate):
        def __call__(self, examples):
            batch = super().__call__(examples)
            seen.extend((os.path.basename(os.path.dirname(e["image"]["path"])), int(label))
                        for e, label in zip(examples, batch[1]))
            return batch

    monkeypatch.setattr("diffusers_entprune.data.PixelCollate", Recording)  # read by the script when it starts
    out = tmp_path / "out"
    run_prune_script(script_args(source_dit, out, data, "--max_train_steps", "3"))
    assert len(seen) == 15 and all(label == int(folder) for folder, label in seen)
    report = json.load(open(out / "entprune_report.json"))
    assert report["class_mapping"] == {"0": 0, "10": 10, "2": 2, "207": 207}
    assert report["skipped_bad_images"] == {"count": 0, "images": {}}


# ---------------------------------------------------------------------------------------------- 5a. labels up front


def test_bad_labels_are_refused_before_training_naming_their_rows():
    images = [Image.new("RGB", (20, 20))] * 6
    for labels, match in [
        ([0, 1, 2, 3, 4, 1500], r"holds labels \[1500\] outside the model's classes 0\.\.999, in rows \[5\] "
                                r"\(1 of 6\).*--class_mapping_file"),
        ([0, -1, 2, -1, 4, 5], r"holds labels \[-1\] outside the model's classes 0\.\.999, in rows \[1, 3\] "
                               r"\(2 of 6\)"),
        ([0, 1, None, 3, 4, 5], r"has missing labels, in rows \[2\] \(1 of 6\)"),
    ]:
        dataset = Dataset.from_dict({"image": images, "label": labels},
                                    features=Features({"image": ImageFeature(), "label": Value("int64")}))
        with pytest.raises(ValueError, match=r"`label_column`='label' " + match):
            prepare_labels(dataset, "label", 1000)
    many = Dataset.from_dict({"image": [None] * 30, "label": [1] * 29 + [7]})  # rows past 5 are counted
    with pytest.raises(ValueError, match=r"in rows \[29\] \(1 of 30\)"):
        prepare_labels(many, "label", 5)


def empty_datasets():
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["a"])})
    return (Dataset.from_dict({"image": [], "label": []}, features=features),
            IterableDataset.from_generator(lambda: iter(()), features=features))


def test_an_empty_dataset_is_refused_naming_the_argument():
    for dataset in empty_datasets():
        with pytest.raises(ValueError, match=r"^`--train_data_dir`='x' \(split 'train'\) (holds|yields) no rows"):
            prepare_labels(dataset, "label", 10, source="`--train_data_dir`='x' (split 'train')")


# ---------------------------------------------------------------------------------------------- 5b. bad images

PNG = io.BytesIO()
Image.new("RGB", (24, 24), (200, 10, 10)).save(PNG, "PNG")
PNG = PNG.getvalue()


def bad_values(tmp_path):
    """Undecoded image values that cannot be read, by kind."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(PNG[: len(PNG) // 2])
    return {"truncated bytes": {"bytes": PNG[: len(PNG) // 2], "path": None},
            "empty bytes": {"bytes": b"", "path": None},
            "null": None,
            "empty file": {"bytes": None, "path": str(tmp_path / "empty.png")},
            "truncated file": {"bytes": None, "path": str(tmp_path / "truncated.png")},
            "missing file": {"bytes": None, "path": str(tmp_path / "gone.png")}}


def test_unreadable_images_are_named_by_row_and_file_or_replaced_in_their_batch(tmp_path):
    good = {"bytes": PNG, "path": None}
    for kind, value in bad_values(tmp_path).items():
        examples = [{"image": good, "label": 1, "__entprune_row__": 10}, {"image": value, "label": 2,
                                                                          "__entprune_row__": 11},
                    {"image": good, "label": 3, "__entprune_row__": 12}]
        with pytest.raises(UnreadableImageError) as raised:
            PixelCollate(16, num_classes=10)(examples)
        where = "row 11" + (f" ({value['path']!r})" if value and value["path"] else "")
        assert raised.value.where == where, kind
        assert f"`image`: {'the image of ' if value else ''}{where}" in str(raised.value)
        assert "`--skip_bad_images`" in str(raised.value)
        batch = PixelCollate(16, num_classes=10, skip_bad_images=True)(examples)
        pixels, labels = batch  # the pair, as before
        assert labels.tolist() == [1, 3, 3] and torch.equal(pixels[1], pixels[2])  # the next readable one
        assert batch.bad_images == [where]
    last_bad = [{"image": good, "label": 1}, {"image": None, "label": 2}]  # the next readable one, cyclically
    assert PixelCollate(16, num_classes=10, skip_bad_images=True)(last_bad)[1].tolist() == [1, 1]
    with pytest.raises(ValueError, match="no image of a batch can be read"):
        PixelCollate(16, num_classes=10, skip_bad_images=True)([{"image": None, "label": 2}])


def dataset_with_bad_rows(tmp_path, bad_rows=(3, 8, 13), rows=20):
    values = bad_values(tmp_path)
    kinds = ["truncated bytes", "empty bytes", "null"]
    images = [values[kinds[bad_rows.index(i) % 3]] if i in bad_rows else
              {"bytes": _png(i), "path": None} for i in range(rows)]
    folder = tmp_path / "bad_data"
    folder.mkdir()
    Dataset.from_dict({"image": images, "label": [i % 10 for i in range(rows)]},
                      features=Features({"image": ImageFeature(), "label": Value("int64")})).to_parquet(
        str(folder / "train.parquet"))
    return str(folder)


def _png(i):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (12 * i, 255 - 12 * i, 90)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_skipping_bad_images_is_deterministic_and_resumable(tmp_path, num_workers):
    dataset = load_image_dataset(train_data_dir=dataset_with_bad_rows(tmp_path))
    collate = PixelCollate(16, num_classes=10, skip_bad_images=True)

    def batches(skip, count):
        loader = iter(training_dataloader(dataset, collate, batch_size=5, seed=3, skip_samples=skip,
                                          num_workers=num_workers))
        return [next(loader) for _ in range(count)]

    whole = batches(0, 8)  # 40 samples: two epochs
    resumed = batches(15, 5)
    for a, b in zip(whole[3:], resumed):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a.bad_images == b.bad_images
    order = [i for i, _ in zip(iter(ShuffledShardSampler(20, seed=3)), range(40))]
    assert sorted(name for batch in whole for name in batch.bad_images) == sorted(
        f"row {i}" for i in order if i in (3, 8, 13))
    assert all(len(batch[0]) == 5 for batch in whole)  # sizes, hence stream positions and draws, unchanged
    with pytest.raises(UnreadableImageError, match=r"`image`: (the image of )?row (3|8|13) (cannot be read|has no)"):
        next(iter(training_dataloader(dataset, PixelCollate(16, num_classes=10), 20)))


def test_latent_batches_name_a_bad_row_or_leave_it_out(tmp_path):
    dataset = load_image_dataset(train_data_dir=dataset_with_bad_rows(tmp_path))
    with pytest.raises(UnreadableImageError, match=r"`image`: the image of row 3 cannot be read"):
        list(LatentBatches(dataset, make_tiny_vae(), 16, batch_size=8, num_classes=10))
    stream = LatentBatches(dataset, make_tiny_vae(), 16, batch_size=8, num_classes=10, skip_bad_images=True)
    batches = list(stream)
    assert sum(len(labels) for _, labels in batches) == 17 and stream.bad_images == ["row 3", "row 8", "row 13"]
    assert torch.cat([labels for _, labels in batches]).tolist() == [i % 10 for i in range(20) if i not in (3, 8, 13)]


def test_the_script_skips_bad_images_reproducibly_and_reports_them(tmp_path, source_dit):
    data = dataset_with_bad_rows(tmp_path)
    with pytest.raises(UnreadableImageError, match=r"row (3|8|13) (cannot be read|has no image).*--skip_bad_images"):
        run_prune_script(script_args(source_dit, tmp_path / "strict", data))
    extra = ["--skip_bad_images", "--max_train_steps", "6", "--checkpointing_steps", "3"]
    run_prune_script(script_args(source_dit, tmp_path / "whole", data, *extra))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", resumed / "checkpoint-3")
    run_prune_script(script_args(source_dit, resumed, data, *extra, "--resume_from_checkpoint", "latest"))
    a, b = weights(tmp_path / "whole"), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    order = [i for i, _ in zip(iter(ShuffledShardSampler(20, seed=0)), range(30))]  # 6 steps of 5
    expected = {f"row {i}": order.count(i) for i in (3, 8, 13) if order.count(i)}
    for folder in (tmp_path / "whole", resumed):
        report = json.load(open(folder / "entprune_report.json"))
        assert report["skipped_bad_images"] == {"count": sum(expected.values()), "images": expected}


# ---------------------------------------------------------------------------------------------- 3, 4, 6, 7: refused
# before any heavy work, leaving the folder as it was (the contract of tests/test_bad_input.py)


def make_dit(num_classes: int):
    torch.manual_seed(0)
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=4, sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes).eval()
    for block in model.transformer_blocks[1:]:  # one conditioning embedder, as in a trained DiT
        block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def script_args(source, out, data, *extra):
    argv = tiny_args(source, out, "--fine_tune_only", "--pruning_steps", "2", "--max_train_steps", "4",
                     "--validation_steps", "0", "--speed_batch_size", "0", "--checkpointing_steps", "100", *extra)
    argv[argv.index("--train_data_dir") + 1] = data
    return argv


@pytest.fixture(scope="module")
def source_dit(tmp_path_factory):
    return save_pruned_pipeline(str(tmp_path_factory.mktemp("dit") / "source"), make_tiny_dit(), make_tiny_vae(),
                                make_scheduler(), id2label={i: f"class{i}" for i in range(10)})


@pytest.fixture(scope="module")
def world(tmp_path_factory, source_dit):
    from diffusers import FlowMatchEulerDiscreteScheduler

    root = tmp_path_factory.mktemp("checks")
    w = {"source": source_dit, "dit10": save_pruned_pipeline(str(root / "dit10"), make_dit(10), make_tiny_vae(),
                                                            make_scheduler())}
    w["sit10"] = save_pruned_pipeline(str(root / "sit10"), make_dit(10), make_tiny_vae(),
                                      FlowMatchEulerDiscreteScheduler(), model_type="sit")
    for name, damage in [("no_vae", lambda f: shutil.rmtree(os.path.join(f, "vae"))),
                         ("no_scheduler_config", lambda f: os.remove(os.path.join(f, "scheduler",
                                                                                  "scheduler_config.json"))),
                         ("no_transformer_weights", lambda f: [os.remove(os.path.join(f, "transformer", n)) for n in
                                                               os.listdir(os.path.join(f, "transformer"))
                                                               if n.endswith(".safetensors")]),
                         ("index_without_vae", lambda f: _drop_from_index(f, "vae"))]:
        w[name] = str(root / name)
        shutil.copytree(source_dit, w[name])
        damage(w[name])
    w["mixed_folders"] = imagefolder(root / "mixed_folders", ["0", "1", "cat"], per_folder=2, size=32)
    w["last_label_bad"] = str(root / "last_label_bad")
    os.makedirs(w["last_label_bad"])
    Dataset.from_dict({"image": [Image.new("RGB", (32, 32))] * 40, "label": [i % 10 for i in range(39)] + [1500]},
                      features=Features({"image": ImageFeature(), "label": Value("int64")})).to_parquet(
        os.path.join(w["last_label_bad"], "train.parquet"))
    (root / "not_json.json").write_text("{cats")
    w["not_json"] = str(root / "not_json.json")
    (root / "partial.json").write_text(json.dumps({"0": 0, "1": 1}))
    w["partial"] = str(root / "partial.json")
    return w


def _drop_from_index(folder, component):
    path = os.path.join(folder, "model_index.json")
    index = json.load(open(path))
    del index[component]
    json.dump(index, open(path, "w"))


def empty_stream(monkeypatch, c):
    empty = empty_datasets()[1]
    monkeypatch.setattr("diffusers_entprune.data.load_dataset_or_embedded", lambda *a, **k: (empty, c["source"]))


def script(*extra, model="source"):
    def run(c):
        argv = tiny_args(c[model], c["out"], *[a.format_map(c) for a in extra])
        run_prune_script(argv)
    return run


def command(*argv):
    return lambda c: cli.main([a.format_map(c) for a in argv])


E = SystemExit
MISSING_VAE = r"`--pretrained_model_name_or_path`=.*no_vae' is a DiTPipeline folder, but it has no `vae/` " \
              r"sub-folder\. A DiT/SiT pipeline folder holds model_index\.json, transformer/ and vae/ .* scheduler/"
NOT_1000 = r"`--pretrained_model_name_or_path`=.*dit10' is a DiT of num_embeds_ada_norm=10 classes, but diffusers' " \
           r"DiTPipeline guides with the hard-coded null class 1000"
SCORE = ("score", "--num_samples", "8", "--output_dir", "{out}", "--pretrained_model_name_or_path")
EVAL = ("eval", "--num_samples", "4", "--num_inference_steps", "1", "--output_dir", "{out}",
        "--pretrained_model_name_or_path")
PRUNE = ("prune", "--prune_blocks", "1", "--output_dir", "{out}", "--pretrained_model_name_or_path")
CASES = [
    ("script-zico-one-batch", script("--zico_num_batches", "1"), E,
     r"--zico_num_batches must be >= 2, got 1: ZiCo divides .* standard deviation across them"),
    ("script-zico-no-batch", script("--zico_num_batches", "0"), E, r"--zico_num_batches must be >= 2, got 0"),
    ("script-dit-of-10-classes", script(model="dit10"), ValueError, NOT_1000),
    ("cli-prune-dit-of-10-classes", command(*PRUNE, "{dit10}"), ValueError, NOT_1000),
    ("cli-eval-dit-of-10-classes", command(*EVAL, "{dit10}", "--feature_network", "digits"), ValueError, NOT_1000),
    ("script-pipeline-without-vae", script(model="no_vae"), FileNotFoundError, MISSING_VAE),
    ("cli-prune-pipeline-without-vae", command(*PRUNE, "{no_vae}"), FileNotFoundError, MISSING_VAE),
    ("cli-score-pipeline-without-vae", command(*SCORE, "{no_vae}"), FileNotFoundError, MISSING_VAE),
    ("cli-eval-pipeline-without-vae", command(*EVAL, "{no_vae}"), FileNotFoundError, MISSING_VAE),
    ("script-pipeline-without-scheduler-config", script(model="no_scheduler_config"), FileNotFoundError,
     r"its `scheduler/` sub-folder has no scheduler_config\.json"),
    ("script-pipeline-without-transformer-weights", script(model="no_transformer_weights"), FileNotFoundError,
     r"its `transformer/` sub-folder has no weights \(diffusion_pytorch_model\.safetensors\)"),
    ("script-index-without-vae", script(model="index_without_vae"), ValueError,
     r"index_without_vae': its model_index\.json lists no vae component; a DiTPipeline needs transformer, vae, "
     r"scheduler"),
    ("script-class-mapping-file-missing", script("--class_mapping_file", "{tmp}/mapping.json"), E,
     r"--class_mapping_file .*mapping\.json' is not a file"),
    ("script-class-mapping-file-not-json", script("--class_mapping_file", "{not_json}"), ValueError,
     r"`--class_mapping_file` .*not_json\.json' is not a readable JSON file"),
    ("script-class-mapping-file-incomplete", script("--train_data_dir", "{mixed_folders}", "--class_mapping_file",
                                                    "{partial}"), ValueError,
     r"`--class_mapping_file` .* does not map the dataset's classes \['cat'\]"),
    ("script-folders-numbers-and-words", script("--train_data_dir", "{mixed_folders}"), ValueError,
     r"`label_column`='label': cannot tell .*\(some names are class ids \(\['0', '1'\]\) and some are not"),
    ("script-label-of-the-last-row-outside", script("--train_data_dir", "{last_label_bad}", "--fine_tune_only",
                                                     "--pruning_steps", "2"), ValueError,
     r"holds labels \[1500\] outside the model's classes 0\.\.999, in rows \[39\] \(1 of 40\)"),
    ("script-empty-stream-fine-tune-only", script("--streaming", "--fine_tune_only", "--pruning_steps", "2"),
     ValueError, r"`--train_data_dir`=.* \(split 'train'\) yields no rows: there is nothing to train on",
     empty_stream),
    ("cli-score-folders-numbers-and-words", command(*SCORE, "{source}", "--train_data_dir", "{mixed_folders}"),
     ValueError, r"`label_column`='label': cannot tell which of the model's classes"),
    ("cli-score-label-of-the-last-row-outside", command(*SCORE, "{source}", "--train_data_dir", "{last_label_bad}"),
     ValueError, r"in rows \[39\] \(1 of 40\)"),
    ("cli-eval-reference-numbers-and-words", command(*EVAL, "{source}", "--reference", "{mixed_folders}",
                                                      "--reference_split", "train", "--feature_network", "digits"),
     ValueError, r"`label_column`='label': cannot tell which of the model's classes"),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_refused_fast_naming_the_argument_and_leaving_the_folder_as_it_was(case, world, tmp_path, monkeypatch,
                                                                           capsys):
    _, run, error, match, *patch = case
    context = {**world, "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    before = snapshot(tmp_path)
    guard_heavy_work(monkeypatch)
    # a data check that fires only once training or the CED pool reads the data would be too late
    monkeypatch.setattr("diffusers_entprune.data.training_dataloader", tripwire("data.training_dataloader"))
    monkeypatch.setattr("diffusers_entprune.data.LatentBatches._encode", tripwire("the calibration pool's encoding"))
    if patch:
        patch[0](monkeypatch, context)
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(error) as raised:
        run(context)
    message = f"{raised.value}\n{capsys.readouterr().err}"
    assert re.search(match, message, re.DOTALL), f"{match!r} not in:\n{message}"
    assert time.perf_counter() - start < 5.0
    assert snapshot(tmp_path) == before and not os.path.exists(context["out"])


def test_a_sit_of_10_classes_prunes_and_samples(world, tmp_path, capsys):
    """SiTPipeline guides with the config's null class, so a SiT need not have 1000 classes."""
    out = str(tmp_path / "sit")
    assert cli.main(["prune", "--pretrained_model_name_or_path", world["sit10"], "--prune_blocks", "1",
                     "--output_dir", out, "--num_samples_per_row", "2", "--num_inference_steps", "2"]) == 0
    assert os.path.isfile(os.path.join(out, "samples.png")) and "max |difference| to the in-memory model = 0" in \
        capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- 8. skipping()


@pytest.mark.parametrize("before, inside, pruned, after", [
    ({1, 3}, [2], [1], {3}),  # a block skipped before and pruned inside: gone, not skipped
    ({1, 3}, [2], [2], {1, 3}),  # the context's own block pruned: the others' skips come back exactly
    ({1}, [1, 4], [1, 4], set()),
    ({1, 3}, [], [0], {1, 3}),
])
def test_pruning_inside_skipping_leaves_no_stale_skip(before, inside, pruned, after, model_inputs):
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit()).eval()
    model.skip_blocks(sorted(before))
    with model.skipping(inside):
        model.prune_blocks(pruned)
    assert model.skipped_block_indices == after
    reference = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit()).eval()
    reference.prune_blocks(pruned)
    reference.skip_blocks(sorted(after))
    with torch.no_grad():
        assert torch.equal(model(*model_inputs).sample, reference(*model_inputs).sample)
    if not after:
        model.to_dit_transformer()  # refused while a stale skip remained
    model.skip_blocks([])  # the remaining blocks can all be restored, none is reported pruned-and-skipped
    assert model.skipped_block_indices == set()
