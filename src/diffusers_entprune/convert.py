"""Original DiT / SiT checkpoints (``DiT-XL-2-256x256.pt``, ``SiT-XL-2-256x256.pt``, training checkpoints) ->
diffusers `DiTTransformer2DModel`.

SiT's backbone is DiT's, with the same key names, so one key map serves both. The config is read off the weights
(hidden size, depth, patch size, channels, classes, and the image size from the stored positional embedding);
the number of attention heads is not in the weights and comes from the standard DiT/SiT sizes or an argument.

Not bit-exact: diffusers' sinusoidal timestep features divide the frequency exponent by ``half - 1`` where the
original code divides by ``half`` (``downscale_freq_shift=1`` vs 0), and `DiTTransformer2DModel` cannot be
configured otherwise. For DiT's integer timesteps 0..999 the features differ by up to 1.94, and the converted
model's output differs from the original code's by an amount that depends on the weights (relative L2: 2.5% on
one small random model, 36% on the random model of `tests/test_convert.py`). For SiT's t in [0, 1] the features
differ by at most 0.0027 and the output by under 1e-3 relative (5e-4 on the test's model). With diffusers'
convention the converted model equals a reference implementation of the original architecture to 1e-5
(`tests/test_convert.py`). A converted DiT is therefore a close but not identical model; fine-tuning (which the
pruning script does anyway) adapts it to the diffusers features.
"""

import argparse
import math
import pickle

import torch

# hidden size -> heads of the standard sizes (S, B, L, XL); all use 64- or 72-wide heads
STANDARD_HEADS = {384: 6, 768: 12, 1024: 16, 1152: 16}

# original name (inside a block, or at the top) -> diffusers name
BLOCK_KEYS = {
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
TOP_KEYS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}
EMBEDDER_KEYS = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table",
}


def load_original_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Read a released checkpoint (a plain state dict) or a training checkpoint (``{"model", "ema", ...}``; the EMA
    weights are taken, as the original sampling code does)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        checkpoint = load_file(path)
    else:
        try:  # tensors and containers only: unpickling anything else could run code
            # the original training script stores its argparse.Namespace under "args": a plain attribute container
            with torch.serialization.safe_globals([argparse.Namespace]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = next((line.strip() for line in str(error).splitlines() if "Unsupported global" in line), "")
            raise pickle.UnpicklingError(
                f"`checkpoint`={path!r} holds Python objects besides tensors and plain containers; loading them could "
                "run arbitrary code, so it is refused. Re-save its state dict (or as .safetensors) where you trust "
                f"the file.{f' ({found})' if found else ''}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"`checkpoint`={path!r} does not hold a state dict.")
    for key in ("ema", "model"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def infer_config(state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None,
                 sample_size: int | None = None) -> dict:
    """`DiTTransformer2DModel` config of an original-format state dict; refuses what is not a DiT/SiT."""
    required = ["x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight", "blocks.0.attn.qkv.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"`checkpoint` is not an original DiT/SiT state dict: keys {missing} are missing.")
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    num_layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    if out_features % (patch * patch):
        raise ValueError(f"`checkpoint`: the final layer's {out_features} outputs do not fit patch size {patch}.")
    heads = num_attention_heads or STANDARD_HEADS.get(hidden)
    if heads is None:
        raise ValueError(f"`num_attention_heads`: hidden size {hidden} is not a standard DiT/SiT size "
                         f"({sorted(STANDARD_HEADS)}); pass the number of heads.")
    if hidden % heads:
        raise ValueError(f"`num_attention_heads`={heads} does not divide the hidden size {hidden}.")
    if sample_size is None:
        if "pos_embed" not in state_dict:
            raise ValueError("`sample_size`: the checkpoint has no `pos_embed` to read the latent size from; pass it "
                             "(the image size divided by 8).")
        tokens = state_dict["pos_embed"].shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"`checkpoint`: pos_embed holds {tokens} tokens, not a square grid.")
        sample_size = side * patch
    rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    return dict(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=in_channels,
                out_channels=out_features // (patch * patch), num_layers=num_layers, sample_size=sample_size,
                patch_size=patch, num_embeds_ada_norm=rows - 1)  # the last row is the "no class" embedding


def convert_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Rename original keys to diffusers ones: split qkv, copy the t/y embedders into every block, drop pos_embed
    (diffusers rebuilds it). Every original key must be used exactly once; anything left over is refused."""
    out, used = {}, set()

    def take(src: str, dst: str):
        for suffix in ("weight", "bias"):
            key = f"{src}.{suffix}"
            if key in state_dict:
                out[f"{dst}.{suffix}"] = state_dict[key]
                used.add(key)

    for src, dst in TOP_KEYS.items():
        take(src, dst)
    for i in range(num_layers):
        for src, dst in BLOCK_KEYS.items():
            take(f"blocks.{i}.{src}", f"transformer_blocks.{i}.{dst}")
        for suffix in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{suffix}"
            q, k, v = state_dict[key].chunk(3, dim=0)  # rows are [q; k; v]
            for name, part in zip(("to_q", "to_k", "to_v"), (q, k, v)):
                out[f"transformer_blocks.{i}.attn1.{name}.{suffix}"] = part.clone()
            used.add(key)
        for src, dst in EMBEDDER_KEYS.items():  # diffusers keeps one copy of DiT's embedder per block
            for suffix in ("weight", "bias"):
                key = f"{src}.{suffix}"
                if key in state_dict:
                    out[f"transformer_blocks.{i}.{dst}.{suffix}"] = state_dict[key]
                    used.add(key)
    used.add("pos_embed")
    unused = sorted(set(state_dict) - used)
    if unused:
        raise ValueError(f"`checkpoint` holds keys this converter does not know: {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}; it is not a standard DiT/SiT.")
    return out


def transformer_from_original(state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None,
                              sample_size: int | None = None):
    """A `DiTTransformer2DModel` holding an original checkpoint's weights (strictly: every weight placed)."""
    from diffusers import DiTTransformer2DModel

    config = infer_config(state_dict, num_attention_heads, sample_size)
    model = DiTTransformer2DModel(**config)
    converted = convert_state_dict(state_dict, config["num_layers"])
    expected = model.state_dict()
    wrong = [k for k, v in converted.items() if k not in expected or expected[k].shape != v.shape]
    missing = sorted(set(expected) - set(converted))
    if wrong or missing:
        raise ValueError(f"`checkpoint` does not fit the inferred config {config}: mismatched {wrong[:5]}, "
                         f"missing {missing[:5]}.")
    model.load_state_dict(converted, strict=True)
    if "pos_embed" in state_dict:  # the rebuilt positional embedding must be the one the model was trained with
        rebuilt = model.pos_embed.pos_embed.to(state_dict["pos_embed"].dtype)
        if rebuilt.shape != state_dict["pos_embed"].shape or \
                not torch.allclose(rebuilt, state_dict["pos_embed"], atol=1e-5):
            raise ValueError("`checkpoint`: its stored positional embedding differs from the one diffusers builds "
                             f"for sample_size={config['sample_size']}; check `sample_size`.")
    return model.eval()


def convert_to_pipeline(checkpoint: str, vae, output_dir: str, model_type: str = "dit",
                        num_attention_heads: int | None = None, sample_size: int | None = None,
                        id2label: dict | None = None, overwrite: bool = False) -> str:
    """An original DiT or SiT checkpoint + a diffusers VAE -> a pipeline folder, written under a temporary name and
    renamed into place.

    ``dit``: a `DiTPipeline` (DDIM with DiT's linear betas); ``sit``: a `SiTPipeline` (flow-matching Euler
    scheduler; Heun, dopri5 and SDE samplers are options of its call). Both go through `save_pruned_pipeline`
    (weights read back and checked, with a report and a model card).
    """
    from .export import save_pruned_pipeline
    from .model_types import check_model_type
    from .output_dir import check_output_dir

    check_model_type(model_type)
    check_output_dir(output_dir, overwrite, inputs={"checkpoint": checkpoint})
    model = transformer_from_original(load_original_state_dict(checkpoint), num_attention_heads, sample_size)
    if model.config.in_channels != vae.config.latent_channels:
        raise ValueError(f"`vae` has {vae.config.latent_channels} latent channels but the checkpoint expects "
                         f"{model.config.in_channels}.")
    report = {"source": checkpoint, "pruned_by": "not pruned: converted from an original checkpoint (timestep "
              "features follow diffusers; see convert.py)"}
    if model_type == "sit":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return save_pruned_pipeline(output_dir, model, vae, FlowMatchEulerDiscreteScheduler(), id2label=id2label,
                                    overwrite=overwrite, report=report, model_type="sit")
    from diffusers import DDIMScheduler

    if model.config.num_embeds_ada_norm != 1000:
        raise ValueError(f"`checkpoint` has {model.config.num_embeds_ada_norm} classes; `DiTPipeline` guides with "
                         "the null class 1000, so only 1000-class (ImageNet) checkpoints make a working pipeline.")
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              clip_sample=False)
    return save_pruned_pipeline(output_dir, model, vae, scheduler, id2label=id2label, overwrite=overwrite,
                                report=report)
