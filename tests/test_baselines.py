import pytest
import torch
from test_ced import N, data, model, objective

from diffusers_entprune.importance import (
    block_influence_scores,
    loss_ablation_scores,
    magnitude_scores,
    random_scores,
    taylor_scores,
)


def with_identity_block_2_and_loud_block_4():
    m = model()
    with torch.no_grad():
        m.transformer_blocks[2].norm1.linear.weight.zero_()
        m.transformer_blocks[2].norm1.linear.bias.zero_()
        m.transformer_blocks[4].ff.net[2].weight.mul_(200.0)
    return m


def test_random_is_seeded_and_covers_every_block():
    a, b, c = random_scores(model(), seed=3), random_scores(model(), seed=3), random_scores(model(), seed=4)
    assert a.scores == b.scores != c.scores
    assert sorted(a.ranking) == list(range(6))


def test_magnitude_ranks_by_mean_absolute_weight_of_the_block_itself():
    m = model()
    with torch.no_grad():
        for p in m.transformer_blocks[1].attn1.parameters():
            p.mul_(0.01)
        for p in m.transformer_blocks[5].ff.parameters():
            p.mul_(10.0)
        m.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.mul_(1000.0)  # shared: ignored
    result = magnitude_scores(m)
    assert result.ranking[0] == 1 and result.ranking[-1] == 5


def test_loss_ablation_is_zero_for_an_identity_block_and_largest_for_a_loud_one():
    result = loss_ablation_scores(with_identity_block_2_and_loud_block_4(), objective(), data(), N)
    scores = dict(zip(result.block_indices, result.scores))
    assert scores[2] == 0.0
    assert max(scores, key=scores.get) == 4


def test_block_influence_is_zero_for_an_identity_block():
    result = block_influence_scores(with_identity_block_2_and_loud_block_4(), objective(), data(), N)
    scores = dict(zip(result.block_indices, result.scores))
    assert scores[2] == pytest.approx(0.0, abs=1e-12)
    assert all(s > 0 for i, s in scores.items() if i != 2)
    assert result.ranking[0] == 2


def test_taylor_matches_a_hand_computed_gradient_and_leaves_no_gradients_behind():
    m = model()
    result = taylor_scores(m, objective(), data(batch_size=N), N)
    assert all(p.grad is None for p in m.parameters())
    # the same quantity by hand for block 3, in one batch
    from diffusers_entprune.importance.baselines import _loss, own_parameters
    from diffusers_entprune.importance.draws import fixed_draws

    draw = next(fixed_draws(m, objective(), data(batch_size=N), N))
    _loss(m, objective(), draw).backward()
    expected = sum((p * p.grad / N).abs().sum().item() for p in own_parameters(m.transformer_blocks[3]))
    assert result.scores[3] == pytest.approx(expected, rel=1e-5)


def test_taylor_is_zero_for_a_block_without_parameters_that_matter():
    m = model()
    with torch.no_grad():
        for p in (m.transformer_blocks[1].norm1.linear.weight, m.transformer_blocks[1].norm1.linear.bias):
            p.zero_()
    result = taylor_scores(m, objective(), data(), N)
    # zero gates: attention and MLP weights get no gradient, the zeroed modulation has w = 0
    assert result.scores[1] == 0.0 and all(s > 0 for k, s in enumerate(result.scores) if k != 1)


def test_metrics_refuse_a_model_with_skipped_blocks():
    from diffusers_entprune.importance import compute_ced

    m = model()
    m.skip_blocks([2])
    for metric in (compute_ced, loss_ablation_scores, block_influence_scores, taylor_scores):
        with pytest.raises(ValueError, match="skipped"):
            metric(m, objective(), data(), N)


@pytest.mark.parametrize("num_layers, num_to_prune, dropped", [
    (12, 6, [1, 3, 5, 7, 9, 11]),  # every other block, block 0 kept (TinyFusion's oracle at 50%)
    (12, 9, [1, 2, 3, 5, 6, 7, 9, 10, 11]),  # keeps 0, 4, 8
    (12, 3, [2, 6, 10]),
    (28, 14, list(range(1, 28, 2))),
])
def test_uniform_keeps_evenly_spaced_blocks_and_meets_the_target(num_layers, num_to_prune, dropped):
    from conftest import make_tiny_dit

    from diffusers_entprune.importance import score_blocks
    from diffusers_entprune.models import EntPrunedTransformer2DModel

    tiny = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers))
    result = score_blocks("uniform", tiny, None, [], 2, num_to_prune=num_to_prune)
    assert sorted(result.ranking[:num_to_prune]) == dropped
    with pytest.raises(ValueError, match="num_to_prune"):
        score_blocks("uniform", tiny, None, [], 2)  # a target-aware ranking needs the target
