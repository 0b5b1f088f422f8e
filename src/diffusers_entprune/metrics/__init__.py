from .features import FEATURE_NETWORKS, DigitsFeatures, Features, InceptionFeatures, load_feature_network
from .scores import frechet_distance, inception_score, kernel_distance, precision_recall

__all__ = [
    "FEATURE_NETWORKS",
    "DigitsFeatures",
    "Features",
    "InceptionFeatures",
    "load_feature_network",
    "frechet_distance",
    "inception_score",
    "kernel_distance",
    "precision_recall",
]
