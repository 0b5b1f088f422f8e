import torch
from conftest import make_tiny_dit

from diffusers_entprune.lora import add_lora, merge_lora
from diffusers_entprune.models import EntPrunedTransformer2DModel


def test_lora_trains_adapters_only_and_merges_into_plain_weights(model_inputs):
    latents, timesteps, labels = model_inputs
    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit(num_layers=4)).eval()
    plain_keys = set(model.state_dict())
    with torch.no_grad():
        before = model(latents, timestep=timesteps, class_labels=labels).sample
    add_lora(model, rank=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("attn1.to_q" in n for n in trainable) and any("ff.net.2" in n for n in trainable)
    with torch.no_grad():
        assert torch.equal(model(latents, timestep=timesteps, class_labels=labels).sample, before)  # B starts at 0
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
        adapted = model(latents, timestep=timesteps, class_labels=labels).sample
    assert not torch.allclose(adapted, before)

    model.prune_blocks([1])  # a pruned block takes its adapters with it
    with torch.no_grad():
        pruned_adapted = model(latents, timestep=timesteps, class_labels=labels).sample
    assert merge_lora(model) == 6 * 3  # six adapted layers in each of the three kept blocks
    assert not any("lora" in n for n in model.state_dict())
    assert set(model.state_dict()) == {k for k in plain_keys if not k.startswith("transformer_blocks.3.")}
    with torch.no_grad():
        merged = model(latents, timestep=timesteps, class_labels=labels).sample
    assert torch.allclose(merged, pruned_adapted, atol=1e-5)
