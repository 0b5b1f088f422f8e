"""diffusers-entprune: entropy-guided adaptive depth pruning (EntPruner) for diffusers DiT models."""

__version__ = "0.1.0.dev0"

from .config import EntPrunerConfig  # noqa: E402
from .export import load_id2label, pruning_report, save_pruned_pipeline  # noqa: E402
from .models import EntPrunedTransformer2DModel, initialize_dit_weights  # noqa: E402
from .pipelines import SiTPipeline  # noqa: E402
from .pruner import EntPruner  # noqa: E402

__all__ = [
    "EntPrunedTransformer2DModel",
    "EntPruner",
    "EntPrunerConfig",
    "initialize_dit_weights",
    "load_id2label",
    "pruning_report",
    "save_pruned_pipeline",
    "SiTPipeline",
]
