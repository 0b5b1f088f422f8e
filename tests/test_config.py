"""`EntPrunerConfig`: defaults, validation (each error names its field), serialisation, the argparse bridge, and
`entprune score`'s flags (new names and old aliases give the same config)."""

import argparse
import inspect
import json

import pytest

import diffusers_entprune
from diffusers_entprune.config import EntPrunerConfig, add_config_arguments, config_from_args, flag_message
from diffusers_entprune.importance import CEDOptions, LearnedRankingOptions
from diffusers_entprune.proxies import score_candidates, zico, zico_from_gradients

# examples/prune_dit.py's parse_args defaults (after its fill-ins: target 0.5, ranking_seed = seed)
SCRIPT_DEFAULTS = {
    "target_prune_ratio": 0.5, "target_num_blocks": None, "target_num_params": None, "fine_tune_only": False,
    "pruning_mode": "adaptive", "pruning_stages": 4, "pruning_steps": None, "rank_once": False, "ranking": "ced",
    "seed": 0, "ranking_seed": 0, "ced_num_samples": 1024, "ced_batch_size": 64, "ced_variance": "channel",
    "ced_estimator": "entropy", "ced_signal": "prediction", "ced_per_class": True, "ced_signed": False,
    "ced_timestep_range": [0.0, 1.0], "ced_num_timestep_buckets": 4, "learned_steps": None,
    "learned_group_size": None, "learned_lora_rank": None, "learned_batch_size": None, "proxy_batch_size": 8,
    "zico_num_batches": 2, "zico_reduction": "mean",
}


def test_defaults_are_the_scripts():
    assert EntPrunerConfig().to_dict() == SCRIPT_DEFAULTS
    assert "EntPrunerConfig" in diffusers_entprune.__all__ and diffusers_entprune.EntPrunerConfig is EntPrunerConfig


def test_zico_reduction_has_one_default():
    for function, name in ((zico_from_gradients, "reduction"), (zico, "reduction"),
                           (score_candidates, "zico_reduction")):
        assert inspect.signature(function).parameters[name].default == EntPrunerConfig().zico_reduction == "mean"


def test_fill_ins():
    assert EntPrunerConfig(seed=7).ranking_seed == 7 and EntPrunerConfig(seed=7, ranking_seed=3).ranking_seed == 3
    assert EntPrunerConfig(target_num_blocks=3).target_prune_ratio is None
    assert EntPrunerConfig(fine_tune_only=True).target_prune_ratio is None
    learned = EntPrunerConfig(ranking="learned", learned_steps=5)
    defaults = LearnedRankingOptions()
    assert (learned.learned_steps, learned.learned_group_size, learned.learned_lora_rank,
            learned.learned_batch_size) == (5, defaults.group_size, defaults.lora_rank, defaults.batch_size)
    assert EntPrunerConfig(ced_timestep_range=[0, 0.5]).ced_timestep_range == (0.0, 0.5)


BAD = [
    ({"target_prune_ratio": 1.0}, "target_prune_ratio", "strictly between 0 and 1"),
    ({"target_prune_ratio": float("nan")}, "target_prune_ratio", "strictly between 0 and 1"),
    ({"target_prune_ratio": 0.0}, "target_prune_ratio", "strictly between 0 and 1"),
    ({"target_num_blocks": 0}, "target_num_blocks", ">= 1"),
    ({"target_num_params": -5}, "target_num_params", ">= 1"),
    ({"target_num_blocks": 2, "target_prune_ratio": 0.5}, "target_prune_ratio", "at most one target"),
    ({"fine_tune_only": True, "target_num_blocks": 2}, "fine_tune_only", "prunes nothing"),
    ({"fine_tune_only": 1}, "fine_tune_only", "True or False"),
    ({"pruning_mode": "gradual"}, "pruning_mode", "must be one of"),
    ({"pruning_stages": 0}, "pruning_stages", ">= 1"),
    ({"pruning_steps": 0}, "pruning_steps", ">= 1"),
    ({"ranking": "entropy"}, "ranking", "must be one of"),
    ({"seed": -1}, "seed", r"\[0, 2\*\*32\)"),
    ({"seed": 2**32}, "seed", r"\[0, 2\*\*32\)"),
    ({"ranking_seed": -3}, "ranking_seed", r"\[0, 2\*\*32\)"),
    ({"ced_num_samples": 1}, "ced_num_samples", ">= 2"),
    ({"ced_num_samples": 2.5}, "ced_num_samples", "integer"),
    ({"ced_batch_size": 0}, "ced_batch_size", ">= 1"),
    ({"ced_variance": "full"}, "ced_variance", "must be one of"),
    ({"ced_estimator": "mi"}, "ced_estimator", "must be one of"),
    ({"ced_signal": "null"}, "ced_signal", "must be one of"),
    ({"ced_signed": True, "ced_estimator": "kl"}, "ced_signed", "'entropy' only"),
    ({"ced_timestep_range": (0.8, 0.2)}, "ced_timestep_range", "0 <= LOW < HIGH <= 1"),
    ({"ced_timestep_range": (0.0, float("nan"))}, "ced_timestep_range", "0 <= LOW < HIGH <= 1"),
    ({"ced_timestep_range": (0.5,)}, "ced_timestep_range", "two numbers"),
    ({"ced_num_timestep_buckets": 0}, "ced_num_timestep_buckets", ">= 1"),
    ({"learned_steps": 5}, "learned_steps", "learned ranking only"),
    ({"ranking": "learned", "learned_steps": 0}, "learned_steps", ">= 1"),
    ({"ranking": "learned", "learned_group_size": 0}, "learned_group_size", ">= 1"),
    ({"ranking": "learned", "learned_batch_size": 0}, "learned_batch_size", ">= 1"),
    ({"ranking": "learned", "learned_lora_rank": -1}, "learned_lora_rank", r">= 0 \(0: no adapters\)"),
    ({"proxy_batch_size": 1}, "proxy_batch_size", ">= 2"),
    ({"zico_num_batches": 1}, "zico_num_batches", ">= 2"),
    ({"zico_reduction": "max"}, "zico_reduction", "must be one of"),
]


@pytest.mark.parametrize("kwargs, name, fragment", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_each_error_names_its_field(kwargs, name, fragment):
    with pytest.raises(ValueError, match=fragment) as raised:
        EntPrunerConfig(**kwargs)
    assert f"`{name}`" in str(raised.value)


@pytest.mark.parametrize("kwargs, name, fragment", BAD[:12], ids=[b[1] for b in BAD[:12]])
def test_the_flags_error_names_the_flag(kwargs, name, fragment, capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args([])
    vars(args).update(kwargs)
    with pytest.raises(SystemExit):
        config_from_args(args, error=parser.error)
    err = capsys.readouterr().err
    assert f"--{name}" in err and f"`{name}`" not in err
    with pytest.raises(ValueError, match=f"`{name}`"):  # without `error`, the library's message
        config_from_args(args)


def test_flag_message_rewrites_only_field_names():
    assert flag_message("`seed` and `other` and `proxy_batch_size`", ["seed", "proxy_batch_size"]) == \
        "--seed and `other` and --proxy_batch_size"


ROUND_TRIP = [
    {},
    {"fine_tune_only": True},
    {"target_num_params": 10_000, "pruning_mode": "fixed", "pruning_steps": 40, "rank_once": True},
    {"ranking": "learned", "learned_lora_rank": 0, "pruning_mode": "one_shot", "target_num_blocks": 3},
    {"ced_estimator": "residual", "ced_signal": "condition", "ced_per_class": False, "ced_timestep_range": (0.1, 0.9),
     "ced_num_timestep_buckets": 2, "seed": 5, "ranking_seed": 9, "zico_reduction": "sum"},
]


@pytest.mark.parametrize("kwargs", ROUND_TRIP)
def test_to_dict_from_dict_round_trip(kwargs):
    config = EntPrunerConfig(**kwargs)
    again = EntPrunerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.to_dict() == config.to_dict()


def test_from_dict_lists_unknown_keys():
    with pytest.raises(ValueError, match=r"Unknown EntPrunerConfig keys \['learning_rate', 'method'\]"):
        EntPrunerConfig.from_dict({"seed": 1, "method": "ced", "learning_rate": 1e-4})


def test_derived_settings():
    config = EntPrunerConfig(ced_variance="diag", ced_signed=True, ced_per_class=False, ced_timestep_range=(0.2, 0.6),
                             ced_num_timestep_buckets=2, ced_signal="condition")
    assert config.ced_options == CEDOptions(variance="diag", signed=True, per_class=False, timestep_range=(0.2, 0.6),
                                            num_timestep_buckets=2, estimator="entropy", signal="condition")
    assert EntPrunerConfig().ced_options == CEDOptions()
    assert config.learned_options is None
    learned = EntPrunerConfig(ranking="learned", learned_steps=3, learned_group_size=2, learned_batch_size=4)
    assert learned.learned_options == LearnedRankingOptions(num_steps=3, group_size=2, batch_size=4)
    no_lora = EntPrunerConfig(ranking="learned", learned_lora_rank=0).learned_options
    assert no_lora.use_lora is False and no_lora.lora_rank == 1
    assert EntPrunerConfig().calibration_pool_size == 1024
    assert EntPrunerConfig(ced_num_samples=16, proxy_batch_size=8, zico_num_batches=3).calibration_pool_size == 32


class Blocks:
    def __init__(self, outside, per_block):
        self.counts = outside, per_block

    def parameter_counts(self):
        return self.counts


def test_num_blocks_to_prune():
    model = Blocks(100, [10] * 12)
    assert EntPrunerConfig().num_blocks_to_prune(model) == 6
    assert EntPrunerConfig(target_prune_ratio=0.25).num_blocks_to_prune(model) == 3
    assert EntPrunerConfig(target_num_blocks=4).num_blocks_to_prune(model) == 4
    assert EntPrunerConfig(target_num_params=175).num_blocks_to_prune(model) == 5  # 220 -> at most 175: 5 blocks
    assert EntPrunerConfig(fine_tune_only=True).num_blocks_to_prune(model) == 0
    with pytest.raises(ValueError, match="`target_num_blocks`=12 removes all 12 blocks"):
        EntPrunerConfig(target_num_blocks=12).num_blocks_to_prune(model)
    with pytest.raises(ValueError, match="`target_num_params` needs blocks of one size"):
        EntPrunerConfig(target_num_params=175).num_blocks_to_prune(Blocks(100, [10] * 11 + [20]))
    assert EntPrunerConfig(target_num_blocks=2).num_blocks_to_prune(Blocks(100, [10] * 11 + [20])) == 2


def test_num_blocks_to_prune_on_a_real_model():
    from conftest import make_tiny_dit

    from diffusers_entprune import EntPrunedTransformer2DModel

    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit())
    outside, per_block = model.parameter_counts()
    budget = outside + 4 * per_block[0]
    assert EntPrunerConfig(target_num_params=budget).num_blocks_to_prune(model) == model.num_blocks - 4


ARGV_AND_KWARGS = [
    ([], {}),
    (["--fine_tune_only"], {"fine_tune_only": True}),
    (["--target_num_params", "5000", "--pruning_mode", "fixed", "--pruning_stages", "2", "--pruning_steps", "8",
      "--rank_once", "--seed", "3"],
     {"target_num_params": 5000, "pruning_mode": "fixed", "pruning_stages": 2, "pruning_steps": 8, "rank_once": True,
      "seed": 3}),
    (["--ranking", "learned", "--learned_steps", "2", "--learned_lora_rank", "0", "--target_prune_ratio", "0.25"],
     {"ranking": "learned", "learned_steps": 2, "learned_lora_rank": 0, "target_prune_ratio": 0.25}),
    (["--ced_num_samples", "32", "--ced_batch_size", "8", "--ced_variance", "scalar", "--ced_estimator", "entropy",
      "--ced_signed", "--ced_pooled", "--ced_timestep_range", "0.1", "0.7", "--ced_num_timestep_buckets", "3",
      "--ced_signal", "condition", "--ranking_seed", "11", "--proxy_batch_size", "4", "--zico_num_batches", "3",
      "--zico_reduction", "sum"],
     {"ced_num_samples": 32, "ced_batch_size": 8, "ced_variance": "scalar", "ced_signed": True,
      "ced_per_class": False, "ced_timestep_range": (0.1, 0.7), "ced_num_timestep_buckets": 3,
      "ced_signal": "condition", "ranking_seed": 11, "proxy_batch_size": 4, "zico_num_batches": 3,
      "zico_reduction": "sum"}),
]


@pytest.mark.parametrize("argv, kwargs", ARGV_AND_KWARGS)
def test_flags_give_the_dataclasss_config(argv, kwargs):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args, error=parser.error)
    assert config == EntPrunerConfig(**kwargs)
    # what __post_init__ resolved is written back, so a run records what it used
    for name in ("target_prune_ratio", "ranking_seed", "learned_steps", "learned_group_size", "learned_lora_rank",
                 "learned_batch_size"):
        assert getattr(args, name) == getattr(config, name)


def test_targets_are_mutually_exclusive_and_fields_and_aliases_select_flags(capsys):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--target_num_blocks", "2", "--fine_tune_only"])
    assert "not allowed with argument" in capsys.readouterr().err
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, fields=["seed", "ced_per_class"], aliases={"ced_per_class": ["--pooled"]},
                         group_title=None)
    args = parser.parse_args(["--pooled"])
    assert vars(args) == {"seed": 0, "ced_per_class": False}
    config = config_from_args(args)
    assert config.ced_per_class is False and config.pruning_stages == 4
    with pytest.raises(ValueError, match="not fields"):
        add_config_arguments(argparse.ArgumentParser(), fields=["method"])


SCORE_BASE = ["--output_dir", "unused"]
OLD_AND_NEW = [
    (["--method", "loss", "--num_samples", "48", "--batch_size", "16", "--seed", "4"],
     ["--ranking", "loss", "--ced_num_samples", "48", "--ced_batch_size", "16", "--seed", "4"]),
    (["--variance", "diag", "--estimator", "entropy", "--signed", "--pooled", "--signal", "condition",
      "--timestep_range", "0.25", "0.75", "--num_timestep_buckets", "2"],
     ["--ced_variance", "diag", "--ced_estimator", "entropy", "--ced_signed", "--ced_pooled", "--ced_signal",
      "condition", "--ced_timestep_range", "0.25", "0.75", "--ced_num_timestep_buckets", "2"]),
    (["--method", "learned", "--num_prune", "2", "--learned_steps", "3"],
     ["--ranking", "learned", "--target_num_blocks", "2", "--learned_steps", "3"]),
]


@pytest.mark.parametrize("old, new", OLD_AND_NEW)
def test_score_flags_old_and_new_names_give_one_config(old, new):
    from diffusers_entprune.cli import _parse_score_args

    old_config = _parse_score_args([*old, *SCORE_BASE]).config
    new_config = _parse_score_args([*new, *SCORE_BASE]).config
    assert old_config == new_config
    assert old_config.ranking_seed == old_config.seed


def test_score_flags_default_to_the_config_and_errors_name_the_new_flag(capsys):
    from diffusers_entprune.cli import _parse_score_args

    assert _parse_score_args(SCORE_BASE).config == EntPrunerConfig()
    for argv, message in (
            (["--num_samples", "1"], "--ced_num_samples must be >= 2"),
            (["--estimator", "kl", "--signed"], "--ced_signed applies to --ced_estimator 'entropy' only"),
            (["--learned_steps", "2"], "--learned_steps apply to the learned ranking only; set --ranking"),
            (["--method", "uniform"], "--ranking uniform chooses the set of blocks to remove for a target: pass "
                                      "--target_num_blocks N"),
            (["--num_prune", "0"], "--target_num_blocks must be >= 1"),
            (["--seed", "-1"], r"--seed must lie in [0, 2**32)")):
        with pytest.raises(SystemExit):
            _parse_score_args([*argv, *SCORE_BASE])
        assert message in capsys.readouterr().err
