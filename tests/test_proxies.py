import copy
import math

import numpy as np
import pytest
import torch
from conftest import make_scheduler, make_tiny_dit

from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.objectives import DiffusionObjective, FlowObjective
from diffusers_entprune.proxies import (
    ProxyScores,
    ntk_condition_number,
    score_candidates,
    zico,
    zico_from_gradients,
)


def model():
    return EntPrunedTransformer2DModel.from_transformer(make_tiny_dit()).eval()


def objective():
    return DiffusionObjective.from_scheduler(make_scheduler())


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def zico_batches(d=3, n=6):
    return [batch(n, seed=10 + k) for k in range(d)]


def seeded_draw(obj, latents, generator):
    """The documented draw order: timesteps, then float32 noise, from one CPU generator."""
    timesteps = obj.sample_timesteps(len(latents), generator=generator)
    return obj.add_noise(latents, torch.randn(latents.shape, generator=generator), timesteps)


def layer_count(module) -> int:
    return sum(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) for m in module.modules())


# ---------------------------------------------------------------------------------------------------- NTK


@pytest.mark.parametrize("skip", [[], [2]])
def test_ntk_condition_number_matches_a_per_sample_jacobian(skip):
    m, obj = model(), objective()
    latents, labels = batch(4)
    kappa = ntk_condition_number(m, obj, latents, labels, skip_blocks=skip, seed=3)

    # independent: one forward per sample on a copy, .backward() into .grad, gradients of ALL parameters (a skipped
    # block's are zero columns, which leave K unchanged), condition number from the float64 singular values of G.
    # (Not torch.func.functional_call: in torch 2.13 it leaves a module shared at several paths, like the tied
    # embedder, holding the passed-in tensors instead of its parameters.)
    ref = copy.deepcopy(m)
    noised = seeded_draw(obj, latents, torch.Generator().manual_seed(3))
    rows = []
    with ref.skipping(skip):
        for i in range(len(latents)):
            ref.zero_grad(set_to_none=True)
            out = ref(noised.noisy[i : i + 1], timestep=noised.timesteps[i : i + 1], class_labels=labels[i : i + 1])
            obj.prediction(out.sample).sum().backward()
            rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                   for p in ref.parameters()]))
    singular = torch.linalg.svdvals(torch.stack(rows).double())
    expected = (singular[0] / singular[-1]).item() ** 2
    assert 1 < expected < 1e4  # finite and well away from the singularity cut-off on the tiny model
    assert kappa == pytest.approx(expected, rel=1e-4)


def test_identical_samples_make_the_ntk_singular():
    class AtData(FlowObjective):
        """Always t = 1: the model input is the clean latents exactly, whatever the noise."""

        def sample_timesteps(self, batch_size, generator=None, device=None):
            return torch.ones(batch_size, device=device)

    m, obj = model(), AtData(learn_sigma=True)
    latents, labels = batch(4)
    duplicated, duplicated_labels = latents.clone(), labels.clone()
    duplicated[2], duplicated_labels[2] = latents[0], labels[0]
    assert math.isfinite(ntk_condition_number(m, obj, latents, labels))  # the control: distinct samples
    assert ntk_condition_number(m, obj, duplicated, duplicated_labels) == math.inf
    # with DDPM noising the two copies get different noise and timesteps, so they are distinct samples again
    assert math.isfinite(ntk_condition_number(m, objective(), duplicated, duplicated_labels))


# ---------------------------------------------------------------------------------------------------- state


def snapshot(m):
    return {
        "weights": {k: v.detach().clone() for k, v in m.state_dict().items()},
        "modes": [(name, mod.training) for name, mod in m.named_modules()],
        "skipped": set(m.skipped_block_indices),
        "rng": torch.get_rng_state(),
    }


def assert_unchanged(m, before):
    after = snapshot(m)
    assert after["weights"].keys() == before["weights"].keys()
    assert all(torch.equal(after["weights"][k], v) for k, v in before["weights"].items())
    assert all(p.grad is None for p in m.parameters())
    assert after["modes"] == before["modes"]
    assert after["skipped"] == before["skipped"]
    assert torch.equal(after["rng"], before["rng"])


def test_proxies_change_no_state_and_restore_it_on_error():
    m, obj = model(), objective()
    for module in m.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5  # in train mode, dropout would make the scores random and draw from the global RNG
    m.train()
    m.pos_embed.eval()  # a mixed-mode model: every module's own mode must come back
    m.skip_blocks([1])
    torch.manual_seed(1234)
    before = snapshot(m)
    latents, labels = batch(4)
    with torch.no_grad():  # the proxies enable grad themselves
        ntk_condition_number(m, obj, latents, labels, skip_blocks=[3])
        zico(m, obj, zico_batches(), skip_blocks=[3])
        scores = score_candidates(m, obj, [[], [3]], (latents, labels), zico_batches())
    assert_unchanged(m, before)
    again = score_candidates(m, obj, [[], [3]], (latents, labels), zico_batches())
    assert [s.to_dict() for s in again] == [s.to_dict() for s in scores]  # deterministic despite dropout
    assert all(math.isfinite(s.ntk_condition_number) and math.isfinite(s.zico) for s in scores)

    class Failing(DiffusionObjective):
        def loss(self, *args):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        score_candidates(m, Failing(obj.betas), [[3]], (latents, labels), zico_batches())
    assert_unchanged(m, before)


def test_skipping_equals_physical_pruning_and_differs_from_the_full_model():
    m, obj = model(), objective()
    latents, labels = batch(4)
    pruned = copy.deepcopy(m)
    pruned.prune_blocks([2])
    skipped_kappa = ntk_condition_number(m, obj, latents, labels, skip_blocks=[2])
    full_kappa = ntk_condition_number(m, obj, latents, labels)
    # the pruned model has no parameters of block 2 at all: equality shows they are not in the skipped NTK
    assert skipped_kappa == pytest.approx(ntk_condition_number(pruned, obj, latents, labels), rel=1e-9)
    assert abs(skipped_kappa - full_kappa) > 1e-3 * full_kappa
    batches = zico_batches()
    assert zico(m, obj, batches, skip_blocks=[2]) == pytest.approx(zico(pruned, obj, batches), rel=1e-9)


def test_score_candidates_uses_common_random_numbers():
    m, obj = model(), objective()
    ntk_batch, batches = batch(4), zico_batches()
    scores = score_candidates(m, obj, [[], [4, 0]], ntk_batch, batches, seed=7, zico_reduction="mean")
    assert [s.skipped_blocks for s in scores] == [[], [0, 4]]
    for s in scores:  # every candidate scored with the same seed, i.e. the same draws as a lone call
        assert s.ntk_condition_number == ntk_condition_number(m, obj, *ntk_batch, s.skipped_blocks, seed=7)
        assert s.zico == zico(m, obj, batches, s.skipped_blocks, seed=7, reduction="mean")
    assert scores[1].to_dict() == {"skipped_blocks": [0, 4], "ntk_condition_number": scores[1].ntk_condition_number,
                                   "zico": scores[1].zico}
    assert isinstance(scores[0], ProxyScores)


# ---------------------------------------------------------------------------------------------------- ZiCo


def test_zico_from_gradients_known_values():
    gradients = {
        # elements: [1, 3] -> mean|g| 2, std 1: 2;  [-1, 1] -> 1 / 1: 1;  [2, 2] -> std 0, left out.  log(3)
        "a": [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([3.0, 1.0, 2.0])],
        # no element varies: the layer is left out
        "b": [torch.zeros(2, 2), torch.zeros(2, 2)],
        # [4, 2] -> 3 / 1: log(3)
        "c": [torch.tensor([[4.0]]), torch.tensor([[2.0]])],
    }
    assert zico_from_gradients(gradients, reduction="sum") == pytest.approx(2 * math.log(3.0), rel=1e-12)
    assert zico_from_gradients(gradients, reduction="mean") == pytest.approx(math.log(3.0), rel=1e-12)
    # identical float64 values whose mean rounds (3 * 0.1 / 3 != 0.1) must not count as a tiny std
    spurious = {"a": gradients["a"], "d": [torch.tensor([0.1], dtype=torch.float64)] * 3}
    assert torch.tensor([0.1] * 3, dtype=torch.float64).std(correction=0) > 0  # the trap is real
    assert zico_from_gradients(spurious) == pytest.approx(math.log(3.0), rel=1e-12)
    assert zico_from_gradients({"b": gradients["b"]}) == -math.inf


def test_zico_rewards_consistent_gradients_and_mean_is_sum_over_layers():
    consistent = [torch.tensor([1.0, 2.0]), torch.tensor([1.1, 2.2]), torch.tensor([0.9, 1.8])]
    flipping = [torch.tensor([1.0, 2.0]), torch.tensor([-1.1, -2.2]), torch.tensor([0.9, 1.8])]  # same |g|
    assert zico_from_gradients({"w": consistent}) > zico_from_gradients({"w": flipping}) + 1.0
    layers = {f"w{k}": [g * (k + 1) for g in (consistent if k % 2 else flipping)] for k in range(5)}
    total = zico_from_gradients(layers, reduction="sum")
    assert total == pytest.approx(5 * zico_from_gradients(layers, reduction="mean"), rel=1e-12)
    # a layer scaled by a constant keeps its value (mean|g| and std scale alike; 4 is exact in float32)
    assert zico_from_gradients({"w": [4 * g for g in consistent]}) == pytest.approx(
        zico_from_gradients({"w": consistent}), rel=1e-12)


def test_zico_on_the_model_matches_a_backward_reference():
    m, obj = model(), objective()
    batches = zico_batches()
    value = zico(m, obj, batches, seed=5, reduction="sum")  # the reference below sums the layers

    # independent: .backward() on a copy, gradients read from .grad, the formula in numpy
    ref = copy.deepcopy(m)
    layers = {n: mod.weight for n, mod in ref.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
    grads = {n: [] for n in layers}
    generator = torch.Generator().manual_seed(5)
    for latents, labels in batches:
        noised = seeded_draw(obj, latents, generator)
        ref.zero_grad(set_to_none=True)
        out = ref(noised.noisy, timestep=noised.timesteps, class_labels=labels).sample
        obj.loss(out, latents, noised).mean().backward()
        for n, w in layers.items():
            grads[n].append(w.grad.double().numpy().copy())
    expected = 0.0
    for per_batch in grads.values():
        stacked = np.stack(per_batch)
        std = stacked.std(axis=0)
        expected += np.log((np.abs(stacked).mean(axis=0)[std > 0] / std[std > 0]).sum())
    assert value == pytest.approx(expected, rel=1e-9)


def test_zico_is_seeded_and_skipping_removes_the_blocks_layers():
    m, obj = model(), objective()
    batches = zico_batches()
    assert zico(m, obj, batches, seed=0) == zico(m, obj, batches, seed=0)
    assert zico(m, obj, batches, seed=1) != zico(m, obj, batches, seed=0)
    # "sum" / "mean" = number of contributing layers: all Linear/Conv2d of the tiny model (every weight matters),
    # minus the own layers of a skipped block (its shared embedder stays in use)
    all_layers = len({id(mod) for mod in m.modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))})
    block = m.transformer_blocks[3]
    own = layer_count(block) - layer_count(block.norm1.emb)
    assert own == 7
    for skip, expected in (([], all_layers), ([3], all_layers - own)):
        ratio = zico(m, obj, batches, skip, reduction="sum") / zico(m, obj, batches, skip, reduction="mean")
        assert ratio == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_are_refused_with_the_argument_name():
    m, obj = model(), objective()
    latents, labels = batch(4)
    with pytest.raises(ValueError, match="`latents`"):
        ntk_condition_number(m, obj, latents[:1], labels[:1])
    with pytest.raises(ValueError, match="`batches`"):
        zico(m, obj, zico_batches(d=1))
    with pytest.raises(ValueError, match="`reduction`"):
        zico(m, obj, zico_batches(), reduction="max")
    with pytest.raises(ValueError, match="`gradients`"):
        zico_from_gradients({"w": [torch.ones(2)]})
    with pytest.raises(ValueError, match="`ntk_batch`"):
        score_candidates(m, obj, [[]], (latents[:1], labels[:1]), zico_batches())
    with pytest.raises(ValueError, match="`zico_batches`"):
        score_candidates(m, obj, [[]], (latents, labels), zico_batches(d=1))
    m.prune_blocks([2])
    with pytest.raises(ValueError, match="`skip_blocks`.*already pruned"):
        ntk_condition_number(m, obj, latents, labels, skip_blocks=[2])
    for bad in ([[1], [2]], [[99]], [[0, 1, 3, 4, 5]], [[1, 1]]):  # pruned, out of range, every block, twice
        with pytest.raises(ValueError, match="`candidates`"):
            score_candidates(m, obj, bad, (latents, labels), zico_batches())
