"""Fixed, seeded draws of (x0, class, t, noise) shared by every importance metric.

The timesteps and noise of all ``num_samples`` samples are drawn up front from one seed, so every variant of the
model (full, block i skipped) and every metric sees the same draws (common random numbers), and the result does not
depend on the batch size. With several processes, process p takes samples p, p + P, p + 2P, ...
"""

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ..objectives import NoisedBatch


@dataclass
class Draw:
    latents: torch.Tensor  # clean x0
    labels: torch.Tensor
    noised: NoisedBatch  # x_t, t and the regression target
    fractions: torch.Tensor  # t as a fraction of the training time range, float64


def fixed_draws(model, objective, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_samples: int,
                seed: int = 0, timestep_range: tuple[float, float] = (0.0, 1.0), process_index: int = 0,
                num_processes: int = 1, progress_desc: str | None = None) -> Iterator[Draw]:
    """Yield `Draw`s over ``batches`` (clean latents, labels) until this process's share of ``num_samples``."""
    from tqdm.auto import tqdm

    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    device = next(model.parameters()).device
    low, high = timestep_range
    generator = torch.Generator().manual_seed(seed)
    fractions = low + (high - low) * torch.rand(num_samples, generator=generator, dtype=torch.float64)
    latent_shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    noise = torch.randn((num_samples, *latent_shape), generator=generator)
    mine = torch.arange(process_index, num_samples, num_processes)
    fractions, noise = fractions[mine], noise[mine]

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
            f = fractions[seen : seen + take]
            eps = noise[seen : seen + take].to(device=device, dtype=latents.dtype)
            noised = objective.add_noise(latents, eps, objective.timesteps_from_fraction(f).to(device))
            yield Draw(latents=latents, labels=labels, noised=noised, fractions=f)
            seen += take
            bar.update(take)
    if seen < len(mine):
        raise ValueError(f"The data ran out after {seen} samples; `num_samples`={num_samples} asks for more "
                         "(repeat the data, e.g. with `diffusers_entprune.data.repeat_batches`).")
