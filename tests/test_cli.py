import json
import os
import subprocess
import sys

import pytest
from conftest import make_scheduler, make_tiny_dit, make_tiny_vae
from diffusers import DiTPipeline

from diffusers_entprune.cli import main
from diffusers_entprune.export import save_pruned_pipeline


@pytest.fixture
def source_pipeline(tmp_path):
    return save_pruned_pipeline(str(tmp_path / "source"), make_tiny_dit(), make_tiny_vae(), make_scheduler(),
                                id2label={i: f"class{i}" for i in range(10)})


def test_prune_command_writes_a_plain_pipeline_report_and_grid(tmp_path, source_pipeline, capsys):
    out = str(tmp_path / "pruned")
    code = main(["prune", "--pretrained_model_name_or_path", source_pipeline, "--prune_blocks", "0", "3",
                 "--output_dir", out, "--num_samples_per_row", "2", "--num_inference_steps", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "max |difference| to the in-memory model = 0" in printed
    assert os.path.isfile(os.path.join(out, "samples.png"))
    report = json.load(open(os.path.join(out, "entprune_report.json")))
    assert report["kept_block_indices"] == [1, 2, 4, 5] and report["pruned_block_indices"] == [0, 3]
    pipe = DiTPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_layers == 4
    assert pipe.get_label_ids(["class7"]) == [7]


def test_prune_command_refuses_bad_input_before_loading(tmp_path, source_pipeline):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model_index.json").write_text("{}")
    with pytest.raises(FileExistsError, match="output_dir"):
        main(["prune", "--pretrained_model_name_or_path", "/does/not/exist", "--prune_blocks", "1",
              "--output_dir", str(taken)])
    with pytest.raises(ValueError, match="keeps zero blocks"):
        main(["prune", "--pretrained_model_name_or_path", source_pipeline, "--prune_blocks", *map(str, range(6)),
              "--output_dir", str(tmp_path / "none"), "--num_samples_per_row", "0"])
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="class_labels"):
        main(["prune", "--pretrained_model_name_or_path", source_pipeline, "--prune_blocks", "1",
              "--class_labels", "1000", "--output_dir", str(tmp_path / "none")])
    assert not (tmp_path / "none").exists()
    with pytest.raises(SystemExit):
        main(["prune", "--prune_blocks", "x", "--output_dir", str(tmp_path / "x")])


def test_console_entry_point_is_installed():
    result = subprocess.run([os.path.join(os.path.dirname(sys.executable), "entprune"), "prune", "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--prune_blocks" in result.stdout


@pytest.mark.parametrize("method", ["ced", "magnitude", "taylor", "block_influence", "loss", "random"])
def test_score_command_writes_json_and_plot(tmp_path, source_pipeline, method):
    from diffusers_entprune.embedded import DIGITS_DIR

    out = tmp_path / f"scores-{method}"
    args = ["score", "--pretrained_model_name_or_path", source_pipeline, "--method", method, "--num_samples", "48",
            "--batch_size", "16", "--train_data_dir", os.path.join(DIGITS_DIR, "downstream"),
            "--output_dir", str(out)]
    assert main(args) == 0
    scores = json.load(open(out / "scores.json"))
    assert scores["method"] == method and scores["num_layers"] == 6 and len(scores["scores"]) == 6
    assert sorted(scores["ranking"]) == list(range(6))
    assert scores["resolution"] == 16  # sample_size 8 x the tiny VAE's downsampling 2
    assert scores["config"]["ranking"] == method and scores["config"]["ced_num_samples"] == 48  # EntPrunerConfig
    if method == "ced":
        assert len(scores["bucket_scores"]) == 6 and len(scores["bucket_scores"][0]) == 4
        assert scores["num_samples"] == 48 and scores["options"]["variance"] == "channel"
    assert (out / "scores.png").stat().st_size > 1000
    with pytest.raises(FileExistsError, match="output_dir"):
        main(args)


def test_score_command_refuses_bad_columns_and_leaves_nothing(tmp_path, source_pipeline):
    from diffusers_entprune.embedded import DIGITS_DIR

    out = tmp_path / "scores"
    with pytest.raises(ValueError, match="label_column.*'digit'"):
        main(["score", "--pretrained_model_name_or_path", source_pipeline, "--label_column", "digit",
              "--train_data_dir", os.path.join(DIGITS_DIR, "downstream"), "--output_dir", str(out)])
    assert not out.exists()
    for bad in (["--num_samples", "1"], ["--batch_size", "0"], ["--method", "entropy"]):
        with pytest.raises(SystemExit):
            main(["score", "--output_dir", str(out), *bad])


def test_prune_command_takes_the_least_important_blocks_from_a_scores_file(tmp_path, source_pipeline):
    from diffusers_entprune.embedded import DIGITS_DIR

    scores_dir, out = tmp_path / "scores", tmp_path / "pruned"
    main(["score", "--pretrained_model_name_or_path", source_pipeline, "--num_samples", "32", "--batch_size", "16",
          "--train_data_dir", os.path.join(DIGITS_DIR, "downstream"), "--output_dir", str(scores_dir)])
    ranking = json.load(open(scores_dir / "scores.json"))["ranking"]
    assert main(["prune", "--pretrained_model_name_or_path", source_pipeline, "--scores",
                 str(scores_dir / "scores.json"), "--num_prune", "2", "--output_dir", str(out),
                 "--num_samples_per_row", "0"]) == 0
    report = json.load(open(out / "entprune_report.json"))
    assert report["pruned_block_indices"] == sorted(ranking[:2])
    assert report["pruned_by"]["method"] == "ced" and report["pruned_by"]["num_prune"] == 2
    for bad in (["--num_prune", "2"], ["--scores", str(scores_dir / "scores.json")],
                ["--scores", str(tmp_path / "missing.json"), "--num_prune", "1"],
                ["--prune_blocks", "1", "--scores", str(scores_dir / "scores.json"), "--num_prune", "1"]):
        with pytest.raises(SystemExit):
            main(["prune", "--output_dir", str(tmp_path / "x"), *bad])
    assert not (tmp_path / "x").exists()
