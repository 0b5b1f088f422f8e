"""--cache_latents: the dataset encoded once, then the same training as from the images; reuse, resume, refusal."""

import json
import os

import pytest
import torch
from conftest import make_tiny_vae
from script_runner import run_prune_script
from test_cli import source_pipeline  # noqa: F401  (fixture)
from test_data import tiny_dataset
from test_prune_dit_script import DOWNSTREAM, fresh_accelerator_state, tiny_args, weights  # noqa: F401

import diffusers_entprune.latent_cache as latent_cache
from diffusers_entprune.data import calibration_batches, encode_training_latents, images_to_tensor
from diffusers_entprune.latent_cache import LatentCache, LatentCacheMismatchError
from diffusers_entprune.randomness import training_draws


def build(folder, dataset, vae, random_flip=False, accelerator=None, **kwargs):
    return LatentCache.build(str(folder), dataset, vae, 16, random_flip, "image", 4,
                             accelerator=accelerator, **kwargs)


def test_cached_latents_equal_encoding_the_batch_with_the_same_draws(tmp_path):
    vae, dataset = make_tiny_vae(), tiny_dataset(n=10)
    cache = build(tmp_path, dataset, vae, random_flip=True)
    rows = [7, 2, 2, 9, 0]  # any order, repeats
    draws = training_draws(3, list(range(100, 105)), (4, 8, 8), 0.1)
    assert draws.flip.any() and not draws.flip.all()  # both branches of the flip are exercised
    pixels = images_to_tensor([dataset[i]["image"] for i in rows], 16)
    expected = encode_training_latents(vae, pixels, draws, random_flip=True)
    # bit for bit: the VAE encodes a row the same alone as in any batch (on this CPU)
    assert torch.equal(cache.training_latents(rows, draws, True, vae.config.scaling_factor), expected)
    unflipped = encode_training_latents(vae, pixels, draws, random_flip=False)
    assert torch.equal(cache.training_latents(rows, draws, False, vae.config.scaling_factor), unflipped)


def test_a_second_build_reuses_the_cache_and_another_vae_gets_its_own(tmp_path, monkeypatch):
    vae, dataset = make_tiny_vae(), tiny_dataset(n=10)
    first = build(tmp_path, dataset, vae)
    def refuse(*args):
        raise RuntimeError("encoded again")

    monkeypatch.setattr(latent_cache, "_encode_chunk", refuse)
    again = build(tmp_path, dataset, vae)
    assert again.folder == first.folder and torch.equal(again.tensors["mean"], first.tensors["mean"])
    other = make_tiny_vae()
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # same config, other weights: must not reuse
    with pytest.raises(RuntimeError, match="encoded again"):
        build(tmp_path, dataset, other)


def test_a_cache_whose_record_differs_is_refused_and_kept(tmp_path):
    vae, dataset = make_tiny_vae(), tiny_dataset(n=10)
    cache = build(tmp_path, dataset, vae)
    info_path = os.path.join(cache.folder, latent_cache.INFO_NAME)
    info = json.load(open(info_path))
    info["resolution"] = 32  # e.g. a folder copied by hand from another run
    json.dump(info, open(info_path, "w"))
    with pytest.raises(LatentCacheMismatchError, match="resolution"):
        build(tmp_path, dataset, vae)
    assert os.listdir(cache.folder)  # nothing deleted


def test_an_interrupted_encoding_resumes_and_processes_split_the_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(latent_cache, "ROWS_PER_CHUNK", 3)  # 10 rows: 4 chunks
    vae, dataset = make_tiny_vae(), tiny_dataset(n=10)
    reference = build(tmp_path / "one", dataset, vae)
    encoded, stop_at = [], {2}
    original = latent_cache._encode_chunk

    def encode(rows, k, *args):
        if k in stop_at:
            raise KeyboardInterrupt  # e.g. preempted
        encoded.append(k)
        return original(rows, k, *args)

    monkeypatch.setattr(latent_cache, "_encode_chunk", encode)

    class Process:  # one of two processes; run one after the other here (the barriers are no-ops)
        def __init__(self, index):
            self.process_index, self.num_processes, self.is_main_process = index, 2, index == 0

        def wait_for_everyone(self):
            pass

    with pytest.raises(KeyboardInterrupt):  # process 0 takes chunks 0 and 2, and stops in chunk 2
        build(tmp_path / "two", dataset, vae, accelerator=Process(0))
    folder = os.path.join(tmp_path / "two", os.listdir(tmp_path / "two")[0])
    assert sorted(os.listdir(folder)) == ["cache_info.json", "chunk-00000.safetensors"]  # no half chunk
    assert json.load(open(os.path.join(folder, latent_cache.INFO_NAME)))["complete"] is False
    stop_at.clear()
    with pytest.raises(FileNotFoundError):  # process 1 alone: its chunks 1 and 3; chunk 2 is still missing
        build(tmp_path / "two", dataset, vae, accelerator=Process(1))
    assert encoded == [0, 1, 3]
    cache = build(tmp_path / "two", dataset, vae, accelerator=Process(0))  # resumed: only chunk 2, then complete
    assert encoded == [0, 1, 3, 2]
    assert json.load(open(os.path.join(folder, latent_cache.INFO_NAME)))["complete"] is True
    assert torch.equal(cache.tensors["mean"], reference.tensors["mean"])
    assert torch.equal(cache.tensors["std"], reference.tensors["std"])


def test_training_from_the_cache_ends_with_the_weights_of_training_from_the_images(tmp_path, source_pipeline):  # noqa: F811
    common = ["--random_flip", "--validation_steps", "0", "--speed_batch_size", "0", "--max_train_steps", "10",
              "--checkpointing_steps", "5"]
    run_prune_script(tiny_args(source_pipeline, tmp_path / "images", *common))
    cache_dir = tmp_path / "cache"
    run_prune_script(tiny_args(source_pipeline, tmp_path / "cached", *common, "--cache_latents", "--latent_cache_dir",
                               cache_dir))
    a, b = weights(tmp_path / "images"), weights(tmp_path / "cached")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(b[name], a[name]), name
    report = [json.load(open(tmp_path / run / "entprune_report.json")) for run in ("images", "cached")]
    assert report[0]["kept_block_indices"] == report[1]["kept_block_indices"]
    assert len(os.listdir(cache_dir)) == 1


@pytest.mark.parametrize("extra, message", [
    (["--latent_cache_dir", "somewhere"], "add --cache_latents"),
    (["--cache_latents", "--streaming"], "drop --streaming"),
])
def test_cache_flags_are_checked_before_any_work(tmp_path, source_pipeline, capsys, extra, message):  # noqa: F811
    with pytest.raises(SystemExit):
        run_prune_script(tiny_args(source_pipeline, tmp_path / "out", *extra))
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ranking_reads_the_training_cache_and_gets_the_pool_it_would_encode(tmp_path, monkeypatch):
    vae, dataset = make_tiny_vae(), tiny_dataset(n=10)
    build(tmp_path, dataset, vae, random_flip=True)  # what a --cache_latents --random_flip run leaves

    def refuse(*args):
        raise RuntimeError("encoded again")

    monkeypatch.setattr(latent_cache, "_encode_chunk", refuse)
    cached = list(calibration_batches(dataset, vae, 16, num_samples=7, batch_size=3, num_classes=3,
                                      cache_dir=str(tmp_path)))
    encoded = list(calibration_batches(dataset, vae, 16, num_samples=7, batch_size=3, num_classes=3))
    assert [len(x) for x, _ in cached] == [3, 3, 1]
    for (a, la), (b, lb) in zip(cached, encoded):
        assert torch.equal(la, lb)
        assert torch.equal(a, b)
    assert len(os.listdir(tmp_path)) == 1  # no second cache
