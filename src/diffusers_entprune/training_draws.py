"""The random numbers of a training step, drawn per sample from (seed, the sample's position in the data stream).

A training run's randomness (horizontal flip, label dropout, the VAE posterior sample, the timestep and the noise)
is tied to the sample, not to the process that happens to hold it. With `ShuffledShardSampler` putting the global
stream's position n on process n mod P, one process with a batch of B and P processes with B / P each see the same
images with the same draws, so a run gives the same model whatever the number of processes (up to float summation
order), and a checkpoint resumes under a different number of processes as if it had not stopped. (A streamed
dataset is split between processes by `datasets` instead, so there only the draws, not the images, line up.)
"""

from dataclasses import dataclass

import numpy as np
import torch

_STREAM_TAG = 1  # keeps these generators apart from the importance draws, which are seeded by (seed, j)


@dataclass
class TrainingDraws:
    flip: torch.Tensor  # bool (B,): mirror the image horizontally (used only with --random_flip)
    drop_label: torch.Tensor  # bool (B,): replace the label by the null class (classifier-free guidance)
    fractions: torch.Tensor  # float64 (B,): t as a fraction of the training time range, uniform in [0, 1)
    vae_noise: torch.Tensor  # (B, C, H, W): the standard normal draw of the VAE posterior sample
    noise: torch.Tensor  # (B, C, H, W): the forward-process noise


def stream_positions(samples_seen: int, batch_size: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """Global stream positions of this process's next ``batch_size`` samples, after ``samples_seen`` of its own."""
    return [(samples_seen + i) * num_processes + process_index for i in range(batch_size)]


def training_draws(seed: int, positions: list[int], latent_shape: tuple[int, ...],
                   class_dropout_prob: float) -> TrainingDraws:
    """One generator per sample, seeded by (seed, position); the same draws for a position on any process."""
    flip, drop, fractions, vae_noise, noise = [], [], [], [], []
    for position in positions:
        # torch seeds its CPU generator with 32 bits: mix (seed, tag, position) into them
        state = np.random.SeedSequence([seed, _STREAM_TAG, position]).generate_state(1)[0]
        generator = torch.Generator().manual_seed(int(state))
        uniforms = torch.rand(2, generator=generator)
        flip.append(uniforms[0] < 0.5)
        drop.append(uniforms[1] < class_dropout_prob)
        fractions.append(torch.rand(1, generator=generator, dtype=torch.float64))
        vae_noise.append(torch.randn(latent_shape, generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
    return TrainingDraws(flip=torch.stack(flip), drop_label=torch.stack(drop), fractions=torch.cat(fractions),
                         vae_noise=torch.stack(vae_noise), noise=torch.stack(noise))
