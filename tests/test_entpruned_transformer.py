import copy

import pytest
import torch
from conftest import make_tiny_dit

from diffusers_entprune.models import EntPrunedTransformer2DModel

PRUNE_SETS = [[0], [5], [2], [0, 2, 5], [1, 2, 3, 4, 5]]


def wrap(model=None, **kwargs):
    return EntPrunedTransformer2DModel.from_transformer(model or make_tiny_dit(), **kwargs).eval()


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def test_unmodified_model_matches_diffusers_bit_for_bit(tiny_dit, model_inputs):
    reference = run(tiny_dit, model_inputs)
    assert torch.equal(run(wrap(copy.deepcopy(tiny_dit)), model_inputs), reference)


def test_wrapping_shares_weights_instead_of_copying(tiny_dit):
    model = EntPrunedTransformer2DModel.from_transformer(tiny_dit)
    assert model.proj_out_2.weight is tiny_dit.proj_out_2.weight
    assert model.transformer_blocks[3].ff.net[2].weight is tiny_dit.transformer_blocks[3].ff.net[2].weight


@pytest.mark.parametrize("blocks", PRUNE_SETS)
def test_skip_equals_prune(blocks, model_inputs):
    model = wrap()
    with model.skipping(blocks):
        skipped = run(model, model_inputs)
    full = run(model, model_inputs)
    assert not torch.allclose(skipped, full), "skipping must change the output"
    model.prune_blocks(blocks)
    assert torch.equal(run(model, model_inputs), skipped)
    assert model.num_blocks == 6 - len(blocks) == model.config.num_layers
    assert model.pruned_block_indices == sorted(blocks)


def test_skip_is_reversible_and_acts_as_identity(model_inputs):
    model = wrap()
    full = run(model, model_inputs)
    model.skip_blocks([1, 4])
    assert not torch.equal(run(model, model_inputs), full)
    model.skip_blocks([])
    assert torch.equal(run(model, model_inputs), full)
    # identity on the residual stream: the tokens entering block 2 equal those leaving block 0 when 1 is skipped
    latents, t, y = model_inputs
    tokens = model.embed(latents)
    with torch.no_grad(), model.skipping([1]):
        after_0 = model.transformer_blocks[0](tokens, timestep=t, class_labels=y)
        assert torch.equal(model.run_blocks(tokens, t, y, start=0), model.run_blocks(after_0, t, y, start=1))


def test_skip_with_gradients_leaves_skipped_block_untouched(model_inputs):
    model = wrap().train()
    with model.skipping([2]):
        model(*model_inputs).sample.square().mean().backward()
    assert all(p.grad is None for n, p in model.transformer_blocks[2].named_parameters() if ".emb." not in n)
    assert all(p.grad is not None for p in model.transformer_blocks[3].attn1.parameters())


def test_gradient_checkpointing_gives_same_output_and_gradients(model_inputs):
    a, b = wrap().train(), wrap().train()
    b.enable_gradient_checkpointing()
    for m in (a, b):
        m.skip_blocks([1])
        m(*model_inputs).sample.sum().backward()
    assert torch.allclose(a(*model_inputs).sample, b(*model_inputs).sample, atol=1e-6)
    grad_a, grad_b = (m.transformer_blocks[3].attn1.to_q.weight.grad for m in (a, b))
    assert torch.allclose(grad_a, grad_b, atol=1e-5)


def test_prune_keeps_module_and_parameter_identity_of_kept_blocks():
    model = wrap()
    kept_param = model.transformer_blocks[4].attn1.to_q.weight
    model.prune_blocks([0, 3])
    assert model.kept_block_indices == [1, 2, 4, 5]
    assert model.transformer_blocks[2].attn1.to_q.weight is kept_param


def test_integer_types_from_rankings_are_accepted():
    import numpy as np

    model = wrap()
    model.prune_blocks(np.array([4, 1]))
    model.prune_blocks(torch.tensor([0]))
    assert model.kept_block_indices == [2, 3, 5]
    assert all(type(i) is int for i in model.kept_block_indices)


def test_successive_prunes_use_original_indices(model_inputs):
    once, twice = wrap(), wrap()
    once.prune_blocks([1, 3, 4])
    twice.prune_blocks([3])
    twice.prune_blocks([1, 4])
    assert twice.kept_block_indices == once.kept_block_indices == [0, 2, 5]
    assert torch.equal(run(twice, model_inputs), run(once, model_inputs))


def test_pruning_reduces_parameters_and_block_calls():
    model = wrap()
    before = sum(p.numel() for p in model.parameters())
    calls = []
    model.prune_blocks([0, 1, 2])
    for block in model.transformer_blocks:
        block.register_forward_hook(lambda *a: calls.append(1))
    run(model, (torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.tensor([2])))
    assert len(calls) == 3
    assert sum(p.numel() for p in model.parameters()) < before


# ---------------------------------------------------------------- embedder and label-dropout policies


def test_embedder_copies_are_tied_into_one_module():
    model = wrap()
    embedders = {id(block.norm1.emb) for block in model.transformer_blocks}
    assert len(embedders) == 1


def test_tied_embedder_stays_identical_after_training_and_pruning_block_0(model_inputs):
    model = wrap().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(*model_inputs).sample.square().mean().backward()
    optimizer.step()
    model.eval()
    with model.skipping([0]):
        skipped = run(model, model_inputs)
    model.prune_blocks([0])
    plain = model.to_dit_transformer().eval()
    first = plain.transformer_blocks[0].norm1.emb.state_dict()
    for block in plain.transformer_blocks[1:]:
        assert all(torch.equal(v, first[k]) for k, v in block.norm1.emb.state_dict().items())
    assert torch.equal(run(plain, model_inputs), skipped)


def test_diverged_embedder_copies_are_refused_unless_a_policy_is_chosen(model_inputs):
    diverged = make_tiny_dit(identical_embedders=False)
    with pytest.raises(ValueError, match="embedder_copies"):
        EntPrunedTransformer2DModel.from_transformer(copy.deepcopy(diverged))
    kept = wrap(copy.deepcopy(diverged), embedder_copies="keep")
    assert torch.equal(run(kept, model_inputs), run(diverged, model_inputs))
    with pytest.raises(ValueError, match="embedder_copies='keep'"):
        kept.prune_blocks([0])
    kept.prune_blocks([3])  # other blocks are fine
    tied = wrap(copy.deepcopy(diverged), embedder_copies="tie_to_first")
    assert len({id(b.norm1.emb) for b in tied.transformer_blocks}) == 1
    with pytest.raises(ValueError, match="embedder_copies"):
        wrap(copy.deepcopy(diverged), embedder_copies="shared")


def test_per_block_label_dropout_is_disabled_and_done_once_per_sample(model_inputs):
    model = wrap().train()
    assert all(b.norm1.emb.class_embedder.dropout_prob == 0.0 for b in model.transformer_blocks)
    with torch.no_grad():
        assert torch.equal(model(*model_inputs).sample, model(*model_inputs).sample)  # no hidden randomness
    labels = torch.arange(1000)
    g = torch.Generator().manual_seed(0)
    dropped = model.drop_class_labels(labels, 0.1, generator=g)
    share = (dropped == model.null_class_label).float().mean().item()
    assert 0.07 < share < 0.13
    assert torch.equal(dropped[dropped != 1000], labels[dropped != 1000])
    assert torch.equal(model.drop_class_labels(labels, 0.0), labels)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "indices, error, match",
    [
        ([0, 1, 2, 3, 4, 5], ValueError, "keeps zero blocks"),
        ([6], ValueError, "out of range"),
        ([-1], ValueError, "out of range"),
        ([2, 2], ValueError, "more than once"),
        ([1.0], TypeError, "integers"),
        ([True], TypeError, "integers"),
        (3, TypeError, "list of block indices"),
    ],
)
def test_bad_prune_indices_are_refused_with_the_argument_named(indices, error, match):
    model = wrap()
    with pytest.raises(error, match=match):
        model.prune_blocks(indices)
    assert model.num_blocks == 6  # nothing changed


def test_already_pruned_block_and_skipping_everything_are_refused():
    model = wrap()
    model.prune_blocks([2])
    with pytest.raises(ValueError, match="already pruned"):
        model.prune_blocks([2])
    with pytest.raises(ValueError, match="no transformer block"):
        model.skip_blocks([0, 1, 3, 4, 5])


def test_export_refuses_skipped_blocks():
    model = wrap()
    model.skip_blocks([1])
    with pytest.raises(ValueError, match="skipped"):
        model.to_dit_transformer()


def test_non_dit_models_are_refused(tmp_path):
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(TypeError, match="`transformer`"):
        EntPrunedTransformer2DModel.from_transformer(unet)
    unet.save_pretrained(tmp_path / "unet")
    with pytest.raises(ValueError, match="pretrained_model_name_or_path.*UNet2DModel"):
        EntPrunedTransformer2DModel.from_pretrained(tmp_path / "unet")


def test_weights_that_do_not_match_num_layers_are_refused(tmp_path):
    import json

    make_tiny_dit(num_layers=6).save_pretrained(tmp_path / "dit")
    config_path = tmp_path / "dit" / "config.json"
    config = json.loads(config_path.read_text())
    for wrong in (4, 8):  # diffusers would silently drop blocks 4-5, or silently add random blocks 6-7
        config["num_layers"] = wrong
        config_path.write_text(json.dumps(config))
        with pytest.raises(ValueError, match="do not match the config"):
            EntPrunedTransformer2DModel.from_pretrained(tmp_path / "dit")


def test_legacy_transformer2d_folder_loads(tmp_path, model_inputs):
    """facebook/DiT-XL-2-256 declares the legacy `Transformer2DModel` with its extra config keys."""
    import json

    dit = make_tiny_dit()
    dit.save_pretrained(tmp_path / "transformer")
    config_path = tmp_path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(_class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None,
                  use_linear_projection=False, only_cross_attention=False)
    config_path.write_text(json.dumps(config))
    model = EntPrunedTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer").eval()
    assert torch.equal(run(model, model_inputs), run(dit, model_inputs))


def test_direct_construction_keeps_independent_embedders_and_prunes(model_inputs):
    model = EntPrunedTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=4, sample_size=8, patch_size=2).eval()
    assert model.embedder_copies == "keep" and model.kept_block_indices == [0, 1, 2, 3]
    assert model.config.sample_size == 8  # the config reaches DiT's __init__ through our signature
    with model.skipping([2]):
        skipped = run(model, model_inputs)
    model.prune_blocks([2])
    assert torch.equal(run(model, model_inputs), skipped)


def test_parameter_counts_split_the_shared_embedder_from_the_blocks():
    from conftest import make_tiny_dit

    from diffusers_entprune.models import EntPrunedTransformer2DModel

    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=6))
    outside, per_block = model.parameter_counts()
    unique = sum(p.numel() for p in model.parameters())
    assert len(set(per_block)) == 1 and outside + sum(per_block) == unique
    embedder = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
    assert outside > embedder  # the shared embedder counts once, outside the blocks
    model.prune_blocks([0, 2])
    assert model.parameter_counts() == (outside, per_block[:4])
    assert sum(p.numel() for p in model.parameters()) == outside + 4 * per_block[0]
