"""CED estimators beside the paper's (residual, kl, w2), the condition signal and the presets: closed forms on
synthetic predictions fed straight into the accumulator, and end-to-end runs on a tiny DiT."""

import math

import pytest
import torch
from conftest import make_scheduler, make_tiny_dit
from test_ced import N, data, model, objective, relative

from diffusers_entprune.importance import CEDOptions, CEDResult, GaussianEntropyAccumulator, compute_ced
from diffusers_entprune.importance.ced import CED_PRESETS, RESIDUAL_FLOOR
from diffusers_entprune.importance.draws import fixed_draws
from diffusers_entprune.objectives import FlowObjective

TWO_PI_E = 2 * math.pi * math.e
ESTIMATORS = ("entropy", "residual", "kl", "w2")


def two_variants(full, skipped, classes, variance="channel", buckets=None, num_buckets=None, num_classes=None):
    """An accumulator holding the full model's predictions (variant 0) and one skipped variant's (variant 1)."""
    buckets = torch.zeros_like(classes) if buckets is None else buckets
    num_buckets = num_buckets or int(buckets.max()) + 1
    num_classes = num_classes or int(classes.max()) + 1
    acc = GaussianEntropyAccumulator(2, num_buckets, num_classes, full.shape[1:], variance, cross=True)
    acc.update(0, full, classes, buckets, reference=full)
    acc.update(1, skipped, classes, buckets, reference=full)
    return acc


def class_moments(x, classes, c):
    """Population mean and variance per channel of class c (what the accumulator's Gaussians are)."""
    x = x[classes == c].double().transpose(0, 1).reshape(x.shape[1], -1)
    return x.mean(dim=1), x.var(dim=1, unbiased=False)


# ---------------------------------------------------------------------------------------------- closed forms


def test_residual_entropy_of_added_independent_noise_is_the_noise_entropy():
    torch.manual_seed(0)
    n, shape = 40000, (2, 2, 2)  # 4 elements per channel feature
    classes = torch.arange(n) % 2
    full = torch.randn(n, *shape, dtype=torch.float64) * 1.5 + classes.view(-1, 1, 1, 1)
    noise_std = torch.tensor([[0.3, 0.8], [0.5, 2.0]], dtype=torch.float64)  # [class][channel]
    skipped = 0.7 * full + torch.randn_like(full) * noise_std[classes].view(n, 2, 1, 1)
    aggregate, per_bucket = two_variants(full, skipped, classes).estimate("residual")
    # p(c) = 1/2; each channel's 4 elements share its variance
    expected = sum(0.5 * 4 * 0.5 * math.log(TWO_PI_E * s**2) for s in noise_std.flatten().tolist())
    assert aggregate[1].item() == pytest.approx(expected, abs=0.02)
    assert per_bucket[1, 0].item() == pytest.approx(aggregate[1].item(), rel=1e-12)  # one bucket


@pytest.mark.parametrize("variance", ["scalar", "channel", "diag"])
def test_a_pure_rescaling_sits_at_the_residual_floor_while_the_entropy_moves_by_n_log_a(variance):
    torch.manual_seed(0)
    n, shape, a = 4000, (2, 3, 3), 0.3
    classes = torch.arange(n) % 3
    full = torch.randn(n, *shape, dtype=torch.float64) * torch.tensor([1.0, 2.0], dtype=torch.float64).view(2, 1, 1)
    acc = two_variants(full, a * full, classes, variance)
    entropy, _ = acc.estimate("entropy")
    residual, _ = acc.estimate("residual")
    elements = math.prod(shape)
    assert (entropy[1] - entropy[0]).item() == pytest.approx(elements * math.log(a), rel=1e-9)
    # the floor: the skipped variance times RESIDUAL_FLOOR, i.e. H(Y_skip | C) + (n / 2) log(floor)
    floor = entropy[1].item() + 0.5 * elements * math.log(RESIDUAL_FLOOR)
    assert residual[1].item() == pytest.approx(floor, rel=1e-9)
    # any independent error, however small against the signal, scores above it
    noisy = two_variants(full, a * full + 1e-3 * torch.randn_like(full), classes, variance).estimate("residual")[0]
    assert noisy[1].item() > residual[1].item() + elements


def test_kl_and_w2_match_the_gaussian_formulas():
    torch.manual_seed(0)
    n, shape = 6000, (2, 2, 2)
    classes = torch.randint(0, 3, (n,))
    full = torch.randn(n, *shape, dtype=torch.float64) * 0.8 + 0.2
    skipped = torch.randn(n, *shape, dtype=torch.float64) * torch.tensor([1.5, 0.4], dtype=torch.float64).view(
        2, 1, 1) - 0.5
    acc = two_variants(full, skipped, classes)
    kl, w2 = acc.estimate("kl")[0], acc.estimate("w2")[0]
    expected_kl = expected_w2 = 0.0
    for c in range(3):
        p = (classes == c).double().mean().item()
        (m1, v1), (m2, v2) = class_moments(full, classes, c), class_moments(skipped, classes, c)
        expected_kl += p * 4 * (0.5 * (torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1)).sum().item()
        expected_w2 += p * 4 * ((m1 - m2) ** 2 + (v1.sqrt() - v2.sqrt()) ** 2).sum().item()
    assert kl[0].item() == 0.0 and w2[0].item() == 0.0  # the full model against itself
    assert kl[1].item() == pytest.approx(expected_kl, rel=1e-9)
    assert w2[1].item() == pytest.approx(expected_w2, rel=1e-9)
    # and the population values they estimate: per channel KL(N(0.2, 0.64) || N(-0.5, s^2)), W2 likewise
    population_kl = sum(4 * 0.5 * (math.log(s**2 / 0.64) + (0.64 + 0.49) / s**2 - 1) for s in (1.5, 0.4))
    population_w2 = sum(4 * (0.49 + (0.8 - s) ** 2) for s in (1.5, 0.4))
    assert kl[1].item() == pytest.approx(population_kl, rel=0.05)
    assert w2[1].item() == pytest.approx(population_w2, rel=0.05)


def test_a_mean_shift_is_invisible_to_the_entropy_but_not_to_kl_and_w2():
    torch.manual_seed(0)
    n, shape, shift = 3000, (2, 2, 2), 0.25
    classes = torch.arange(n) % 2
    full = torch.randn(n, *shape, dtype=torch.float64) * 2.0
    acc = two_variants(full, full + shift, classes)
    entropy, kl, w2 = acc.estimate("entropy")[0], acc.estimate("kl")[0], acc.estimate("w2")[0]
    elements = math.prod(shape)
    assert (entropy[1] - entropy[0]).abs().item() < 1e-9
    assert w2[1].item() == pytest.approx(elements * shift**2, rel=1e-9)
    expected_kl = sum(0.5 * (classes == c).double().mean().item() * 4 * shift**2 / class_moments(full, classes, c)[1]
                      for c in range(2)).sum().item()
    assert kl[1].item() == pytest.approx(expected_kl, rel=1e-9)


def test_per_bucket_estimates_are_those_of_each_bucket_alone():
    torch.manual_seed(0)
    n, shape = 2000, (2, 2, 2)
    classes, buckets = torch.arange(n) % 2, torch.arange(n) % 3
    full = torch.randn(n, *shape, dtype=torch.float64)
    skipped = (1 + buckets.view(-1, 1, 1, 1)) * full + torch.randn_like(full) * 0.5
    both = two_variants(full, skipped, classes, buckets=buckets)
    for estimator in ESTIMATORS:
        _, per_bucket = both.estimate(estimator)
        for b in range(3):
            alone = two_variants(full[buckets == b], skipped[buckets == b], classes[buckets == b])
            assert per_bucket[:, b].tolist() == pytest.approx(alone.estimate(estimator)[0].tolist(), rel=1e-9)


def test_accumulated_halves_summed_equal_one_pass_for_every_estimator():
    torch.manual_seed(0)
    n, shape = 1000, (2, 2, 2)
    classes, buckets = torch.arange(n) % 3, torch.arange(n) // 7 % 2
    full = torch.randn(n, *shape)
    skipped = 0.5 * full + 0.3 * torch.randn_like(full) + 0.1
    whole = two_variants(full, skipped, classes, buckets=buckets)
    halves = [two_variants(full[p::2], skipped[p::2], classes[p::2], buckets=buckets[p::2], num_buckets=2,
                           num_classes=3) for p in (0, 1)]
    merged = GaussianEntropyAccumulator(2, 2, 3, shape, "channel", cross=True)
    merged.load_state([a + b for a, b in zip(*(h.state() for h in halves))])
    assert len(merged.state()) == 4  # the cross moments travel with the other sums
    for estimator in ESTIMATORS:
        for got, want in zip(merged.estimate(estimator), whole.estimate(estimator)):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_the_residual_estimator_needs_the_cross_moments():
    acc = GaussianEntropyAccumulator(2, 1, 1, (1, 1, 1), "scalar")
    assert len(acc.state()) == 3  # the paper's estimator keeps its three sums
    with pytest.raises(ValueError, match="cross=True"):
        acc.estimate("residual")
    crossed = GaussianEntropyAccumulator(2, 1, 1, (1, 1, 1), "scalar", cross=True)
    with pytest.raises(ValueError, match="reference"):
        crossed.update(0, torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="tensors"):
        crossed.load_state(acc.state())


# ---------------------------------------------------------------------------------------------- options, presets


def test_presets_and_bad_options():
    assert CEDOptions.from_preset("paper") == CEDOptions()  # the paper's estimator stays the default
    assert CEDOptions().estimator == "entropy" and CEDOptions().signal == "prediction"
    assert CEDOptions.from_preset("residual", variance="scalar") == CEDOptions(estimator="residual", variance="scalar")
    assert CED_PRESETS["residual_condition"] == CEDOptions(estimator="residual", signal="condition")
    assert CEDOptions.from_preset("residual") is not CED_PRESETS["residual"]  # a copy: the preset stays as it is
    with pytest.raises(ValueError, match="preset"):
        CEDOptions.from_preset("best")
    with pytest.raises(ValueError, match="estimator"):
        CEDOptions(estimator="mutual_information")
    with pytest.raises(ValueError, match="signal"):
        CEDOptions(signal="uncond")
    with pytest.raises(ValueError, match="signed"):
        CEDOptions(estimator="kl", signed=True)


def test_non_entropy_scores_rank_by_value_not_magnitude():
    scores = [-30.0, -5.0, 2.0]  # residual entropies may be negative
    result = CEDResult("ced", [0, 1, 2], scores, options={"estimator": "residual"})
    assert result.ranking == [0, 1, 2]
    assert CEDResult("ced", [0, 1, 2], scores, options={"estimator": "entropy"}).ranking == [2, 1, 0]


# ---------------------------------------------------------------------------------------------- on a tiny DiT


def test_the_default_is_the_paper_estimator_unchanged():
    default = compute_ced(model(), objective(), data(), N)
    paper = compute_ced(model(), objective(), data(), N, CEDOptions.from_preset("paper"))
    assert default.scores == paper.scores and default.bucket_scores == paper.bucket_scores
    assert default.options["estimator"] == "entropy" and default.options["signal"] == "prediction"


@pytest.mark.parametrize("signal", ["prediction", "condition"])
@pytest.mark.parametrize("estimator", ["residual", "kl", "w2"])
def test_prefix_cached_equals_naive(estimator, signal):
    options = CEDOptions(estimator=estimator, signal=signal, num_timestep_buckets=3)
    cached = compute_ced(model(), objective(), data(), N, options, prefix_cache=True)
    naive = compute_ced(model(), objective(), data(), N, options, prefix_cache=False)
    assert relative(cached.scores, naive.scores) < 1e-6
    assert relative(cached.bucket_scores, naive.bucket_scores) < 1e-6
    assert cached.ranking == naive.ranking
    assert cached.options["estimator"] == estimator and cached.options["signal"] == signal
    assert all(math.isfinite(s) for s in cached.scores)


def test_condition_signal_equals_two_separate_forward_passes():
    """The concatenated batch gives the statistics of prediction(c) - prediction(null) run apart."""
    m, obj, n = model(), objective(), 48
    options = CEDOptions(estimator="kl", signal="condition", num_timestep_buckets=1)
    result = compute_ced(m, obj, data(n=n), n, options)
    acc = GaussianEntropyAccumulator(1 + m.num_blocks, 1, 1001, (4, 8, 8), "channel")
    with torch.no_grad():
        for draw in fixed_draws(m, obj, data(n=n), n):
            x, t, labels = draw.noised.noisy, draw.noised.timesteps, draw.labels
            null = torch.full_like(labels, m.null_class_label)
            for variant, skip in enumerate([[], *([i] for i in m.kept_block_indices)]):
                with m.skipping(skip):
                    signal = obj.prediction(m(x, t, labels).sample) - obj.prediction(m(x, t, null).sample)
                acc.update(variant, signal, labels, torch.zeros_like(labels))
    assert relative(result.scores, acc.estimate("kl")[0][1:].tolist()) < 1e-5


def test_condition_signal_of_a_model_that_ignores_the_class_is_degenerate_but_finite():
    m = model()
    with torch.no_grad():  # every label embeds to zero: the output no longer depends on the class
        m.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight.zero_()
    for estimator in ESTIMATORS:
        result = compute_ced(m, objective(), data(), N, CEDOptions(estimator=estimator, signal="condition"))
        assert all(math.isfinite(s) for s in result.scores + sum(result.bucket_scores, []))
        if estimator == "residual":  # every block alike, at the variance floor: ties rank by index
            assert len(set(result.scores)) == 1
            assert result.ranking == sorted(result.block_indices)
        else:
            assert result.scores == [0.0] * len(result.scores)


def test_condition_signal_leaves_out_null_labelled_draws():
    m = model()
    batches = data(num_classes=4)
    null = m.null_class_label
    batches[0][1][:5] = null  # five draws without a condition
    result = compute_ced(m, objective(), batches, N, CEDOptions(signal="condition"))
    assert result.num_samples == N - 5
    with pytest.raises(ValueError, match="null class"):
        compute_ced(m, objective(), [(x, torch.full_like(y, null)) for x, y in data()], N,
                    CEDOptions(signal="condition"))


def test_two_shards_summed_equal_one_process_with_the_residual_estimator():
    options = CEDOptions(estimator="residual", signal="condition")
    whole = compute_ced(model(), objective(), data(), N, options)
    shards = [[(x[p::2], y[p::2]) for x, y in data(batch_size=N)] for p in (0, 1)]
    partial = []

    def capture(t):
        partial.append(t)
        return t

    for p in (0, 1):
        compute_ced(model(), objective(), shards[p], N, options, process_index=p, num_processes=2, reduce=capture)
    assert len(partial) == 8  # sum, sum_sq, count, sum_cross from each process
    summed = [partial[i] + partial[i + 4] for i in range(4)]
    emulated = compute_ced(model(), objective(), shards[1], N, options, process_index=1, num_processes=2,
                           reduce=lambda t, it=iter(summed): next(it))
    assert emulated.num_samples == N
    assert relative(emulated.scores, whole.scores) < 1e-9


def test_sit_velocity_with_every_estimator_and_signal():
    m = model()
    for estimator in ESTIMATORS:
        for signal in ("prediction", "condition"):
            result = compute_ced(m, FlowObjective(learn_sigma=True), data(n=32), 32,
                                 CEDOptions(estimator=estimator, signal=signal))
            assert len(result.scores) == 6 and all(math.isfinite(s) for s in result.scores)
            assert sorted(result.ranking) == list(range(6))


# ---------------------------------------------------------------------------------------------- wiring


def test_score_command_records_the_estimator_and_signal(tmp_path):
    import json
    import os

    from conftest import make_tiny_vae

    from diffusers_entprune.cli import main
    from diffusers_entprune.embedded import DIGITS_DIR
    from diffusers_entprune.export import save_pruned_pipeline

    source = save_pruned_pipeline(str(tmp_path / "source"), make_tiny_dit(), make_tiny_vae(), make_scheduler(),
                                  id2label={i: f"class{i}" for i in range(10)})
    out = tmp_path / "scores"
    assert main(["score", "--pretrained_model_name_or_path", source, "--num_samples", "32", "--batch_size", "16",
                 "--train_data_dir", os.path.join(DIGITS_DIR, "downstream"), "--estimator", "residual",
                 "--signal", "condition", "--output_dir", str(out)]) == 0
    scores = json.load(open(out / "scores.json"))
    assert scores["options"]["estimator"] == "residual" and scores["options"]["signal"] == "condition"
    assert sorted(scores["ranking"]) == list(range(6)) and scores["num_samples"] == 32
    for bad in (["--estimator", "mi"], ["--signal", "null"], ["--estimator", "kl", "--signed"]):
        with pytest.raises(SystemExit):
            main(["score", "--output_dir", str(tmp_path / "bad"), *bad])
    assert not (tmp_path / "bad").exists()


def test_prune_script_takes_the_estimator_and_signal(tmp_path, capsys):
    """The script's --ced_* flags are EntPrunerConfig's (the paper's by default); a bad value stops it at once."""
    import argparse

    from script_runner import run_prune_script

    from diffusers_entprune.config import EntPrunerConfig, add_config_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    defaults = config_from_args(parser.parse_args([]))
    assert (defaults.ced_estimator, defaults.ced_signal) == ("entropy", "prediction")  # the paper's
    assert config_from_args(parser.parse_args(["--ced_estimator", "w2", "--ced_signal", "condition"])) == \
        EntPrunerConfig(ced_estimator="w2", ced_signal="condition")
    with pytest.raises(SystemExit):
        run_prune_script(["--ced_estimator", "mi", "--output_dir", str(tmp_path / "out")])
    assert "--ced_estimator" in capsys.readouterr().err and not (tmp_path / "out").exists()
