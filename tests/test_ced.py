import pytest
import torch
from conftest import make_scheduler, make_tiny_dit

from diffusers_entprune.importance import CEDOptions, GaussianEntropyAccumulator, compute_ced
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.objectives import DiffusionObjective

N = 96


def data(batch_size=16, n=N, seed=0, num_classes=4):
    g = torch.Generator().manual_seed(seed)
    latents, labels = torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    return [(latents[i : i + batch_size], labels[i : i + batch_size]) for i in range(0, n, batch_size)]


def model():
    return EntPrunedTransformer2DModel.from_transformer(make_tiny_dit()).eval()


def objective():
    return DiffusionObjective.from_scheduler(make_scheduler())


def relative(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("variance", ["scalar", "channel", "diag"])
def test_prefix_cached_equals_naive(variance):
    options = CEDOptions(variance=variance, num_timestep_buckets=3)
    cached = compute_ced(model(), objective(), data(), N, options, prefix_cache=True)
    naive = compute_ced(model(), objective(), data(), N, options, prefix_cache=False)
    assert relative(cached.scores, naive.scores) < 1e-6
    assert relative(cached.bucket_scores, naive.bucket_scores) < 1e-6
    assert cached.ranking == naive.ranking


def test_prefix_cache_halves_block_calls():
    calls = {"n": 0}

    def count(*args):
        calls["n"] += 1

    counts = {}
    for cached in (True, False):
        m = model()
        for block in m.transformer_blocks:
            block.register_forward_hook(count)
        calls["n"] = 0
        compute_ced(m, objective(), data(batch_size=N), N, prefix_cache=cached)
        counts[cached] = calls["n"]
    # 6 blocks: naive runs 6 (full) + 6 * 5 (each skip) = 36; cached runs 6 + (5 + 4 + ... + 0) = 21
    assert counts == {False: 36, True: 21}


def test_identity_block_scores_zero_and_an_exploding_block_scores_highest():
    m = model()
    with torch.no_grad():
        m.transformer_blocks[2].norm1.linear.weight.zero_()
        m.transformer_blocks[2].norm1.linear.bias.zero_()  # all gates 0: the block is the identity already
        m.transformer_blocks[4].ff.net[2].weight.mul_(200.0)
    result = compute_ced(m, objective(), data(), N)
    scores = dict(zip(result.block_indices, result.scores))
    assert scores[2] == 0.0
    assert max(scores, key=scores.get) == 4
    assert result.ranking[0] == 2 and result.ranking[-1] == 4


def test_scores_do_not_depend_on_batch_size_and_repeat_exactly():
    a = compute_ced(model(), objective(), data(batch_size=8), N)
    b = compute_ced(model(), objective(), data(batch_size=48), N)
    again = compute_ced(model(), objective(), data(batch_size=8), N)
    assert relative(a.scores, b.scores) < 1e-5  # float32 kernels round differently per batch size
    assert a.scores == again.scores and a.bucket_scores == again.bucket_scores
    c = compute_ced(model(), objective(), data(batch_size=8), N, seed=1)
    assert c.scores != a.scores


def test_two_shards_summed_equal_one_process():
    whole = compute_ced(model(), objective(), data(), N)
    # process p sees samples p, p+2, ...: emulate both processes and sum their statistics
    shards = [[(x[p::2], y[p::2]) for x, y in data(batch_size=N)] for p in (0, 1)]
    partial = []

    def capture(t):
        partial.append(t)
        return t

    for p in (0, 1):
        compute_ced(model(), objective(), shards[p], N, process_index=p, num_processes=2, reduce=capture)
    summed = [partial[i] + partial[i + 3] for i in range(3)]
    emulated = compute_ced(model(), objective(), shards[1], N, process_index=1, num_processes=2,
                           reduce=lambda t, it=iter(summed): next(it))
    assert emulated.num_samples == N
    assert relative(emulated.scores, whole.scores) < 1e-9


def test_ranks_what_remains_of_a_pruned_model():
    m = model()
    m.prune_blocks([1, 3])
    result = compute_ced(m, objective(), data(), N)
    assert result.block_indices == [0, 2, 4, 5] and sorted(result.ranking) == [0, 2, 4, 5]
    assert len(result.bucket_scores) == 4 and len(result.bucket_scores[0]) == 4


def test_signed_scores_keep_the_direction_and_per_bucket_matrix_is_reported():
    unsigned = compute_ced(model(), objective(), data(), N)
    signed = compute_ced(model(), objective(), data(), N, CEDOptions(signed=True))
    assert [abs(s) for s in signed.scores] == pytest.approx(unsigned.scores, rel=1e-12)
    assert any(s < 0 for s in signed.scores) or any(s > 0 for s in signed.scores)
    assert signed.ranking == unsigned.ranking


def test_gaussian_entropy_matches_the_closed_form():
    torch.manual_seed(0)
    acc = GaussianEntropyAccumulator(1, 1, 2, (2, 1, 1), "channel")
    x = torch.randn(20000, 2, 1, 1) * torch.tensor([0.5, 2.0]).view(1, 2, 1, 1)
    classes = torch.zeros(20000, dtype=torch.long)
    acc.update(0, x, classes, torch.zeros_like(classes))
    aggregate, _ = acc.conditional_entropy()
    expected = sum(0.5 * torch.log(torch.tensor(2 * torch.pi * torch.e * s**2)).item() for s in (0.5, 2.0))
    assert aggregate.item() == pytest.approx(expected, abs=0.02)


def test_bad_options_and_inputs_are_refused():
    with pytest.raises(ValueError, match="variance"):
        CEDOptions(variance="full")
    with pytest.raises(ValueError, match="timestep_range"):
        CEDOptions(timestep_range=(0.5, 0.2))
    with pytest.raises(ValueError, match="num_samples"):
        compute_ced(model(), objective(), data(), 1)
    with pytest.raises(ValueError, match="ran out"):
        compute_ced(model(), objective(), data(n=32), 64)
    with pytest.raises(ValueError, match="do not fit the model"):
        compute_ced(model(), objective(), [(torch.randn(8, 4, 16, 16), torch.zeros(8, dtype=torch.long))], 8)
