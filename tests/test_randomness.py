import numpy as np
import pytest
import torch

from diffusers_entprune.randomness import (
    TRAINING_TAG,
    image_generators,
    sample_generator,
    shard_batches,
    shard_indices,
    stream_positions,
    training_draws,
)


@pytest.mark.parametrize("num_items", [0, 1, 7, 12, 13])
@pytest.mark.parametrize("num_processes", [1, 2, 3, 5])
def test_shard_indices_cover_every_item_once_in_the_stride_pattern(num_items, num_processes):
    shards = [shard_indices(num_items, p, num_processes) for p in range(num_processes)]
    for p, shard in enumerate(shards):
        assert shard == [p + k * num_processes for k in range(len(shard))]  # p, p + P, p + 2P, ...
        assert all(0 <= i < num_items for i in shard)
    assert sorted(i for shard in shards for i in shard) == list(range(num_items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced


def test_shard_indices_refuses_a_process_outside_the_group():
    for process_index, num_processes in [(2, 2), (-1, 2), (0, 0)]:
        with pytest.raises(ValueError, match="process_index"):
            shard_indices(10, process_index, num_processes)


def test_sample_generator_is_the_seed_sequence_convention_deterministic_per_key():
    for key in [(0,), (3, 7), (5, TRAINING_TAG, 11)]:
        a, b = torch.rand(8, generator=sample_generator(*key)), torch.rand(8, generator=sample_generator(*key))
        assert torch.equal(a, b)
        state = int(np.random.SeedSequence(list(key)).generate_state(1)[0])  # the key -> 32-bit seed convention
        assert torch.equal(a, torch.rand(8, generator=torch.Generator().manual_seed(state)))
    keys = [(0, 1, 0), (0, 1, 1), (0, 2, 0), (1, 1, 0), (0, 1, 2), (0, 5, 3)]
    draws = [torch.rand(4, generator=sample_generator(*k)) for k in keys]
    assert len({tuple(d.tolist()) for d in draws}) == len(keys)  # nearby keys: unrelated generators
    with pytest.raises(ValueError, match="key"):
        sample_generator()


def test_image_generators_are_seeded_with_seed_plus_index():
    generators = image_generators(10, [0, 3, 7])
    for generator, i in zip(generators, [0, 3, 7]):
        assert torch.equal(torch.randn(3, generator=generator),
                           torch.randn(3, generator=torch.Generator().manual_seed(10 + i)))


def test_training_draws_of_a_batch_split_over_processes_equal_one_process():
    shape, seed, prob, global_batch = (2, 4, 4), 5, 0.3, 6
    for samples_seen in (0, 4):  # a later step: each process has seen samples_seen * 6 / P samples of its own
        one = training_draws(seed, stream_positions(samples_seen * global_batch, global_batch), shape, prob)
        assert one.noise.shape == (global_batch, *shape) and one.fractions.dtype == torch.float64
        assert not torch.equal(one.noise[0], one.noise[1])  # each sample has its own draws
        for num_processes in (1, 2, 3):
            local = global_batch // num_processes
            parts = [training_draws(seed, stream_positions(samples_seen * local, local, p, num_processes), shape, prob)
                     for p in range(num_processes)]
            # process p's k-th sample is global position k * P + p: interleave the parts back
            order = [(k % num_processes, k // num_processes) for k in range(global_batch)]
            for name in ("flip", "drop_label", "fractions", "vae_noise", "noise"):
                merged = torch.stack([getattr(parts[p], name)[k] for p, k in order])
                assert torch.equal(merged, getattr(one, name)), (name, num_processes)
    assert not torch.equal(training_draws(seed + 1, [0], shape, prob).noise, one.noise[:1])


def test_training_draws_do_not_depend_on_the_batch_they_come_in():
    shape = (1, 2, 2)
    whole = training_draws(0, list(range(8)), shape, 0.5)
    pieces = [training_draws(0, list(range(a, b)), shape, 0.5) for a, b in [(0, 3), (3, 4), (4, 8)]]
    assert torch.equal(torch.cat([p.noise for p in pieces]), whole.noise)
    assert torch.equal(torch.cat([p.fractions for p in pieces]), whole.fractions)


@pytest.mark.parametrize("sizes", [[5, 2, 8, 1], [1, 1, 1, 1, 1, 1, 1], [16], [3, 0, 4, 9]])
@pytest.mark.parametrize("num_processes", [1, 2, 3, 4])
def test_shard_batches_interleave_back_to_the_global_stream(sizes, num_processes):
    bounds = np.cumsum([0, *sizes]).tolist()
    total = bounds[-1]
    batches = [(torch.arange(a, b), -torch.arange(a, b)) for a, b in zip(bounds, bounds[1:])]
    shards = []
    for p in range(num_processes):
        pieces = list(shard_batches(batches, p, num_processes))
        assert all(len(x) > 0 for x, _ in pieces)  # no empty batches
        x = torch.cat([x for x, _ in pieces]) if pieces else torch.empty(0, dtype=torch.long)
        y = torch.cat([y for _, y in pieces]) if pieces else torch.empty(0, dtype=torch.long)
        assert torch.equal(y, -x)  # labels stay with their latents
        assert x.tolist() == shard_indices(total, p, num_processes)
        shards.append(x.tolist())
    interleaved = [shards[i % num_processes][i // num_processes] for i in range(total)]
    assert interleaved == list(range(total))
