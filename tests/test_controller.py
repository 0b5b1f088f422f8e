import math

import pytest

from diffusers_entprune.controller import (
    AdaptivePruningController,
    candidate_amounts,
    combine_proxies,
    decision_steps,
    resolve_target,
)


def ced_for(controller, values):
    """CED scores for the blocks still present, from a full per-block list."""
    pruned = set(controller.pruned_blocks)
    return {i: v for i, v in enumerate(values) if i not in pruned}


CED = [0.5, 0.1, 0.9, 0.05, 0.7, 0.2, 0.8, 0.3, 1.0, 0.6, 0.4, 0.95]  # block 3 least important, then 1, 5, 7, 10


def run(controller, proxy_fn, values=CED):
    for step in controller.steps:
        assert controller.is_decision_step(step)
        controller.decide(step, ced_for(controller, values), proxy_fn)
    return controller


def test_resolve_target_ratio_count_and_bad_input():
    assert resolve_target(28, target_prune_ratio=0.5) == 14
    assert resolve_target(12, target_num_blocks=3) == 3
    with pytest.raises(ValueError, match="target_prune_ratio"):
        resolve_target(12, target_prune_ratio=1.0)  # all blocks
    with pytest.raises(ValueError, match="removes no block"):
        resolve_target(12, target_prune_ratio=0.01)  # rounds to none
    with pytest.raises(ValueError, match="removes all 12 blocks"):
        resolve_target(12, target_num_blocks=12)
    with pytest.raises(ValueError, match="removes no block"):
        resolve_target(12, target_num_blocks=0)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_target(12)


def test_decision_steps_and_candidates():
    assert decision_steps(4, 400) == [0, 100, 200, 300]
    assert decision_steps(4, 400, mode="one_shot") == [0]
    with pytest.raises(ValueError, match="pruning_steps"):
        decision_steps(4, 3)
    assert candidate_amounts(6, 4) == [0, 2, 4]
    assert candidate_amounts(6, 1) == [6]  # the last stage takes what is left
    assert candidate_amounts(1, 3) == [0, 1]
    assert candidate_amounts(0, 2) == [0]


@pytest.mark.parametrize("preference", ["never", "always", "random"])
def test_target_met_exactly_whatever_the_proxies_say(preference):
    import random

    rng = random.Random(0)

    def proxy_fn(candidates):
        if preference == "never":  # the full candidate looks best on both proxies
            return [(1.0 + len(c), -len(c)) for c in candidates]
        if preference == "always":
            return [(1.0 / (1 + len(c)), len(c)) for c in candidates]
        return [(rng.uniform(1, 100), rng.uniform(-1, 1)) for _ in candidates]

    controller = run(AdaptivePruningController(12, 6, [0, 10, 20, 30]), proxy_fn)
    assert controller.finished and controller.remaining_to_prune == 0
    assert len(controller.pruned_blocks) == len(set(controller.pruned_blocks)) == 6
    if preference == "never":  # m = 0 chosen until the last stage, which must do everything
        assert [len(d.pruned_blocks) for d in controller.decisions] == [0, 0, 0, 6]
    if preference == "always":
        assert len(controller.decisions[0].pruned_blocks) == 4  # the largest candidate (2 x the even share)


def test_drops_the_lowest_ced_blocks_and_reranks_each_stage():
    def prefer_two(candidates):
        return [(1.0, -abs(len(c) - 2)) for c in candidates]

    controller = AdaptivePruningController(12, 4, [0, 10])
    controller.decide(0, ced_for(controller, CED), prefer_two)
    assert controller.decisions[0].pruned_blocks == [1, 3]  # of candidates [0, 2, 4], the lowest two
    new_values = list(CED)
    new_values[11] = 0.0  # after fine-tuning block 11 became the least important
    controller.decide(10, ced_for(controller, new_values), prefer_two)
    assert controller.decisions[1].pruned_blocks == [5, 11]


def test_rank_once_reuses_the_first_ranking():
    controller = AdaptivePruningController(12, 4, [0, 10], mode="fixed", rank_once=True)
    controller.decide(0, ced_for(controller, CED))
    assert not controller.needs_ced()
    controller.decide(10, None)
    assert controller.pruned_blocks == [1, 3, 5, 7]


def test_fixed_and_one_shot_modes():
    fixed = run(AdaptivePruningController(12, 6, [0, 10, 20, 30], mode="fixed"), None)
    assert [len(d.pruned_blocks) for d in fixed.decisions] == [2, 2, 1, 1]
    assert sorted(fixed.pruned_blocks) == [0, 1, 3, 5, 7, 10]  # the 6 lowest CED, ranked on fixed scores
    one = run(AdaptivePruningController(12, 6, [0], mode="one_shot"), None)
    assert [len(d.pruned_blocks) for d in one.decisions] == [6]


def test_decisions_are_deterministic_and_survive_a_state_round_trip():
    def proxy_fn(candidates):
        return [(10.0 ** (len(c) % 3), math.sin(len(c))) for c in candidates]

    a = run(AdaptivePruningController(12, 6, [0, 10, 20, 30]), proxy_fn)
    b = AdaptivePruningController(12, 6, [0, 10, 20, 30])
    b.decide(0, ced_for(b, CED), proxy_fn)
    resumed = AdaptivePruningController(12, 6, [0, 10, 20, 30])
    resumed.load_state_dict(b.state_dict())  # a resumed run continues from the saved decisions
    for step in [10, 20, 30]:
        resumed.decide(step, ced_for(resumed, CED), proxy_fn)
    assert resumed.state_dict() == a.state_dict()
    other = AdaptivePruningController(12, 5, [0, 10, 20, 30])
    with pytest.raises(ValueError, match="same pruning arguments"):
        other.load_state_dict(a.state_dict())


def test_combine_proxies_equal_weight_and_singular_ntk():
    # candidate 0: best NTK, worst ZiCo; candidate 1: the reverse -> a tie; candidate 2 singular NTK, mid ZiCo
    combined = combine_proxies([10.0, 1000.0, math.inf], [0.0, 2.0, 1.0])
    assert combined[0] == pytest.approx(0.5) and combined[1] == pytest.approx(0.5)
    assert combined[2] == pytest.approx(0.25)
    assert combine_proxies([5.0, 5.0], [1.0, 1.0]) == [0.5, 0.5]


def test_controller_refuses_wrong_scores_and_extra_decisions():
    controller = AdaptivePruningController(6, 2, [0], mode="one_shot")
    with pytest.raises(ValueError, match="blocks still present"):
        controller.decide(0, {0: 1.0, 1: 2.0})
    controller.decide(0, {i: float(i) for i in range(6)})
    assert controller.pruned_blocks == [0, 1]
    with pytest.raises(RuntimeError, match="already"):
        controller.decide(1, {i: float(i) for i in range(2, 6)})
    with pytest.raises(ValueError, match="proxy_fn"):
        AdaptivePruningController(6, 2, [0, 1]).decide(0, {i: float(i) for i in range(6)})


def test_stages_after_the_target_is_met_need_no_ranking():
    controller = AdaptivePruningController(12, 4, [0, 10, 20])

    def prefer_all(candidates):
        return [(1.0, len(c)) for c in candidates]

    controller.decide(0, ced_for(controller, CED), prefer_all)  # candidates [0, 2, 4]: all four at once
    assert controller.remaining_to_prune == 0 and not controller.needs_ced()
    decision = controller.decide(10, None)
    assert decision.pruned_blocks == [] and decision.ced_scores == {} and decision.num_blocks_after == 8
    controller.decide(20, None)
    assert controller.finished


def test_parameter_budget_maps_to_the_fewest_blocks_that_fit():
    # 1000 outside the blocks, 12 blocks of 100: 2200 in all
    def target(budget):
        return resolve_target(12, target_num_params=budget, params_per_block=100, params_outside_blocks=1000)

    assert target(2100) == 1 and target(2099) == 2 and target(1600) == 6 and target(1100) == 11
    with pytest.raises(ValueError, match="removes no block"):
        target(2200)
    with pytest.raises(ValueError, match="removes all 12 blocks"):
        target(1099)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_target(12, target_num_blocks=2, target_num_params=2000, params_per_block=100,
                       params_outside_blocks=1000)
