import json
import os

import pytest
from conftest import make_scheduler, make_tiny_vae
from test_export import pruned_model

import diffusers_entprune.hub as hub
from diffusers_entprune.cli import main
from diffusers_entprune.export import save_pruned_pipeline


class FakeApi:
    calls = []

    def __init__(self, token=None):
        FakeApi.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, folder_path, repo_id, **kwargs):
        FakeApi.calls.append(("upload_folder", repo_id, sorted(os.listdir(folder_path)), kwargs))


def test_saved_folder_carries_a_model_card(tmp_path):
    out = save_pruned_pipeline(str(tmp_path / "out"), pruned_model([0, 4]), make_tiny_vae(), make_scheduler(),
                               report={"source": "facebook/DiT-XL-2-256"}, repo_id="me/dit-pruned")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: facebook/DiT-XL-2-256" in card and "library_name: diffusers" in card
    assert 'DiTPipeline.from_pretrained("me/dit-pruned")' in card
    assert "| kept blocks (original indices) | [1, 2, 3, 5] |" in card and "4 of 6 kept" in card
    assert os.path.isfile(os.path.join(out, "model_index.json"))


def test_push_uploads_the_folder_and_never_prints_the_token(tmp_path, monkeypatch, capsys):
    secret = "hf_SECRETTOKEN1234567890"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setattr(hub, "HfApi", FakeApi)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    FakeApi.calls.clear()
    source = save_pruned_pipeline(str(tmp_path / "source"), pruned_model([]), make_tiny_vae(), make_scheduler())
    out = tmp_path / "dit-d4"
    assert main(["prune", "--pretrained_model_name_or_path", source, "--prune_blocks", "1", "3",
                 "--output_dir", str(out), "--num_samples_per_row", "2", "--num_inference_steps", "2",
                 "--push_to_hub", "--hub_private"]) == 0
    create = next(c for c in FakeApi.calls if c[0] == "create_repo")
    upload = next(c for c in FakeApi.calls if c[0] == "upload_folder")
    assert create[1] == "dit-d4" and create[2]["private"] is True  # default repo id: the folder's name
    assert {"model_index.json", "README.md", "entprune_report.json", "samples.png", "transformer"} <= set(upload[2])
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err
    for root, _, files in os.walk(out):
        for name in files:
            if name.endswith((".json", ".md")):
                assert secret not in open(os.path.join(root, name)).read()
    assert json.load(open(out / "entprune_report.json"))["pruned_block_indices"] == [1, 3]


def test_push_is_refused_up_front_when_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="push_to_hub.*HF_HUB_OFFLINE"):
        main(["prune", "--prune_blocks", "1", "--output_dir", str(tmp_path / "out"), "--push_to_hub"])
    assert not (tmp_path / "out").exists()
