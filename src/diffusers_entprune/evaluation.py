"""Evaluate a class-conditional pipeline (DiT or SiT) against reference images: FID, KID, precision / recall,
Inception Score, sFID, class fidelity, latency, parameters and FLOPs, with every setting that the numbers depend on.

Samples are reproducible and independent of the number of processes: sample i has class ``labels[i]`` and its own
generator seeded with ``seed + i``; process p makes the samples i = p, p + P, ... (see
`diffusers_entprune.randomness`); features are gathered and put back in sample order before any metric is
computed, so one process and several give the same matrices.
"""

import datetime
import statistics
import time

import torch

from .metrics import Features, frechet_distance, inception_score, kernel_distance, precision_recall
from .randomness import image_generators, shard_indices
from .speed import synchronize, transformer_flops


def balanced_labels(classes: list[int], num_samples: int) -> list[int]:
    """Classes cycled in order: every class gets num_samples / len(classes) samples (up to one)."""
    if not classes:
        raise ValueError("No class to sample: the reference data has no labels and no `class_labels` were given.")
    return [classes[i % len(classes)] for i in range(num_samples)]


@torch.no_grad()
def generate_images(pipe, labels: list[int], indices: list[int], seed: int = 0, batch_size: int = 32,
                    guidance_scale: float = 4.0, num_inference_steps: int = 50, progress: bool = True,
                    **call_kwargs) -> torch.Tensor:
    """Images in [0, 1] (len(indices), 3, H, W) for samples ``indices`` (classes ``labels[i]``, seeds seed + i)."""
    from tqdm.auto import tqdm

    pipe.set_progress_bar_config(disable=True)
    chunks = [indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]
    images = []
    for chunk in tqdm(chunks, desc="sampling", disable=not progress):
        generators = image_generators(seed, chunk)
        output = pipe(class_labels=[labels[i] for i in chunk], guidance_scale=guidance_scale,
                      num_inference_steps=num_inference_steps, generator=generators, output_type="np",
                      **call_kwargs).images  # DiTPipeline gives numpy for every output_type but "pil"
        images.append(torch.from_numpy(output).permute(0, 3, 1, 2).float())
    if not images:
        return torch.empty(0, 3, 0, 0)
    return torch.cat(images)


@torch.no_grad()
def extract_features(network, images: torch.Tensor, batch_size: int = 256) -> Features:
    parts = [network(chunk) for chunk in images.split(batch_size)]

    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if not values or values[0] is None else torch.cat([v.cpu() for v in values])

    return Features(pooled=cat("pooled"), logits=cat("logits"), spatial=cat("spatial"))


def gather_in_order(accelerator, indices: list[int], tensor: torch.Tensor | None) -> torch.Tensor | None:
    """This process's rows (for samples ``indices``) -> every process's rows, in sample order."""
    if tensor is None:
        return None
    index = torch.tensor(indices, dtype=torch.long)
    if accelerator is not None and accelerator.num_processes > 1:
        device = accelerator.device
        tensor = accelerator.pad_across_processes(tensor.to(device), dim=0)
        index = accelerator.pad_across_processes(index.to(device) + 1, dim=0) - 1  # padding rows get index -1
        tensor, index = accelerator.gather(tensor).cpu(), accelerator.gather(index).cpu()
        keep = index >= 0
        tensor, index = tensor[keep], index[keep]
    return tensor[torch.argsort(index)]


def reference_images(dataset, resolution: int, image_column: str = "image", label_column: str | None = "label",
                     indices: list[int] | None = None, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] at ``resolution`` (DiT's centre crop) and labels (-1 without a label column)."""
    from .data import images_to_tensor

    indices = list(range(len(dataset))) if indices is None else indices
    images, labels = [], []
    for start in range(0, len(indices), batch_size):
        rows = dataset[indices[start: start + batch_size]]  # a dict of columns
        images.append(images_to_tensor(rows[image_column], resolution) / 2 + 0.5)
        labels.append(torch.tensor(rows[label_column]) if label_column else torch.full((len(rows[image_column]),), -1))
    if not images:
        return torch.empty(0, 3, resolution, resolution), torch.empty(0, dtype=torch.long)
    return torch.cat(images), torch.cat(labels).long()


@torch.no_grad()
def sampling_latency(pipe, class_labels: list[int], num_inference_steps: int = 50, guidance_scale: float = 4.0,
                     repeats: int = 3, warmup: int = 1, **call_kwargs) -> dict:
    """Median seconds of a full pipeline call (VAE decode included) after ``warmup`` calls; CUDA events on a GPU."""
    device = pipe.transformer.device

    def run():
        kwargs = dict(class_labels=class_labels, num_inference_steps=num_inference_steps,
                      guidance_scale=guidance_scale, generator=torch.manual_seed(0), output_type="np", **call_kwargs)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            pipe(**kwargs)
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000.0
        synchronize(device)
        begin = time.perf_counter()
        pipe(**kwargs)
        return time.perf_counter() - begin

    pipe.set_progress_bar_config(disable=True)
    for _ in range(warmup):
        run()
    seconds = statistics.median(run() for _ in range(repeats))
    return {"batch_size": len(class_labels), "seconds_per_call": seconds,
            "images_per_second": len(class_labels) / seconds, "repeats": repeats, "warmup": warmup,
            "timer": "cuda events" if device.type == "cuda" else "perf_counter",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu ({torch.get_num_threads()} threads)"}


def distribution_metrics(real: Features, fake: Features, real_labels: torch.Tensor, fake_labels: torch.Tensor,
                         classifies_labels: bool, seed: int = 0, k: int = 3) -> dict:
    """Every metric the features allow; ``classifies_labels``: the network's logits are the dataset's classes."""
    precision, recall = precision_recall(real.pooled, fake.pooled, k=min(k, len(real.pooled) - 1,
                                                                         len(fake.pooled) - 1))
    kid_mean, kid_std = kernel_distance(real.pooled, fake.pooled, seed=seed)
    metrics = {"fid": frechet_distance(real.pooled, fake.pooled), "kid_mean": kid_mean, "kid_std": kid_std,
               "precision": precision, "recall": recall, "precision_recall_k": k,
               "inception_score_mean": None, "inception_score_std": None, "sfid": None, "class_fidelity": None,
               "reference_class_fidelity": None}
    if fake.logits is not None:
        metrics["inception_score_mean"], metrics["inception_score_std"] = inception_score(fake.logits, seed=seed)
    if real.spatial is not None and fake.spatial is not None:
        metrics["sfid"] = frechet_distance(real.spatial, fake.spatial)
    if classifies_labels and fake.logits is not None:
        metrics["class_fidelity"] = float((fake.logits.argmax(1) == fake_labels).double().mean())
        labelled = real_labels >= 0
        if labelled.any():  # the same judge on real images: the ceiling of class fidelity
            metrics["reference_class_fidelity"] = float(
                (real.logits[labelled].argmax(1) == real_labels[labelled]).double().mean())
    return metrics


def _check_class_labels(class_labels: list[int], num_classes: int, source: str = "") -> None:
    outside = [label for label in class_labels if not 0 <= label < num_classes]
    if outside:
        raise ValueError(f"`class_labels`{source} must lie in 0..{num_classes - 1} for this model, got {outside[:5]}.")


def evaluate_pipeline(pipe, reference_dataset, feature_network, num_samples: int = 1000, seed: int = 0,
                      guidance_scale: float = 4.0, num_inference_steps: int = 50, batch_size: int = 32,
                      class_labels: list[int] | None = None, image_column: str = "image",
                      label_column: str | None = "label", max_reference_images: int | None = None,
                      latency_batch_size: int = 8, latency_repeats: int = 3, accelerator=None, progress: bool = True,
                      **call_kwargs) -> tuple[dict, torch.Tensor]:
    """Metrics of ``pipe``'s samples against ``reference_dataset`` (a map-style `datasets.Dataset`).

    Returns (metrics with their settings, the generated images in sample order, on the main process).
    """
    process_index = accelerator.process_index if accelerator is not None else 0
    num_processes = accelerator.num_processes if accelerator is not None else 1
    start = time.time()
    config = pipe.transformer.config
    resolution = config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if class_labels is not None:  # before the reference images are read
        _check_class_labels(class_labels, config.num_embeds_ada_norm)

    num_reference = len(reference_dataset) if max_reference_images is None else \
        min(max_reference_images, len(reference_dataset))
    reference_indices = shard_indices(num_reference, process_index, num_processes)
    real_images, real_labels = reference_images(reference_dataset, resolution, image_column, label_column,
                                                reference_indices)
    if class_labels is None:
        all_labels = gather_in_order(accelerator, reference_indices, real_labels)
        class_labels = sorted({int(label) for label in all_labels.tolist() if label >= 0})
        _check_class_labels(class_labels, config.num_embeds_ada_norm, " (the reference data's labels)")
    labels = balanced_labels(class_labels, num_samples)
    sample_indices = shard_indices(num_samples, process_index, num_processes)
    fake_images = generate_images(pipe, labels, sample_indices, seed, batch_size, guidance_scale,
                                  num_inference_steps, progress=progress, **call_kwargs)

    real, fake = extract_features(feature_network, real_images), extract_features(feature_network, fake_images)
    real = Features(*(gather_in_order(accelerator, reference_indices, getattr(real, name))
                      for name in ("pooled", "logits", "spatial")))
    fake = Features(*(gather_in_order(accelerator, sample_indices, getattr(fake, name))
                      for name in ("pooled", "logits", "spatial")))
    all_real_labels = gather_in_order(accelerator, reference_indices, real_labels)
    images = gather_in_order(accelerator, sample_indices, fake_images)
    fake_labels = torch.tensor(labels)
    classifies = getattr(feature_network, "name", "") == "digits-classifier"
    metrics = distribution_metrics(real, fake, all_real_labels, fake_labels, classifies, seed=seed)
    sampling_seconds = time.time() - start

    result = {
        **metrics,
        "num_samples": num_samples, "num_reference_images": len(real.pooled),
        "feature_network": getattr(feature_network, "name", type(feature_network).__name__),
        "sampling": {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                     "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
                     "seed": seed, "seeds": f"sample i uses seed {seed} + i", "class_labels": class_labels,
                     "labels": "classes cycled in order", **call_kwargs},
        "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
        "num_layers": config.num_layers,
        "flops_per_forward": transformer_flops(pipe.transformer, 1),
        "num_processes": num_processes,
        "seconds_sampling_and_metrics": round(sampling_seconds, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    if latency_repeats and (accelerator is None or accelerator.is_main_process):
        result["latency"] = sampling_latency(pipe, [labels[i % len(labels)] for i in range(latency_batch_size)],
                                             num_inference_steps, guidance_scale, repeats=latency_repeats,
                                             **call_kwargs)
    return result, images
