"""`EntPruner`, the library object that prunes inside any training loop (README, "Prune inside your own training
loop"): a no-op off its decision steps; at them, the target depth by the last one, with the optimizer and the EMA
following the model; the same decisions with and without accelerate, with LoRA, after a checkpoint round trip and
under two gloo processes; its calibration pool, its input checks and its report."""

import copy
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import make_scheduler, make_tiny_dit
from diffusers.training_utils import EMAModel

import diffusers_entprune.pruner as pruner_module
from diffusers_entprune.config import EntPrunerConfig
from diffusers_entprune.controller import fixed_amount
from diffusers_entprune.importance import score_blocks
from diffusers_entprune.lora import add_lora
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.objectives import DiffusionObjective
from diffusers_entprune.pruner import EntPruner

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(TESTS_DIR, "pruner_worker.py")
NUM_LAYERS, NUM_CLASSES = 6, 10
SMALL = dict(ced_num_samples=32, ced_batch_size=16, proxy_batch_size=4)
OBJECTIVE = DiffusionObjective.from_scheduler(make_scheduler())


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def make_model(seed: int = 0) -> EntPrunedTransformer2DModel:
    return EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(NUM_LAYERS, seed=seed)).train()


def make_config(**overrides) -> EntPrunerConfig:
    """Target 3 of 6 blocks in 3 stages over 6 steps (decisions at steps 0, 2, 4), small ranking and proxies."""
    settings = dict(target_num_blocks=3, pruning_mode="adaptive", pruning_stages=3, pruning_steps=6, **SMALL)
    settings.update(overrides)
    return EntPrunerConfig(**settings)


def make_pool(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=generator), torch.randint(0, NUM_CLASSES, (n,), generator=generator)


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_step(model, unwrapped, optimizer, ema, generator, backward=None) -> float:
    x0 = torch.randn(4, 4, 8, 8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (4,), generator=generator)
    t = OBJECTIVE.sample_timesteps(4, generator=generator)
    noised = OBJECTIVE.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
    loss = OBJECTIVE.loss(model(noised.noisy, timestep=t, class_labels=labels).sample, x0, noised).mean()
    (backward or torch.Tensor.backward)(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.step(trainable(unwrapped))
    return loss.item()


def base_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def snapshot(model, optimizer, ema) -> dict:
    """What must survive a stage: parameter identities by block, optimizer state and hyperparameters, EMA shadows."""
    base = base_optimizer(optimizer)
    return {"params": list(model.parameters()),
            "blocks": {i: {id(p) for p in block.parameters()}
                       for i, block in zip(model.kept_block_indices, model.transformer_blocks)},
            "state": {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                      for p, s in base.state.items()},
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
            "ema": {id(p): s.clone() for p, s in zip(trainable(model), ema.shadow_params)}}


def check_training_state_followed(before: dict, model, optimizer, ema, pruned: list[int]) -> None:
    """Exactly the removed blocks' own parameters left the model, the optimizer and the EMA; every kept parameter
    is the same object with the same optimizer state and EMA shadow as before."""
    kept_ids = set().union(*(ids for i, ids in before["blocks"].items() if i not in pruned))
    removed = set().union(*(before["blocks"][i] for i in pruned)) - kept_ids  # the shared embedder stays
    params_after = list(model.parameters())
    ids_before, ids_after = [id(p) for p in before["params"]], [id(p) for p in params_after]
    assert set(ids_after) == set(ids_before) - removed and len(ids_after) == len(set(ids_after))

    base = base_optimizer(optimizer)
    in_groups = [p for group in base.param_groups for p in group["params"]]
    assert [id(p) for p in in_groups] == [id(p) for p in trainable(model)]  # the pruned model's order
    assert [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups] == before["groups"]
    assert {id(p) for p in base.state} == set(before["state"]) - removed
    for p in in_groups:
        for key, value in before["state"].get(id(p), {}).items():
            assert torch.equal(base.state[p][key], value) if torch.is_tensor(value) else base.state[p][key] == value

    assert len(ema.shadow_params) == len(in_groups)
    for p, shadow in zip(trainable(model), ema.shadow_params):
        assert torch.equal(shadow, before["ema"][id(p)])


def decisions(pruner) -> list[dict]:
    return pruner.state_dict()["controller"]["decisions"]


# ---------------------------------------------------------------------------------------------- 1. one process


@pytest.mark.parametrize("mode, steps, depths", [
    ("adaptive", [0, 2, 4], None),
    ("fixed", [0, 2, 4], [5, 5, 4, 4, 3, 3, 3, 3]),
    ("one_shot", [0], [3] * 8),
])
def test_step_is_a_noop_off_decision_steps_and_reaches_the_target_by_the_last(monkeypatch, mode, steps, depths):
    model = make_model()
    pruner = EntPruner(make_config(pruning_mode=mode), model, OBJECTIVE, make_pool())
    assert pruner.decision_steps == steps and pruner.needs_calibration and not pruner.finished
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMAModel(trainable(model), decay=0.9)

    allowed = [False]  # the expensive parts may run only at a decision step

    def guarded(function):
        def call(*args, **kwargs):
            assert allowed[0], f"{function.__name__} ran off a decision step"
            return function(*args, **kwargs)
        return call

    for name in ("score_blocks", "score_candidates", "prune_training_state", "reprepare_model"):
        monkeypatch.setattr(pruner_module, name, guarded(getattr(pruner_module, name)))
    monkeypatch.setattr(EntPruner, "calibration_pool", guarded(EntPruner.calibration_pool))

    generator, seen = torch.Generator().manual_seed(0), []
    for step in [*range(8), 1000]:
        allowed[0] = step in steps
        assert pruner.is_decision_step(step) == (step in steps)
        kept, num_decisions, seconds = list(model.kept_block_indices), len(pruner.controller.decisions), \
            list(pruner.stage_seconds)
        weights = [p.detach().clone() for p in model.parameters()]
        assert pruner.step(step, model, optimizer, ema) is model
        assert model.training  # the stage evaluates in eval mode and gives the model back in train mode
        if step in steps:
            assert len(pruner.controller.decisions) == num_decisions + 1
            assert len(pruner.stage_seconds) == len(seconds) + 1
            assert pruner.controller.decisions[-1].step == step
        else:
            assert model.kept_block_indices == kept and pruner.stage_seconds == seconds
            assert len(pruner.controller.decisions) == num_decisions
            assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
        seen.append(model.num_blocks)
        train_step(model, model, optimizer, ema, generator)

    depths_by_step = seen[:8]
    assert depths_by_step[steps[-1]] == NUM_LAYERS - 3 == seen[-1]
    assert depths_by_step == sorted(depths_by_step, reverse=True) and min(seen) == 3
    if depths is not None:
        assert depths_by_step == depths
    assert pruner.finished and not pruner.needs_calibration
    assert sorted(pruner.pruned_blocks) == model.pruned_block_indices and len(pruner.pruned_blocks) == 3
    assert [d.num_blocks_after for d in pruner.controller.decisions] == [depths_by_step[s] for s in steps]


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_optimizer_and_ema_lose_exactly_the_removed_parameters(mode):
    model = make_model()
    pruner = EntPruner(make_config(pruning_mode=mode, target_num_blocks=4), model, OBJECTIVE, make_pool())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ema = EMAModel(trainable(model), decay=0.9)
    generator, checked = torch.Generator().manual_seed(0), 0
    train_step(model, model, optimizer, ema, generator)  # moments in place before the first stage
    for step in range(7):
        before = snapshot(model, optimizer, ema)
        pruner.step(step, model, optimizer, ema)
        if pruner.controller.decisions and pruner.controller.decisions[-1].step == step:
            pruned = pruner.controller.decisions[-1].pruned_blocks
            check_training_state_followed(before, model, optimizer, ema, pruned)
            checked += bool(pruned) and bool(before["state"])  # pruned with AdamW moments in place
        train_step(model, model, optimizer, ema, generator)
    assert model.num_blocks == 2 and checked >= 1
    assert {id(p) for p in optimizer.state} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("mode, target", [("fixed", 4), ("one_shot", 4), ("fixed", 3)])
def test_pruned_blocks_are_the_lowest_ranked_by_score_blocks_on_the_same_pool(mode, target):
    """fixed / one_shot: each stage drops the lowest-ranked blocks of the model as it is then (re-ranked after
    training), by `importance.score_blocks` on the pool, in the amounts of the schedule."""
    config = make_config(pruning_mode=mode, target_num_blocks=target, ced_estimator="residual")
    latents, labels = make_pool(40)
    model = make_model()
    pruner = EntPruner(config, model, OBJECTIVE, (latents, labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator, stages = torch.Generator().manual_seed(0), []
    pool = latents[:32], labels[:32]  # the pool is the first calibration_pool_size samples
    for step in range(6):
        if pruner.is_decision_step(step):
            reference = copy.deepcopy(model).eval()
            result = score_blocks(config.ranking, reference, OBJECTIVE,
                                  zip(pool[0].split(config.ced_batch_size), pool[1].split(config.ced_batch_size)),
                                  config.ced_num_samples, seed=config.ranking_seed, ced_options=config.ced_options)
            scores = dict(zip(result.block_indices, result.scores))
            assert sorted(scores) == model.kept_block_indices
            remaining = pruner.controller.remaining_to_prune
            stages_left = len(pruner.decision_steps) - len(pruner.controller.decisions)
            amount = fixed_amount(remaining, stages_left) if mode == "fixed" else remaining
            lowest = sorted(sorted(scores, key=lambda i: (scores[i], i))[:amount])
            kept_before = list(model.kept_block_indices)
            pruner.step(step, model, optimizer)
            decision = pruner.controller.decisions[-1]
            assert decision.ced_scores == pytest.approx(scores, rel=1e-9)
            assert decision.pruned_blocks == lowest
            assert model.kept_block_indices == [i for i in kept_before if i not in lowest]
            stages.append(lowest)
        else:
            pruner.step(step, model, optimizer)
        train_step(model, model, optimizer, None, generator)
    steps = pruner.decision_steps
    assert steps == ([0] if mode == "one_shot" else [0, 2, 4])
    assert len(stages) == len(steps) and sum(map(len, stages)) == target
    assert model.num_blocks == NUM_LAYERS - target


# ---------------------------------------------------------------------------------------------- 2. accelerate


def run_loop(pruner, model, optimizer, ema, num_steps: int, backward=None):
    generator, returned = torch.Generator().manual_seed(0), []
    for step in range(num_steps):
        model = pruner.step(step, model, optimizer, ema)
        returned.append(model)
        train_step(model, pruner.model, optimizer, ema, generator, backward)
    return returned


@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_accelerator_single_process_decides_as_without_one(mode):
    config, pool = make_config(pruning_mode=mode), make_pool()
    plain = make_model()
    plain_pruner = EntPruner(config, plain, OBJECTIVE, pool)
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    plain_ema = EMAModel(trainable(plain), decay=0.9)
    run_loop(plain_pruner, plain, plain_optimizer, plain_ema, 7)

    accelerator = Accelerator(cpu=True)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = EMAModel(trainable(model), decay=0.9)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    pruner = EntPruner(config, prepared, OBJECTIVE, pool, accelerator=accelerator)  # built from the prepared model
    assert pruner.model is model
    returned = run_loop(pruner, prepared, optimizer, ema, 7, backward=accelerator.backward)

    assert all(r is prepared for r in returned)  # one process: nothing to wrap again
    assert decisions(pruner) == decisions(plain_pruner)
    assert sum(len(d["pruned_blocks"]) for d in decisions(pruner)) == 3
    assert model.kept_block_indices == plain.kept_block_indices and model.num_blocks == 3
    assert {id(p) for p in optimizer.optimizer.state} == {id(p) for p in model.parameters()}
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    for a, b in zip(ema.shadow_params, plain_ema.shadow_params):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- 3. LoRA


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_lora_adapters_follow_pruning_in_optimizer_and_ema(mode):
    model = add_lora(make_model(), rank=4)
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    adapters = trainable(model)
    assert adapters and len(adapters) == 12 * NUM_LAYERS  # A and B of six layers per block
    optimizer = torch.optim.AdamW(adapters, lr=1e-2)
    ema = EMAModel(adapters, decay=0.9)
    pruner = EntPruner(make_config(pruning_mode=mode), model, OBJECTIVE, make_pool())
    generator, checked = torch.Generator().manual_seed(0), 0
    train_step(model, model, optimizer, ema, generator)  # moments in place before the first stage
    for step in range(7):
        before = snapshot(model, optimizer, ema)
        assert pruner.step(step, model, optimizer, ema) is model
        if pruner.controller.decisions and pruner.controller.decisions[-1].step == step:
            pruned = pruner.controller.decisions[-1].pruned_blocks
            check_training_state_followed(before, model, optimizer, ema, pruned)
            checked += bool(pruned)
        assert math.isfinite(train_step(model, model, optimizer, ema, generator))  # training goes on
    assert checked >= 1 and model.num_blocks == 3
    named = dict(model.named_parameters())
    assert all(("lora_" in n) == p.requires_grad for n, p in named.items())
    assert {id(p) for p in model.parameters() if not p.requires_grad} <= frozen
    assert {id(p) for p in optimizer.state} == {id(p) for p in trainable(model)}
    assert len(trainable(model)) == 12 * 3 == len(ema.shadow_params)


# ---------------------------------------------------------------------------------------------- 4. state_dict


@pytest.mark.parametrize("mode", ["fixed", "adaptive"])
def test_state_dict_round_trip_resumes_the_same_schedule(mode):
    config, pool = make_config(pruning_mode=mode), make_pool()
    model = make_model()
    pruner = EntPruner(config, model, OBJECTIVE, pool)
    pruner.step(0, model)
    pruner.step(1, model)
    pruner.step(2, model)
    state = pruner.state_dict()
    text = json.dumps(state)  # JSON-able as it is
    assert json.loads(text) == state
    assert state["config"] == config.to_dict() and len(state["stage_seconds"]) == 2
    kept, weights = list(model.kept_block_indices), copy.deepcopy(model.state_dict())
    for step in range(3, 7):  # the uninterrupted run
        pruner.step(step, model)

    fresh = make_model()
    resumed = EntPruner(EntPrunerConfig.from_dict(json.loads(text)["config"]), fresh, OBJECTIVE, pool)
    resumed.load_state_dict(json.loads(text))
    assert fresh.kept_block_indices == kept and resumed.pruned_blocks == state_pruned(state)
    assert fresh.state_dict().keys() == weights.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights.items())
    assert resumed.decision_steps == pruner.decision_steps == [0, 2, 4]
    assert resumed.stage_seconds == state["stage_seconds"]
    assert [resumed.is_decision_step(s) for s in range(5)] == [False, False, False, False, True]
    for step in range(3, 7):
        resumed.step(step, fresh)
    assert decisions(resumed) == decisions(pruner)
    assert fresh.kept_block_indices == model.kept_block_indices and fresh.num_blocks == 3
    assert resumed.finished


def state_pruned(state: dict) -> list[int]:
    return [b for d in state["controller"]["decisions"] for b in d["pruned_blocks"]]


@pytest.mark.parametrize("other", [dict(pruning_steps=8), dict(target_num_blocks=2), dict(pruning_mode="adaptive"),
                                   dict(pruning_stages=2), dict(rank_once=True)])
def test_state_of_another_schedule_is_refused(other):
    model = make_model()
    pruner = EntPruner(make_config(pruning_mode="fixed"), model, OBJECTIVE, make_pool())
    pruner.step(0, model)
    state = json.loads(json.dumps(pruner.state_dict()))
    fresh = make_model()
    refusing = EntPruner(make_config(**{"pruning_mode": "fixed", **other}), fresh, OBJECTIVE, make_pool())
    with pytest.raises(ValueError, match="differs from this run's") as error:
        refusing.load_state_dict(state)
    assert "same pruning arguments" in str(error.value)
    assert fresh.num_blocks == NUM_LAYERS and refusing.controller.decisions == [] and refusing.stage_seconds == []


def test_bare_controller_state_of_old_checkpoints_is_accepted():
    config, pool = make_config(pruning_mode="fixed"), make_pool()
    model = make_model()
    pruner = EntPruner(config, model, OBJECTIVE, pool)
    for step in range(3):
        pruner.step(step, model)
    bare = json.loads(json.dumps(pruner.controller.state_dict()))
    assert "controller" not in bare and "config" not in bare

    fresh = make_model()
    resumed = EntPruner(config, fresh, OBJECTIVE, pool)
    resumed.load_state_dict(bare)
    assert fresh.kept_block_indices == model.kept_block_indices and fresh.num_blocks == NUM_LAYERS - 2
    assert decisions(resumed) == decisions(pruner) and resumed.stage_seconds == []
    for step in range(3, 6):
        pruner.step(step, model)
        resumed.step(step, fresh)
    assert decisions(resumed) == decisions(pruner) and fresh.kept_block_indices == model.kept_block_indices


# ---------------------------------------------------------------------------------------------- 5. calibration data


class Batches:
    """A re-iterable of (latents, labels) batches that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = list(batches), 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)


class Unreadable:
    def __iter__(self):
        raise RuntimeError("the calibration data was read")


def test_short_iterable_is_repeated_to_the_pool_size_and_read_once_when_first_needed():
    config = make_config(pruning_mode="fixed")
    assert config.calibration_pool_size == 32
    latents, labels = make_pool(20)
    source = Batches(zip(latents.split(8), labels.split(8)))  # 8 + 8 + 4 samples
    model = make_model()
    pruner = EntPruner(config, model, OBJECTIVE, source)
    assert source.passes == 0  # nothing read at construction
    pruner.step(0, model)
    assert source.passes == 1  # read once, however short: the pool repeats from memory
    passes = source.passes
    pool_latents, pool_labels = pruner.calibration_pool()
    cycle = torch.arange(32) % 20
    assert pool_latents.shape == (32, 4, 8, 8) and pool_labels.shape == (32,)
    assert torch.equal(pool_latents, latents[cycle]) and torch.equal(pool_labels, labels[cycle])
    assert pool_latents.device.type == "cpu"
    for step in range(1, 7):
        pruner.step(step, model)
    assert source.passes == passes and model.num_blocks == 3  # every stage uses the same pool


def test_tensor_pair_longer_than_the_pool_is_cut_to_its_first_samples():
    latents, labels = make_pool(50)
    pruner = EntPruner(make_config(), make_model(), OBJECTIVE, (latents, labels))
    pool_latents, pool_labels = pruner.calibration_pool()
    assert torch.equal(pool_latents, latents[:32]) and torch.equal(pool_labels, labels[:32])


def test_unreadable_calibration_data_raises_at_the_first_stage_not_at_construction():
    model = make_model()
    pruner = EntPruner(make_config(pruning_steps=6), model, OBJECTIVE, Unreadable())
    with pytest.raises(RuntimeError, match="calibration data was read"):
        pruner.calibration_pool()
    with pytest.raises(RuntimeError, match="calibration data was read"):
        pruner.step(0, model)
    assert model.num_blocks == NUM_LAYERS and pruner.controller.decisions == []


def test_none_calibration_is_refused_when_pruning_and_accepted_when_fine_tuning_only():
    with pytest.raises(ValueError, match="calibration_data"):
        EntPruner(make_config(), make_model(), OBJECTIVE, None)
    for source in (None, Unreadable()):
        model = make_model()
        config = EntPrunerConfig(fine_tune_only=True, pruning_stages=3, pruning_steps=6, **SMALL)
        pruner = EntPruner(config, model, OBJECTIVE, source)
        assert not pruner.needs_calibration
        for step in range(7):
            assert pruner.step(step, model) is model
        assert model.num_blocks == NUM_LAYERS and pruner.pruned_blocks == [] and pruner.finished
        assert [d["pruned_blocks"] for d in decisions(pruner)] == [[], [], []]


# ---------------------------------------------------------------------------------------------- 6. bad input


def test_config_without_pruning_steps_is_refused_naming_it():
    with pytest.raises(ValueError, match="pruning_steps"):
        EntPruner(EntPrunerConfig(target_num_blocks=3, **SMALL), make_model(), OBJECTIVE, make_pool())


def test_config_of_another_type_is_refused():
    with pytest.raises(TypeError, match="EntPrunerConfig"):
        EntPruner(make_config().to_dict(), make_model(), OBJECTIVE, make_pool())


def test_model_that_is_not_an_entpruned_transformer_is_refused():
    with pytest.raises(TypeError, match="EntPrunedTransformer2DModel") as error:
        EntPruner(make_config(), make_tiny_dit(NUM_LAYERS), OBJECTIVE, make_pool())
    assert "DiTTransformer2DModel" in str(error.value)


def test_step_with_another_model_is_refused_before_anything_changes():
    model, other = make_model(), make_model()
    pruner = EntPruner(make_config(pruning_mode="fixed"), model, OBJECTIVE, make_pool())
    with pytest.raises(ValueError, match="not the model this pruner was built for"):
        pruner.step(0, other)
    assert model.num_blocks == other.num_blocks == NUM_LAYERS and pruner.controller.decisions == []
    assert pruner.step(0, model) is model and model.num_blocks == NUM_LAYERS - 1


# ---------------------------------------------------------------------------------------------- 7. report


@pytest.mark.parametrize("ranking, method", [("ced", "EntPruner (fixed schedule, CED ranking)"),
                                             ("magnitude", "fixed schedule, magnitude ranking (a baseline)")])
def test_report_holds_stages_config_and_ranking(ranking, method):
    config = make_config(pruning_mode="fixed", pruning_stages=2, pruning_steps=4, ranking=ranking)
    model = make_model()
    pruner = EntPruner(config, model, OBJECTIVE, make_pool())
    empty = pruner.report()
    assert empty.stages == [] and empty.pruned_by["stages"] == 0
    for step in range(5):
        pruner.step(step, model)
    report = pruner.report()
    assert report.pruning_mode == "fixed" and report.ranking == ranking
    assert report.pruning_config == config.to_dict()
    assert report.pruned_by == {"method": method, "stages": 2}
    assert report.stages == [d.to_dict() for d in pruner.controller.decisions]
    assert [s["step"] for s in report.stages] == [0, 2] and [s["stage"] for s in report.stages] == [0, 1]
    assert sorted(b for s in report.stages for b in s["pruned_blocks"]) == model.pruned_block_indices
    assert [s["num_blocks_after"] for s in report.stages] == [4, 3]
    assert report.stages[0]["ced_scores"].keys() == {str(i) for i in range(NUM_LAYERS)}
    assert len(report.pruning_stage_seconds) == 2 and all(s >= 0 for s in report.pruning_stage_seconds)
    for total, parts in zip(report.pruning_stage_seconds, report.pruning_stage_breakdown):
        assert set(parts) == {"ranking", "proxies", "surgery"} and 0 <= sum(parts.values()) <= total + 0.003
    assert json.loads(json.dumps(report.to_dict()))["pruning_config"] == config.to_dict()


# ---------------------------------------------------------------------------------------------- 8. two processes


def launch_worker(tmp_path, num_processes: int) -> dict:
    out = tmp_path / f"processes-{num_processes}.json"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    if num_processes == 1:
        command = [sys.executable, WORKER, str(out)]
    else:
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
        with socket.socket() as s:  # not accelerate's default port, which other tests' launches may hold
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                   WORKER, str(out)]
    # a session of its own, so that a timeout ends the launcher's worker processes too
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"the worker ({num_processes} processes) ran past 300 s:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_two_gloo_processes_agree_and_decide_as_one(tmp_path):
    one, two = launch_worker(tmp_path, 1), launch_worker(tmp_path, 2)
    assert one["num_processes"] == 1 and two["num_processes"] == 2
    for run in (one, two):
        assert run["finished"] and run["decision_steps"] == [0, 2]
        assert len(run["kept_block_indices"]) == 6 - 3
        assert sum(len(d["pruned_blocks"]) for d in run["decisions"]) == 3
        # per rank: 3 blocks left; optimizer groups, optimizer state and EMA match the pruned model's parameters
        assert all(summary[:2] == [3.0, 1.0] for summary in run["rank_summaries"])

    # both ranks: the same decisions, blocks, weights, EMA and optimizer entries (bit for bit)
    assert len(two["rank_summaries"]) == 2 and two["rank_summaries"][0] == two["rank_summaries"][1]
    assert two["kept_by_rank"] == [two["kept_block_indices"]] * 2
    assert two["decisions_by_rank"][0] == two["decisions_by_rank"][1]

    # two processes decide as one (scores up to float summation order)
    assert two["kept_block_indices"] == one["kept_block_indices"]
    for a, b in zip(one["decisions"], two["decisions"]):
        assert (a["step"], a["pruned_blocks"], a["num_blocks_after"]) == (b["step"], b["pruned_blocks"],
                                                                           b["num_blocks_after"])
        assert b["ced_scores"] == pytest.approx(a["ced_scores"], rel=1e-4)
        assert [c["blocks"] for c in b["candidates"]] == [c["blocks"] for c in a["candidates"]]
        for ca, cb in zip(a["candidates"], b["candidates"]):
            for key in ("ntk_condition_number", "zico"):
                if ca[key] is not None:
                    assert cb[key] == pytest.approx(ca[key], rel=1e-3)
    # the same training: the DDP wrapper given back after pruning still averages the gradients
    assert two["rank_summaries"][0][3:] == pytest.approx(one["rank_summaries"][0][3:], rel=1e-5)

    # what `step` gave back: a new DDP wrapper exactly where blocks were pruned; else the same object
    pruned_at = {d["step"] for d in two["decisions"] if d["pruned_blocks"]}
    assert pruned_at
    assert [r["num_blocks"] for r in two["returned"]] == [r["num_blocks"] for r in one["returned"]]
    for r in two["returned"]:
        assert r["type"] == "DistributedDataParallel" and r["same_object"] == (r["step"] not in pruned_at)
    assert all(r["same_object"] for r in one["returned"])


def test_a_one_pass_generator_fills_the_pool_and_a_failed_stage_leaves_the_train_mode():
    """A generator can be read once only: the pool is collected in one pass and repeated from memory. A stage that
    fails (here: no samples at all) leaves the model in the mode the caller had it in."""
    from diffusers_entprune import DiffusionObjective, EntPrunedTransformer2DModel, EntPruner, EntPrunerConfig

    latents, labels = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 10
    config = EntPrunerConfig(target_num_blocks=3, pruning_steps=4, ced_num_samples=32, ced_batch_size=16,
                             proxy_batch_size=4)
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(6)).train()
    one_pass = ((latents[i:i + 8], labels[i:i + 8]) for i in (0, 8))
    pruner = EntPruner(config, model, DiffusionObjective.from_scheduler(make_scheduler()), one_pass)
    pool_latents, pool_labels = pruner.calibration_pool()
    assert len(pool_latents) == config.calibration_pool_size == 32
    assert torch.equal(pool_latents[16:], latents) and torch.equal(pool_labels[:16], labels)
    empty = EntPruner(config, model, DiffusionObjective.from_scheduler(make_scheduler()), iter([]))
    with pytest.raises(ValueError, match="`calibration_data` holds no samples"):
        empty.step(0, model)
    assert model.training
