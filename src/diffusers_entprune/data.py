"""`datasets` -> (latent, label) batches for scoring and fine-tuning.

Any `datasets` source works: a Hub id (``dataset_name``), a local folder (``train_data_dir``: an imagefolder, or a
folder of parquet files), with ``streaming=True`` too. Images are preprocessed as DiT does (shrink, bicubic resize
of the short side, centre crop, [-1, 1]) and encoded by the pipeline's VAE times its scaling factor. An optional
on-disk latent cache (safetensors) lets scoring and training skip the VAE the second time.
"""

import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image


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


def center_crop_resize(image: Image.Image, resolution: int) -> Image.Image:
    """DiT's preprocessing: halve with a box filter while the short side is >= 2x the target, resize the short side
    to ``resolution`` (bicubic), then crop the centre square."""
    if min(image.size) < resolution:
        raise ValueError(f"An image of size {image.size} is smaller than `resolution`={resolution}; pass a smaller "
                         "`resolution` or upscale the dataset first (we do not upscale silently).")
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - resolution) // 2, (image.size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def images_to_tensor(images, resolution: int) -> torch.Tensor:
    arrays = [np.asarray(center_crop_resize(image, resolution), dtype=np.float32) for image in images]
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


class LatentBatches:
    """Iterate (latents, labels) batches of a dataset through a VAE, optionally through an on-disk cache.

    Args:
        dataset: a `datasets` Dataset or IterableDataset with ``image_column`` and ``label_column``.
        vae: the pipeline's `AutoencoderKL`; latents are ``encode(x).latent_dist.mean * scaling_factor`` (or a
            sample with ``latent_sampling="sample"``, as DiT's training does).
        num_classes: labels must lie in ``[0, num_classes)``; anything else is refused when it is met.
        cache_dir: where to keep encoded latents (keyed by dataset fingerprint, VAE config, resolution and
            sampling); the first full pass writes them, later passes read them.
    """

    def __init__(self, dataset, vae, resolution: int, batch_size: int = 64, image_column: str = "image",
                 label_column: str = "label", num_classes: int | None = None, latent_sampling: str = "mean",
                 cache_dir: str | None = None, seed: int = 0):
        if latent_sampling not in ("mean", "sample"):
            raise ValueError(f"`latent_sampling` must be 'mean' or 'sample', got {latent_sampling!r}.")
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
        check_columns(dataset, image_column, label_column, num_classes)
        self.dataset, self.vae, self.resolution, self.batch_size = dataset, vae, resolution, batch_size
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
        images, labels = [], []

        def flush():
            pixels = images_to_tensor(images, self.resolution).to(device=device, dtype=dtype)
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.mean if self.latent_sampling == "mean" else \
                posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(device)
            return (latents * self.vae.config.scaling_factor).float().cpu(), self._check_labels(labels)

        for example in self.dataset:
            images.append(example[self.image_column])
            labels.append(example[self.label_column])
            if len(images) == self.batch_size:
                yield flush()
                images, labels = [], []
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


def shard_batches(batches, process_index: int, num_processes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of a stream of batches: global samples p, p + P, p + 2P, ... (matching the draws of
    `diffusers_entprune.importance.draws.fixed_draws`), whatever the batch boundaries."""
    offset = 0
    for latents, labels in batches:
        first = (process_index - offset) % num_processes
        if first < len(latents):
            yield latents[first::num_processes], labels[first::num_processes]
        offset += len(latents)


class ShuffledShardSampler(torch.utils.data.Sampler):
    """Endless dataset indices for training, exactly reproducible from a position (for resuming).

    The global stream is epoch 0's permutation, then epoch 1's, ... (epoch e seeded by (seed, e)); process p of P
    takes the stream's positions p, p + P, p + 2P, ... So P processes with batches of B / P together read, step by
    step, the images one process with batches of B reads, whatever the dataset size. ``start`` skips that many of
    this process's indices without materialising them, so a resumed run sees the same images in the same order as
    an uninterrupted one, under any number of processes for the same global batch.
    """

    def __init__(self, dataset_size: int, seed: int = 0, process_index: int = 0, num_processes: int = 1,
                 start: int = 0):
        if dataset_size < 1:
            raise ValueError("The dataset is empty: it has no images to train on.")
        self.dataset_size, self.seed, self.start = dataset_size, seed, start
        self.process_index, self.num_processes = process_index, num_processes

    def _permutation(self, epoch: int) -> list[int]:
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1)[0]
        return torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(int(state))).tolist()

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
    """Examples -> (images in [-1, 1] at ``resolution`` with DiT's crop, int64 labels); picklable for workers."""

    def __init__(self, resolution: int, image_column: str = "image", label_column: str = "label",
                 num_classes: int | None = None):
        self.resolution, self.image_column, self.label_column = resolution, image_column, label_column
        self.num_classes = num_classes

    def __call__(self, examples):
        pixels = images_to_tensor([e[self.image_column] for e in examples], self.resolution)
        return pixels, labels_to_tensor([e[self.label_column] for e in examples], self.label_column,
                                        self.num_classes)


def training_dataloader(dataset, collate: PixelCollate, batch_size: int, seed: int = 0, process_index: int = 0,
                        num_processes: int = 1, skip_samples: int = 0, num_workers: int = 0,
                        shuffle_buffer_size: int = 1000):
    """An endless loader of this process's training batches, starting after ``skip_samples`` of its samples.

    A map-style dataset is shuffled by `ShuffledShardSampler`; a streaming one is split between processes, shuffled
    with a buffer and repeated, and a resumed run reads past the samples already seen (streams cannot seek).
    """
    from datasets import IterableDataset
    from datasets.distributed import split_dataset_by_node

    # A DataLoader draws its workers' base seed from the global RNG when it starts iterating unless it has its own
    # generator; that draw would shift every later random number of a resumed run.
    generator = torch.Generator().manual_seed(seed + process_index)
    if isinstance(dataset, IterableDataset):
        stream = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size).repeat(None).skip(skip_samples)
        return torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=collate,
                                           num_workers=min(num_workers, stream.num_shards), generator=generator)
    sampler = ShuffledShardSampler(len(dataset), seed, process_index, num_processes, start=skip_samples)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       generator=generator)
