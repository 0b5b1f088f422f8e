"""`evaluate` module: FID, KID, precision / recall, Inception Score, sFID and class fidelity of generated images.

    import evaluate
    from diffusers_entprune.evaluate_modules import IMAGE_METRICS_PATH

    metric = evaluate.load(IMAGE_METRICS_PATH)          # a local path: nothing is downloaded
    metric.compute(predictions=generated, references=real, feature_network="digits", labels=requested_classes)

``predictions`` and ``references`` are images as float arrays in [0, 1] of shape (3, H, W) (e.g. a DiT/SiT
pipeline's ``output_type="np"`` images transposed, or ``torch`` tensors); `evaluate` needs as many references as
predictions. The feature networks and the metrics are those of `entprune eval` (see diffusers_entprune.metrics).
"""

import datasets
import evaluate
import numpy as np
import torch

_DESCRIPTION = __doc__
_CITATION = """\
@inproceedings{heusel2017gans, title={GANs trained by a two time-scale update rule converge to a local Nash
  equilibrium}, author={Heusel, Martin and others}, booktitle={NeurIPS}, year={2017}}
@inproceedings{kynkaanniemi2019improved, title={Improved precision and recall metric for assessing generative
  models}, author={Kynk{\\"a}{\\"a}nniemi, Tuomas and others}, booktitle={NeurIPS}, year={2019}}
"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated images, float arrays in [0, 1] of shape (3, H, W).
    references: real images, the same format (as many as predictions).
    feature_network: "digits" (the embedded digit classifier) or "inception" (needs torch-fidelity).
    inception_weights: a local FID Inception weights file, for offline use.
    labels: the class each generated image was asked for (for class fidelity with a classifying network).
    seed: seed of KID's and the Inception Score's random subsets.
Returns:
    fid, kid_mean, kid_std, precision, recall, inception_score_mean, inception_score_std, sfid, class_fidelity
    (None where the feature network does not provide what a metric needs).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EntpruneImageMetrics(evaluate.Metric):
    def _info(self):
        image = datasets.Sequence(datasets.Sequence(datasets.Sequence(datasets.Value("float32"))))  # (3, H, W)
        return evaluate.MetricInfo(description=_DESCRIPTION, citation=_CITATION, inputs_description=_KWARGS_DESCRIPTION,
                                   features=datasets.Features({"predictions": image, "references": image}))

    def _compute(self, predictions, references, feature_network="digits", inception_weights=None, labels=None,
                 seed=0):
        from diffusers_entprune.evaluation import distribution_metrics, extract_features
        from diffusers_entprune.metrics import load_feature_network

        network = load_feature_network(feature_network, inception_weights)
        fake = extract_features(network, torch.from_numpy(np.asarray(predictions, dtype=np.float32)))
        real = extract_features(network, torch.from_numpy(np.asarray(references, dtype=np.float32)))
        fake_labels = torch.as_tensor(labels if labels is not None else [-1] * len(predictions)).long()
        metrics = distribution_metrics(real, fake, torch.full((len(references),), -1), fake_labels,
                                       classifies_labels=labels is not None and feature_network == "digits",
                                       seed=seed)
        metrics.pop("reference_class_fidelity")
        return metrics
