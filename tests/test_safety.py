"""Safety: untrusted checkpoints cannot run code, no code path trusts remote code, and a Hub token never leaks.

- `convert.load_original_state_dict` (and `entprune convert`) unpickle with ``torch.load(weights_only=True)``: a
  checkpoint whose unpickling would call a function is refused before the call happens;
- no source under src/, examples/ or scripts/ sets ``trust_remote_code`` or passes ``custom_pipeline`` (which makes
  diffusers import code from the Hub), and every ``torch.load`` passes ``weights_only=True``;
- `examples/prune_dit.py` with ``--push_to_hub --hub_token ...`` (mocked Hub, and a tracker that writes its run
  config and logs under output_dir, as tensorboard does) writes the token to no output, log, report, model card or
  tracker file; it reaches the Hub client and nothing else.
"""

import ast
import json
import logging
import os
import pickle

import pytest
import torch
from accelerate.tracking import GeneralTracker
from test_cli import source_pipeline  # noqa: F401  (fixture)
from test_prune_dit_script import fresh_accelerator_state, run_prune_script, tiny_args  # noqa: F401

import diffusers_entprune.hub as hub
from diffusers_entprune.cli import main as cli_main
from diffusers_entprune.convert import load_original_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------- pickles


class CreatesAFile:
    """Unpickled, this calls ``open(path, "w")``: it creates the file. Any callable could stand in its place."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def malicious_checkpoint(folder, marker) -> str:
    """A file shaped like an original DiT checkpoint, with a payload among its weights."""
    path = os.path.join(folder, "DiT-XL-2-256x256.pt")
    torch.save({"pos_embed": torch.zeros(1, 4, 8), "x_embedder.proj.weight": torch.zeros(8, 4, 2, 2),
                "payload": CreatesAFile(str(marker))}, path)
    return path


def test_the_payload_is_live_when_loaded_without_weights_only(tmp_path):
    """The control: unpickled the unsafe way, the file does run its payload (so the test below means something)."""
    marker = tmp_path / "control-marker"
    torch.load(malicious_checkpoint(tmp_path, marker), weights_only=False)
    assert marker.exists()


def test_a_checkpoint_that_would_run_code_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "MARKER"
    path = malicious_checkpoint(tmp_path, marker)
    with pytest.raises(pickle.UnpicklingError, match=r"`checkpoint`=.*could run arbitrary code, so it is refused"):
        load_original_state_dict(path)
    assert not marker.exists()


def test_entprune_convert_refuses_it_and_writes_nothing(tmp_path, source_pipeline):  # noqa: F811
    marker, out = tmp_path / "MARKER", tmp_path / "converted"
    path = malicious_checkpoint(tmp_path, marker)
    with pytest.raises(pickle.UnpicklingError, match="`checkpoint`"):
        cli_main(["convert", "--checkpoint", path, "--vae", os.path.join(source_pipeline, "vae"),
                  "--output_dir", str(out)])
    assert not marker.exists() and not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["DiT-XL-2-256x256.pt", "source"]


# ---------------------------------------------------------------------------------------------- remote code


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Places in ``source`` that enable remote code, or unpickle without ``weights_only=True``."""
    found = []

    def where(node):
        return f"{filename}:{node.lineno}"

    def is_false(node):
        return isinstance(node, ast.Constant) and node.value is False

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code" and not is_false(node.value):
            found.append(f"{where(node.value)}: trust_remote_code={ast.unparse(node.value)}")
        if isinstance(node, ast.keyword) and node.arg == "custom_pipeline":
            found.append(f"{where(node.value)}: custom_pipeline={ast.unparse(node.value)}")
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value in ("trust_remote_code", "custom_pipeline") and \
                        not (key.value == "trust_remote_code" and is_false(value)):
                    found.append(f"{where(key)}: {key.value!r}: {ast.unparse(value)}")
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id if isinstance(t, ast.Name) else getattr(t, "attr", None) for t in targets]
            if "trust_remote_code" in names and not is_false(node.value):
                found.append(f"{where(node)}: trust_remote_code = {ast.unparse(node.value)}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
            if not (weights_only and isinstance(weights_only[0], ast.Constant) and weights_only[0].value is True):
                found.append(f"{where(node)}: {ast.unparse(node)} without weights_only=True")
    return found


def test_the_scanner_finds_what_it_looks_for():
    planted = """
pipe = DiffusionPipeline.from_pretrained("x", trust_remote_code=True)
pipe = DiffusionPipeline.from_pretrained("x", custom_pipeline="someone/pipeline")
kwargs = {"trust_remote_code": True}
trust_remote_code = True
state = torch.load("model.pt")
state = torch.load("model.pt", weights_only=False)
fine = torch.load("model.pt", weights_only=True)
fine = load_dataset("x", trust_remote_code=False)
"""
    assert len(unsafe_calls(planted)) == 6


def test_no_code_path_trusts_remote_code_or_unpickles_unsafely():
    scanned, found = 0, []
    for top in ("src", "examples", "scripts"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path, encoding="utf-8") as f:
                        found += unsafe_calls(f.read(), os.path.relpath(path, REPO))
                    scanned += 1
    assert scanned > 30  # the whole package, the examples and the scripts were read
    assert found == []


# ---------------------------------------------------------------------------------------------- the Hub token

SECRET = "hf_SECRETtoken123"


class FileTracker(GeneralTracker):
    """A tracker that, like tensorboard's, keeps the run config and every logged value in files under output_dir."""

    name = "file"
    requires_logging_directory = False

    def __init__(self, path):
        super().__init__()
        self.path = path

    @property
    def tracker(self):
        return self

    def _write(self, record):
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=repr) + "\n")

    def store_init_configuration(self, values):
        self._write({"config": values})

    def log(self, values, step=None, **kwargs):
        self._write({"step": step, "values": values})


def test_the_hub_token_reaches_the_hub_client_and_nothing_else(tmp_path, source_pipeline, monkeypatch,  # noqa: F811
                                                              caplog, capfd):
    import huggingface_hub.constants
    from test_hub import FakeApi

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    out = tmp_path / "out"
    tracker_file = out / "logs" / "tracker.jsonl"
    import accelerate

    real_accelerator = accelerate.Accelerator  # the script's `from accelerate import Accelerator` picks this up
    monkeypatch.setattr(accelerate, "Accelerator",
                        lambda **kwargs: real_accelerator(**{**kwargs, "log_with": [FileTracker(str(tracker_file))]}))
    caplog.set_level(logging.DEBUG)
    FakeApi.calls.clear()

    run_prune_script(tiny_args(source_pipeline, out, "--push_to_hub", "--hub_model_id", "me/dit-tiny-pruned",
                             "--hub_token", SECRET, "--speed_batch_size", "0", "--checkpointing_steps", "6"))

    assert ("init", SECRET) in FakeApi.calls  # the upload was authorised with the token
    assert any(c[0] == "upload_folder" for c in FakeApi.calls)
    config = json.loads(tracker_file.read_text().splitlines()[0])["config"]
    assert config["hub_model_id"] == "me/dit-tiny-pruned" and "hub_token" not in config  # the tracker ran
    printed = capfd.readouterr()
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert "Pruning" in caplog.text  # the run's own log lines were captured
    for name, text in (("stdout", printed.out), ("stderr", printed.err), ("logging", logged)):
        assert SECRET not in text, f"the token is in {name}"
    files = [os.path.join(root, name) for root, _, names in os.walk(tmp_path) for name in names]
    assert any(f.endswith("README.md") for f in files) and any(f.endswith("entprune_report.json") for f in files)
    assert any("checkpoint-6" in f for f in files) and str(tracker_file) in files
    leaked = [f for f in files if SECRET.encode() in open(f, "rb").read()]
    assert leaked == []


def test_a_secret_prints_as_stars_and_reveals_only_on_request():
    secret = hub.Secret(SECRET)
    assert SECRET not in repr(secret) and SECRET not in str(secret) and SECRET not in f"{secret} {[secret]}"
    assert not isinstance(secret, str) and hub.reveal(secret) == SECRET and hub.reveal("plain") == "plain"
