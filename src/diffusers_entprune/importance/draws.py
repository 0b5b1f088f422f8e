"""Fixed, seeded draws of (x0, class, t, noise) shared by every importance metric.

Sample j's timestep and noise come from a generator seeded with (seed, j), so every variant of the model (full,
block i skipped) and every metric sees the same draws (common random numbers), the result does not depend on the
batch size, and no memory grows with the number of samples. With several processes, process p takes samples
p, p + P, p + 2P, ... (the conventions of `diffusers_entprune.randomness`).
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..objectives import NoisedBatch, Objective
from ..randomness import sample_generator, shard_indices


@dataclass
class Draw:
    latents: torch.Tensor  # clean x0
    labels: torch.Tensor
    noised: NoisedBatch  # x_t, t and the regression target
    fractions: torch.Tensor  # t as a fraction of the training time range, float64


def fixed_draws(model, objective: Objective, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_samples: int,
                seed: int = 0, timestep_range: tuple[float, float] = (0.0, 1.0), process_index: int = 0,
                num_processes: int = 1, progress_desc: str | None = None) -> Iterator[Draw]:
    """Yield `Draw`s over ``batches`` (clean latents, labels) until this process's share of ``num_samples``."""
    from tqdm.auto import tqdm

    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    if model.skipped_block_indices:  # every metric compares against the full model
        raise ValueError(f"Blocks {sorted(model.skipped_block_indices)} are skipped; restore them before scoring.")
    device = next(model.parameters()).device
    low, high = timestep_range
    latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    mine = shard_indices(num_samples, process_index, num_processes)

    def draw_for(sample_indices):
        fractions, noise = [], []
        for j in sample_indices:
            generator = sample_generator(seed, j)  # untagged: see `diffusers_entprune.randomness`
            fractions.append(low + (high - low) * torch.rand(1, generator=generator, dtype=torch.float64))
            noise.append(torch.randn(latent_shape, generator=generator))
        return torch.cat(fractions), torch.stack(noise)

    seen = 0
    with tqdm(total=len(mine), desc=progress_desc, disable=progress_desc is None) as bar:
        for latents, labels in batches:
            take = min(len(latents), len(mine) - seen)
            if take <= 0:
                break
            if tuple(latents.shape[1:]) != latent_shape:
                raise ValueError(f"Latents of shape {tuple(latents.shape[1:])} do not fit the model "
                                 f"({latent_shape}); check `resolution` and the VAE.")
            latents, labels = latents[:take].to(device), labels[:take].to(device)
            f, eps = draw_for(mine[seen : seen + take])
            eps = eps.to(device=device, dtype=latents.dtype)
            noised = objective.add_noise(latents, eps, objective.timesteps_from_fraction(f).to(device))
            yield Draw(latents=latents, labels=labels, noised=noised, fractions=f)
            seen += take
            bar.update(take)
    if seen < len(mine):
        raise ValueError(f"The data ran out after {seen} samples; `num_samples`={num_samples} asks for more "
                         "(repeat the data, e.g. with `diffusers_entprune.data.repeat_batches`).")
