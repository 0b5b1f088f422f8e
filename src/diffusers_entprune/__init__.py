"""diffusers-entprune: entropy-guided adaptive depth pruning (EntPruner) for diffusers DiT and SiT models.

    from diffusers_entprune import EntPruner, EntPrunerConfig, EntPrunedTransformer2DModel, save_pruned_pipeline

`EntPruner` prunes inside any training loop (`EntPrunerConfig` holds every setting); `EntPrunedTransformer2DModel`
skips, prunes and exports blocks of a diffusers DiT; `save_pruned_pipeline` writes a plain `DiTPipeline` folder
(a `SiTPipeline` one for SiT) with its `PruningReport`. See README.md, "Prune inside your own training loop".
"""

__version__ = "0.1.0.dev0"

from .config import EntPrunerConfig  # noqa: E402
from .data import calibration_batches, load_dataset_or_embedded, vae_scale_factor  # noqa: E402
from .embedded import TINY_DIT_DIR, TINY_SIT_DIR  # noqa: E402
from .export import load_id2label, pruning_report, save_pruned_pipeline  # noqa: E402
from .models import EntPrunedTransformer2DModel, initialize_dit_weights  # noqa: E402
from .objectives import DiffusionObjective, FlowObjective, Objective  # noqa: E402
from .pipelines import SiTPipeline  # noqa: E402
from .pruner import EntPruner  # noqa: E402
from .report import PruningReport  # noqa: E402

__all__ = [
    "DiffusionObjective",
    "EntPrunedTransformer2DModel",
    "EntPruner",
    "EntPrunerConfig",
    "FlowObjective",
    "Objective",
    "PruningReport",
    "SiTPipeline",
    "TINY_DIT_DIR",
    "TINY_SIT_DIR",
    "calibration_batches",
    "initialize_dit_weights",
    "load_dataset_or_embedded",
    "load_id2label",
    "pruning_report",
    "save_pruned_pipeline",
    "vae_scale_factor",
]
