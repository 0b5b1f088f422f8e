"""Encode a dataset through the VAE once, then train and rank from the cache (``--cache_latents``).

DiT's own trainer, fast-DiT and TinyFusion train from pre-extracted VAE latents; encoding every training batch
again costs more than the transformer step at small depths. A cache holds, for every row of a map-style dataset,
the VAE posterior's mean and standard deviation (in the VAE's dtype), and those of the horizontally flipped image
when it is made for ``--random_flip``. Training then draws ``mean + std * noise`` with the sample's own
`randomness.training_draws` (flip, posterior noise): the same latents, bit for bit, as encoding the batch
(`data.encode_training_latents`) whenever the VAE encodes a row the same alone as in a batch (tested on CPU).

Layout: ``<latent_cache_dir>/latents-<key>/`` with ``cache_info.json`` (what the cache was made from: dataset
fingerprint, VAE config and weights SHA-256, resolution, flip, dtype, columns; ``complete`` once every chunk is
written) and ``chunk-00000.safetensors``, ... of `ROWS_PER_CHUNK` rows each (``mean``, ``std``, ``flipped_mean``,
``flipped_std``, ``readable``). Chunks are the unit of work: processes encode every P-th chunk, each written under
a temporary name then renamed, so a preempted encoding resumes where it stopped and no reader sees half a chunk.
The key is a hash of the description, so one folder serves many datasets and VAEs and runs share it; a cache
whose ``cache_info.json`` does not match the run (another VAE, resolution or dataset) is refused, never reused.
Labels are not cached: they come from the dataset's label column (after the class mapping), which is cheap to read.
"""

import hashlib
import json
import logging
import os

import torch
from tqdm.auto import tqdm

from .data import (
    PixelBatch,
    ShuffledShardSampler,
    UnreadableImageError,
    decode_image,
    describe_row,
    images_to_tensor,
    labels_to_tensor,
    undecoded,
)
from .randomness import shard_indices

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
ROWS_PER_CHUNK = 1024
INFO_NAME = "cache_info.json"


def default_latent_cache_dir() -> str:
    """``$HF_HOME/diffusers_entprune/latents``: beside the Hub cache, shared by every run of this machine."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "diffusers_entprune", "latents")


class LatentCacheMismatchError(ValueError):
    """A cache folder made from another dataset, VAE or resolution than the run asks for."""


def _vae_weights_sha256(vae) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def dataset_content_sha256(dataset, image_column: str) -> str:
    """SHA-256 over every row's image bytes, in row order (read undecoded; a few seconds per GB). A cache stands for
    every row, so a fingerprint of the first rows (what a resumed run compares) would not do."""
    from .run_identity import _value_bytes

    rows = undecoded(dataset.select_columns([image_column]), image_column)
    digest = hashlib.sha256(str(len(rows)).encode())
    for batch in rows.iter(batch_size=1000):
        for value in batch[image_column]:
            data = _value_bytes(value)
            digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


def cache_description(dataset, vae, resolution: int, random_flip: bool, image_column: str) -> dict:
    """What a cache is made from; two runs share a cache exactly when their descriptions are equal."""
    return {"version": CACHE_VERSION, "dataset_sha256": dataset_content_sha256(dataset, image_column),
            "num_rows": len(dataset),
            "image_column": image_column, "resolution": resolution, "random_flip": bool(random_flip),
            "vae_config": {k: v for k, v in dict(vae.config).items() if not k.startswith("_")},
            "vae_weights_sha256": _vae_weights_sha256(vae), "dtype": str(vae.dtype).replace("torch.", "")}


def _plain(value):
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def cache_key(description: dict) -> str:
    return hashlib.sha256(json.dumps(_plain(description), sort_keys=True).encode()).hexdigest()[:16]


def estimate_bytes(num_rows: int, latent_shape: tuple[int, ...], dtype: torch.dtype, random_flip: bool) -> int:
    per_row = 2 * (2 if random_flip else 1) * torch.Size(latent_shape).numel() * torch.finfo(dtype).bits // 8
    return num_rows * per_row


class LatentCache:
    """The VAE posteriors of a dataset's rows, encoded once (`build`) and held in memory for training and ranking.

    Args:
        folder (`str`): the cache's own folder (``<latent_cache_dir>/latents-<key>``).
        info (`dict`): its ``cache_info.json``.
    """

    def __init__(self, folder: str, info: dict):
        from safetensors.torch import load_file

        self.folder, self.info = folder, info
        chunks = [load_file(os.path.join(folder, _chunk_name(k))) for k in range(_num_chunks(info["num_rows"]))]
        self.tensors = {name: torch.cat([c[name] for c in chunks]) for name in chunks[0]}
        self.readable = self.tensors.pop("readable").bool()

    def __len__(self) -> int:
        return len(self.readable)

    @classmethod
    def build(cls, latent_cache_dir: str, dataset, vae, resolution: int, random_flip: bool = False,
              image_column: str = "image", batch_size: int = 64, skip_bad_images: bool = False,
              accelerator=None) -> "LatentCache":
        """Open the cache of ``dataset`` under ``latent_cache_dir``, encoding whatever chunks are missing first.

        Every process encodes its share of the missing chunks (chunk k goes to process k mod P) with ``vae`` on its
        device; the main process then marks the cache complete. An unreadable image stops the encoding with its row
        named, unless ``skip_bad_images`` (then the row is marked unreadable and training replaces it in its batch as
        `data.PixelCollate` does). Refuses (`LatentCacheMismatchError`) a folder made from something else.
        """
        from datasets import IterableDataset

        if isinstance(dataset, IterableDataset):
            raise ValueError("`--cache_latents` needs a map-style dataset (random access to rows); drop "
                             "`--streaming` or train without the cache.")
        description = _plain(cache_description(dataset, vae, resolution, random_flip, image_column))
        return cls._open_or_encode(latent_cache_dir, description, dataset, vae, resolution, image_column, batch_size,
                                   skip_bad_images, accelerator)

    @classmethod
    def for_ranking(cls, latent_cache_dir: str, dataset, vae, resolution: int, image_column: str = "image",
                    batch_size: int = 64, skip_bad_images: bool = False, accelerator=None) -> "LatentCache":
        """The cache ranking reads (unflipped means only): a complete one made for ``--random_flip`` training
        serves too, else the plain one is opened or encoded (`entprune score --latent_cache_dir`)."""
        description = _plain(cache_description(dataset, vae, resolution, False, image_column))
        flipped = {**description, "random_flip": True}
        info = _read_info(os.path.join(latent_cache_dir, f"latents-{cache_key(flipped)}"))
        if info is not None and info.get("complete"):
            description = flipped
        return cls._open_or_encode(latent_cache_dir, description, dataset, vae, resolution, image_column, batch_size,
                                   skip_bad_images, accelerator)

    @classmethod
    def _open_or_encode(cls, latent_cache_dir, description, dataset, vae, resolution, image_column, batch_size,
                        skip_bad_images, accelerator) -> "LatentCache":
        random_flip = description["random_flip"]
        folder = os.path.join(latent_cache_dir, f"latents-{cache_key(description)}")
        info = _read_info(folder)
        if info is not None:
            _check_matches(info, description, folder)
            if info.get("complete"):
                return cls(folder, info)
        is_main = accelerator is None or accelerator.is_main_process
        os.makedirs(folder, exist_ok=True)  # every process: a shared file system may show it late
        if is_main:
            if info is None:
                _write_info(folder, {**description, "complete": False})
        if accelerator is not None:
            accelerator.wait_for_everyone()
        process, processes = (0, 1) if accelerator is None else (accelerator.process_index,
                                                                 accelerator.num_processes)
        chunks = shard_indices(_num_chunks(len(dataset)), process, processes)
        missing = [k for k in chunks if not os.path.isfile(os.path.join(folder, _chunk_name(k)))]
        if is_main:
            latent_shape = (vae.config.latent_channels, resolution // _downscale(vae), resolution // _downscale(vae))
            size = estimate_bytes(len(dataset), latent_shape, vae.dtype, random_flip)
            done = _num_chunks(len(dataset)) - len(missing) * processes
            logger.info(f"Encoding {len(dataset)} images into the latent cache {folder} ({size / 2**30:.2f} GiB on "
                        f"disk and in memory{', flipped images too' if random_flip else ''}); "
                        f"{max(done, 0)} of {_num_chunks(len(dataset))} chunks already there.")
        rows = undecoded(dataset, image_column)
        for k in tqdm(missing, desc="Encoding latents", disable=not is_main):
            _write_chunk(folder, k, _encode_chunk(rows, k, vae, resolution, random_flip, image_column, batch_size,
                                                  skip_bad_images))
        if accelerator is not None:
            accelerator.wait_for_everyone()
        if is_main:
            absent = [k for k in range(_num_chunks(len(dataset)))
                      if not os.path.isfile(os.path.join(folder, _chunk_name(k)))]
            if absent:
                raise RuntimeError(f"The latent cache {folder} lacks chunks {absent[:8]} after encoding.")
            _write_info(folder, {**description, "complete": True})
        if accelerator is not None:
            accelerator.wait_for_everyone()
        return cls(folder, _read_info(folder))

    # ------------------------------------------------------------------------------------------- reading

    def rows(self, indices: list[int], skip_bad_images: bool = False, where: str = "") -> list[int]:
        """``indices`` with each unreadable row replaced by the next readable one of the batch (cyclically), as
        `data.PixelCollate` replaces an unreadable image; the unreadable rows are refused without
        ``skip_bad_images``."""
        readable = [bool(self.readable[i]) for i in indices]
        if all(readable):
            return list(indices)
        if not skip_bad_images:
            bad = [i for i, ok in zip(indices, readable) if not ok]
            raise UnreadableImageError(f"rows {bad} of the dataset could not be read when the latent cache "
                                       f"{self.folder} was made; pass `--skip_bad_images`.", where)
        good = [j for j, ok in enumerate(readable) if ok]
        if not good:
            raise ValueError(f"No image of a batch can be read (rows {indices[:4]} ...); check the dataset's files.")
        return [indices[j if readable[j] else next((g for g in good if g > j), good[0])] for j in range(len(indices))]

    def training_latents(self, indices: list[int], draws, random_flip: bool, scaling_factor: float,
                         device=None) -> torch.Tensor:
        """Scaled float32 latents of the rows ``indices`` with their samples' draws: what
        `data.encode_training_latents` computes from their images."""
        if random_flip and not self.info["random_flip"]:
            raise ValueError(f"The latent cache {self.folder} was made without flipped images; `--random_flip` "
                             "needs a cache made with it.")
        index = torch.as_tensor(indices)
        mean, std = self.tensors["mean"][index], self.tensors["std"][index]
        if random_flip:
            flip = draws.flip.cpu()[:, None, None, None]  # the cache lives in CPU memory
            mean = torch.where(flip, self.tensors["flipped_mean"][index], mean)
            std = torch.where(flip, self.tensors["flipped_std"][index], std)
        mean, std = mean.to(device), std.to(device)
        latents = mean + std * draws.vae_noise.to(mean.device, mean.dtype)
        return latents.float() * scaling_factor

    def calibration_batches(self, labels: torch.Tensor, num_samples: int, batch_size: int, scaling_factor: float):
        """The first ``num_samples`` rows' scaled means, unreadable rows left out: what `data.calibration_batches`
        yields from the images."""
        rows = [i for i in range(min(num_samples, len(self))) if self.readable[i]]
        for start in range(0, len(rows), batch_size):
            index = torch.as_tensor(rows[start : start + batch_size])
            yield (self.tensors["mean"][index] * scaling_factor).float(), labels[index]


class CachedCalibration:
    """Lazy calibration batches from a `LatentCache` (built on first use), like `data.LatentBatches`."""

    def __init__(self, build, dataset, label_column: str, num_classes, num_samples: int, batch_size: int,
                 scaling_factor: float):
        self._build, self.dataset, self.label_column, self.num_classes = build, dataset, label_column, num_classes
        self.num_samples, self.batch_size, self.scaling_factor = num_samples, batch_size, scaling_factor

    def __iter__(self):
        cache = self._build()
        count = min(self.num_samples, len(self.dataset))
        labels = labels_to_tensor(self.dataset.select(range(count))[self.label_column], self.label_column,
                                  self.num_classes)
        yield from cache.calibration_batches(labels, self.num_samples, self.batch_size, self.scaling_factor)


def cached_training_batches(cache: LatentCache, labels: torch.Tensor, batch_size: int, seed: int = 0,
                            process_index: int = 0, num_processes: int = 1, skip_samples: int = 0,
                            skip_bad_images: bool = False):
    """Endless ``(rows, labels)`` training batches of this process from ``cache``: the rows and order
    `data.training_dataloader` reads (`data.ShuffledShardSampler`), unreadable rows replaced within their batch as
    there. Each batch is a `data.PixelBatch` (its ``bad_images`` name the replaced rows); ``rows`` are row indices
    for `LatentCache.training_latents`."""
    indices = iter(ShuffledShardSampler(len(cache), seed, process_index, num_processes, start=skip_samples))
    while True:
        wanted = [next(indices) for _ in range(batch_size)]
        rows = cache.rows(wanted, skip_bad_images, where=f"rows {wanted[:4]}...")
        batch = PixelBatch((torch.as_tensor(rows), labels[rows]))
        batch.bad_images = [f"row {i}" for i in wanted if not cache.readable[i]]
        yield batch


def dataset_labels(dataset, label_column: str, num_classes: int | None) -> torch.Tensor:
    """Every row's label as one int64 tensor (the column only; no image is read)."""
    return labels_to_tensor(dataset[label_column], label_column, num_classes)


# ------------------------------------------------------------------------------------------------ internals


def _chunk_name(k: int) -> str:
    return f"chunk-{k:05d}.safetensors"


def _num_chunks(num_rows: int) -> int:
    return -(-num_rows // ROWS_PER_CHUNK)


def _downscale(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _read_info(folder: str) -> dict | None:
    path = os.path.join(folder, INFO_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LatentCacheMismatchError(f"{path} is not valid JSON ({error}); delete the folder {folder} to "
                                       "encode the cache again.") from None


def _write_info(folder: str, info: dict) -> None:
    tmp = os.path.join(folder, f"{INFO_NAME}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, INFO_NAME))


def _check_matches(info: dict, description: dict, folder: str) -> None:
    differ = [k for k in description if info.get(k) != description[k]]
    if differ:
        names = {"dataset_sha256": "dataset", "num_rows": "dataset", "vae_config": "VAE", "vae_weights_sha256": "VAE",
                 "resolution": "resolution", "random_flip": "--random_flip", "dtype": "VAE dtype (--mixed_precision)",
                 "image_column": "--image_column", "version": "cache format"}
        what = sorted({names.get(k, k) for k in differ})
        raise LatentCacheMismatchError(f"The latent cache {folder} was made with another {', '.join(what)} than "
                                       "this run uses; it is not reused. Point `--latent_cache_dir` at another folder "
                                       "or delete this one.")


def _encode_chunk(rows, k, vae, resolution, random_flip, image_column, batch_size, skip_bad_images) -> dict:
    start, stop = k * ROWS_PER_CHUNK, min((k + 1) * ROWS_PER_CHUNK, len(rows))
    parts, readable = [], []
    for first in range(start, stop, batch_size):
        images, names = [], []
        for row in range(first, min(first + batch_size, stop)):
            example = rows[row]
            where = describe_row(example, image_column, row)
            try:
                images.append(decode_image(example[image_column], where, image_column))
                readable.append(True)
            except UnreadableImageError:
                if not skip_bad_images:
                    raise
                logger.warning(f"The image of {where} cannot be read; marked in the latent cache "
                               "(--skip_bad_images replaces it in its training batches).")
                images.append(None)
                readable.append(False)
            names.append(where)
        parts.append(_encode_images(images, names, vae, resolution, random_flip))
    out = {name: torch.cat([p[name] for p in parts]).contiguous() for name in parts[0]}
    out["readable"] = torch.tensor(readable, dtype=torch.uint8)
    return out


@torch.no_grad()
def _encode_images(images, names, vae, resolution, random_flip) -> dict:
    good = [i for i, image in enumerate(images) if image is not None]
    device, dtype = vae.device, vae.dtype
    channels, size = vae.config.latent_channels, resolution // _downscale(vae)
    out = {name: torch.zeros(len(images), channels, size, size, dtype=dtype)
           for name in (("mean", "std", "flipped_mean", "flipped_std") if random_flip else ("mean", "std"))}
    if not good:
        return out
    pixels = images_to_tensor([images[i] for i in good], resolution, [names[i] for i in good])
    pixels = pixels.to(device=device, dtype=dtype)
    variants = [("", pixels)] + ([("flipped_", pixels.flip(-1))] if random_flip else [])
    index = torch.as_tensor(good)
    for prefix, batch in variants:
        posterior = vae.encode(batch).latent_dist
        out[prefix + "mean"][index] = posterior.mean.cpu()
        out[prefix + "std"][index] = posterior.std.cpu()
    return out


def _write_chunk(folder: str, k: int, tensors: dict) -> None:
    from safetensors.torch import save_file

    final = os.path.join(folder, _chunk_name(k))
    tmp = f"{final}.tmp-{os.getpid()}"
    save_file(tensors, tmp)
    os.replace(tmp, final)
