from .entpruned_transformer_2d import EntPrunedTransformer2DModel
from .initialization import initialize_dit_weights

__all__ = ["EntPrunedTransformer2DModel", "initialize_dit_weights"]
