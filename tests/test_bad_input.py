"""Bad input, table-driven: every case must fail fast, name the offending argument, and leave no files behind.

One table (`CASES`) covers the pruning script (`examples/prune_dit.py` through its command line, on the tiny setup of
`tests/test_prune_dit_script.py`), the ``entprune`` command line and the Python API. Each case gets a fresh folder
whose ``out`` is its output_dir; the test checks that

- the call raises the expected exception, whose message (with stderr, where argparse writes its errors) matches the
  case's regex: the regexes name the argument (``--learning_rate``, `label_column`, ...) and mostly the fix;
- it raised within `FAST_SECONDS`, and before any heavy work: ranking, proxies, checkpoints, export and sampling are
  replaced by a tripwire, so a check that only fires late fails here even on this tiny model;
- the case's folder is exactly as the case prepared it (nothing created, nothing changed).

Grayscale, RGBA and palette images are not bad input: DiT's preprocessing converts every image to RGB (alpha is
dropped, not composited). `test_grayscale_rgba_palette_and_odd_sized_images_are_converted` checks that they work;
images smaller than the model's resolution are refused (we do not upscale silently), a case of the table.
"""

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from conftest import make_scheduler, make_tiny_dit, make_tiny_vae
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage
from test_prune_dit_script import DOWNSTREAM, fresh_accelerator_state, run_prune_script, tiny_args  # noqa: F401

from diffusers_entprune import cli
from diffusers_entprune.controller import AdaptivePruningController, decision_steps, resolve_target
from diffusers_entprune.convert import infer_config, load_original_state_dict
from diffusers_entprune.data import LatentBatches, PixelCollate, load_image_dataset
from diffusers_entprune.export import save_pruned_pipeline
from diffusers_entprune.importance import CEDOptions, compute_ced, score_blocks
from diffusers_entprune.model_types import pipeline_class
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.objectives import DiffusionObjective
from diffusers_entprune.pipelines import SiTPipeline

FAST_SECONDS = 5.0  # the slowest case loads the tiny model and opens a dataset: well under a second alone
OFFLINE_ID = "entprune-tests/never-downloaded"  # a Hub id no cache holds: with HF_HUB_OFFLINE=1 it cannot load


class HeavyWorkStarted(AssertionError):
    pass


def tripwire(what):
    def refuse(*args, **kwargs):
        raise HeavyWorkStarted(f"{what} ran: the bad input was not refused before the heavy work")
    return refuse


def guard_heavy_work(monkeypatch):
    """Ranking, proxies, checkpoints, validation, export and sampling raise `HeavyWorkStarted`."""
    import diffusers

    import diffusers_entprune
    import diffusers_entprune.evaluation as evaluation
    import diffusers_entprune.export as export
    import diffusers_entprune.importance as importance
    import diffusers_entprune.pruner as pruner
    from diffusers_entprune.checkpoints import RunCheckpoints

    for name in ("score_blocks", "score_candidates"):  # EntPruner's stage: ranking and proxies
        monkeypatch.setattr(pruner, name, tripwire(f"EntPruner's {name}"))
    monkeypatch.setattr(RunCheckpoints, "save", tripwire("RunCheckpoints.save"))
    monkeypatch.setattr(importance, "score_blocks", tripwire("score_blocks"))
    monkeypatch.setattr(export, "save_pruned_pipeline", tripwire("save_pruned_pipeline"))
    monkeypatch.setattr(diffusers_entprune, "save_pruned_pipeline", tripwire("save_pruned_pipeline"))
    monkeypatch.setattr(evaluation, "generate_images", tripwire("evaluation.generate_images"))
    monkeypatch.setattr(diffusers.DiTPipeline, "__call__", tripwire("DiTPipeline sampling"))
    monkeypatch.setattr(SiTPipeline, "__call__", tripwire("SiTPipeline sampling"))


# ---------------------------------------------------------------------------------------------- the bad inputs


def parquet(folder, images, labels, features=None):
    os.makedirs(folder)
    Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(
        os.path.join(folder, "train.parquet"))
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Read-only inputs shared by the cases: the tiny source pipeline, wrong folders, bad datasets and files."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel

    root = tmp_path_factory.mktemp("world")
    w = {"downstream": DOWNSTREAM, "offline_id": OFFLINE_ID}
    w["source"] = save_pruned_pipeline(str(root / "source"), make_tiny_dit(), make_tiny_vae(), make_scheduler(),
                                       id2label={i: f"class{i}" for i in range(10)})
    w["vae"] = os.path.join(w["source"], "vae")
    w["unet"] = str(root / "unet")
    UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2).save_pretrained(w["unet"])
    for name, index in (("no_class", {"foo": 1}), ("stable_diffusion", {"_class_name": "StableDiffusionPipeline"})):
        os.makedirs(root / name)
        (root / name / "model_index.json").write_text(json.dumps(index))
        w[name] = str(root / name)
    w["dit_with_unet"] = str(root / "dit_with_unet")  # a DiTPipeline index whose transformer is a UNet
    shutil.copytree(w["source"], w["dit_with_unet"])
    shutil.rmtree(os.path.join(w["dit_with_unet"], "transformer"))
    shutil.copytree(w["unet"], os.path.join(w["dit_with_unet"], "transformer"))

    image, small = PILImage.new("RGB", (32, 32), (200, 120, 40)), PILImage.new("RGB", (8, 8))
    int_labels = Features({"image": Image(), "label": Value("int64")})
    w["empty_parquet"] = parquet(root / "empty_parquet", [image], [1], int_labels)
    Dataset.from_parquet(os.path.join(w["empty_parquet"], "train.parquet")).select([]).to_parquet(
        os.path.join(w["empty_parquet"], "train.parquet"))
    w["string_labels"] = parquet(root / "string_labels", [image] * 4, ["cat", "dog", "cat", "eel"])
    w["path_images"] = parquet(root / "path_images", ["a.png", "b.png"], [0, 1])
    w["small_images"] = parquet(root / "small_images", [small] * 4, [0, 1, 2, 3], int_labels)
    w["labels_1500"] = parquet(root / "labels_1500", [image] * 4, [0, 1, 1500, 2], int_labels)
    w["labels_negative"] = parquet(root / "labels_negative", [image] * 4, [0, -1, 1, 2], int_labels)
    w["labels_missing"] = parquet(root / "labels_missing", [image] * 4, [0, None, 1, 2], int_labels)
    w["empty_imagefolder"] = str(root / "empty_imagefolder")
    os.makedirs(w["empty_imagefolder"])
    (root / "empty_imagefolder" / "README.txt").write_text("the images are elsewhere")

    from safetensors.torch import save_file

    w["not_dit_weights"] = str(root / "resnet.safetensors")
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}, w["not_dit_weights"])
    w["tensor_pt"] = str(root / "tensor.pt")
    torch.save(torch.zeros(3), w["tensor_pt"])
    w["not_json"] = str(root / "not_json.json")
    (root / "not_json.json").write_text("ranking: 0 1 2")
    w["scores_no_ranking"] = str(root / "scores_no_ranking.json")
    (root / "scores_no_ranking.json").write_text(json.dumps({"method": "ced", "scores": [0.1] * 6}))
    w["scores_all"] = str(root / "scores_all.json")
    (root / "scores_all.json").write_text(json.dumps({"method": "ced", "ranking": [3, 1, 0, 5, 2, 4]}))

    model = EntPrunedTransformer2DModel.from_transformer(make_tiny_dit())
    w["model"], w["objective"] = model, DiffusionObjective.from_scheduler(make_scheduler(), learn_sigma=True)
    w["sit"] = SiTPipeline(transformer=make_tiny_dit(), vae=make_tiny_vae(),
                           scheduler=FlowMatchEulerDiscreteScheduler())
    return w


@dataclass
class Case:
    id: str
    kind: str  # "script", "cli" or "api"
    run: Callable  # called with the case's context: the world's entries plus "tmp" and "out"
    error: type
    match: str
    prepare: Callable | None = None  # makes what the case needs in its folder before the call
    patch: Callable | None = None  # (monkeypatch, context)


def fill(arguments, c):
    return [a.format_map(c) for a in arguments]


def script(*extra, data=None):
    """`examples/prune_dit.py` on the tiny setup plus ``extra``; ``data``: the world's dataset to train on, or
    False for none (the case passes --dataset_name)."""
    def run(c):
        argv = tiny_args(c["source"], c["out"], *fill(extra, c))
        if data is not None:
            at = argv.index("--train_data_dir")
            argv[at: at + 2] = [] if data is False else ["--train_data_dir", c[data]]
        run_prune_script(argv)
    return run


def command(*argv):
    return lambda c: cli.main(fill(argv, c))


def write_file(c):
    with open(c["out"], "w") as f:
        f.write("not a folder")


def write_blocker(c):
    with open(os.path.join(c["tmp"], "blocker"), "w") as f:
        f.write("a file where a folder should be")


def taken_output_dir(c):
    os.makedirs(c["out"])
    with open(os.path.join(c["out"], "model_index.json"), "w") as f:
        f.write("{}")


def read_only(monkeypatch, c):
    """Writing a file anywhere fails, as on a read-only mount (where `os.access` still says yes to root)."""
    import diffusers_entprune.output_dir as output_dir

    def refuse(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(output_dir.tempfile, "mkstemp", refuse)


def offline(monkeypatch, c):
    """Offline mode whatever the environment says (conftest only sets it by default): no case reaches the Hub."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


S, C, A = "script", "cli", "api"
E = SystemExit  # argparse errors: the message goes to stderr
PRUNE = ("prune", "--pretrained_model_name_or_path", "{source}", "--output_dir", "{out}")
SCORE = ("score", "--pretrained_model_name_or_path", "{source}", "--train_data_dir", "{downstream}",
         "--num_samples", "8", "--output_dir", "{out}")
EVAL = ("eval", "--pretrained_model_name_or_path", "{source}", "--num_samples", "4", "--num_inference_steps", "1",
        "--output_dir", "{out}")
CONVERT = ("convert", "--output_dir", "{out}")

CASES = [
    # ---- the script's numbers: types and ranges
    Case("script-learning-rate-zero", S, script("--learning_rate", "0"), E, r"--learning_rate: must be > 0, got 0"),
    Case("script-learning-rate-nan", S, script("--learning_rate", "nan"), E, r"--learning_rate: must be > 0, got nan"),
    Case("script-learning-rate-not-a-number", S, script("--learning_rate", "fast"), E,
         r"argument --learning_rate: invalid float value: 'fast'"),
    Case("script-batch-size-zero", S, script("--train_batch_size", "0"), E, r"--train_batch_size: must be >= 1"),
    Case("script-batch-size-float", S, script("--train_batch_size", "2.5"), E,
         r"argument --train_batch_size: invalid int value: '2.5'"),
    Case("script-max-train-steps-negative", S, script("--max_train_steps", "-5"), E,
         r"--max_train_steps: must be >= 1, got -5"),
    Case("script-gradient-accumulation-zero", S, script("--gradient_accumulation_steps", "0"), E,
         r"--gradient_accumulation_steps: must be >= 1"),
    Case("script-lr-warmup-negative", S, script("--lr_warmup_steps", "-1"), E, r"--lr_warmup_steps: must be >= 0"),
    Case("script-lr-scheduler-unknown", S, script("--lr_scheduler", "exponential"), E,
         r"--lr_scheduler 'exponential' is not a diffusers schedule; choose one of \[.*'cosine'"),
    Case("script-adam-beta1-above-one", S, script("--adam_beta1", "1.5"), E, r"--adam_beta1: must lie in \[0, 1\)"),
    Case("script-adam-beta2-one", S, script("--adam_beta2", "1"), E, r"--adam_beta2: must lie in \[0, 1\)"),
    Case("script-adam-epsilon-zero", S, script("--adam_epsilon", "0"), E, r"--adam_epsilon: must be > 0"),
    Case("script-weight-decay-negative", S, script("--adam_weight_decay", "-0.1"), E,
         r"--adam_weight_decay: must be >= 0"),
    Case("script-max-grad-norm-negative", S, script("--max_grad_norm", "-1"), E,
         r"--max_grad_norm: must be >= 0 \(0: no gradient clipping\)"),
    Case("script-ema-decay-above-one", S, script("--use_ema", "--ema_decay", "1.5"), E,
         r"--ema_decay: must lie in \[0, 1\), got 1.5"),
    Case("script-class-dropout-one", S, script("--class_dropout_prob", "1"), E,
         r"--class_dropout_prob: must lie in \[0, 1\)"),
    Case("script-guidance-negative", S, script("--guidance_scale", "-2"), E,
         r"--guidance_scale: must be >= 0 \(<= 1: no guidance\)"),
    Case("script-inference-steps-zero", S, script("--num_inference_steps", "0"), E,
         r"--num_inference_steps: must be >= 1"),
    Case("script-seed-negative", S, script("--seed", "-1"), E, r"--seed must lie in \[0, 2\*\*32\), got -1"),
    Case("script-resolution-zero", S, script("--resolution", "0"), E, r"--resolution: must be >= 1"),
    Case("script-resolution-mismatch", S, script("--resolution", "64"), ValueError,
         r"--resolution`=64 does not match the model.*16 px\. Drop `--resolution`"),
    Case("script-max-train-samples-zero", S, script("--max_train_samples", "0"), E,
         r"--max_train_samples: must be >= 1"),
    Case("script-shuffle-buffer-zero", S, script("--shuffle_buffer_size", "0"), E,
         r"--shuffle_buffer_size: must be >= 1"),
    Case("script-dataloader-workers-negative", S, script("--dataloader_num_workers", "-1"), E,
         r"--dataloader_num_workers: must be >= 0"),
    Case("script-lora-rank-zero", S, script("--use_lora", "--lora_rank", "0"), E, r"--lora_rank: must be >= 1"),
    Case("script-checkpointing-steps-zero", S, script("--checkpointing_steps", "0"), E,
         r"--checkpointing_steps: must be >= 1"),
    Case("script-checkpoints-limit-zero", S, script("--checkpoints_total_limit", "0"), E,
         r"--checkpoints_total_limit: must be >= 1"),
    Case("script-validation-steps-negative", S, script("--validation_steps", "-1"), E,
         r"--validation_steps: must be >= 0 \(0: no validation grids\)"),
    Case("script-validation-labels-outside", S, script("--validation_class_labels", "0", "1000"), ValueError,
         r"--validation_class_labels` \[1000\] are not classes of the model.*0\.\.999"),
    Case("script-speed-batch-negative", S, script("--speed_batch_size", "-1"), E,
         r"--speed_batch_size: must be >= 0 \(0: no speed comparison\)"),
    # ---- the script's pruning target and schedule
    Case("script-prune-ratio-above-one", S, script("--target_prune_ratio", "1.5"), E,
         r"--target_prune_ratio .* strictly between 0 and 1, got 1.5; use --target_num_blocks"),
    Case("script-prune-ratio-zero", S, script("--target_prune_ratio", "0"), E,
         r"--target_prune_ratio .* strictly between 0 and 1, got 0"),
    Case("script-num-blocks-zero", S, script("--target_num_blocks", "0"), E, r"--target_num_blocks must be >= 1"),
    Case("script-num-params-negative", S, script("--target_num_params", "-10"), E,
         r"--target_num_params must be >= 1"),
    Case("script-prune-every-block", S, script("--target_num_blocks", "6"), ValueError,
         r"target_num_blocks`=6 removes all 6 blocks; at least one must stay"),
    Case("script-pruning-stages-zero", S, script("--pruning_stages", "0"), E, r"--pruning_stages must be >= 1"),
    Case("script-pruning-steps-zero", S, script("--pruning_steps", "0"), E, r"--pruning_steps must be >= 1"),
    Case("script-pruning-steps-beyond-training", S, script("--pruning_steps", "20"), E,
         r"--pruning_steps 20 exceeds --max_train_steps 12"),
    Case("script-fewer-pruning-steps-than-stages", S, script("--fine_tune_only", "--pruning_steps", "2",
                                                             "--pruning_stages", "4"), E,
         r"--pruning_steps=2 is shorter than --pruning_stages=4: each stage needs at least one training step"),
    Case("script-ced-samples-one", S, script("--ced_num_samples", "1"), E, r"--ced_num_samples must be >= 2"),
    Case("script-proxy-batch-one", S, script("--proxy_batch_size", "1"), E,
         r"--proxy_batch_size must be >= 2 \(the NTK of one sample"),
    # ---- contradictory flags
    Case("script-two-targets", S, script("--target_prune_ratio", "0.5", "--target_num_blocks", "2"), E,
         r"argument --target_num_blocks: not allowed with argument --target_prune_ratio"),
    Case("script-fine-tune-only-with-target", S, script("--fine_tune_only", "--target_num_blocks", "2"), E,
         r"argument --target_num_blocks: not allowed with argument --fine_tune_only"),
    Case("script-sampler-on-dit", S, script("--sampler", "heun"), ValueError,
         r"`--sampler` applies to SiT models only"),
    Case("script-model-type-mismatch", S, script("--model_type", "sit"), ValueError,
         r"`--model_type`='sit' does not match --pretrained_model_name_or_path .*Drop `--model_type`"),
    Case("script-dataset-and-folder", S, script("--dataset_name", "someone/digits"), E,
         r"at most one of --dataset_name and --train_data_dir"),
    Case("script-taylor-with-lora", S, script("--ranking", "taylor", "--use_lora"), E,
         r"--ranking taylor needs the gradients .* --use_lora freezes"),
    # ---- not a DiT: unknown model types, other folders, unreachable Hub ids
    Case("script-model-type-unknown", S, script("--model_type", "unet"), E,
         r"argument --model_type: invalid choice: 'unet'"),
    Case("script-unet-folder", S, script("--pretrained_model_name_or_path", "{unet}"), OSError,
         r"`--pretrained_model_name_or_path`=.*unet': this folder is not a DiTPipeline or SiTPipeline folder.*"
         r"no model_index\.json.*entprune convert"),
    Case("script-pretrained-folder-missing", S, script("--pretrained_model_name_or_path", "{tmp}/dit-xl"), OSError,
         r"`--pretrained_model_name_or_path`=.*dit-xl': there is no such folder; pass a DiTPipeline or SiTPipeline",
         patch=offline),
    Case("script-model-index-without-class", S, script("--pretrained_model_name_or_path", "{no_class}"), ValueError,
         r"`--pretrained_model_name_or_path`=.* model_index\.json names no pipeline class.*DiTPipeline"),
    Case("script-stable-diffusion-folder", S, script("--pretrained_model_name_or_path", "{stable_diffusion}"),
         ValueError, r"`--pretrained_model_name_or_path`=.* is a StableDiffusionPipeline folder.*entprune convert"),
    Case("script-dit-index-with-unet-transformer", S, script("--pretrained_model_name_or_path", "{dit_with_unet}"),
         ValueError, r"`pretrained_model_name_or_path`=.*holds a UNet2DModel, not a DiT transformer"),
    Case("script-hub-id-offline", S, script("--pretrained_model_name_or_path", OFFLINE_ID), OSError,
         r"`--pretrained_model_name_or_path`='entprune-tests/never-downloaded': not a local folder, and "
         r"HF_HUB_OFFLINE is set.*Unset HF_HUB_OFFLINE", patch=offline),
    # ---- data: columns, types, empty datasets, image sizes, labels
    Case("script-dataset-hub-offline", S, script("--dataset_name", OFFLINE_ID, data=False), ConnectionError,
         r"`dataset_name`='entprune-tests/never-downloaded' is not a local dataset and HF_HUB_OFFLINE",
         patch=offline),
    Case("script-image-column-missing", S, script("--image_column", "picture"), ValueError,
         r"`image_column`='picture' is not a column of the dataset; columns: \['image', 'label'\]"),
    Case("script-label-column-missing", S, script("--label_column", "digit"), ValueError,
         r"`label_column`='digit' is not a column of the dataset; columns: \['image', 'label'\]"),
    Case("script-label-column-holds-names", S, script(data="string_labels"), ValueError,
         r"`label_column`='label' holds string values; class labels must be integer.*class_encode_column"),
    Case("script-image-column-holds-paths", S, script(data="path_images"), ValueError,
         r"`image_column`='image' holds string values, not images.*cast_column"),
    Case("script-empty-parquet", S, script(data="empty_parquet"), ValueError,
         r"`train_data_dir`=.*empty_parquet': its parquet files for split 'train' hold no rows"),
    Case("script-imagefolder-without-images", S, script(data="empty_imagefolder"), FileNotFoundError,
         r"`train_data_dir`=.*empty_imagefolder' holds no images"),
    Case("script-images-smaller-than-resolution", S, script(data="small_images"), ValueError,
         r"size \(8, 8\) is smaller than `resolution`=16.*upscale the dataset"),
    Case("script-labels-above-the-classes", S, script(data="labels_1500"), ValueError,
         r"`label_column`='label' holds labels \[1500\] outside the model's classes 0\.\.999"),
    Case("script-labels-negative", S, script(data="labels_negative"), ValueError,
         r"`label_column`='label' holds labels \[-1\] outside the model's classes"),
    Case("script-labels-missing", S, script(data="labels_missing"), ValueError,
         r"`label_column`='label' has missing labels"),
    # ---- output folder and resuming
    Case("script-output-dir-is-a-file", S, script(), ValueError, r"`--output_dir`=.* is a file; pass a folder path",
         prepare=write_file),
    Case("script-output-dir-under-a-file", S, script("--output_dir", "{tmp}/blocker/out"), ValueError,
         r"`--output_dir`=.*blocker/out': .*blocker' is a file, so no folder can be made under it",
         prepare=write_blocker),
    Case("script-output-dir-read-only", S, script(), PermissionError,
         r"`--output_dir`=.*cannot write in .*Read-only file system",
         patch=read_only),
    Case("script-output-dir-taken", S, script(), FileExistsError,
         r"`--output_dir`=.* already holds an earlier output of this command.*--overwrite_output_dir",
         prepare=taken_output_dir),
    Case("script-resume-from-nothing", S, script("--resume_from_checkpoint", "{tmp}/checkpoint-9"), ValueError,
         r"`--resume_from_checkpoint`=.*checkpoint-9' is not a checkpoint of this script.*or 'latest'"),
    Case("script-push-offline", S, script("--push_to_hub"), ValueError,
         r"`--push_to_hub` needs the Hub, but HF_HUB_OFFLINE is set", patch=offline),
    # ---- entprune prune
    Case("cli-prune-block-out-of-range", C, command(*PRUNE, "--prune_blocks", "99"), ValueError,
         r"`--prune_blocks`: block 99 is out of range; the original model has blocks 0\.\.5"),
    Case("cli-prune-block-twice", C, command(*PRUNE, "--prune_blocks", "1", "1"), ValueError,
         r"`--prune_blocks` lists blocks \[1\] more than once"),
    Case("cli-prune-block-not-an-int", C, command(*PRUNE, "--prune_blocks", "first"), E,
         r"argument --prune_blocks: invalid int value: 'first'"),
    Case("cli-prune-every-block-from-scores", C, command(*PRUNE, "--scores", "{scores_all}", "--num_prune", "6"),
         ValueError, r"`--num_prune/--scores`: pruning 6 of 6 remaining blocks keeps zero blocks"),
    Case("cli-prune-scores-not-json", C, command(*PRUNE, "--scores", "{not_json}", "--num_prune", "1"), ValueError,
         r"`--scores` .*not_json\.json' is not JSON.*from `entprune score`"),
    Case("cli-prune-scores-without-ranking", C, command(*PRUNE, "--scores", "{scores_no_ranking}", "--num_prune",
                                                        "1"), ValueError,
         r"`--scores` .* has no `ranking`; pass a scores\.json from `entprune score`"),
    Case("cli-prune-num-prune-zero", C, command(*PRUNE, "--scores", "{scores_all}", "--num_prune", "0"), E,
         r"--num_prune must be >= 1"),
    Case("cli-prune-null-class-label", C, command(*PRUNE, "--prune_blocks", "1", "--class_labels", "1000"),
         ValueError, r"`--class_labels` must lie in 0\.\.999"),
    Case("cli-prune-guidance-negative", C, command(*PRUNE, "--prune_blocks", "1", "--guidance_scale", "-1"), E,
         r"--guidance_scale must be >= 0"),
    Case("cli-prune-nothing-named", C, command(*PRUNE), E,
         r"one of the arguments --prune_blocks --scores is required"),
    Case("cli-prune-output-dir-under-a-file", C,
         command("prune", "--prune_blocks", "1", "--output_dir", "{tmp}/blocker/out"), ValueError,
         r"`--output_dir`=.*blocker' is a file, so no folder can be made under it", prepare=write_blocker),
    # ---- entprune score
    Case("cli-score-one-sample", C, command(*SCORE, "--num_samples", "1"), E, r"--ced_num_samples must be >= 2"),
    Case("cli-score-batch-size-zero", C, command(*SCORE, "--batch_size", "0"), E, r"--ced_batch_size must be >= 1"),
    Case("cli-score-timestep-range-reversed", C, command(*SCORE, "--timestep_range", "0.8", "0.2"), E,
         r"--ced_timestep_range LOW HIGH must satisfy 0 <= LOW < HIGH <= 1.*got 0.8 0.2"),
    Case("cli-score-no-timestep-buckets", C, command(*SCORE, "--num_timestep_buckets", "0"), E,
         r"--ced_num_timestep_buckets must be >= 1"),
    Case("cli-score-seed-negative", C, command(*SCORE, "--seed", "-3"), E, r"--seed must lie in \[0, 2\*\*32\)"),
    Case("cli-score-method-unknown", C, command(*SCORE, "--method", "entropy"), E,
         r"argument --ranking/--method: invalid choice: 'entropy'"),
    Case("cli-score-label-column-missing", C, command(*SCORE, "--label_column", "digit"), ValueError,
         r"`label_column`='digit' is not a column"),
    Case("cli-score-output-dir-is-a-file", C, command(*SCORE), ValueError, r"`--output_dir`=.* is a file",
         prepare=write_file),
    # ---- entprune eval
    Case("cli-eval-too-few-samples", C, command(*EVAL, "--num_samples", "2"), E,
         r"--num_samples must be >= 4 \(precision and recall need k \+ 1 samples"),
    Case("cli-eval-guidance-negative", C, command(*EVAL, "--guidance_scale", "-1"), E,
         r"--guidance_scale must be >= 0"),
    Case("cli-eval-sampler-on-dit", C, command(*EVAL, "--sampler", "heun"), ValueError,
         r"`--sampler` applies to SiT models only"),
    Case("cli-eval-unknown-embedded-reference", C, command(*EVAL, "--reference", "embedded:cifar"), E,
         r"--reference 'embedded:cifar' is not embedded data; use one of"),
    Case("cli-eval-reference-offline", C, command(*EVAL, "--reference", OFFLINE_ID, "--feature_network", "digits"),
         ConnectionError, r"`--reference` 'entprune-tests/never-downloaded' is not a local folder and the Hub could "
                          r"not be reached.*HF_HUB_OFFLINE.*pass a local imagefolder / parquet folder",
         patch=offline),
    Case("cli-eval-class-label-outside", C, command(*EVAL, "--class_labels", "3", "1000"), ValueError,
         r"`class_labels` must lie in 0\.\.999 for this model, got \[1000\]"),
    Case("cli-eval-inception-weights-missing", C, command(*EVAL, "--inception_weights", "{tmp}/pt_inception.pth"),
         E, r"--inception_weights .*pt_inception\.pth' is not a file"),
    Case("cli-eval-original-not-a-pipeline", C, command(*EVAL, "--original_model_name_or_path", "{unet}"), OSError,
         r"`--original_model_name_or_path`=.*unet': this folder is not a DiTPipeline or SiTPipeline folder"),
    # ---- entprune convert
    Case("cli-convert-checkpoint-missing", C, command(*CONVERT, "--checkpoint", "{tmp}/DiT.pt", "--vae", "{vae}"), E,
         r"--checkpoint .*DiT\.pt' is not a file"),
    Case("cli-convert-heads-zero", C, command(*CONVERT, "--checkpoint", "{tensor_pt}", "--vae", "{vae}",
                                              "--num_attention_heads", "0"), E,
         r"--num_attention_heads must be >= 1, got 0 \(leave it out to read it off the weights\)"),
    Case("cli-convert-not-a-dit-state-dict", C, command(*CONVERT, "--checkpoint", "{not_dit_weights}", "--vae",
                                                        "{vae}"), ValueError,
         r"`checkpoint` is not an original DiT/SiT state dict: keys \['x_embedder\.proj\.weight'"),
    Case("cli-convert-vae-offline", C, command(*CONVERT, "--checkpoint", "{not_dit_weights}", "--vae", OFFLINE_ID),
         OSError, r"`--vae`='entprune-tests/never-downloaded': not a local folder, and HF_HUB_OFFLINE is set",
         patch=offline),
    Case("cli-convert-vae-is-a-pipeline", C, command(*CONVERT, "--checkpoint", "{not_dit_weights}", "--vae",
                                                     "{source}"), OSError,
         r"`--vae`=.*: this folder is not a diffusers AutoencoderKL \(add `--vae_subfolder vae`"),
    Case("cli-convert-id2label-not-json", C, command(*CONVERT, "--checkpoint", "{not_dit_weights}", "--vae", "{vae}",
                                                     "--id2label", "{not_json}"), ValueError,
         r"`--id2label` .* is not a JSON object mapping class indices to names"),
    Case("cli-convert-model-type-unknown", C, command(*CONVERT, "--checkpoint", "{not_dit_weights}", "--vae",
                                                      "{vae}", "--model_type", "pixart"), E,
         r"argument --model_type: invalid choice: 'pixart'"),
    # ---- the Python API
    Case("api-transformer-from-a-vae-folder", A, lambda c: EntPrunedTransformer2DModel.from_pretrained(c["vae"]),
         ValueError, r"`pretrained_model_name_or_path`=.* holds a AutoencoderKL, not a DiT transformer"),
    Case("api-transformer-from-a-pipeline-root", A, lambda c: EntPrunedTransformer2DModel.from_pretrained(c["source"]),
         OSError, r"`pretrained_model_name_or_path`=.*: this folder is not a DiT transformer.*"
                  r"pass `subfolder='transformer'`"),
    Case("api-transformer-offline", A,
         lambda c: EntPrunedTransformer2DModel.from_pretrained(OFFLINE_ID, subfolder="transformer"), OSError,
         r"`pretrained_model_name_or_path`='entprune-tests/never-downloaded': not a local folder, and HF_HUB_OFFLINE",
         patch=offline),
    Case("api-transformer-embedder-policy", A,
         lambda c: EntPrunedTransformer2DModel.from_pretrained(c["source"], subfolder="transformer",
                                                               embedder_copies="share"), ValueError,
         r"`embedder_copies` must be one of"),
    Case("api-save-not-a-transformer", A,
         lambda c: save_pruned_pipeline(c["out"], "DiT-XL", make_tiny_vae(), make_scheduler()), TypeError,
         r"`transformer` must be a DiT transformer, got str"),
    Case("api-save-unknown-model-type", A,
         lambda c: save_pruned_pipeline(c["out"], c["model"], make_tiny_vae(), make_scheduler(), model_type="unet"),
         ValueError, r"`model_type` must be one of \('dit', 'sit'\), got 'unet'"),
    Case("api-save-into-a-file", A, lambda c: save_pruned_pipeline(c["out"], c["model"], make_tiny_vae(),
                                                                   make_scheduler()),
         ValueError, r"`output_dir`=.* is a file", prepare=write_file),
    Case("api-pipeline-class-unknown", A, lambda c: pipeline_class("pixart"), ValueError,
         r"`model_type` must be one of \('dit', 'sit'\), got 'pixart'"),
    Case("api-resolve-target-ratio-above-one", A, lambda c: resolve_target(12, target_prune_ratio=1.2), ValueError,
         r"`target_prune_ratio` must lie strictly between 0 and 1, got 1.2"),
    Case("api-resolve-target-two-targets", A, lambda c: resolve_target(12, 0.5, 3), ValueError,
         r"Give exactly one of `target_prune_ratio`.*`target_num_blocks`"),
    Case("api-resolve-target-budget-without-sizes", A, lambda c: resolve_target(12, target_num_params=10**6),
         ValueError, r"`target_num_params` needs `params_per_block` and `params_outside_blocks`"),
    Case("api-decision-steps-too-few-steps", A, lambda c: decision_steps(4, 2), ValueError,
         r"`pruning_steps`=2 is shorter than `pruning_stages`=4.*Train longer or use fewer stages"),
    Case("api-decision-steps-unknown-mode", A, lambda c: decision_steps(4, 8, "gradual"), ValueError,
         r"`pruning_mode` must be one of \('adaptive', 'fixed', 'one_shot'\), got 'gradual'"),
    Case("api-controller-prunes-everything", A, lambda c: AdaptivePruningController(6, 6, [0]), ValueError,
         r"`num_to_prune` must be in \[0, 5\], got 6"),
    Case("api-ced-variance-unknown", A, lambda c: CEDOptions(variance="full"), ValueError,
         r"`variance` must be one of \('scalar', 'channel', 'diag'\), got 'full'"),
    Case("api-ced-no-data", A, lambda c: compute_ced(c["model"], c["objective"], [], num_samples=8), ValueError,
         r"The data ran out after 0 samples; `num_samples`=8 asks for more.*repeat_batches"),
    Case("api-ced-one-sample", A, lambda c: compute_ced(c["model"], c["objective"], [], num_samples=1), ValueError,
         r"`num_samples` must be >= 2 to estimate a variance"),
    Case("api-score-blocks-unknown-method", A,
         lambda c: score_blocks("entropy", c["model"], c["objective"], [], 8), ValueError,
         r"`method` must be one of \('ced', .*got 'entropy'"),
    Case("api-prune-block-out-of-range", A, lambda c: c["model"].prune_blocks([6]), ValueError,
         r"`indices`: block 6 is out of range; the original model has blocks 0\.\.5"),
    Case("api-sit-sampler-unknown", A, lambda c: c["sit"]([1], sampler="rk4"), ValueError,
         r"`sampler` must be one of .*got 'rk4'"),
    Case("api-sit-zero-steps", A, lambda c: c["sit"]([1], num_inference_steps=0), ValueError,
         r"`num_inference_steps` must be >= 1, got 0"),
    Case("api-sit-class-label-outside", A, lambda c: c["sit"]([1, 1001], num_inference_steps=1), ValueError,
         r"`class_labels` \[1001\] are outside the model's classes 0\.\.999"),
    Case("api-sit-guidance-negative", A, lambda c: c["sit"]([1], guidance_scale=-1.0), ValueError,
         r"`guidance_scale` must be >= 0"),
    Case("api-original-checkpoint-not-a-dict", A, lambda c: load_original_state_dict(c["tensor_pt"]), ValueError,
         r"`checkpoint`=.*tensor\.pt' does not hold a state dict"),
    Case("api-original-config-not-dit", A, lambda c: infer_config({"fc.weight": torch.zeros(2, 2)}), ValueError,
         r"`checkpoint` is not an original DiT/SiT state dict: keys .* are missing"),
    Case("api-latent-batches-zero-batch", A,
         lambda c: LatentBatches(load_image_dataset(train_data_dir=c["downstream"]), make_tiny_vae(), 16,
                                 batch_size=0), ValueError, r"`batch_size` must be >= 1, got 0"),
    Case("api-dataset-folder-missing", A, lambda c: load_image_dataset(train_data_dir=os.path.join(c["tmp"], "x")),
         ValueError, r"`train_data_dir`=.* is not a folder"),
]


def snapshot(folder) -> dict:
    """Every path under ``folder`` with its kind, size and content hash."""
    import hashlib

    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = "dir"
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return found


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 35 and len({case.id for case in CASES}) == len(CASES)
    assert {case.kind for case in CASES} == {S, C, A}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_fast_names_the_argument_and_leaves_nothing(case, world, tmp_path, monkeypatch, capsys):
    context = {**world, "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    if case.prepare is not None:
        case.prepare(context)
    before = snapshot(tmp_path)
    if case.kind != A:
        guard_heavy_work(monkeypatch)
    if case.patch is not None:
        case.patch(monkeypatch, context)
    capsys.readouterr()
    start = time.perf_counter()
    with pytest.raises(case.error) as raised:
        case.run(context)
    seconds = time.perf_counter() - start
    message = f"{raised.value}\n{capsys.readouterr().err}"
    if case.error is SystemExit:
        assert raised.value.code not in (0, None)
    assert re.search(case.match, message, re.DOTALL), f"{case.match!r} not in:\n{message}"
    assert seconds < FAST_SECONDS, f"took {seconds:.1f} s to refuse"
    assert snapshot(tmp_path) == before, "files were created or changed"
    if case.prepare is None:
        assert not os.path.exists(context["out"])


def test_grayscale_rgba_palette_and_odd_sized_images_are_converted(tmp_path):
    """Not bad input: DiT's preprocessing converts every mode to RGB (alpha dropped) and centre-crops any image at
    least as large as the resolution, so such datasets train and score like RGB ones."""
    rng = np.random.default_rng(0)
    rgb = PILImage.fromarray(rng.integers(0, 255, (41, 17, 3), dtype=np.uint8))  # 17 x 41: odd, not square
    rgba = rgb.convert("RGBA")
    rgba.putalpha(64)  # mostly transparent
    images = [rgb.convert(mode) if mode != "RGBA" else rgba for mode in ("L", "LA", "RGBA", "P", "CMYK", "1", "RGB")]
    folder = parquet(tmp_path / "modes", images, list(range(len(images))),
                     Features({"image": Image(), "label": Value("int64")}))
    dataset = load_image_dataset(train_data_dir=folder)
    assert [example["image"].mode for example in dataset] == ["L", "LA", "RGBA", "P", "CMYK", "1", "RGB"]
    pixels, labels = PixelCollate(16, num_classes=10)(list(dataset))
    assert pixels.shape == (7, 3, 16, 16) and labels.tolist() == list(range(7))
    assert pixels.min() >= -1 and pixels.max() <= 1
    gray = pixels[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])  # grayscale: three equal channels
    assert torch.equal(pixels[2], pixels[6])  # RGBA: the colour channels, alpha dropped
    latents, _ = next(iter(LatentBatches(dataset, make_tiny_vae(), 16, batch_size=7, num_classes=10)))
    assert latents.shape == (7, 4, 8, 8) and torch.isfinite(latents).all()
