"""`evaluate` modules, loadable from a local path: ``evaluate.load(IMAGE_METRICS_PATH)``."""

import os

IMAGE_METRICS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "entprune_image_metrics")
