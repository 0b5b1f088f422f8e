"""Property-based tests (hypothesis) of the pure parts: CED statistics, rankings, and the pruning budget.

- CED sums statistics per (variant, timestep bucket, class, feature), so shards of the samples, in any split and
  any order, add up to one pass (exactly, for integer-valued predictions; to rounding for a real model's);
- a ranking is a permutation of the scored blocks, by score ascending (CED: by magnitude), ties by block index;
- the controller's arithmetic (`resolve_target`, `candidate_amounts`, `fixed_amount`, `decision_steps`,
  `combine_proxies`) keeps its promises, and `AdaptivePruningController` meets the target exactly by its last stage
  whatever the CED scores and proxy values.
"""

import math

import pytest
import torch
from conftest import make_scheduler, make_tiny_dit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_entprune.controller import (
    PRUNING_MODES,
    AdaptivePruningController,
    candidate_amounts,
    combine_proxies,
    decision_steps,
    fixed_amount,
    resolve_target,
)
from diffusers_entprune.importance import (
    CEDResult,
    GaussianEntropyAccumulator,
    ImportanceResult,
    compute_ced,
    score_blocks,
)
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.objectives import DiffusionObjective

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODEL_SLOW = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------- CED statistics


@st.composite
def accumulator_problems(draw):
    variance = draw(st.sampled_from(["scalar", "channel", "diag"]))
    variants, buckets, classes = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    n = draw(st.integers(1, 12))
    size = n * math.prod(shape)
    # integer values: float64 sums are exact in any order, so shards must agree bit for bit
    values = draw(st.lists(st.integers(-8, 8), min_size=size, max_size=size))
    samples = [(draw(st.integers(0, variants - 1)), draw(st.integers(0, classes - 1)),
                draw(st.integers(0, buckets - 1))) for _ in range(n)]  # (variant, class, timestep bucket)
    predictions = torch.tensor(values, dtype=torch.float32).reshape(n, *shape)
    return variance, variants, buckets, classes, shape, predictions, samples


def accumulate(problem, indices):
    variance, variants, buckets, classes, shape, predictions, samples = problem
    acc = GaussianEntropyAccumulator(variants, buckets, classes, shape, variance)
    for i in indices:  # one sample per update: the order is the shard's own
        variant, label, bucket = samples[i]
        acc.update(variant, predictions[i: i + 1], torch.tensor([label]), torch.tensor([bucket]))
    return acc


@FAST
@given(problem=accumulator_problems(), data=st.data())
def test_shards_in_any_split_and_order_sum_to_one_pass(problem, data):
    n = len(problem[-1])
    whole = accumulate(problem, range(n))
    num_shards = data.draw(st.integers(1, 4), label="shards")
    owner = data.draw(st.lists(st.integers(0, num_shards - 1), min_size=n, max_size=n), label="owner")
    shards = []
    for shard in range(num_shards):
        mine = data.draw(st.permutations([i for i in range(n) if owner[i] == shard]), label="order")
        shards.append(accumulate(problem, mine))
    shards = data.draw(st.permutations(shards), label="summation order")
    summed = [sum(tensors) for tensors in zip(*(s.state() for s in shards))]
    assert all(torch.equal(a, b) for a, b in zip(summed, whole.state()))
    merged = accumulate(problem, [])
    merged.load_state(summed)
    for a, b in zip(merged.conditional_entropy(), whole.conditional_entropy()):
        assert torch.equal(a, b)
    assert whole.count.sum().item() == n


@FAST
@given(problem=accumulator_problems(), data=st.data())
def test_batched_updates_equal_one_sample_at_a_time(problem, data):
    variance, variants, buckets, classes, shape, predictions, samples = problem
    one_by_one = accumulate(problem, range(len(samples)))
    batched = GaussianEntropyAccumulator(variants, buckets, classes, shape, variance)
    for variant in range(variants):
        rows = [i for i, s in enumerate(samples) if s[0] == variant]
        if rows:
            rows = data.draw(st.permutations(rows))
            batched.update(variant, predictions[rows], torch.tensor([samples[i][1] for i in rows]),
                           torch.tensor([samples[i][2] for i in rows]))
    assert all(torch.equal(a, b) for a, b in zip(batched.state(), one_by_one.state()))


@pytest.fixture(scope="module")
def small_model():
    return EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=3)).eval()


def ced_data(n, batch_size):
    g = torch.Generator().manual_seed(0)
    latents, labels = torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(latents[i: i + batch_size], labels[i: i + batch_size]) for i in range(0, n, batch_size)]


@MODEL_SLOW
@given(num_processes=st.integers(2, 3), batch_size=st.sampled_from([3, 7, 16]), data=st.data())
def test_compute_ced_shards_summed_in_any_order_equal_one_process(small_model, num_processes, batch_size, data):
    n, objective = 18, DiffusionObjective.from_scheduler(make_scheduler())
    whole = compute_ced(small_model, objective, ced_data(n, batch_size), n)
    states = {}
    for p in range(num_processes):  # process p sees samples p, p + P, ... of the global stream
        shard = [(x[p::num_processes], y[p::num_processes]) for x, y in ced_data(n, n)]

        def capture(t, p=p):
            states.setdefault(p, []).append(t)
            return t

        compute_ced(small_model, objective, shard, n, process_index=p, num_processes=num_processes, reduce=capture)
    order = data.draw(st.permutations(range(num_processes)))
    summed = [sum(states[p][k] for p in order) for k in range(3)]
    last = order[-1]
    shard = [(x[last::num_processes], y[last::num_processes]) for x, y in ced_data(n, n)]
    merged = compute_ced(small_model, objective, shard, n, process_index=last, num_processes=num_processes,
                         reduce=lambda t, it=iter(summed): next(it))
    assert merged.num_samples == n and merged.ranking == whole.ranking
    assert merged.scores == pytest.approx(whole.scores, rel=1e-5, abs=1e-9)  # float32 forwards per batch size


# ---------------------------------------------------------------------------------------------- rankings


@st.composite
def scored_blocks(draw):
    blocks = draw(st.lists(st.integers(0, 40), min_size=1, max_size=12, unique=True))
    # a few distinct values, so ties are common; signed for CED
    pool = draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=4))
    scores = [draw(st.sampled_from(pool)) for _ in blocks]
    return blocks, scores


def assert_ranked(ranking, blocks, importance):
    assert sorted(ranking) == sorted(blocks)  # a permutation of the scored blocks
    keys = [(importance[b], b) for b in ranking]
    assert keys == sorted(keys)  # by score ascending; ties by block index


@FAST
@given(scored=scored_blocks())
def test_ranking_is_a_permutation_by_score_then_index(scored):
    blocks, scores = scored
    result = ImportanceResult("magnitude", blocks, scores)
    assert_ranked(result.ranking, blocks, dict(zip(blocks, scores)))
    assert result.to_dict()["ranking"] == result.ranking


@FAST
@given(scored=scored_blocks())
def test_ced_ranking_uses_the_magnitude_of_signed_scores(scored):
    blocks, scores = scored
    result = CEDResult("ced", blocks, scores)
    assert_ranked(result.ranking, blocks, {b: abs(s) for b, s in zip(blocks, scores)})
    assert result.ranking == CEDResult("ced", blocks, [abs(s) for s in scores]).ranking


@FAST
@given(pruned=st.lists(st.integers(0, 5), max_size=5, unique=True), method=st.sampled_from(["random", "magnitude"]),
       seed=st.integers(0, 2**32 - 1))
def test_score_blocks_ranks_exactly_the_blocks_that_remain(pruned, method, seed):
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit())
    model.prune_blocks(pruned)
    result = score_blocks(method, model, None, [], 2, seed=seed)
    assert result.block_indices == model.kept_block_indices
    assert_ranked(result.ranking, model.kept_block_indices, dict(zip(result.block_indices, result.scores)))


# ---------------------------------------------------------------------------------------------- the budget


@FAST
@given(num_layers=st.integers(2, 48), ratio=st.floats(0.001, 0.999))
def test_a_ratio_removes_the_nearest_whole_number_of_blocks_or_is_refused(num_layers, ratio):
    count = round(ratio * num_layers)
    if 1 <= count <= num_layers - 1:
        assert resolve_target(num_layers, target_prune_ratio=ratio) == count
    else:
        with pytest.raises(ValueError, match="target_prune_ratio"):
            resolve_target(num_layers, target_prune_ratio=ratio)


@FAST
@given(num_layers=st.integers(2, 48), per_block=st.integers(1, 10**7), outside=st.integers(0, 10**8),
       target=st.integers(1, 10**9))
def test_a_parameter_budget_removes_the_fewest_blocks_that_fit(num_layers, per_block, outside, target):
    def size(removed):
        return outside + (num_layers - removed) * per_block

    fits = [m for m in range(1, num_layers) if size(m) <= target]
    if fits and size(0) > target:
        count = resolve_target(num_layers, target_num_params=target, params_per_block=per_block,
                               params_outside_blocks=outside)
        assert count == fits[0] and size(count) <= target < size(count - 1)
    else:  # already within budget, or even one block is too many
        with pytest.raises(ValueError, match="target_num_params"):
            resolve_target(num_layers, target_num_params=target, params_per_block=per_block,
                           params_outside_blocks=outside)


@FAST
@given(remaining=st.integers(0, 64), stages_left=st.integers(1, 12))
def test_candidates_include_not_now_and_never_exceed_what_is_left(remaining, stages_left):
    amounts = candidate_amounts(remaining, stages_left)
    assert amounts == sorted(set(amounts)) and all(0 <= m <= remaining for m in amounts)
    if stages_left == 1 or remaining == 0:
        assert amounts == [remaining]  # the last stage takes everything that is left
    else:
        assert 0 in amounts and math.ceil(remaining / stages_left) in amounts
        assert max(amounts) == min(2 * math.ceil(remaining / stages_left), remaining)


@FAST
@given(total=st.integers(0, 64), stages=st.integers(1, 12))
def test_fixed_amounts_land_exactly_on_the_target(total, stages):
    remaining, amounts = total, []
    for stage in range(stages):
        amounts.append(fixed_amount(remaining, stages - stage))
        remaining -= amounts[-1]
        assert remaining >= 0
    assert sum(amounts) == total and remaining == 0
    assert amounts == sorted(amounts, reverse=True) and max(amounts) - min(amounts) <= 1  # as even as possible


@FAST
@given(stages=st.integers(1, 20), steps=st.integers(1, 10**6), mode=st.sampled_from(PRUNING_MODES))
def test_decision_steps_are_spread_over_the_pruning_window(stages, steps, mode):
    if mode == "one_shot":
        assert decision_steps(stages, steps, mode) == [0]
    elif steps < stages:
        with pytest.raises(ValueError, match="pruning_steps"):
            decision_steps(stages, steps, mode)
    else:
        found = decision_steps(stages, steps, mode)
        assert len(found) == stages and found[0] == 0 and found[-1] < steps
        boundaries = found + [steps]
        gaps = [b - a for a, b in zip(boundaries, boundaries[1:])]  # training steps of each stage
        assert all(steps // stages <= gap <= math.ceil(steps / stages) for gap in gaps)


ntk_values = st.one_of(st.floats(1.0, 1e15), st.just(math.inf))
zico_values = st.one_of(st.floats(-1e6, 1e6), st.just(-math.inf))


@FAST
@given(proxies=st.lists(st.tuples(ntk_values, zico_values), min_size=1, max_size=6), data=st.data())
def test_combined_proxies_are_bounded_monotone_and_order_free(proxies, data):
    ntk, zico = [p[0] for p in proxies], [p[1] for p in proxies]
    combined = combine_proxies(ntk, zico)
    assert len(combined) == len(proxies) and all(0.0 <= c <= 1.0 for c in combined)
    for i, j in ((i, j) for i in range(len(proxies)) for j in range(len(proxies))):
        if ntk[i] <= ntk[j] and zico[i] >= zico[j]:  # i is at least as good on both proxies
            assert combined[i] >= combined[j] - 1e-12
    order = data.draw(st.permutations(range(len(proxies))))
    shuffled = combine_proxies([ntk[k] for k in order], [zico[k] for k in order])
    assert shuffled == pytest.approx([combined[k] for k in order], abs=1e-12)


@st.composite
def schedules(draw):
    num_layers = draw(st.integers(2, 16))
    num_to_prune = draw(st.integers(0, num_layers - 1))
    mode = draw(st.sampled_from(PRUNING_MODES))
    stages = draw(st.integers(1, 6))
    pruning_steps = draw(st.integers(stages, 40))
    return num_layers, num_to_prune, mode, stages, pruning_steps, draw(st.booleans())


@FAST
@given(schedule=schedules(), data=st.data())
def test_the_controller_meets_the_target_exactly_whatever_the_proxies_say(schedule, data):
    num_layers, num_to_prune, mode, stages, pruning_steps, rank_once = schedule
    steps = decision_steps(stages, pruning_steps, mode)
    controller = AdaptivePruningController(num_layers, num_to_prune, steps, mode, rank_once=rank_once)

    def proxy_fn(candidates):
        return [data.draw(st.tuples(ntk_values, zico_values), label="proxies") for _ in candidates]

    for step in steps:
        present = [i for i in range(num_layers) if i not in controller.pruned_blocks]
        scores = None
        if controller.needs_ced():
            values = data.draw(st.lists(st.floats(0, 10), min_size=len(present), max_size=len(present)), label="ced")
            scores = dict(zip(present, values))
        remaining, stages_left = controller.remaining_to_prune, len(steps) - len(controller.decisions)
        decision = controller.decide(step, scores, proxy_fn)
        assert len(decision.pruned_blocks) <= remaining
        assert len(decision.pruned_blocks) in ([remaining] if mode == "one_shot" or stages_left == 1 else
                                               candidate_amounts(remaining, stages_left))
        assert decision.num_blocks_after == len(present) - len(decision.pruned_blocks)
        if decision.pruned_blocks:  # the lowest-ranked blocks among those present
            ranked = ImportanceResult("ced", sorted(decision.ced_scores),
                                      [decision.ced_scores[b] for b in sorted(decision.ced_scores)]).ranking
            assert sorted(decision.pruned_blocks) == sorted(ranked[: len(decision.pruned_blocks)])
    assert controller.finished
    pruned = controller.pruned_blocks
    assert len(pruned) == num_to_prune == len(set(pruned)) and all(0 <= b < num_layers for b in pruned)
    restored = AdaptivePruningController(num_layers, num_to_prune, steps, mode, rank_once=rank_once)
    restored.load_state_dict(controller.state_dict())
    assert restored.pruned_blocks == pruned and restored.finished
