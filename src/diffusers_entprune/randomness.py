"""Seeded randomness per sample, and which process holds which sample: the conventions, in one place.

**Per-sample draws.** A sample's random numbers (timestep, noise, flip, label dropout, ...) come from its own CPU
generator, `sample_generator`, keyed by (seed, stream tag, the sample's global index): the key is mixed by numpy's
`SeedSequence` into the 32 bits that torch seeds a CPU generator with. Every variant of a model sees the same draws
(common random numbers), and the draws do not depend on the batch size, the number of processes, the device or
where a run resumed. Generators are cheap: one per sample, none kept.

**Sharding.** Items (samples, images, stream positions) have global indices 0, 1, 2, ...; process p of P holds
p, p + P, p + 2P, ...: its k-th item is global item k * P + p. `shard_indices` lists them for N items,
`shard_batches` cuts them out of a global stream of batches whatever the batch boundaries, `stream_positions`
names the global positions of a process's next training batch, and `data.ShuffledShardSampler` reads its epoch
permutations the same way. P processes with batches of B / P thus hold, step by step, what one process with
batches of B holds, with the same draws.

**Streams** (key -> what draws from it):

- ``(seed, j)``: `importance.draws.fixed_draws`, sample j's timestep and noise (no tag: the key predates them).
- ``(seed, e)``: `data.ShuffledShardSampler`, epoch e's permutation of the training set.
- ``(seed, TRAINING_TAG, n)``: `training_draws`, stream position n's flip, label dropout, timestep, VAE posterior
  noise and forward-process noise.
- ``(seed, LEARNED_ORDER_TAG, e)``, ``(seed, LEARNED_GUMBEL_TAG)``, ``(seed, LEARNED_LORA_TAG)``,
  ``(seed, LEARNED_STEP_TAG, step)``: the learned ranking's epoch order of its pool, Gumbel noise, adapter
  initialisation and each step's timesteps and noise (`importance.learned`).

The streams above share keys: importance sample j and sampler epoch j have one key; the learned ranking's epoch
order and the training draws share tag 1; and `SeedSequence` pads a key shorter than four entries with zeros, so
``(seed, 1)`` and ``(seed, 1, 0)`` are one key too (importance sample 1 = training position 0 = the learned
ranking's epoch 0), as are importance samples 2, 3, 4 and the learned ranking's Gumbel noise, adapters and first
step. These streams draw different quantities in different phases of a run, and their keys are kept so that
results stay reproducible; a new stream should take a fresh tag (5 or more) and a key of three entries
``(seed, tag, index)``.

**Not per sample.** Evaluation samples image i with its own generator seeded with ``seed + i`` (`image_generators`,
kept so that published numbers reproduce); the NTK and ZiCo proxies (`proxies`) and the VAE posterior samples of
`data.LatentBatches` draw in order from one generator seeded with ``seed``; `data.training_dataloader` gives its
DataLoader a generator seeded with ``seed + process_index``, used only for the workers' base seed.
"""

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

# Sums a tensor over the processes (e.g. ``lambda t: accelerator.reduce(t, "sum")``); None with one process.
Reduce = Callable[[torch.Tensor], torch.Tensor]

TRAINING_TAG = 1  # training_draws: (seed, TRAINING_TAG, stream position)
LEARNED_ORDER_TAG = 1  # learned ranking: (seed, LEARNED_ORDER_TAG, epoch), the order of the pool in an epoch
LEARNED_GUMBEL_TAG = 2  # learned ranking: (seed, LEARNED_GUMBEL_TAG), the Gumbel noise of every step
LEARNED_LORA_TAG = 3  # learned ranking: (seed, LEARNED_LORA_TAG), the adapters' initialisation
LEARNED_STEP_TAG = 4  # learned ranking: (seed, LEARNED_STEP_TAG, step), a step's timesteps and noise


def sample_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by ``key`` (non-negative integers, e.g. (seed, tag, index)).

    torch seeds a CPU generator with 32 bits: the key is mixed into them by ``numpy.random.SeedSequence``, so nearby
    keys give unrelated generators. Keys shorter than four entries are padded with zeros (see the module docstring).
    """
    if not key:
        raise ValueError("`sample_generator` needs a key, e.g. (seed, tag, index).")
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def image_generators(seed: int, indices: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per image ``i`` of ``indices``, seeded with ``seed + i`` (evaluation's sampling)."""
    return [torch.Generator().manual_seed(seed + i) for i in indices]


def shard_indices(num_items: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """Process ``process_index``'s items of ``num_items``: p, p + P, p + 2P, ... (for P = ``num_processes``)."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"`process_index` must lie in [0, num_processes) with num_processes >= 1, got "
                         f"process_index={process_index}, num_processes={num_processes}.")
    return list(range(process_index, num_items, num_processes))


def shard_batches(batches, process_index: int, num_processes: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's share of a stream of (latents, labels) batches: global samples p, p + P, p + 2P, ...
    (matching the draws of `diffusers_entprune.importance.draws.fixed_draws`), whatever the batch boundaries."""
    offset = 0
    for latents, labels in batches:
        first = (process_index - offset) % num_processes
        if first < len(latents):
            yield latents[first::num_processes], labels[first::num_processes]
        offset += len(latents)


# ---------------------------------------------------------------------------------------------------- training


@dataclass
class TrainingDraws:
    """The random numbers of a training step, drawn per sample from (seed, the sample's position in the data stream).

    A training run's randomness is tied to the sample, not to the process that happens to hold it. With
    `data.ShuffledShardSampler` putting the global stream's position n on process n mod P, one process with a batch
    of B and P processes with B / P each see the same images with the same draws, so a run gives the same model
    whatever the number of processes (up to float summation order), and a checkpoint resumes under a different
    number of processes as if it had not stopped. (A streamed dataset is split between processes by `datasets`
    instead, so there only the draws, not the images, line up.)
    """

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
    """One generator per sample, keyed (seed, `TRAINING_TAG`, position); the same draws for a position anywhere."""
    flip, drop, fractions, vae_noise, noise = [], [], [], [], []
    for position in positions:
        generator = sample_generator(seed, TRAINING_TAG, position)
        uniforms = torch.rand(2, generator=generator)
        flip.append(uniforms[0] < 0.5)
        drop.append(uniforms[1] < class_dropout_prob)
        fractions.append(torch.rand(1, generator=generator, dtype=torch.float64))
        vae_noise.append(torch.randn(latent_shape, generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
    return TrainingDraws(flip=torch.stack(flip), drop_label=torch.stack(drop), fractions=torch.cat(fractions),
                         vae_noise=torch.stack(vae_noise), noise=torch.stack(noise))
