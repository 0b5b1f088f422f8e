import copy

import torch
from accelerate import Accelerator
from conftest import make_scheduler, make_tiny_dit
from diffusers.training_utils import EMAModel

from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.objectives import DiffusionObjective
from diffusers_entprune.training_state import prune_training_state, reprepare_model


def train_steps(model, optimizer, ema, steps, seed=0):
    objective = DiffusionObjective.from_scheduler(make_scheduler())
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = torch.randn(4, 4, 8, 8, generator=generator)
        labels = torch.randint(0, 10, (4,), generator=generator)
        t = objective.sample_timesteps(4, generator=generator)
        noised = objective.add_noise(x0, torch.randn(x0.shape, generator=generator), t)
        out = model(noised.noisy, timestep=t, class_labels=labels).sample
        objective.loss(out, x0, noised).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())


def setup(wrap_optimizer=False):
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=6)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ema = EMAModel(model.parameters(), decay=0.9)
    if wrap_optimizer:
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer, ema, accelerator
    return model, optimizer, ema, None


def test_optimizer_moments_and_ema_of_kept_parameters_carry_over():
    model, optimizer, ema, _ = setup()
    train_steps(model, optimizer, ema, 3)
    params_before = list(model.parameters())
    shared = {id(p) for p in model.transformer_blocks[0].norm1.emb.parameters()}  # one embedder, tied
    removed_params = {id(p) for b in (1, 4) for p in model.transformer_blocks[b].parameters()} - shared
    kept_state = {id(p): copy.deepcopy(optimizer.state[p]) for p in params_before if id(p) not in removed_params}
    shadow_by_param = {id(p): s.clone() for p, s in zip(params_before, ema.shadow_params)}

    assert prune_training_state(model, [1, 4], optimizer, ema) == [1, 4]

    params_after = list(model.parameters())
    assert model.kept_block_indices == [0, 2, 3, 5]
    assert {id(p) for p in params_after} == set(kept_state)  # kept parameters are the same objects
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    assert [id(p) for p in in_groups] == [id(p) for p in params_after]
    assert set(map(id, optimizer.state)) == set(kept_state)  # removed parameters' moments are gone
    for p in params_after:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[p][key], kept_state[id(p)][key])
    assert len(ema.shadow_params) == len(params_after)
    for p, shadow in zip(params_after, ema.shadow_params):  # each EMA copy still belongs to its parameter
        assert torch.equal(shadow, shadow_by_param[id(p)])

    before_step = [p.detach().clone() for p in params_after]
    train_steps(model, optimizer, ema, 1, seed=1)  # training goes on: Adam's step counter continues at 4
    assert all(optimizer.state[p]["step"].item() == 4 for p in params_after)
    assert any(not torch.equal(a, p) for a, p in zip(before_step, params_after))


def test_pruning_with_accelerate_wrapped_optimizer_and_single_process_reprepare():
    model, optimizer, ema, accelerator = setup(wrap_optimizer=True)
    train_steps(model, optimizer, ema, 2)
    unwrapped = accelerator.unwrap_model(model)
    prune_training_state(unwrapped, [0], optimizer, ema)
    assert reprepare_model(accelerator, model, unwrapped) is unwrapped  # one process: nothing to re-wrap
    kept = {id(p) for p in unwrapped.parameters()}
    assert {id(p) for p in optimizer.optimizer.state} == kept
    train_steps(model, optimizer, ema, 1)


def test_pruned_training_matches_training_a_pruned_copy():
    """Pruning mid-training = continuing with a model pruned beforehand that holds the same weights and moments."""
    model, optimizer, ema, _ = setup()
    train_steps(model, optimizer, ema, 2)
    twin = copy.deepcopy((model, optimizer, ema))
    prune_training_state(model, [2, 3], optimizer, ema)
    twin_model, twin_optimizer, _ = twin
    twin_model.prune_blocks([2, 3])
    kept = {id(p) for p in twin_model.parameters()}
    fresh = torch.optim.AdamW(twin_model.parameters(), lr=1e-3)
    fresh.load_state_dict({"state": {i: twin_optimizer.state[p] for i, p in enumerate(twin_model.parameters())},
                           "param_groups": [{**twin_optimizer.param_groups[0],
                                             "params": list(range(len(kept)))}]})
    train_steps(model, optimizer, ema, 2, seed=5)
    train_steps(twin_model, fresh, EMAModel(twin_model.parameters(), decay=0.9), 2, seed=5)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_pruning_block_zero_keeps_optimizer_and_ema_in_the_models_parameter_order():
    # the shared embedder is first mentioned under block 0; once block 0 goes it is mentioned under block 1
    model, optimizer, ema, _ = setup()
    train_steps(model, optimizer, ema, 1)
    prune_training_state(model, [0], optimizer, ema)
    after = list(model.parameters())
    assert [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in after]
    assert [s.shape for s in ema.shadow_params] == [p.shape for p in after]
    train_steps(model, optimizer, ema, 1)


def test_ema_over_trainable_parameters_only_follows_them_through_pruning():
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=4)).train()
    for name, p in model.named_parameters():  # as with LoRA: most weights frozen
        p.requires_grad_("attn1.to_q" in name)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ema = EMAModel(trainable, decay=0.9)
    with torch.no_grad():
        for s, p in zip(ema.shadow_params, trainable):
            s.add_(float(id(p) % 997))  # tag each copy with its parameter
    tags = {id(p): float(id(p) % 997) for p in trainable}
    prune_training_state(model, [1, 2], None, ema)
    kept = [p for p in model.parameters() if p.requires_grad]
    assert len(ema.shadow_params) == len(kept) == 4  # to_q weight and bias of the two kept blocks
    for s, p in zip(ema.shadow_params, kept):
        assert torch.allclose(s - p, torch.full_like(p, tags[id(p)]))
