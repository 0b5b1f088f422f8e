import argparse

import pytest
import torch
from original_dit_reference import ReferenceDiT

from diffusers_entprune.convert import (
    convert_state_dict,
    infer_config,
    load_original_state_dict,
    transformer_from_original,
)


def reference(freq_shift=0, **kwargs):
    torch.manual_seed(0)
    model = ReferenceDiT(freq_shift=freq_shift, **kwargs)
    with torch.no_grad():  # adaLN-Zero would zero most paths; random weights make every one of them count
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def inputs(t):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(t), 4, 8, 8, generator=g)
    return x, torch.tensor(t), torch.tensor([0, 3, 9, 10][: len(t)])  # 10 = the "no class" row


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("t", [[10, 500, 999, 0], [0.0, 0.25, 0.7, 1.0]])  # DiT's integer steps, SiT's times
def test_converted_model_matches_the_reference_architecture(t):
    ref = reference(freq_shift=1)  # the reference with diffusers' timestep features: must agree exactly
    model = transformer_from_original(ref.state_dict(), num_attention_heads=4)
    assert model.config.num_layers == 3 and model.config.num_embeds_ada_norm == 10
    assert model.config.sample_size == 8 and model.config.out_channels == 8
    x, timesteps, labels = inputs(t)
    with torch.no_grad():
        expected = ref(x, timesteps, labels)
        got = model(x, timestep=timesteps, class_labels=labels).sample
    assert relative(got, expected) < 1e-5


def test_difference_to_the_original_timestep_convention_is_what_the_docs_say():
    ref = reference(freq_shift=0)  # the original code's convention
    model = transformer_from_original(ref.state_dict(), num_attention_heads=4)
    with torch.no_grad():
        x, timesteps, labels = inputs([10, 500, 999, 0])
        dit = relative(model(x, timestep=timesteps, class_labels=labels).sample, ref(x, timesteps, labels))
        x, times, labels = inputs([0.0, 0.25, 0.7, 1.0])
        sit = relative(model(x, timestep=times, class_labels=labels).sample, ref(x, times, labels))
    # DiT's integer timesteps: the features differ by up to 1.94, so the outputs differ clearly (how much depends
    # on the weights: 36% on this random model, 2.5% on another one in facts.md); SiT's t in [0, 1]: features
    # differ by at most 0.0027 and the outputs by 5e-4 here
    assert dit > 1e-2
    assert sit < 1e-3


def test_key_map_splits_qkv_copies_embedders_and_drops_pos_embed():
    sd = reference().state_dict()
    out = convert_state_dict(sd, num_layers=3)
    assert not any(k.startswith("pos_embed.pos_embed") or k == "pos_embed" for k in out)
    q, k, v = sd["blocks.1.attn.qkv.weight"].chunk(3)
    assert torch.equal(out["transformer_blocks.1.attn1.to_q.weight"], q)
    assert torch.equal(out["transformer_blocks.1.attn1.to_k.weight"], k)
    assert torch.equal(out["transformer_blocks.1.attn1.to_v.bias"], sd["blocks.1.attn.qkv.bias"].chunk(3)[2])
    for i in range(3):  # one copy of DiT's single embedder in every diffusers block
        assert torch.equal(out[f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight"],
                           sd["y_embedder.embedding_table.weight"])
    assert torch.equal(out["proj_out_1.weight"], sd["final_layer.adaLN_modulation.1.weight"])
    assert torch.equal(out["proj_out_2.bias"], sd["final_layer.linear.bias"])


def test_training_checkpoints_give_their_ema_weights(tmp_path):
    ema, raw = reference().state_dict(), {k: v + 1 for k, v in reference().state_dict().items()}
    args = argparse.Namespace(model="DiT-XL/2", global_batch_size=256)  # the original training script stores these
    torch.save({"model": raw, "ema": ema, "opt": {}, "args": args}, tmp_path / "train.pt")
    torch.save(ema, tmp_path / "released.pt")
    for name in ("train.pt", "released.pt"):
        loaded = load_original_state_dict(str(tmp_path / name))
        assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_checkpoints_that_do_not_fit_are_refused():
    sd = reference().state_dict()
    with pytest.raises(ValueError, match="num_attention_heads"):
        infer_config(sd)  # hidden 64 is no standard size: the heads must be given
    bad = dict(sd, **{"blocks.2.mlp.fc1.weight": torch.zeros(100, 64)})
    with pytest.raises(ValueError, match="does not fit"):
        transformer_from_original(bad, num_attention_heads=4)
    with pytest.raises(ValueError, match="does not know"):
        transformer_from_original(dict(sd, **{"extra.weight": torch.zeros(1)}), num_attention_heads=4)
    with pytest.raises(ValueError, match="missing"):
        transformer_from_original({k: v for k, v in sd.items() if not k.startswith("t_embedder")},
                                  num_attention_heads=4)
    with pytest.raises(ValueError, match="positional embedding"):
        transformer_from_original(dict(sd, pos_embed=sd["pos_embed"] + 1), num_attention_heads=4)
    no_pos = {k: v for k, v in sd.items() if k != "pos_embed"}
    with pytest.raises(ValueError, match="sample_size"):
        transformer_from_original(no_pos, num_attention_heads=4)
    assert transformer_from_original(no_pos, num_attention_heads=4, sample_size=8).config.sample_size == 8


def test_convert_command_writes_a_dit_pipeline_that_samples(tmp_path):
    from conftest import make_tiny_vae
    from diffusers import DiTPipeline

    from diffusers_entprune.cli import main

    ref = reference(freq_shift=1, num_classes=1000)  # DiTPipeline guides with the null class 1000
    torch.save(ref.state_dict(), tmp_path / "DiT-tiny.pt")
    make_tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "converted"
    assert main(["convert", "--checkpoint", str(tmp_path / "DiT-tiny.pt"), "--vae", str(tmp_path / "vae"),
                 "--num_attention_heads", "4", "--output_dir", str(out)]) == 0
    pipe = DiTPipeline.from_pretrained(out)
    x, timesteps, labels = inputs([10, 500, 999, 0])
    with torch.no_grad():
        assert relative(pipe.transformer(x, timestep=timesteps, class_labels=labels).sample,
                        ref(x, timesteps, labels)) < 1e-5
    images = pipe(class_labels=[3], num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    with pytest.raises(FileExistsError, match="output_dir"):  # an existing folder is kept
        main(["convert", "--checkpoint", str(tmp_path / "DiT-tiny.pt"), "--vae", str(tmp_path / "vae"),
              "--num_attention_heads", "4", "--output_dir", str(out)])
    ten_classes = tmp_path / "ten.pt"
    torch.save(reference(freq_shift=1).state_dict(), ten_classes)
    with pytest.raises(ValueError, match="null class 1000"):
        main(["convert", "--checkpoint", str(ten_classes), "--vae", str(tmp_path / "vae"),
              "--num_attention_heads", "4", "--output_dir", str(tmp_path / "ten")])
    assert not (tmp_path / "ten").exists()


def test_convert_command_writes_a_sit_pipeline(tmp_path):
    from conftest import make_tiny_vae

    from diffusers_entprune.cli import main
    from diffusers_entprune.pipelines import SiTPipeline

    ref = reference(freq_shift=0)  # the original convention: at SiT's times the gap is small
    torch.save({"ema": ref.state_dict(), "model": {}}, tmp_path / "SiT-tiny.pt")
    make_tiny_vae().save_pretrained(tmp_path / "vae")
    out = tmp_path / "sit"
    assert main(["convert", "--checkpoint", str(tmp_path / "SiT-tiny.pt"), "--model_type", "sit",
                 "--vae", str(tmp_path / "vae"), "--num_attention_heads", "4", "--output_dir", str(out)]) == 0
    pipe = SiTPipeline.from_pretrained(out)
    x, times, labels = inputs([0.0, 0.25, 0.7, 1.0])
    with torch.no_grad():
        assert relative(pipe.transformer(x, timestep=times, class_labels=labels).sample, ref(x, times, labels)) < 1e-3
    images = pipe(class_labels=[3, 10], num_inference_steps=2, sampler="heun", generator=torch.manual_seed(0),
                  output_type="np").images  # 10 classes here: the null class is 10
    assert images.shape == (2, 16, 16, 3)
