import os

# Tests never reach the network: fail fast instead of retrying Hub calls.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for the subprocesses some tests start

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel  # noqa: E402

# Tiny models gain nothing from intra-op threads, and on a 2-core machine shared with other work, thread
# oversubscription made them up to 100x slower (measured).
torch.set_num_threads(1)


def make_tiny_dit(num_layers: int = 6, seed: int = 0, identical_embedders: bool = True) -> DiTTransformer2DModel:
    """A tiny DiT with learned sigma whose every weight matters (no zero-initialised modulation)."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        sample_size=8, patch_size=2, num_embeds_ada_norm=1000,
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        if identical_embedders:
            first = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)
    return model.eval()


def make_tiny_vae() -> AutoencoderKL:
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    ).eval()


def make_scheduler() -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)


@pytest.fixture
def tiny_dit():
    return make_tiny_dit()


@pytest.fixture
def model_inputs():
    g = torch.Generator().manual_seed(123)
    latents = torch.randn(4, 4, 8, 8, generator=g)
    timesteps = torch.tensor([0, 10, 500, 999])
    labels = torch.tensor([1, 7, 3, 1000])  # 1000 = the null class used by guidance
    return latents, timesteps, labels
