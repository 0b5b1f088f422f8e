"""Distribution metrics and `entprune eval`: known answers on constructed cases, a complete metrics.json, and the
same numbers from one process and from two."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import DiTPipeline

from diffusers_entprune.cli import main
from diffusers_entprune.embedded import DIGITS_CLASSIFIER_DIR, load_digits_dataset
from diffusers_entprune.evaluation import extract_features, reference_images
from diffusers_entprune.metrics import DigitsFeatures, frechet_distance, kernel_distance, precision_recall


@pytest.fixture(scope="module")
def downstream_test():
    images, labels = reference_images(load_digits_dataset("downstream", split="test"), 32)
    return images, labels


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(downstream_test):
    images, _ = downstream_test
    network = DigitsFeatures()
    real = extract_features(network, images)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(images.shape, generator=generator)
    fids, kids = [], []
    for level in (0.0, 0.05, 0.1, 0.2, 0.4):
        noisy = extract_features(network, (images + level * noise).clamp(0, 1))
        fids.append(frechet_distance(real.pooled, noisy.pooled))
        kids.append(kernel_distance(real.pooled, noisy.pooled)[0])
    # measured: FID 0 / 0.021 / 0.24 / 2.19 / 9.54; KID -0.0096 / -0.0083 / 0.0047 / 0.119 / 0.546 (the unbiased
    # estimator puts a set against itself slightly below 0: the cross term includes each point's self-similarity)
    assert fids[0] < 1e-6 and abs(kids[0]) < 0.02
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    sfid_clean = frechet_distance(real.spatial, real.spatial)
    assert sfid_clean < 1e-6 < frechet_distance(real.spatial, extract_features(network, (images + 0.2 * noise)
                                                                               .clamp(0, 1)).spatial)


def test_precision_and_recall_on_constructed_cases():
    generator = torch.Generator().manual_seed(0)
    centres = 10.0 * torch.eye(8, dtype=torch.float64)[:4]  # four well-separated modes

    def draw(n, modes=(0, 1, 2, 3), spread=1.0):
        which = torch.tensor(modes)[torch.arange(n) % len(modes)]
        return centres[which] + spread * torch.randn(n, 8, generator=generator, dtype=torch.float64)

    # measured (k = 3, 8 dimensions): same distribution 0.857 / 0.857; one mode 0.848 / 0.21; too wide 0.04 / 0.99
    real = draw(600)
    assert precision_recall(real, real) == (1.0, 1.0)
    precision, recall = precision_recall(real, draw(600))  # the same distribution, new draws
    assert precision > 0.75 and recall > 0.75
    precision, recall = precision_recall(real, draw(600, modes=(0,)))  # realistic, one mode of four: mode dropping
    assert precision > 0.75 and 0.15 < recall < 0.3
    precision, recall = precision_recall(real, draw(600, spread=3.0))  # covers the data, but mostly unrealistic
    assert precision < 0.3 and recall > 0.75
    assert precision_recall(real, real + 20.0) == (0.0, 0.0)  # nothing realistic, nothing covered


def test_class_fidelity_of_real_images_is_the_classifiers_test_accuracy(tmp_path):
    out = tmp_path / "eval"
    main(["eval", "--num_samples", "8", "--batch_size", "8", "--latency_repeats", "0", "--num_grid_images", "0",
          "--num_inference_steps", "2", "--output_dir", str(out)])
    metrics = json.load(open(out / "metrics.json"))
    trained = json.load(open(os.path.join(DIGITS_CLASSIFIER_DIR, "training_info.json")))
    assert metrics["reference_class_fidelity"] == pytest.approx(trained["test_accuracy"]["downstream"], abs=1e-6)


def test_eval_writes_a_complete_metrics_json_and_a_grid(tmp_path):
    out = tmp_path / "eval"
    code = main(["eval", "--model_type", "sit", "--sampler", "heun", "--num_samples", "20", "--batch_size", "10",
                 "--num_inference_steps", "4", "--guidance_scale", "1.5", "--reference", "embedded:pretrain",
                 "--latency_repeats", "1", "--latency_batch_size", "2", "--seed", "3", "--output_dir", str(out)])
    assert code == 0
    metrics = json.load(open(out / "metrics.json"))
    for key in ("fid", "kid_mean", "kid_std", "precision", "recall", "inception_score_mean", "inception_score_std",
                "sfid", "class_fidelity", "reference_class_fidelity", "transformer_parameters", "flops_per_forward"):
        assert isinstance(metrics[key], (int, float)), key
    assert metrics["pretrained_model_name_or_path"] == "embedded:tiny-sit-digits" and metrics["model_type"] == "sit"
    assert metrics["num_samples"] == 20 and metrics["num_reference_images"] == 180
    assert metrics["reference"]["dataset"] == "embedded:digits/pretrain"
    sampling = metrics["sampling"]  # FID means nothing without these
    assert (sampling["pipeline"], sampling["sampler"], sampling["num_inference_steps"], sampling["guidance_scale"],
            sampling["seed"]) == ("SiTPipeline", "heun", 4, 1.5, 3)
    assert sampling["class_labels"] == list(range(10))
    assert metrics["latency"]["batch_size"] == 2 and metrics["latency"]["seconds_per_call"] > 0
    assert metrics["class_fidelity"] > 0.5  # the SiT base draws the requested digits in its own style
    assert (out / "samples.png").exists()


@pytest.mark.parametrize("extra, error, match", [
    (["--feature_network", "inception", "--reference", "embedded:downstream"], ImportError, "torch-fidelity"),
    (["--label_column", "digit"], ValueError, "--label_column.*digit"),
    (["--reference", "embedded:cifar"], SystemExit, "2"),
    (["--sampler", "heun"], ValueError, "--sampler.*SiT"),
    (["--class_labels", "1000"], ValueError, "class_labels"),
])
def test_eval_refuses_bad_input_and_writes_nothing(tmp_path, extra, error, match):
    out = tmp_path / "eval"
    with pytest.raises(error, match=match):
        main(["eval", "--num_samples", "4", "--num_inference_steps", "1", "--latency_repeats", "0",
              "--output_dir", str(out), *extra])
    assert not out.exists()


def test_two_processes_give_the_metrics_of_one(tmp_path):
    common = ["--num_samples", "9", "--batch_size", "3", "--num_inference_steps", "3", "--latency_repeats", "0",
              "--max_reference_images", "61"]  # odd counts: uneven shards
    main(["eval", *common, "--output_dir", str(tmp_path / "one")])
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "diffusers_entprune.cli",
                             "eval", *common, "--output_dir", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.load(open(tmp_path / name / "metrics.json")) for name in ("one", "two"))
    assert two["num_processes"] == 2 and one["num_processes"] == 1
    assert two["num_reference_images"] == one["num_reference_images"] == 61
    for key in ("fid", "kid_mean", "precision", "recall", "inception_score_mean", "sfid", "class_fidelity",
                "reference_class_fidelity"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key


def test_evaluate_module_loads_from_a_local_path_and_agrees_with_the_api(monkeypatch):
    import evaluate

    from diffusers_entprune.evaluate_modules import IMAGE_METRICS_PATH

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real, _ = reference_images(load_digits_dataset("downstream", split="test"), 32)
    fake, labels = reference_images(load_digits_dataset("pretrain", split="test"), 32)
    result = evaluate.load(IMAGE_METRICS_PATH).compute(predictions=list(fake.numpy()),
                                                       references=list(real.numpy()), labels=labels.tolist())
    network = DigitsFeatures()
    expected = frechet_distance(extract_features(network, real).pooled, extract_features(network, fake).pooled)
    assert result["fid"] == pytest.approx(expected, rel=1e-5)
    trained = json.load(open(os.path.join(DIGITS_CLASSIFIER_DIR, "training_info.json")))
    assert result["class_fidelity"] == pytest.approx(trained["test_accuracy"]["pretrain"], abs=1e-6)
    assert 0 <= result["precision"] <= 1 and result["sfid"] > 0


def test_eval_compares_with_the_original_on_the_same_machine_and_batch(tmp_path):
    from diffusers_entprune.embedded import TINY_DIT_DIR
    from diffusers_entprune.export import save_pruned_pipeline
    from diffusers_entprune.models import EntPrunedTransformer2DModel

    transformer = EntPrunedTransformer2DModel.from_pretrained(TINY_DIT_DIR, subfolder="transformer")
    base = DiTPipeline.from_pretrained(TINY_DIT_DIR)
    transformer.prune_blocks([1, 3, 5, 7, 9, 11])
    save_pruned_pipeline(str(tmp_path / "pruned"), transformer, base.vae, base.scheduler)
    out = tmp_path / "eval"
    assert main(["eval", "--pretrained_model_name_or_path", str(tmp_path / "pruned"), "--original_model_name_or_path",
                 "embedded", "--num_samples", "8", "--num_inference_steps", "2", "--latency_repeats", "1",
                 "--latency_batch_size", "2", "--num_grid_images", "0", "--output_dir", str(out)]) == 0
    comparison = json.load(open(out / "metrics.json"))["comparison"]
    assert comparison["original_model_name_or_path"] == "embedded:tiny-dit-digits"
    assert comparison["original_num_layers"] == 12 and comparison["batch_size"] == 2
    assert 1.9 < comparison["flops_ratio"] < 2.0  # half the blocks; embedding and final layer are kept
    assert 1.5 < comparison["parameter_ratio"] < 2.0
    assert comparison["speedup"] > 0 and comparison["original_seconds_per_call"] > 0


def test_eval_refuses_an_original_of_another_family_before_sampling(tmp_path):
    from diffusers_entprune.embedded import TINY_SIT_DIR

    with pytest.raises(ValueError, match="--original_model_name_or_path.*SIT"):
        main(["eval", "--original_model_name_or_path", TINY_SIT_DIR, "--num_samples", "4", "--output_dir",
              str(tmp_path / "eval")])
    assert not (tmp_path / "eval").exists()
