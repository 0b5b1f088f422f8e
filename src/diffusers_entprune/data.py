"""`datasets` -> (latent, label) batches for scoring and fine-tuning.

Any `datasets` source works: a Hub id (``dataset_name``), a local folder (``train_data_dir``: an imagefolder, or a
folder of parquet files), with ``streaming=True`` too. Images are preprocessed as DiT does (shrink, bicubic resize
of the short side, centre crop, [-1, 1]) and encoded by the pipeline's VAE times its scaling factor. An optional
on-disk latent cache (safetensors) lets scoring and training skip the VAE the second time.
"""

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from .randomness import sample_generator

logger = logging.getLogger(__name__)


def load_image_dataset(dataset_name: str | None = None, train_data_dir: str | None = None, split: str = "train",
                       dataset_config_name: str | None = None, streaming: bool = False, cache_dir: str | None = None):
    """Load the training images: exactly one of ``dataset_name`` (Hub id or a path `load_dataset` understands) and
    ``train_data_dir`` (an imagefolder, or a folder of ``*.parquet`` files)."""
    from datasets import load_dataset

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError("Pass exactly one of `dataset_name` (a Hub or local dataset) and `train_data_dir`.")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"`train_data_dir`={train_data_dir!r} is not a folder.")
        parquet = sorted(os.path.join(root, f) for root, _, files in os.walk(train_data_dir)
                         for f in files if f.endswith(".parquet"))
        if parquet:
            # files or sub-folders named after splits (train.parquet, test/...) are honoured; else all files
            def split_of(path):
                first = os.path.relpath(path, train_data_dir).split(os.sep)[0]
                return next((s for s in ("train", "test", "validation", split) if first.startswith(s)), None)

            files = [p for p in parquet if split_of(p) == split]
            if not files and any(split_of(p) for p in parquet):
                raise ValueError(f"`split`={split!r}: {train_data_dir!r} holds parquet files of other splits only "
                                 f"({sorted({split_of(p) for p in parquet if split_of(p)})}).")
            files = files or parquet
            _check_parquet_rows(files, train_data_dir, split)
            return load_dataset("parquet", data_files={split: files}, split=split, streaming=streaming,
                                cache_dir=cache_dir)
        from PIL import Image as PILImage

        extensions = {ext for ext, name in PILImage.registered_extensions().items() if name in PILImage.OPEN}
        if not any(os.path.splitext(f)[1].lower() in extensions for _, _, files in os.walk(train_data_dir)
                   for f in files):
            raise FileNotFoundError(f"`train_data_dir`={train_data_dir!r} holds no images: neither parquet files nor "
                                    "image files (an imagefolder: class sub-folders of images, or images with a "
                                    "metadata file).")
        return load_dataset("imagefolder", data_dir=train_data_dir, split=split, streaming=streaming,
                            cache_dir=cache_dir)
    try:
        return load_dataset(dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir)
    except ConnectionError as error:
        from huggingface_hub import constants

        offline = " HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set, so" if constants.HF_HUB_OFFLINE or \
            os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") else ""
        raise ConnectionError(f"`dataset_name`={dataset_name!r} is not a local dataset and{offline} the Hub could not "
                              "be reached for it; download it once with the network on, or pass a local folder "
                              f"(`train_data_dir`). ({error})") from error


def _check_parquet_rows(files: list[str], train_data_dir: str, split: str) -> None:
    """Refuse parquet files without a single row (read from their footers, no data is loaded)."""
    import pyarrow.parquet as pq

    if sum(pq.ParquetFile(path).metadata.num_rows for path in files) == 0:
        raise ValueError(f"`train_data_dir`={train_data_dir!r}: its parquet files for split {split!r} hold no rows, "
                         "i.e. no images to train on or score with.")


def load_dataset_or_embedded(dataset_name: str | None = None, train_data_dir: str | None = None, split: str = "train",
                             dataset_config_name: str | None = None, streaming: bool = False,
                             cache_dir: str | None = None):
    """The user's dataset (see `load_image_dataset`), or the embedded downstream digits when neither
    ``dataset_name`` nor ``train_data_dir`` is given. Returns the dataset and a name for reports."""
    if dataset_name is None and train_data_dir is None:
        from .embedded import load_digits_dataset

        return load_digits_dataset("downstream", split=split, streaming=streaming), "embedded:digits/downstream"
    dataset = load_image_dataset(dataset_name, train_data_dir, split, dataset_config_name, streaming=streaming,
                                 cache_dir=cache_dir)
    return dataset, dataset_name or train_data_dir


def check_columns(dataset, image_column: str, label_column: str, num_classes: int | None = None) -> None:
    """Fail early, naming the argument, when the dataset cannot feed a class-conditional model."""
    columns = list(dataset.column_names or (dataset.features or {}).keys())
    if image_column not in columns:
        raise ValueError(f"`image_column`={image_column!r} is not a column of the dataset; columns: {columns}.")
    if label_column not in columns:
        raise ValueError(f"`label_column`={label_column!r} is not a column of the dataset; columns: {columns}. "
                         "Class-conditional pruning needs a label per image.")
    from datasets import Value

    features = dataset.features or {}
    image_feature, label_feature = features.get(image_column), features.get(label_column)
    if isinstance(image_feature, Value):  # numbers or strings, e.g. file paths
        raise ValueError(f"`image_column`={image_column!r} holds {image_feature.dtype} values, not images. Pass the "
                         "image column, or cast it (e.g. file paths) with `dataset.cast_column(name, "
                         "datasets.Image())`.")
    if isinstance(label_feature, Value) and not str(label_feature.dtype).startswith(("int", "uint")):
        raise ValueError(f"`label_column`={label_column!r} holds {label_feature.dtype} values; class labels must be "
                         "integer class ids (an int or ClassLabel column). Map names to ids first, e.g. with "
                         "`dataset.class_encode_column(name)`.")
    names = getattr(label_feature, "names", None)
    if num_classes is not None and names is not None and len(names) > num_classes:
        raise ValueError(f"`label_column`={label_column!r} has {len(names)} classes but the model knows "
                         f"{num_classes}; fine-tune a model with more class embeddings or map the labels.")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB. PIL's own conversion clips 16-bit values at 255, so a 16-bit PNG (mode ``I;16``)
    would turn white: 16-bit modes are scaled to 8 bits first (value / 257). Mode ``I`` (32-bit integers) is read
    as 16-bit too, as older Pillow releases open 16-bit PNGs in it; values outside 0..65535, and mode ``F``
    (floats: [0, 1] or [0, 255]? nothing says), are refused rather than guessed."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.float64)
        if image.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"An image of mode 'I' (32-bit integers) holds values {values.min():.0f}.."
                             f"{values.max():.0f}, outside the 16-bit range 0..65535 it is read with; convert the "
                             "dataset's images to 8-bit ('L', 'RGB') or 16-bit PNGs first.")
        image = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        raise ValueError("An image of mode 'F' (32-bit floats) has no agreed value range ([0, 1]? [0, 255]?); "
                         "convert the dataset's images to 8-bit ('L', 'RGB') or 16-bit PNGs first.")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """DiT's preprocessing: halve with a box filter while the short side is >= 2x the target, resize the short side
    to ``resolution`` (bicubic), then crop the centre square."""
    if min(image.size) < resolution:
        raise ValueError(f"An image of size {image.size} is smaller than `resolution`={resolution}; pass a smaller "
                         "`resolution` or upscale the dataset first (we do not upscale silently).")
    image = to_rgb(image)
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def images_to_tensor(images, resolution: int, names: list[str] | None = None) -> torch.Tensor:
    """Images -> (N, 3, resolution, resolution) in [-1, 1]; ``names`` (where each image comes from) go into errors."""
    arrays = []
    for i, image in enumerate(images):
        try:
            arrays.append(np.asarray(center_crop_resize(image, resolution), dtype=np.float32))
        except ValueError as error:
            if names is None:
                raise
            raise ValueError(f"{names[i]}: {error}") from None
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def labels_to_tensor(labels: list, label_column: str = "label", num_classes: int | None = None) -> torch.Tensor:
    """Class labels as int64, refusing missing ones and ones outside ``[0, num_classes)``."""
    if any(label is None for label in labels):
        raise ValueError(f"`label_column`={label_column!r} has missing labels.")
    labels = torch.tensor(labels, dtype=torch.long)
    if num_classes is not None and ((labels < 0) | (labels >= num_classes)).any():
        bad = labels[(labels < 0) | (labels >= num_classes)][:5].tolist()
        raise ValueError(f"`label_column`={label_column!r} holds labels {bad} outside the model's "
                         f"classes 0..{num_classes - 1}.")
    return labels


# ---------------------------------------------------------------------------------------------- unreadable images

ROW_KEY = "__entprune_row__"  # `training_dataloader` adds each map-style row's index, so a bad image is named by row


class UnreadableImageError(ValueError):
    """An image that cannot be decoded (missing, empty, truncated or corrupt); ``where`` names its row or file."""

    def __init__(self, message: str, where: str = ""):
        super().__init__(message)
        self.where = where


def describe_row(example: dict, image_column: str = "image", row: int | None = None) -> str:
    """Where an example comes from, for messages: its row and/or its file path (an undecoded image keeps it)."""
    value = example.get(image_column)
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else \
        getattr(value, "filename", None)
    row = example.get(ROW_KEY, row)
    if row is not None:
        return f"row {row} ({path!r})" if path else f"row {row}"
    return repr(path) if path else "a row without a row number or file path (a streamed one)"


def undecoded(dataset, image_column: str):
    """``dataset`` with its image column left as ``{"bytes", "path"}``: `decode_image` then decodes each image and
    can name a bad one, where `datasets` would fail inside its iterator without saying which row it was reading."""
    from datasets import Image as ImageFeature

    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, ImageFeature) and feature.decode:
        return dataset.cast_column(image_column, ImageFeature(decode=False))
    return dataset


def decode_image(value, where: str, image_column: str = "image") -> Image.Image:
    """The PIL image of a dataset value (an image, a path, or undecoded ``{"bytes", "path"}``), decoded fully now;
    `UnreadableImageError` naming ``where`` when it cannot be read."""
    from datasets import Image as ImageFeature

    hint = "Fix or remove it, or pass `--skip_bad_images` to go on without it (skipped images are reported)."
    if value is None:
        raise UnreadableImageError(f"`{image_column}`: {where} has no image (null). {hint}", where)
    if isinstance(value, Image.Image):
        return value
    try:  # datasets' decoder: the same images as before, EXIF orientation included; load() reads the whole file
        return ImageFeature().decode_example({"path": value, "bytes": None} if isinstance(value, str) else value)
    except Exception as error:  # PIL raises OSError, SyntaxError, DecompressionBombError, ... on bad files
        raise UnreadableImageError(f"`{image_column}`: the image of {where} cannot be read ({type(error).__name__}: "
                                   f"{error}). {hint}", where) from None


class PixelBatch(tuple):
    """``(pixels, labels)`` from `PixelCollate` (it unpacks as that pair) plus ``bad_images``: where the unreadable
    images it replaced came from. An attribute, not a third item, so that code unpacking the pair keeps working; it
    travels with the batch out of DataLoader worker processes."""

    bad_images: list[str] = []


class BadImageTally:
    """How often `--skip_bad_images` replaced each unreadable image in training batches: ``counts`` up to the last
    `merge` (the same on every process; saved in checkpoints, so a resumed run reports what an uninterrupted one
    does) plus ``new``, what this process met since."""

    def __init__(self, counts: dict | None = None):
        self.counts, self.new = dict(counts or {}), {}

    def add(self, names) -> None:
        for name in names:
            self.new[name] = self.new.get(name, 0) + 1

    def merge(self, accelerator=None) -> dict:
        """Fold every process's ``new`` into ``counts`` and return them. With several processes it is a collective:
        every process must call it."""
        news = [self.new]
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            news = gather_object([self.new])
        for new in news:
            for name, times in new.items():
                self.counts[name] = self.counts.get(name, 0) + times
        self.new = {}
        return dict(sorted(self.counts.items()))

    def report(self) -> dict:
        return {"count": sum(self.counts.values()), "images": dict(sorted(self.counts.items()))}


# ---------------------------------------------------------------------------------------------- class ids

_WORDNET_ID = re.compile(r"n\d{8}")


def _normalise(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


def _summary(mapping: dict, limit: int = 12) -> str:
    items = list(mapping.items())
    shown = json.dumps(dict(items[:limit]))
    return shown if len(items) <= limit else f"{shown[:-1]}, ...}} ({len(items)} classes)"


def class_mapping(names: list[str], num_classes: int, id2label: dict | None = None,
                  label_column: str = "label") -> tuple[dict[str, int], str]:
    """Which of the model's classes each name of a ClassLabel column is: (name -> model class id, how it was found).

    The dataset's own ids cannot be trusted: an imagefolder numbers its folders alphabetically (0, 1, 10, 11, 2,
    ...), so a folder ``207`` would train class 3. The names decide:

    - all integers: that class id (folder ``207`` is class 207);
    - all labels of the model (``id2label``): that label's id. A name matches a label, or one of the
      comma-separated synonyms ImageNet labels have ("tench, Tinca tinca"), ignoring case and reading '_' as a
      space (folder names avoid spaces);
    - none of either (a downstream dataset of new classes, e.g. birds): the dataset's ids 0..K-1, in its order. One
      exception: WordNet ids (``n01440764``, ImageNet's folder names) take ImageNet's ids only as the full set
      (sorted, they are ImageNet's class order), so a subset is ambiguous.

    Anything else is ambiguous (numbers and words mixed, numbers outside the model, a name matching several
    classes, two names one class, some names the model's labels and some not) and refused with what was found and
    how to say it with ``--class_mapping_file``.
    """
    own = {name: i for i, name in enumerate(names)}
    problem, found = None, {}
    numeric = [name for name in names if re.fullmatch(r"\d+", name.strip())]
    if numeric:
        found = {name: int(name) for name in numeric}
        outside = [name for name in numeric if found[name] >= num_classes]
        if len(numeric) < len(names):
            problem = f"some names are class ids ({numeric[:5]}) and some are not " \
                      f"({[n for n in names if n not in found][:5]})"
        elif outside:
            problem = f"names {outside[:5]} are not class ids of the model, which has classes 0..{num_classes - 1}"
        if problem is None and len(set(found.values())) == len(found):
            return found, "the names are the model's class ids"
    else:
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        index: dict[str, set[int]] = {}
        for class_id, label in id2label.items():
            for key in {_normalise(label)} | {_normalise(part) for part in label.split(",") if part.strip()}:
                index.setdefault(key, set()).add(class_id)
        matches = {name: sorted(index.get(_normalise(name), ())) for name in names}
        found = {name: ids[0] for name, ids in matches.items() if len(ids) == 1}
        several = {name: ids for name, ids in matches.items() if len(ids) > 1}
        if several:
            problem = "names matching labels of several classes: " + ", ".join(
                f"{name!r} -> {[f'{i}: {id2label[i]}' for i in ids[:4]]}" for name, ids in list(several.items())[:4])
        elif found and len(found) < len(names):
            problem = f"names {[n for n in names if n not in found][:5]} are not the model's labels but " \
                      f"{_summary(found, 5)} are"
        elif found and len(set(found.values())) == len(found):
            return found, "the names are the model's labels"
        elif not found:
            if not all(_WORDNET_ID.fullmatch(name) for name in names):
                return own, "new classes: the names are neither class ids nor labels of the model, so they keep " \
                            "the dataset's ids"
            if len(names) == num_classes and names == sorted(names):
                return own, "WordNet ids, the full set: sorted, ImageNet's class order"
            problem = f"the names are WordNet ids (ImageNet folders), {len(names)} of them, not the model's " \
                      f"{num_classes} classes in sorted (ImageNet's) order, so the dataset's ids are not ImageNet's"
    if problem is None:  # all found, but some two names share one class
        shared = {i: [n for n in found if found[n] == i] for i in set(found.values())}
        problem = "names sharing one class: " + "; ".join(f"{names_} -> {i}" for i, names_ in shared.items()
                                                          if len(names_) > 1)
    raise ValueError(
        f"`label_column`={label_column!r}: cannot tell which of the model's classes the dataset's classes are "
        f"({problem}). Say it with `--class_mapping_file`, a JSON file {{class name: model class id}}"
        + (f"; the matches found: {_summary(found)}" if found else "")
        + f"; to train them as new classes with the dataset's ids: {_summary(own)}.")


def load_class_mapping(path: str, num_classes: int | None = None) -> dict[str, int]:
    """``--class_mapping_file``: a JSON object {class name (or label id): model class id}."""
    example = 'e.g. {"cat": 281, "dog": 207}'
    try:
        with open(path) as f:
            mapping = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"`--class_mapping_file` {path!r} is not a readable JSON file ({type(error).__name__}: "
                         f"{error}); it must hold an object {{class name: model class id}}, {example}.") from None
    if not isinstance(mapping, dict) or not mapping or \
            not all(isinstance(v, int) and not isinstance(v, bool) for v in mapping.values()):
        raise ValueError(f"`--class_mapping_file` {path!r} must hold a non-empty JSON object {{class name: model "
                         f"class id (an integer)}}, {example}.")
    outside = {k: v for k, v in mapping.items() if num_classes is not None and not 0 <= v < num_classes}
    if outside:
        raise ValueError(f"`--class_mapping_file` {path!r} maps {_summary(outside, 5)} outside the model's classes "
                         f"0..{num_classes - 1}.")
    return mapping


class _RemapLabels:
    """A streamed dataset's label -> model class id (a class, not a lambda: DataLoader workers may pickle it)."""

    def __init__(self, label_column: str, mapping: dict[int, int]):
        self.label_column, self.mapping = label_column, mapping

    def __call__(self, label):
        if label is not None and label not in self.mapping:
            raise ValueError(f"`label_column`={self.label_column!r} holds label {label}, which "
                             "`--class_mapping_file` does not map.")
        return {self.label_column: None if label is None else self.mapping[label]}


def prepare_labels(dataset, label_column: str, num_classes: int | None, id2label: dict | None = None,
                   class_mapping_file: str | None = None, source: str = "The dataset", log=logger.info):
    """Check the labels before any training, scoring or sampling, and put the model's class ids in the label column.

    A ClassLabel column's ids follow its names (`class_mapping`) or ``class_mapping_file`` (JSON {class name: model
    class id}; for an integer column, {label: model class id}). A map-style dataset's label column is read whole
    (cheap: no image is decoded), so an empty dataset, a missing label or one outside the model's classes is refused
    naming its rows, and the remapped labels replace the column in memory. A stream cannot be read ahead cheaply:
    only its emptiness (one label is read) and its ClassLabel names are checked here; its labels are remapped as
    they stream and checked batch by batch (`labels_to_tensor`). ``source`` names the dataset argument in messages.

    Returns (the dataset, {class name (or label, as a string): model class id} as decided, or None for an integer
    column without ``class_mapping_file``).
    """
    from datasets import Features, IterableDataset, Value
    from datasets import Image as ImageFeature

    feature = (dataset.features or {}).get(label_column)
    names = getattr(feature, "names", None)
    explicit = load_class_mapping(class_mapping_file, num_classes) if class_mapping_file else None
    mapping, decided = None, None
    if names is not None:
        if explicit is not None:
            missing = [name for name in names if name not in explicit]
            if missing:
                raise ValueError(f"`--class_mapping_file` {class_mapping_file!r} does not map the dataset's classes "
                                 f"{missing[:8]} ({len(missing)} of {len(names)}); give every class name an id.")
            by_name, how = {name: explicit[name] for name in names}, "--class_mapping_file"
        else:
            by_name, how = class_mapping(names, num_classes or len(names), id2label, label_column)
        log(f"`label_column`={label_column!r}: dataset classes -> model class ids ({how}): {_summary(by_name)}")
        mapping, decided = {i: by_name[name] for i, name in enumerate(names)}, by_name
        if all(i == class_id for i, class_id in mapping.items()):
            mapping = None  # the ids are right as they are
    elif explicit is not None:
        try:
            mapping = {int(key): class_id for key, class_id in explicit.items()}
        except ValueError:
            raise ValueError(f"`--class_mapping_file` {class_mapping_file!r}: `label_column`={label_column!r} holds "
                             "integer labels, so the keys must be those integers (as strings), e.g. {\"3\": 207}."
                             ) from None
        decided = {str(label): class_id for label, class_id in mapping.items()}
        log(f"`label_column`={label_column!r}: labels -> model class ids (--class_mapping_file): {_summary(decided)}")

    if isinstance(dataset, IterableDataset):
        if next(iter(dataset.select_columns([label_column]).take(1)), None) is None:
            raise ValueError(f"{source} yields no rows: there is nothing to train on or score with.")
        if mapping is not None and dataset.features:
            # images stay undecoded through the map (`datasets` would decode every row's image to remap its label,
            # failing on a bad one without naming it); `PixelCollate` and `LatentBatches` decode them
            raw = Features({name: ImageFeature(decode=False) if isinstance(feature, ImageFeature) else feature
                            for name, feature in dataset.features.items()})
            dataset = dataset.cast(raw).map(_RemapLabels(label_column, mapping), input_columns=[label_column],
                                            features=Features({**raw, label_column: Value("int64")}))
        elif mapping is not None:
            dataset = dataset.map(_RemapLabels(label_column, mapping), input_columns=[label_column])
        return dataset, decided

    if len(dataset) == 0:
        raise ValueError(f"{source} holds no rows: there is nothing to train on or score with.")
    values = dataset.select_columns([label_column]).with_format("arrow")[label_column].to_pylist()

    def rows(bad: list[int]) -> str:
        return f"in rows {bad[:5]}{' ...' if len(bad) > 5 else ''} ({len(bad)} of {len(values)})"

    missing = [row for row, value in enumerate(values) if value is None]
    if missing:
        raise ValueError(f"`label_column`={label_column!r} has missing labels, {rows(missing)}; fill them in or "
                         "drop those rows.")
    if explicit is not None and names is None:
        unmapped = [row for row, value in enumerate(values) if value not in mapping]
        if unmapped:
            raise ValueError(f"`--class_mapping_file` {class_mapping_file!r} does not map the labels "
                             f"{sorted({values[r] for r in unmapped})[:5]} of `label_column`={label_column!r}, "
                             f"{rows(unmapped)}.")
    if mapping is not None:
        values = [mapping.get(value, value) for value in values]  # ClassLabel's -1 ("no label") stays, refused next
    if num_classes is not None:
        outside = [row for row, value in enumerate(values) if not 0 <= value < num_classes]
        if outside:
            raise ValueError(f"`label_column`={label_column!r} holds labels {sorted({values[r] for r in outside})[:5]} "
                             f"outside the model's classes 0..{num_classes - 1}, {rows(outside)}; fix or drop those "
                             "rows, or map the labels with `--class_mapping_file`.")
    if mapping is not None:  # a new in-memory column beside the images, which are not copied (unless the dataset
        # has an indices mapping, e.g. from a shuffle: `datasets` flattens it first)
        dataset = dataset.remove_columns([label_column]).add_column(label_column, values, feature=Value("int64"))
    return dataset, decided


class LatentBatches:
    """Iterate (latents, labels) batches of a dataset through a VAE, optionally through an on-disk cache.

    Args:
        dataset: a `datasets` Dataset or IterableDataset with ``image_column`` and ``label_column``.
        vae: the pipeline's `AutoencoderKL`; latents are ``encode(x).latent_dist.mean * scaling_factor`` (or a
            sample with ``latent_sampling="sample"``, as DiT's training does).
        num_classes: labels must lie in ``[0, num_classes)``; anything else is refused when it is met.
        cache_dir: where to keep encoded latents (keyed by dataset fingerprint, VAE config, resolution and
            sampling); the first full pass writes them, later passes read them.
        skip_bad_images: leave out images that cannot be decoded, with a warning naming each (their row, or file),
            instead of failing; ``bad_images`` lists them.
    """

    def __init__(self, dataset, vae, resolution: int, batch_size: int = 64, image_column: str = "image",
                 label_column: str = "label", num_classes: int | None = None, latent_sampling: str = "mean",
                 cache_dir: str | None = None, seed: int = 0, skip_bad_images: bool = False):
        if latent_sampling not in ("mean", "sample"):
            raise ValueError(f"`latent_sampling` must be 'mean' or 'sample', got {latent_sampling!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        check_columns(dataset, image_column, label_column, num_classes)
        dataset = undecoded(dataset, image_column)  # decoded by `decode_image`, which names a bad row
        self.dataset, self.vae, self.resolution, self.batch_size = dataset, vae, resolution, batch_size
        self.skip_bad_images, self.bad_images = skip_bad_images, []
        self.image_column, self.label_column, self.num_classes = image_column, label_column, num_classes
        self.latent_sampling, self.seed = latent_sampling, seed
        self.cache_path = os.path.join(cache_dir, f"latents-{self._cache_key()}.safetensors") if cache_dir else None

    def _cache_key(self) -> str:
        # A map-style dataset has a content fingerprint; a streaming one only its info (name, config, splits).
        fingerprint = getattr(self.dataset, "_fingerprint", None) or repr(getattr(self.dataset, "info", ""))
        key = hashlib.sha256(json.dumps([fingerprint, dict(self.vae.config), self.resolution, self.latent_sampling,
                                         self.seed, self.image_column, self.label_column],
                                        sort_keys=True, default=str).encode())
        for parameter in self.vae.parameters():  # two VAEs with one config but different weights must not collide
            key.update(parameter.detach().float().cpu().numpy().tobytes())
        return key.hexdigest()[:16]

    def _check_labels(self, labels: list) -> torch.Tensor:
        return labels_to_tensor(labels, self.label_column, self.num_classes)

    @torch.no_grad()
    def _encode(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        device, dtype = self.vae.device, self.vae.dtype
        images, labels, names = [], [], []

        def flush():
            pixels = images_to_tensor(images, self.resolution, names).to(device=device, dtype=dtype)
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.mean if self.latent_sampling == "mean" else \
                posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
            return (latents * self.vae.config.scaling_factor).float().cpu(), self._check_labels(labels)

        for row, example in enumerate(self.dataset):  # rows in order: a map-style row index or a stream position
            where = describe_row(example, self.image_column, row)
            try:
                images.append(decode_image(example[self.image_column], where, self.image_column))
            except UnreadableImageError:
                if not self.skip_bad_images:
                    raise
                if where not in self.bad_images:
                    logger.warning(f"Skipping the unreadable image of {where} (--skip_bad_images).")
                    self.bad_images.append(where)
                continue
            labels.append(example[self.label_column])
            names.append(where)
            if len(images) == self.batch_size:
                yield flush()
                images, labels, names = [], [], []
        if images:
            yield flush()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from safetensors.torch import load_file, save_file

        if self.cache_path and os.path.isfile(self.cache_path):
            cached = load_file(self.cache_path)
            yield from zip(cached["latents"].split(self.batch_size), cached["labels"].split(self.batch_size))
            return
        parts = []
        for latents, labels in self._encode():
            if self.cache_path:
                parts.append((latents, labels))
            yield latents, labels
        if self.cache_path and parts:  # only a complete pass is cached; written under a temporary name
            os.makedirs(os.path.dirname(self.cache_path), exist_ok=True)
            tmp = f"{self.cache_path}.tmp-{os.getpid()}"
            save_file({"latents": torch.cat([p[0] for p in parts]).contiguous(),
                       "labels": torch.cat([p[1] for p in parts])}, tmp)
            os.replace(tmp, self.cache_path)


def first_rows(dataset, num_rows: int):
    """The first ``num_rows`` rows of a map-style or streamed dataset (all of a shorter one), nothing read."""
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        return dataset.take(num_rows)
    return dataset.select(range(min(num_rows, len(dataset))))


def load_labelled_dataset(dataset_name: str | None = None, train_data_dir: str | None = None, split: str = "train",
                          dataset_config_name: str | None = None, streaming: bool = False,
                          cache_dir: str | None = None, image_column: str = "image", label_column: str = "label",
                          num_classes: int | None = None, id2label: dict | None = None,
                          class_mapping_file: str | None = None, max_samples: int | None = None, log=print):
    """The training data of a command, checked before any heavy work: `load_dataset_or_embedded`, its columns
    (`check_columns`), the first ``max_samples`` rows, and every label made the model's class id (`prepare_labels`;
    a bad label met at step 97 would cost the whole run). Returns (dataset, name for reports, class mapping)."""
    dataset, name = load_dataset_or_embedded(dataset_name, train_data_dir, split, dataset_config_name, streaming,
                                             cache_dir)
    check_columns(dataset, image_column, label_column, num_classes)
    if max_samples is not None:
        dataset = first_rows(dataset, max_samples)
    argument = "--dataset_name" if dataset_name is not None else "--train_data_dir"
    dataset, mapping = prepare_labels(dataset, label_column, num_classes, id2label, class_mapping_file,
                                      f"`{argument}`={name!r} (split {split!r})", log=log)
    return dataset, name, mapping


@torch.no_grad()
def encode_training_latents(vae, pixels: torch.Tensor, draws, random_flip: bool = False) -> torch.Tensor:
    """Scaled float32 training latents of ``pixels`` (on the VAE's device and dtype) with a sample's own draws
    (`randomness.TrainingDraws`): its horizontal flip when ``random_flip``, and its VAE posterior sample
    ``mean + std * draws.vae_noise``, as DiT's training samples the posterior."""
    if random_flip:
        pixels = torch.where(draws.flip.to(pixels.device)[:, None, None, None], pixels.flip(-1), pixels)
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.mean + posterior.std * draws.vae_noise.to(posterior.mean.device, posterior.mean.dtype)
    return latents.float() * vae.config.scaling_factor


def calibration_batches(dataset, vae, resolution: int, num_samples: int, batch_size: int = 64,
                        image_column: str = "image", label_column: str = "label", num_classes: int | None = None,
                        cache_dir: str | None = None, skip_bad_images: bool = False) -> "LatentBatches":
    """The calibration data of ranking and proxies: the VAE means (scaled) of the first ``num_samples`` images of
    ``dataset``, as lazy `LatentBatches` (nothing is encoded until it is iterated). Shared by `EntPruner`'s callers
    (examples/prune_dit.py), `entprune score` and the benchmarks, so that they all rank on the same latents.

    Args:
        dataset (`datasets.Dataset` or `datasets.IterableDataset`): with an image and an integer label column
            (the model's class ids; see `prepare_labels`).
        vae (`AutoencoderKL`): the pipeline's VAE, on the device and dtype to encode with.
        resolution (`int`): image size in pixels (the transformer's ``sample_size`` times `vae_scale_factor`).
        num_samples (`int`): images to take from the start; e.g. `EntPrunerConfig.calibration_pool_size`.
        batch_size (`int`, *optional*, defaults to 64): images per VAE call (and per yielded batch).
        num_classes (`int`, *optional*): labels must lie in ``[0, num_classes)``.
        cache_dir (`str`, *optional*): a latent cache folder (`latent_cache.LatentCache`, shared with the
            script's ``--cache_latents``): the whole map-style dataset is encoded there once (or read from a cache
            made before) and the first rows' means are read from it.
        skip_bad_images (`bool`, *optional*, defaults to `False`): leave unreadable images out with a warning.
    """
    from datasets import IterableDataset

    if cache_dir is not None and not isinstance(dataset, IterableDataset):
        from .latent_cache import CachedCalibration, LatentCache

        def open_cache():
            return LatentCache.for_ranking(cache_dir, dataset, vae, resolution, image_column, batch_size,
                                           skip_bad_images)

        return CachedCalibration(open_cache, dataset, label_column, num_classes, num_samples, batch_size,
                                 vae.config.scaling_factor)
    return LatentBatches(first_rows(dataset, num_samples), vae, resolution, batch_size, image_column, label_column,
                         num_classes=num_classes, latent_sampling="mean", cache_dir=cache_dir,
                         skip_bad_images=skip_bad_images)


def collect_pool(batches, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` (latents, labels) from ``batches`` as two CPU tensors: read in one pass, no further than
    needed (so a generator works too), and repeated from memory when the data is shorter (a small dataset is met
    again, with fresh noise draws wherever it is used). ``batches`` may also be one (latents, labels) pair."""
    if isinstance(batches, tuple) and len(batches) == 2 and torch.is_tensor(batches[0]):
        batches = [batches]
    read, count = [], 0
    for latents, labels in batches:
        read.append((latents, labels))
        count += len(latents)
        if count >= num_samples:
            break
    if count == 0:
        raise ValueError("`calibration_data` holds no samples: pass (latents, labels) tensors or batches.")
    pool = list(repeat_batches(read, num_samples))
    return (torch.cat([b[0] for b in pool])[:num_samples].cpu(), torch.cat([b[1] for b in pool])[:num_samples].cpu())


def repeat_batches(batches, num_samples: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pass over ``batches`` (re-iterable) as often as needed to yield ``num_samples`` samples.

    Each pass meets the images again with new timesteps and noise, so repeating a small dataset is legitimate.
    """
    yielded = 0
    while yielded < num_samples:
        before = yielded
        for latents, labels in batches:
            yield latents, labels
            yielded += len(latents)
            if yielded >= num_samples:
                return
        if yielded == before:
            raise ValueError("The dataset is empty: it yielded no images.")


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


class ShuffledShardSampler(torch.utils.data.Sampler):
    """Endless dataset indices for training, exactly reproducible from a position (for resuming).

    The global stream is epoch 0's permutation, then epoch 1's, ... (epoch e keyed (seed, e) in
    `diffusers_entprune.randomness.sample_generator`); process p of P takes the stream's positions p, p + P, ...
    So P processes with batches of B / P together read, step by step, the images one process with batches of B
    reads, whatever the dataset size. ``start`` skips that many of this process's indices without materialising
    them, so a resumed run sees the same images in the same order as an uninterrupted one, under any number of
    processes for the same global batch.
    """

    def __init__(self, dataset_size: int, seed: int = 0, process_index: int = 0, num_processes: int = 1,
                 start: int = 0):
        if dataset_size < 1:
            raise ValueError("The dataset is empty: it has no images to train on.")
        self.dataset_size, self.seed, self.start = dataset_size, seed, start
        self.process_index, self.num_processes = process_index, num_processes

    def _permutation(self, epoch: int) -> list[int]:
        return torch.randperm(self.dataset_size, generator=sample_generator(self.seed, epoch)).tolist()

    def __iter__(self):
        position = self.start * self.num_processes + self.process_index  # in the global stream
        epoch, order = None, None
        while True:
            current, index = divmod(position, self.dataset_size)
            if current != epoch:
                epoch, order = current, self._permutation(current)
            yield order[index]
            position += self.num_processes


class PixelCollate:
    """Examples -> `PixelBatch` (images in [-1, 1] at ``resolution`` with DiT's crop, int64 labels); picklable for
    workers. Images are decoded here (`decode_image`), so an unreadable one is named by its row or file; with
    ``skip_bad_images`` the next readable image of the batch (cyclically) takes its place, with its label. The
    batch keeps its size and its samples their stream positions, so the training draws, resuming and the number
    of processes work as without bad images, and a resumed run replaces the same images the same way."""

    def __init__(self, resolution: int, image_column: str = "image", label_column: str = "label",
                 num_classes: int | None = None, skip_bad_images: bool = False):
        self.resolution, self.image_column, self.label_column = resolution, image_column, label_column
        self.num_classes, self.skip_bad_images = num_classes, skip_bad_images

    def __call__(self, examples):
        names = [describe_row(e, self.image_column) for e in examples]
        images, bad = [], []
        for example, where in zip(examples, names):
            try:
                images.append(decode_image(example[self.image_column], where, self.image_column))
            except UnreadableImageError:
                if not self.skip_bad_images:
                    raise
                logger.warning(f"Replacing the unreadable image of {where} in its batch (--skip_bad_images).")
                images.append(None)
                bad.append(where)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise ValueError(f"`{self.image_column}`: no image of a batch can be read ({bad[:4]} ...); check the "
                             "dataset's files.")
        take = [i if images[i] is not None else next((g for g in good if g > i), good[0]) for i in range(len(images))]
        pixels = images_to_tensor([images[i] for i in take], self.resolution, [names[i] for i in take])
        labels = labels_to_tensor([examples[i][self.label_column] for i in take], self.label_column,
                                  self.num_classes)
        batch = PixelBatch((pixels, labels))
        batch.bad_images = bad
        return batch


class NumberedRows(torch.utils.data.Dataset):
    """A map-style dataset whose rows carry their index (`ROW_KEY`), so that `PixelCollate` can name a bad row."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return {**self.dataset[index], ROW_KEY: index}

    def __getitems__(self, indices):  # the DataLoader fetches a batch in one call
        return [{**row, ROW_KEY: index} for row, index in zip(self.dataset.__getitems__(indices), indices)]


def training_dataloader(dataset, collate: PixelCollate, batch_size: int, seed: int = 0, process_index: int = 0,
                        num_processes: int = 1, skip_samples: int = 0, num_workers: int = 0,
                        shuffle_buffer_size: int = 1000):
    """An endless loader of this process's training batches, starting after ``skip_samples`` of its samples.

    A map-style dataset is shuffled by `ShuffledShardSampler`; a streaming one is split between processes, shuffled
    with a buffer and repeated, and a resumed run reads past the samples already seen (streams cannot seek).
    Images reach ``collate`` undecoded (`undecoded`), map-style rows with their index.
    """
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    dataset = undecoded(dataset, collate.image_column)

    # A DataLoader draws its workers' base seed from the global RNG when it starts iterating unless it has its own
    # generator; that draw would shift every later random number of a resumed run.
    generator = torch.Generator().manual_seed(seed + process_index)
    if isinstance(dataset, IterableDataset):
        stream = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size).repeat(None).skip(skip_samples)
        return torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate,
                                           num_workers=min(num_workers, stream.num_shards), generator=generator)
    sampler = ShuffledShardSampler(len(dataset), seed, process_index, num_processes, start=skip_samples)
    return torch.utils.data.DataLoader(NumberedRows(dataset), batch_size=batch_size, sampler=sampler,
                                       collate_fn=collate, num_workers=num_workers,
                                       persistent_workers=num_workers > 0, generator=generator)
