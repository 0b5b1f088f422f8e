"""DiT's own initialisation (adaLN-Zero), for training a DiT-format transformer from scratch.

A freshly constructed `DiTTransformer2DModel` keeps PyTorch's default initialisation; the DiT paper's recipe makes
every block start as the identity (zero-initialised modulation) and the output start at zero, which trains much
better. We follow the recipe as the paper describes it.
"""

import torch
from diffusers import DiTTransformer2DModel
from torch import nn


@torch.no_grad()
def initialize_dit_weights(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    for module in transformer.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    patch_proj = transformer.pos_embed.proj
    nn.init.xavier_uniform_(patch_proj.weight.view(patch_proj.weight.shape[0], -1))
    nn.init.zeros_(patch_proj.bias)

    first_embedder = transformer.transformer_blocks[0].norm1.emb
    nn.init.normal_(first_embedder.class_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(first_embedder.timestep_embedder.linear_1.weight, std=0.02)
    nn.init.normal_(first_embedder.timestep_embedder.linear_2.weight, std=0.02)
    for block in transformer.transformer_blocks:
        # One conditioning embedder, as in the original DiT: every block's copy starts equal to block 0's.
        block.norm1.emb.load_state_dict(first_embedder.state_dict())
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)

    for layer in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return transformer
