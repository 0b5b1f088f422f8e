"""The `learned` ranking: exact targets, determinism, an untouched model, a planted choice, SiT, several processes,
and the script and command line with it."""

import copy
import json
import os
import threading

import pytest
import torch
from conftest import make_scheduler, make_tiny_dit
from test_cli import source_pipeline  # noqa: F401  (fixture)

from diffusers_entprune.importance import (
    RANKING_METHODS,
    TARGET_AWARE_METHODS,
    LearnedRankingOptions,
    learned_scores,
    score_blocks,
)
from diffusers_entprune.importance.learned import allocate_keeps, split_into_groups
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.objectives import DiffusionObjective, FlowObjective, NoisedBatch

FEW = LearnedRankingOptions(num_steps=3, batch_size=8)


def tiny(num_layers=6):
    return EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=num_layers)).eval()


def diffusion():
    return DiffusionObjective.from_scheduler(make_scheduler())


def data(n=32, batch_size=16, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(n, 4, 8, 8, generator=g)
    labels = torch.randint(0, 4, (n,), generator=g) if labels is None else torch.full((n,), labels)
    return [(latents[i: i + batch_size], labels[i: i + batch_size]) for i in range(0, n, batch_size)]


def check_exact(result, num_to_prune):
    dropped = sorted(result.ranking[:num_to_prune])
    assert dropped == result.pruned_block_indices and len(dropped) == num_to_prune
    # every group keeps its allocation, and the kept blocks (1 + p) all rank above the dropped ones (p < 1)
    scores = dict(zip(result.block_indices, result.scores))
    for group, keep in zip(result.groups, result.keep_per_group):
        assert sum(scores[i] >= 1.0 for i in group) == keep
    assert all(0.0 <= s < 1.0 for i, s in scores.items() if i in dropped)
    assert all(1.0 <= s < 2.0 for i, s in scores.items() if i not in dropped)


@pytest.mark.parametrize("num_blocks, group_size, keeps", [
    (12, 4, {6: [2, 2, 2], 9: [1, 1, 1], 7: [2, 1, 2], 5: [2, 3, 2]}),
    (28, 4, {14: [2] * 7, 18: [1, 2, 1, 2, 1, 2, 1]}),
    (10, 4, {3: [3, 2, 2], 5: [2, 2, 1]}),
    (6, 4, {3: [2, 1], 5: [1, 0]}),
])
def test_allocation_meets_the_target_and_spreads_the_remainders(num_blocks, group_size, keeps):
    sizes = split_into_groups(num_blocks, group_size)
    assert sum(sizes) == num_blocks and max(sizes) - min(sizes) <= 1 and max(sizes) <= group_size
    for num_to_prune, expected in keeps.items():
        assert allocate_keeps(sizes, num_blocks - num_to_prune) == expected


def test_allocation_is_exact_and_within_the_groups_for_every_count():
    for num_blocks in range(1, 33):
        for group_size in range(1, 7):
            sizes = split_into_groups(num_blocks, group_size)
            for keep in range(num_blocks + 1):
                keeps = allocate_keeps(sizes, keep)
                assert sum(keeps) == keep and all(0 <= k <= s for k, s in zip(keeps, sizes))


@pytest.mark.parametrize("num_blocks, num_to_prune, group_size", [(6, 3, 4), (6, 5, 4), (8, 4, 4), (10, 3, 4),
                                                                  (10, 7, 3), (7, 2, 7)])
def test_learned_meets_the_target_exactly(num_blocks, num_to_prune, group_size):
    options = LearnedRankingOptions(num_steps=2, batch_size=4, group_size=group_size)
    result = learned_scores(tiny(num_blocks), diffusion(), data(), 32, num_to_prune, options=options)
    check_exact(result, num_to_prune)
    assert result.method == "learned" and result.keep_per_group == allocate_keeps(
        split_into_groups(num_blocks, group_size), num_blocks - num_to_prune)
    report = result.to_dict()
    assert report["options"]["num_steps"] == 2 and report["seconds"] > 0
    assert set(report["loss_curve"]) == {"first", "last", "every_tenth", "final_mask_sampled"}
    assert len(report["mask_probabilities"]) == len(report["groups"])


def test_same_seed_same_result_another_seed_other_draws():
    model = tiny()
    a = learned_scores(model, diffusion(), data(), 32, 3, seed=5, options=FEW)
    b = learned_scores(model, diffusion(), data(), 32, 3, seed=5, options=FEW)
    c = learned_scores(model, diffusion(), data(), 32, 3, seed=6, options=FEW)
    assert a.scores == b.scores and a.loss_curve == b.loss_curve
    assert a.scores != c.scores


def assert_unchanged(model, before_state, before_flags, before_modules):
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert set(before_state) == set(model.state_dict())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before_flags
    assert [(n, type(m)) for n, m in model.named_modules()] == before_modules
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("with_peft_lora", [False, True])
def test_the_model_comes_back_unchanged(with_peft_lora):
    model = tiny()
    if with_peft_lora:  # as in the script with --use_lora: adapters of its own, base weights frozen
        from diffusers_entprune.lora import add_lora

        add_lora(model, rank=4)
        with torch.no_grad():  # non-zero adapters, so the model with them differs from the model without
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [(n, type(m)) for n, m in model.named_modules()]
    with torch.no_grad():  # the ranking trains whatever the caller's grad mode
        result = learned_scores(model, diffusion(), data(), 32, 3, options=FEW)
    check_exact(result, 3)
    assert model.training and torch.is_grad_enabled()
    assert_unchanged(model, state, flags, modules)


class MatchTheFullModel:
    """A loss that the unpruned model meets exactly (its own outputs are the targets): removing a block that does
    something costs, removing an identity block costs nothing."""

    def __init__(self, teacher):
        self.teacher, self.base = teacher, diffusion()

    def timesteps_from_fraction(self, fractions):
        return self.base.timesteps_from_fraction(fractions)

    def add_noise(self, x0, noise, timesteps):
        noised = self.base.add_noise(x0, noise, timesteps)
        with torch.no_grad():  # labels are all 0 in this test's data
            target = self.teacher(noised.noisy, timesteps, torch.zeros(len(x0), dtype=torch.long)).sample
        return NoisedBatch(noised.noisy, timesteps, target)

    def loss(self, output, x0, batch):
        return ((output - batch.target) ** 2).mean(dim=(1, 2, 3))


@pytest.mark.parametrize("use_lora", [True, False])
def test_identity_blocks_are_the_ones_dropped(use_lora):
    model = tiny(8)
    identities = [1, 3, 5, 6]  # two in each group of 4
    with torch.no_grad():  # zero adaLN modulation: zero gates, the block returns its input
        for i in identities:
            model.transformer_blocks[i].norm1.linear.weight.zero_()
            model.transformer_blocks[i].norm1.linear.bias.zero_()
    objective = MatchTheFullModel(copy.deepcopy(model))
    options = LearnedRankingOptions(num_steps=10, batch_size=8, use_lora=use_lora)
    for seed in (0, 1):
        result = learned_scores(model, objective, data(64, labels=0), 64, 4, seed=seed, options=options)
        assert result.pruned_block_indices == identities and result.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert sorted(result.ranking[:4]) == identities


def test_sit_flow_objective():
    model = tiny()
    result = learned_scores(model, FlowObjective(learn_sigma=True), data(), 32, 2, options=FEW)
    check_exact(result, 2)
    assert result.loss_curve["first"] > 0


def test_score_blocks_dispatches_and_needs_the_target():
    assert "learned" in RANKING_METHODS and "learned" in TARGET_AWARE_METHODS
    with pytest.raises(ValueError, match="num_to_prune"):
        score_blocks("learned", tiny(), diffusion(), data(), 32)
    result = score_blocks("learned", tiny(), diffusion(), data(), 32, num_to_prune=4, learned_options=FEW)
    check_exact(result, 4)


def test_bad_options_and_arguments_are_refused_by_name():
    for bad in (dict(group_size=0), dict(num_steps=0), dict(batch_size=-1), dict(lora_rank=0), dict(num_steps=2.5),
                dict(gate_learning_rate=0.0), dict(lora_learning_rate=float("nan")), dict(tau_end=-1.0),
                dict(tau_schedule="cosine")):
        with pytest.raises(ValueError, match=f"`{next(iter(bad))}`"):
            LearnedRankingOptions(**bad)
    for num_to_prune in (-1, 6):
        with pytest.raises(ValueError, match="num_to_prune"):
            learned_scores(tiny(), diffusion(), data(), 32, num_to_prune, options=FEW)
    with pytest.raises(ValueError, match="group_size.*masks"):  # C(16, 8) = 12870 masks in one group
        learned_scores(tiny(16), diffusion(), data(), 32, 8, options=LearnedRankingOptions(group_size=16))
    with pytest.raises(ValueError, match="ran out"):
        learned_scores(tiny(), diffusion(), data(16), 32, 3, options=FEW)
    with pytest.raises(ValueError, match="reduce"):
        learned_scores(tiny(), diffusion(), data(), 32, 3, options=FEW, num_processes=2)
    model = tiny()
    model.skip_blocks([1])
    with pytest.raises(ValueError, match="skipped"):
        learned_scores(model, diffusion(), data(), 32, 3, options=FEW)


def test_gradient_checkpointing_gives_the_same_result():
    plain = learned_scores(tiny(), diffusion(), data(), 32, 3, options=FEW)
    model = tiny()
    model.enable_gradient_checkpointing()
    assert learned_scores(model, diffusion(), data(), 32, 3, options=FEW).scores == pytest.approx(plain.scores)


def test_nothing_to_prune_trains_nothing():
    result = learned_scores(tiny(), diffusion(), data(), 32, 0, options=FEW)
    assert all(s >= 1.0 for s in result.scores) and result.loss_curve == {}


def test_two_processes_decide_like_one():
    """Two processes (threads here, summing through a barrier) hold the same logits at every step and end with one
    decision, the one a single process makes on the same samples."""
    from diffusers_entprune.randomness import shard_batches

    model = tiny()
    options = LearnedRankingOptions(num_steps=4, batch_size=8)
    one = learned_scores(model, diffusion(), data(), 32, 3, seed=2, options=options)
    barrier, slots, results = threading.Barrier(2), [None, None], [None, None]

    def run(rank):
        def reduce(tensor):
            slots[rank] = tensor.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before the next step overwrites the slots
            return total

        replica = copy.deepcopy(model)  # each process holds its own copy
        results[rank] = learned_scores(replica, diffusion(), shard_batches(data(), rank, 2), 32, 3, seed=2,
                                       options=options, reduce=reduce, process_index=rank, num_processes=2)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0].scores == results[1].scores  # bit for bit: one set of logits
    assert results[0].ranking == one.ranking
    assert results[0].scores == pytest.approx(one.scores, rel=1e-4, abs=1e-6)


# ---------------------------------------------------------------------------------------------- script and CLI


@pytest.mark.parametrize("extra", [[], ["--use_lora"], ["--use_lora", "--learned_lora_rank", "0"]])
def test_script_prunes_the_learned_set(tmp_path, source_pipeline, extra):  # noqa: F811
    from test_prune_dit_script import run_prune_script, tiny_args

    out = tmp_path / "out"
    run_prune_script(tiny_args(source_pipeline, out, "--pruning_mode", "one_shot", "--ranking", "learned",
                             "--learned_steps", "3", "--learned_batch_size", "8", "--validation_steps", "0",
                             "--speed_batch_size", "0", *extra))
    report = json.load(open(out / "entprune_report.json"))
    scores = {int(k): v for k, v in report["stages"][0]["ced_scores"].items()}
    assert report["ranking"] == "learned" and len(report["kept_block_indices"]) == 3
    assert report["stages"][0]["pruned_blocks"] == sorted(i for i, s in scores.items() if s < 1.0)
    assert report["pruning_config"]["learned_steps"] == 3 and report["pruning_config"]["learned_group_size"] == 4


def test_script_refuses_learned_flags_without_the_learned_ranking(tmp_path, source_pipeline):  # noqa: F811
    from test_prune_dit_script import run_prune_script, tiny_args

    for extra in (["--ranking", "ced", "--learned_steps", "5"], ["--ranking", "learned", "--learned_steps", "0"],
                  ["--ranking", "learned", "--learned_lora_rank", "-1"]):
        with pytest.raises(SystemExit):
            run_prune_script(tiny_args(source_pipeline, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_score_command_with_learned(tmp_path, source_pipeline):  # noqa: F811
    from diffusers_entprune.cli import main
    from diffusers_entprune.embedded import DIGITS_DIR

    out = tmp_path / "scores"
    common = ["score", "--pretrained_model_name_or_path", source_pipeline, "--method", "learned", "--num_samples",
              "32", "--batch_size", "16", "--train_data_dir", os.path.join(DIGITS_DIR, "downstream")]
    assert main([*common, "--num_prune", "2", "--learned_steps", "2", "--learned_group_size", "3",
                 "--output_dir", str(out)]) == 0
    scores = json.load(open(out / "scores.json"))
    assert scores["method"] == "learned" and scores["groups"] == [[0, 1, 2], [3, 4, 5]]
    assert scores["options"]["num_steps"] == 2 and scores["options"]["group_size"] == 3
    assert sum(s < 1.0 for s in scores["scores"]) == 2
    for bad in (["--learned_steps", "2"], ["--num_prune", "2", "--learned_group_size", "0"]):
        with pytest.raises(SystemExit):
            main([*common, *bad, "--output_dir", str(tmp_path / "bad")])
    with pytest.raises(SystemExit):  # the flags belong to the learned ranking
        main([*common[:4], "ced", *common[5:], "--learned_steps", "2", "--output_dir", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_two_gloo_processes_decide_like_one(tmp_path, source_pipeline):  # noqa: F811
    from test_multiprocess import score_in_one_and_two_processes

    from diffusers_entprune.embedded import DIGITS_DIR

    common = ["score", "--pretrained_model_name_or_path", source_pipeline, "--method", "learned", "--num_prune", "3",
              "--learned_steps", "3", "--num_samples", "40", "--batch_size", "12",
              "--train_data_dir", os.path.join(DIGITS_DIR, "downstream")]
    one, two = score_in_one_and_two_processes(tmp_path, common)
    assert two["num_processes"] == 2 and two["ranking"] == one["ranking"]
    assert two["scores"] == pytest.approx(one["scores"], rel=1e-5)
