#!/usr/bin/env python
"""Fine-tune a pretrained DiT or SiT on a downstream dataset while pruning whole transformer blocks (EntPruner).

    # the embedded default: tiny digits DiT and the bundled downstream digits, a few minutes on a laptop CPU
    accelerate launch examples/prune_dit.py
    # the same with the embedded tiny SiT (flow model); examples/prune_sit.py is this script with --model_type sit
    accelerate launch examples/prune_dit.py --model_type sit

    # the real thing
    accelerate launch examples/prune_dit.py \
      --pretrained_model_name_or_path facebook/DiT-XL-2-256 --dataset_name <a Hub or local dataset> \
      --target_prune_ratio 0.5 --max_train_steps 100000 --train_batch_size 32 --mixed_precision bf16 \
      --use_ema --checkpointing_steps 5000 --output_dir dit-xl-pruned --push_to_hub

Training runs in ``--pruning_stages`` stages spread over the first ``--pruning_steps`` steps. At each stage boundary
the remaining blocks are ranked by Conditional Entropy Deviation (CED) on a fixed pool of training images; the
candidates "drop the m lowest-CED blocks" (m = 0 included) are scored by two zero-shot proxies (NTK condition number
and ZiCo); the chosen blocks leave the model, its optimizer state and its EMA, and fine-tuning continues on the
smaller model. The last stage always meets ``--target_prune_ratio``. ``--pruning_mode fixed`` and ``one_shot`` are
the schedules to compare against.

A SiT (a `SiTPipeline` folder, e.g. made by ``entprune convert --model_type sit``) is trained with the flow objective
(velocity MSE on the linear interpolant); CED is measured on its velocity prediction and the proxies on the flow
loss; validation grids and the speed comparison use ``--sampler``. The family is read from the folder's
``model_index.json``.

With ``--distill_output_weight`` and/or ``--distill_feature_weight`` the student also regresses a frozen teacher (by
default the source model; better, ``--teacher_model_name_or_path`` a ``--fine_tune_only`` output): its outputs and
its masked hidden states (diffusers_entprune/distillation.py).

The output folder is a plain `DiTPipeline` (a `SiTPipeline` for SiT; EMA weights with ``--use_ema``) that diffusers
loads without this package, with ``entprune_report.json`` (every decision, the CED scores, the measured sampling
speedup), ``ced.png``, ``samples.png`` (original vs pruned, same seeds), validation grids, a model card, and the
``checkpoint-*`` folders that ``--resume_from_checkpoint latest`` continues from (same architecture, same schedule).
SIGTERM (preemption) ends the run after the step in progress with a checkpoint and exit status 143
(diffusers_entprune/preemption.py).
"""

import argparse
import logging
import os
import shutil
import tempfile
import time

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffusers_entprune.checkpoints import (
    FINITE_KEY,
    STATE_NAME,
    CheckpointWriteError,
    CorruptCheckpointError,
    disk_full_message,
    is_disk_full,
    last_good_checkpoint,
    latest_intact_checkpoint,
    list_checkpoints,
    read_state,
    remove_stale_staging,
    verify_checkpoint,
    write_state,
)
from diffusers_entprune.controller import PRUNING_MODES, AdaptivePruningController, decision_steps, resolve_target
from diffusers_entprune.data import (
    BadImageTally,
    LatentBatches,
    PixelCollate,
    check_columns,
    load_dataset_or_embedded,
    prepare_labels,
    repeat_batches,
    shard_batches,
    training_dataloader,
    vae_scale_factor,
)
from diffusers_entprune.distillation import (
    DistillationConfig,
    Distiller,
    Teacher,
    check_distillation_settings,
    check_teacher_config,
)
from diffusers_entprune.export import load_id2label, save_pruned_pipeline
from diffusers_entprune.hub import Secret, check_can_push, push_pruned_pipeline
from diffusers_entprune.importance import RANKING_METHODS, CEDOptions, score_blocks
from diffusers_entprune.importance.learned import LEARNED_FLAGS, add_learned_arguments, learned_options_from_args
from diffusers_entprune.lora import add_lora, merge_lora
from diffusers_entprune.model_types import (
    MODEL_TYPES,
    check_null_class,
    detect_model_type,
    objective_for,
    pipeline_class,
    resolve_source,
)
from diffusers_entprune.models import EntPrunedTransformer2DModel
from diffusers_entprune.output_dir import (
    MARKER_NAME,
    OutputDirLock,
    OutputDirLockedError,
    check_not_an_input,
    check_not_locked,
    check_output_dir,
    check_writable,
    clear_output_dir,
    write_marker,
)
from diffusers_entprune.pipelines.pipeline_sit import SAMPLERS
from diffusers_entprune.plotting import plot_stage_scores, sample_grid
from diffusers_entprune.preemption import any_process, handle_sigterm, phase, preempted, stop_requested
from diffusers_entprune.proxies import score_candidates
from diffusers_entprune.run_identity import (
    RunMismatchError,
    compare_run_identity,
    fingerprint_dataset,
    fingerprint_weights,
    run_identity,
)
from diffusers_entprune.speed import compare_sampling_speed
from diffusers_entprune.training_draws import stream_positions, training_draws
from diffusers_entprune.training_state import (
    nonfinite_training_state,
    prune_training_state,
    reprepare_model,
    set_base_learning_rate,
)

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help="DiT or SiT pipeline folder or Hub id, e.g. facebook/DiT-XL-2-256 (default: the embedded "
                            "tiny digits DiT, or SiT with --model_type sit).")
    model.add_argument("--model_type", choices=MODEL_TYPES, default=None,
                       help="dit (DDPM, DiTPipeline) or sit (flow, SiTPipeline). Default: read from the pipeline "
                            "folder's model_index.json; dit for the embedded base.")
    model.add_argument("--revision", default=None)

    data = parser.add_argument_group("data (default: the embedded downstream digits)")
    data.add_argument("--dataset_name", default=None, help="A Hub dataset id or a path `datasets` can load.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="An imagefolder or a folder of parquet files.")
    data.add_argument("--split", default="train")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument("--resolution", type=int, default=None,
                      help="Image size (default: the model's sample_size times the VAE's downsampling).")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    data.add_argument("--shuffle_buffer_size", type=int, default=1000, help="With --streaming.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N images only.")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random (DiT does).")
    data.add_argument("--dataloader_num_workers", type=int, default=0)
    data.add_argument("--cache_dir", default=None, help="`datasets` cache folder.")
    data.add_argument("--class_mapping_file", default=None,
                      help="A JSON file {class name: model class id} for the label column's classes (e.g. an "
                           "imagefolder's folders). Default: by name: folders named by class id take that id, names "
                           "that are the model's labels take their ids, new classes keep the dataset's ids.")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="Replace an unreadable image (truncated, empty, missing) by another of its batch, with a "
                           "warning, instead of stopping; they are counted in entprune_report.json.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=None, help="Default: dit-pruned or sit-pruned.")
    train.add_argument("--overwrite_output_dir", action="store_true",
                       help="Start afresh in a non-empty output_dir (its old checkpoints are removed).")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--train_batch_size", type=int, default=32, help="Per process.")
    train.add_argument("--max_train_steps", type=int, default=800)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=float, default=None,
                       help="Default: 1e-4, DiT's rate; 1e-3 for the embedded tiny base, which was trained at it.")
    train.add_argument("--lr_scheduler", default="constant",
                       help='"constant", "constant_with_warmup", "linear", "cosine", ... (diffusers names).')
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=0.0)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--class_dropout_prob", type=float, default=0.1,
                       help="Classifier-free guidance: replace a sample's label by the null class this often.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None,
                       help="Default: accelerate's config.")
    train.add_argument("--allow_tf32", action="store_true")
    train.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights and export it.")
    train.add_argument("--ema_decay", type=float, default=0.9999)
    train.add_argument("--use_lora", action="store_true",
                       help="Fine-tune LoRA adapters of the kept blocks only (merged before export).")
    train.add_argument("--lora_rank", type=int, default=16)
    train.add_argument("--lora_alpha", type=float, default=None, help="Default: the rank.")
    train.add_argument("--checkpointing_steps", type=int, default=500)
    train.add_argument("--checkpoints_total_limit", type=int, default=None)
    train.add_argument("--resume_from_checkpoint", default=None,
                       help='A checkpoint folder, or "latest" (the newest in output_dir; none there: start afresh).')
    train.add_argument("--report_to", default=None, help='"tensorboard", "wandb", "all" (default: no tracker).')
    train.add_argument("--logging_dir", default="logs")
    train.add_argument("--validation_steps", type=int, default=200,
                       help="Save a grid of samples every N steps (0: never).")
    train.add_argument("--validation_class_labels", type=int, nargs="+", default=None,
                       help="Classes of the validation grid (default: the first 8).")
    train.add_argument("--guidance_scale", type=float, default=4.0)
    train.add_argument("--num_inference_steps", type=int, default=50)
    train.add_argument("--sampler", choices=SAMPLERS, default=None,
                       help="SiT only: the SiTPipeline sampler for validation, samples and timing (default euler).")

    prune = parser.add_argument_group("pruning")
    target = prune.add_mutually_exclusive_group()
    target.add_argument("--target_prune_ratio", type=float, default=None,
                        help="Fraction of the blocks to remove (default 0.5).")
    target.add_argument("--target_num_blocks", type=int, default=None, help="Number of blocks to remove.")
    target.add_argument("--target_num_params", type=int, default=None,
                        help="Parameter budget (unique parameters, one shared embedder as in the original DiT): "
                             "remove the fewest blocks that bring the model within it.")
    target.add_argument("--fine_tune_only", action="store_true",
                        help="Prune nothing: the same fine-tuning, export and report for the unpruned model (the "
                             "ceiling a pruned model is compared with).")
    prune.add_argument("--pruning_mode", choices=PRUNING_MODES, default="adaptive",
                       help="adaptive: zero-shot proxies decide how many blocks each stage drops; fixed: equal "
                            "amounts per stage; one_shot: everything at step 0.")
    prune.add_argument("--pruning_stages", type=int, default=4)
    prune.add_argument("--pruning_steps", type=int, default=None,
                       help="Stage boundaries are spread over the first N steps (default: half of max_train_steps).")
    prune.add_argument("--rank_once", action="store_true",
                       help="Rank the blocks by CED once at the start instead of at every stage.")
    prune.add_argument("--ranking", choices=RANKING_METHODS, default="ced",
                       help="How blocks are ranked at each stage: ced (EntPruner) or a baseline to compare with "
                            "(random, magnitude, taylor, block_influence, loss, uniform); see `entprune score`. "
                            "learned (TinyFusion-style: learns which blocks to keep with adapters standing in for the "
                            "fine-tuning, see --learned_*) chooses the set for the whole remaining target at once: "
                            "use it with --pruning_mode one_shot.")
    prune.add_argument("--ranking_seed", type=int, default=None,
                       help="Seed of the ranking's draws (and of the random ranking); default --seed.")
    prune.add_argument("--ced_num_samples", type=int, default=1024,
                       help="Fixed (x0, t, noise) draws for the ranking.")
    prune.add_argument("--ced_batch_size", type=int, default=64)
    prune.add_argument("--ced_variance", choices=["scalar", "channel", "diag"], default="channel")
    prune.add_argument("--ced_estimator", choices=["entropy", "residual", "kl", "w2"], default="entropy",
                       help="How --ranking ced compares the skipped model with the full one: entropy (the paper's "
                            "|H(Y|C) - H(Y_skip|C)|), residual (H(Y_skip | Y_full, C)), kl or w2 (divergences of "
                            "the per-class Gaussians); see `entprune score --help`.")
    prune.add_argument("--ced_signal", choices=["prediction", "condition"], default="prediction",
                       help="What --ranking ced measures: the prediction (the paper's) or the condition's "
                            "contribution, prediction(class) - prediction(null class) (twice the block work).")
    add_learned_arguments(parser)
    prune.add_argument("--proxy_batch_size", type=int, default=8,
                       help="Samples in the NTK batch and in each ZiCo batch (NTK memory: this many gradients).")
    prune.add_argument("--zico_num_batches", type=int, default=2,
                       help="Mini-batches of ZiCo (>= 2: it divides gradient means by their deviation across them).")
    prune.add_argument("--zico_reduction", choices=["sum", "mean"], default="mean",
                       help="Combine ZiCo's layers by sum (its definition; favours deeper candidates) or mean.")

    distill = parser.add_argument_group(
        "knowledge distillation (diffusers_entprune/distillation.py; off by default): loss = (1 - w) * ground truth "
        "+ w * output KD + beta * hidden-state KD, beta decaying linearly from --distill_feature_weight to 0")
    distill.add_argument("--distill_output_weight", type=float, default=None,
                         help="w in [0, 1]: the share of the output-distillation term (the student regresses the "
                              "teacher's output, learned-variance channels included; SiT: the velocity). Default 0: "
                              "off.")
    distill.add_argument("--distill_feature_weight", type=float, default=None,
                         help="beta0 >= 0: initial weight of the hidden-state term (after each kept block, matched "
                              "to the teacher's block of the same original index, outliers masked). Default 0: off.")
    distill.add_argument("--distill_feature_decay_steps", type=int, default=None,
                         help="beta decays linearly to 0 over this many steps (0: no decay). Default: "
                              "--max_train_steps, so it guides the student while blocks leave it and is gone by the "
                              "end; give it explicitly to let a resumed run grow --max_train_steps.")
    distill.add_argument("--distill_mask_sigma", type=float, default=None,
                         help="Leave out of the hidden-state term the teacher's elements farther than this many "
                              "standard deviations from their sample's mean (DiT's massive activations, which make "
                              "unmasked feature KD diverge). Default 2.0; 0: no mask.")
    distill.add_argument("--teacher_model_name_or_path", default=None,
                         help="The teacher: a DiT/SiT pipeline folder or Hub id of the student's architecture. "
                              "Default: the source model, frozen before any pruning. Recommended: the output of a "
                              "--fine_tune_only run on the same data; a teacher that never saw the downstream data "
                              "pulls the student toward the pretraining distribution.")

    out = parser.add_argument_group("output")
    out.add_argument("--save_fp16", action="store_true", help="Store the exported weights in float16.")
    out.add_argument("--speed_batch_size", type=int, default=8,
                     help="Class labels per call when timing the original against the pruned pipeline (0: skip).")
    out.add_argument("--speed_repeats", type=int, default=3)
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", default=None, help="Default: the output folder's name.")
    out.add_argument("--hub_token", default=None, help="Default: the login of `hf auth login` / HF_TOKEN.")
    out.add_argument("--hub_private", action="store_true")
    args = parser.parse_args(argv)
    # kept out of every log and tracker config (those take plain values only); `reveal` hands it to the upload
    args.hub_token = Secret(args.hub_token) if args.hub_token is not None else None

    if args.target_prune_ratio is None and args.target_num_blocks is None and args.target_num_params is None \
            and not args.fine_tune_only:
        args.target_prune_ratio = 0.5
    if args.learning_rate is None:
        args.learning_rate = 1e-3 if args.pretrained_model_name_or_path is None else 1e-4
    if not args.learning_rate > 0:  # written so that nan fails too
        parser.error(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("Pass at most one of --dataset_name and --train_data_dir.")
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "ced_batch_size",
                 "speed_repeats", "pruning_stages", "shuffle_buffer_size", "lora_rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ("target_num_blocks", "target_num_params", "pruning_steps", "max_train_samples", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name, meaning in (("lr_warmup_steps", ""), ("validation_steps", " (0: no validation grids)"),
                          ("speed_batch_size", " (0: no speed comparison)"), ("dataloader_num_workers", ""),
                          ("max_grad_norm", " (0: no gradient clipping)"), ("adam_weight_decay", ""),
                          ("guidance_scale", " (<= 1: no classifier-free guidance)")):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name} must be >= 0{meaning}, got {getattr(args, name)}.")
    for name in ("seed", "ranking_seed"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < 2**32:
            parser.error(f"--{name} must lie in [0, 2**32), got {getattr(args, name)}.")
    if args.target_prune_ratio is not None and not 0.0 < args.target_prune_ratio < 1.0:
        parser.error(f"--target_prune_ratio is the fraction of the blocks to remove and must lie strictly between 0 "
                     f"and 1, got {args.target_prune_ratio}; use --target_num_blocks for a number of blocks.")
    for name in ("adam_beta1", "adam_beta2", "ema_decay"):
        if not 0.0 <= getattr(args, name) < 1.0:
            parser.error(f"--{name} must lie in [0, 1), got {getattr(args, name)}.")
    if not args.adam_epsilon > 0:
        parser.error(f"--adam_epsilon must be > 0, got {args.adam_epsilon}.")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        parser.error(f"--lora_alpha must be > 0, got {args.lora_alpha}.")
    from diffusers.optimization import SchedulerType

    if args.lr_scheduler not in [s.value for s in SchedulerType]:
        parser.error(f"--lr_scheduler {args.lr_scheduler!r} is not a diffusers schedule; choose one of "
                     f"{[s.value for s in SchedulerType]}.")
    if args.proxy_batch_size < 2:
        parser.error("--proxy_batch_size must be >= 2 (the NTK of one sample has no condition number).")
    if args.ced_num_samples < 2:
        parser.error("--ced_num_samples must be >= 2.")
    if args.zico_num_batches < 2:
        parser.error(f"--zico_num_batches must be >= 2, got {args.zico_num_batches}: ZiCo divides each gradient's "
                     "mean over its mini-batches by its standard deviation across them, which needs two.")
    if args.class_mapping_file is not None and not os.path.isfile(args.class_mapping_file):
        parser.error(f"--class_mapping_file {args.class_mapping_file!r} is not a file (a JSON object {{class name: "
                     "model class id}}).")
    if args.checkpointing_steps < 1:
        parser.error("--checkpointing_steps must be >= 1.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be >= 1.")
    if args.pruning_steps is None:
        args.pruning_steps = max(1, args.max_train_steps // 2)
    if args.pruning_steps > args.max_train_steps:
        parser.error(f"--pruning_steps {args.pruning_steps} exceeds --max_train_steps {args.max_train_steps}.")
    if not 0.0 <= args.class_dropout_prob < 1.0:
        parser.error("--class_dropout_prob must lie in [0, 1).")
    if args.num_inference_steps < 1:
        parser.error(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}.")
    if args.use_lora and args.ranking == "taylor":
        parser.error("--ranking taylor needs the gradients of the block weights, which --use_lora freezes; pick "
                     "another --ranking or train without LoRA.")
    if args.ranking_seed is None:
        args.ranking_seed = args.seed
    learned_options_from_args(args, args.ranking, "--ranking", parser.error)  # checks the --learned_* flags
    check_distillation_flags(parser, args)
    return args


def check_distillation_flags(parser, args) -> None:
    """Validate the --distill_* flags and fill in their defaults. Without distillation they all stay None, so a run
    records the same settings as before distillation existed (its checkpoints resume under either version)."""
    flags = {name: f"--distill_{name}" for name in ("output_weight", "feature_weight", "feature_decay_steps",
                                                    "mask_sigma")}
    try:
        check_distillation_settings(args.distill_output_weight or 0.0, args.distill_feature_weight or 0.0,
                                    args.distill_feature_decay_steps or 0,
                                    2.0 if args.distill_mask_sigma is None else args.distill_mask_sigma, flags)
    except ValueError as error:
        parser.error(str(error))
    feature = (args.distill_feature_weight or 0.0) > 0
    if not (args.distill_output_weight or 0.0) > 0 and not feature:
        given = [f"--{name}" for name in ("distill_feature_decay_steps", "distill_mask_sigma",
                                          "teacher_model_name_or_path") if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)} set without distillation; pass --distill_output_weight or "
                         "--distill_feature_weight (> 0), or drop them.")
        args.distill_output_weight = args.distill_feature_weight = None  # an explicit 0 is "off" too
        return
    args.distill_output_weight = args.distill_output_weight or 0.0
    args.distill_feature_weight = args.distill_feature_weight or 0.0
    if not feature:
        given = [f"--{name}" for name in ("distill_feature_decay_steps", "distill_mask_sigma")
                 if getattr(args, name) is not None]
        if given:
            parser.error(f"{', '.join(given)} shape the hidden-state term, which is off; pass "
                         "--distill_feature_weight (> 0), or drop them.")
        return
    if args.distill_feature_decay_steps is None:
        args.distill_feature_decay_steps = args.max_train_steps
    if args.distill_mask_sigma is None:
        args.distill_mask_sigma = 2.0


def resolve_model_type(args) -> None:
    """Fill in --model_type from the pipeline folder (it must agree when given), then the defaults that follow."""
    args.model_type, args.source, args.source_name = resolve_source(args.pretrained_model_name_or_path,
                                                                    args.model_type, args.revision)
    if args.sampler is not None and args.model_type == "dit":
        raise ValueError("`--sampler` applies to SiT models only; DiT samples with its pipeline's scheduler.")
    if args.model_type == "sit" and args.sampler is None:
        args.sampler = "euler"
    args.output_dir = args.output_dir or f"{args.model_type}-pruned"
    check_null_class(args.model_type, args.source, args.revision)  # the export must sample with DiTPipeline
    if args.validation_class_labels is not None:  # checked now: validation first samples after training steps
        config = EntPrunedTransformer2DModel.load_config(args.source, subfolder="transformer", revision=args.revision)
        num_classes = config.get("num_embeds_ada_norm")
        bad = [c for c in args.validation_class_labels if num_classes is not None and not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"`--validation_class_labels` {bad} are not classes of the model, which has classes "
                             f"0..{num_classes - 1}.")


def check_teacher(args) -> None:
    """Before any heavy work: the distillation teacher must be a DiT/SiT pipeline of the student's family whose
    transformer fits the source model's (same latents, patches and classes; for the hidden-state term also width,
    original depth and a block in common). The default teacher, the source model itself, fits by construction."""
    if args.distill_output_weight is None or args.teacher_model_name_or_path is None:
        return
    from diffusers_entprune.models.entpruned_transformer_2d import check_dit_config

    path, argument = args.teacher_model_name_or_path, "--teacher_model_name_or_path"
    teacher_type = detect_model_type(path, argument=argument)
    if teacher_type != args.model_type:
        raise ValueError(f"`{argument}`={path!r} is a {teacher_type} pipeline, but the student is a "
                         f"{args.model_type} ({args.source_name}): a teacher must predict what the student predicts. "
                         f"Pass a {args.model_type} pipeline folder.")
    teacher_config = EntPrunedTransformer2DModel.load_config(path, subfolder="transformer")
    check_dit_config(teacher_config, argument=argument, source=path)
    student_config = EntPrunedTransformer2DModel.load_config(args.source, subfolder="transformer",
                                                             revision=args.revision)
    check_teacher_config(teacher_config, student_config, features=args.distill_feature_weight > 0,
                         argument=argument, teacher_name=f"the teacher {path!r}")


def sampler_kwargs(args) -> dict:
    """Extra pipeline-call arguments: the SiT sampler."""
    return {"sampler": args.sampler} if args.model_type == "sit" else {}


# ---------------------------------------------------------------------------------------------- checkpoints


EMA_WEIGHTS_NAME = "ema.safetensors"  # in every checkpoint of a run with --use_ema


def resolve_resume_path(args) -> str | None:
    """The checkpoint to resume from, verified against its manifest: with "latest", the newest intact one."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        return latest_intact_checkpoint(args.output_dir)
    path = args.resume_from_checkpoint
    if not os.path.isfile(os.path.join(path, STATE_NAME)):
        raise ValueError(f"`--resume_from_checkpoint`={path!r} is not a checkpoint of this script (no {STATE_NAME} "
                         f"in it). Pass a `checkpoint-N` folder from a previous run's output_dir, or 'latest'.")
    try:
        verify_checkpoint(path)
    except CorruptCheckpointError as error:
        raise CorruptCheckpointError(f"`--resume_from_checkpoint`: {error} Pass an older checkpoint, or 'latest' "
                                     "to take the newest intact one.") from None
    return path


def check_output_dir_before_run(args, resume_path: str | None) -> None:
    """The output folder may not be, contain or lie inside an input, must be writable, and (unless the run continues
    from one of its own checkpoints) must be empty or an earlier run of this script with --overwrite_output_dir.
    Nothing is deleted here: `clear_output_dir` runs once every argument has been validated."""
    check_not_locked(args.output_dir, "--output_dir")  # a live run there: say so, whatever else is wrong
    inputs = {"--pretrained_model_name_or_path": args.source, "--train_data_dir": args.train_data_dir,
              "--dataset_name": args.dataset_name, "--cache_dir": args.cache_dir,
              "--class_mapping_file": getattr(args, "class_mapping_file", None),
              "--teacher_model_name_or_path": getattr(args, "teacher_model_name_or_path", None)}
    continuing = resume_path is not None and is_own_checkpoint(args, resume_path)
    if resume_path is not None and not continuing:
        inputs["--resume_from_checkpoint"] = resume_path  # a checkpoint of another folder is an input like the others
    if continuing:  # this folder's own run
        check_not_an_input(args.output_dir, inputs, "--output_dir")
        check_writable(args.output_dir, "--output_dir")  # files of the user's beside the run are left alone
        return
    check_output_dir(args.output_dir, args.overwrite_output_dir, "--output_dir", inputs=inputs, kind="training",
                     extra_names=(args.logging_dir,),
                     hint="Continue that run with `--resume_from_checkpoint latest`. " if list_checkpoints(
                         args.output_dir) else "")


def is_own_checkpoint(args, path: str) -> bool:
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(args.output_dir)


def lock_output_dir(accelerator, args):
    """The main process takes the output folder's lock for the run's lifetime; every process learns if it could
    not (then all stop with the same error)."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            lock = OutputDirLock(args.output_dir, command="examples/prune_dit.py").acquire()
        except OutputDirLockedError as refused:
            error = str(refused)
    if accelerator.num_processes > 1:
        box = [error]
        broadcast_object_list(box)
        error = box[0]
    if error is not None:
        raise OutputDirLockedError(error)
    return lock


def save_ema(ema, folder: str) -> dict:
    """EMA shadows as safetensors (by position, the model's parameter order); returns its scalar settings."""
    state = ema.state_dict()
    shadows = state.pop("shadow_params")
    save_file({f"shadow.{i}": t.detach().cpu().contiguous() for i, t in enumerate(shadows)},
              os.path.join(folder, EMA_WEIGHTS_NAME))
    return state


def load_ema(ema, folder: str, settings: dict | None) -> None:
    """Restore what `save_ema` wrote (``settings``: the scalars kept in the checkpoint's state file)."""
    path = os.path.join(folder, EMA_WEIGHTS_NAME)
    if not os.path.isfile(path) or settings is None:
        raise ValueError(f"`--resume_from_checkpoint`: {folder!r} has no {EMA_WEIGHTS_NAME}, but `--use_ema` is set. "
                         "Resume without `--use_ema` (the EMA restarts from the weights) or from a checkpoint of a "
                         "run that used it.")
    shadows = load_file(path)
    ema.load_state_dict({**settings, "shadow_params": [shadows[f"shadow.{i}"] for i in range(len(shadows))]})


def save_checkpoint(accelerator, args, global_step: int, controller, stage_times: list, ema=None,
                    identity: dict | None = None, *, model, optimizer) -> str:
    """`accelerator.save_state` into a temporary folder, add the pruning state, rename into place, then apply
    `--checkpoints_total_limit` (old checkpoints go only once the new one is complete). A non-finite training state
    is never saved (`check_finite`); a full disk is reported as such and the incomplete folder removed."""
    check_finite(accelerator, args, global_step, model, optimizer, ema)
    bad_images = args.bad_images.merge(accelerator)  # every process's, so a resumed run reports them all
    final = os.path.join(args.output_dir, f"checkpoint-{global_step}")
    staging = os.path.join(args.output_dir, f".checkpoint-{global_step}.tmp")
    if accelerator.is_main_process and os.path.exists(staging):
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    failure = write_or_disk_full(lambda: accelerator.save_state(staging))  # every process writes its RNG state
    raise_if_disk_full(accelerator, args, failure, staging, final)  # also waits for every process
    if accelerator.is_main_process:  # the state and the manifest of every file go in last
        def write_pruning_state():
            ema_settings = save_ema(ema, staging) if ema is not None else None
            write_state(staging, {"global_step": global_step, "controller": controller.state_dict(),
                                  "stage_times": stage_times, "ema": ema_settings, "run_identity": identity,
                                  "bad_images": bad_images, FINITE_KEY: True})
        failure = write_or_disk_full(write_pruning_state)
    raise_if_disk_full(accelerator, args, failure, staging, final)
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        if args.checkpoints_total_limit is not None:
            for old in list_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
        logger.info(f"Saved {final}")
    accelerator.wait_for_everyone()
    return final


def write_or_disk_full(write) -> BaseException | None:
    """Run ``write``; return its error when the disk or quota is full (every other error propagates)."""
    try:
        write()
    except Exception as error:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        if not is_disk_full(error):
            raise
        return error
    return None


def raise_if_disk_full(accelerator, args, failure, staging: str, final: str) -> None:
    """Every process learns whether any ran out of space (one tiny all-reduce, which also lines them up); then the
    main process removes the incomplete staging folder, and all raise `CheckpointWriteError`."""
    if any_process(accelerator, failure is not None):
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        raise CheckpointWriteError(disk_full_message(staging, final, args.output_dir,
                                                     args.checkpoints_total_limit)) from failure


def check_finite(accelerator, args, global_step: int, model, optimizer, ema) -> None:
    """Raise the divergence error, on every process, when any holds a non-finite weight, optimizer state or EMA
    weight (one tiny all-reduce). The loss was finite: a non-finite loss stops the step before its update."""
    bad = nonfinite_training_state(accelerator.unwrap_model(model), optimizer, ema)
    if any_process(accelerator, bool(bad)):
        what = (f"The {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")) if bad else \
            "The training state of another process"
        raise divergence_error(args, f"{what} is not finite after the update of step {global_step}, though the loss "
                                     "was finite: a gradient or the update overflowed, and training diverged.")


def divergence_error(args, what: str) -> RuntimeError:
    """The error for a run whose loss or weights stopped being finite, naming the newest checkpoint that was checked
    finite when saved (an older version of this script saved without checking)."""
    good = last_good_checkpoint(args.output_dir)
    resume = f"the last good checkpoint is {good}. Resume from it with `--resume_from_checkpoint {good}` and" if good \
        else "there is no checkpoint checked finite to resume from. Start again with"
    return RuntimeError(f"{what} Nothing was saved from that step on; {resume} a lower `--learning_rate` (now "
                        f"{args.learning_rate}) or `--max_grad_norm` (now {args.max_grad_norm}), or with "
                        "`--mixed_precision bf16` instead of fp16.")


# ---------------------------------------------------------------------------------------------- helpers


@torch.no_grad()
def sample_images(transformer, vae, scheduler, class_labels, args):
    was_training = transformer.training
    transformer.eval()
    pipe = pipeline_class(args.model_type)(transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    # under mixed precision the VAE is half precision and the transformer float32: autocast lets them meet
    with torch.autocast(vae.device.type, dtype=vae.dtype, enabled=vae.dtype != torch.float32):
        images = pipe(class_labels=class_labels, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, generator=torch.manual_seed(args.seed),
                      **sampler_kwargs(args)).images
    transformer.train(was_training)
    return images


def validation_labels(args, transformer) -> list[int]:
    return args.validation_class_labels or list(range(min(8, transformer.config.num_embeds_ada_norm)))


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def build_ced_pool(dataset, vae, resolution, args, num_classes):
    """A fixed pool of clean latents (VAE means) from the first images of the training data, used for CED and
    the proxies at every stage (the same draws each time, so the stages are comparable)."""
    from datasets import IterableDataset

    needed = max(args.ced_num_samples, args.proxy_batch_size * (1 + args.zico_num_batches))
    subset = dataset.take(needed) if isinstance(dataset, IterableDataset) else \
        dataset.select(range(min(needed, len(dataset))))
    stream = LatentBatches(subset, vae, resolution, args.ced_batch_size, args.image_column, args.label_column,
                           num_classes=num_classes, latent_sampling="mean", skip_bad_images=args.skip_bad_images)
    batches = list(repeat_batches(stream, needed))  # a small dataset is met again with fresh noise draws
    latents, labels = torch.cat([b[0] for b in batches])[:needed], torch.cat([b[1] for b in batches])[:needed]
    return latents, labels


# ---------------------------------------------------------------------------------------------- main


@handle_sigterm  # SIGTERM (preemption) stops training at a step boundary with a checkpoint: see preemption.py
def main(argv=None):
    args = parse_args(argv)
    resolve_model_type(args)
    check_teacher(args)
    if args.push_to_hub:
        check_can_push()
    resume_path = resolve_resume_path(args)
    check_output_dir_before_run(args, resume_path)  # before any heavy work; deletes nothing

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # The blocks share one conditioning embedder, so safetensors stores it once and accelerate warns at every
    # checkpoint; reloading restores the tie (a resumed run ends bit-identical, tested), so the warning is noise.
    logging.getLogger("accelerate.utils.other").addFilter(lambda record: "Removed shared tensor" not in
                                                          record.getMessage())
    logger.info(accelerator.state, main_process_only=False)
    lock = lock_output_dir(accelerator, args)  # one run per folder: a second one is refused here
    try:
        train(args, accelerator, resume_path)
    finally:
        if lock is not None:
            lock.release()


def train(args, accelerator, resume_path):
    if accelerator.is_main_process:  # under the lock, so never the staging folder of a live run
        for path in remove_stale_staging(args.output_dir):  # an interrupted save or export; never a checkpoint
            logger.info(f"Removed {path}, left by an interrupted run.")
    accelerator.wait_for_everyone()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)  # training draws are per sample (training_draws); this seeds whatever else draws
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- model, data, objective
    source, source_name = args.source, args.source_name
    transformer = EntPrunedTransformer2DModel.from_pretrained(source, subfolder="transformer", revision=args.revision)
    source_fingerprint = fingerprint_weights(transformer)  # before any pruning: what a resumed run must start from
    pipe = pipeline_class(args.model_type).from_pretrained(source, transformer=transformer, revision=args.revision)
    vae, scheduler = pipe.vae.to(device, dtype=weight_dtype).eval(), pipe.scheduler
    vae.requires_grad_(False)
    id2label = load_id2label(source, revision=args.revision)
    num_classes = transformer.config.num_embeds_ada_norm
    objective = objective_for(args.model_type, transformer.config, scheduler)
    distiller, teacher_fingerprint = None, None
    if args.distill_output_weight is not None:  # a second, frozen model: never prepared, never in a checkpoint
        distiller = Distiller(DistillationConfig(
            output_weight=args.distill_output_weight, feature_weight=args.distill_feature_weight,
            feature_decay_steps=args.distill_feature_decay_steps or 0,
            mask_sigma=2.0 if args.distill_mask_sigma is None else args.distill_mask_sigma),
            Teacher.from_pretrained(args.teacher_model_name_or_path or source, device=device,
                                    revision=None if args.teacher_model_name_or_path else args.revision,
                                    autocast_dtype=weight_dtype))  # computes as the student does
        # the default teacher is the source model, whose weights were just fingerprinted
        teacher_fingerprint = source_fingerprint if args.teacher_model_name_or_path is None else \
            fingerprint_weights(distiller.teacher.model)
    resolution = transformer.config.sample_size * vae_scale_factor(vae)
    if args.resolution not in (None, resolution):
        raise ValueError(f"`--resolution`={args.resolution} does not match the model: its latents are "
                         f"{transformer.config.sample_size} wide, i.e. {resolution} px. Drop `--resolution`.")

    dataset, dataset_name = load_dataset_or_embedded(args.dataset_name, args.train_data_dir, args.split,
                                                     args.dataset_config_name, args.streaming, args.cache_dir)
    check_columns(dataset, args.image_column, args.label_column, num_classes)
    if args.max_train_samples is not None:
        dataset = dataset.take(args.max_train_samples) if args.streaming else \
            dataset.select(range(min(args.max_train_samples, len(dataset))))
    # every label checked (a map-style dataset's whole label column, no image decoded) and made the model's class id
    # now: a bad label met at step 97 of 150, or an imagefolder's alphabetical ids, would cost the whole run
    dataset_argument = "--dataset_name" if args.dataset_name is not None else "--train_data_dir"
    dataset, args.class_mapping = prepare_labels(
        dataset, args.label_column, num_classes, id2label, args.class_mapping_file,
        f"`{dataset_argument}`={dataset_name!r} (split {args.split!r})", log=logger.info)

    # ---- the pruning schedule, and the state of an interrupted run
    outside, per_block = transformer.parameter_counts()
    if len(set(per_block)) != 1 and args.target_num_params is not None:
        raise ValueError(f"`--target_num_params` needs blocks of one size; this model's are {sorted(set(per_block))}.")
    num_to_prune = 0 if args.fine_tune_only else resolve_target(
        transformer.original_num_layers, args.target_prune_ratio, args.target_num_blocks, args.target_num_params,
        per_block[0], outside)
    controller = AdaptivePruningController(
        transformer.original_num_layers, num_to_prune,
        decision_steps(args.pruning_stages, args.pruning_steps, args.pruning_mode), args.pruning_mode,
        rank_once=args.rank_once)
    global_step, stage_times = 0, []
    args.bad_images = BadImageTally()  # --skip_bad_images: what was replaced, over every process; kept in checkpoints
    # everything that makes this run this run, kept in every checkpoint and compared when resuming
    identity = run_identity({**vars(args), "global_batch_size": args.train_batch_size * accelerator.num_processes},
                            source_fingerprint,
                            fingerprint_dataset(dataset, dataset_name, args.split, args.dataset_config_name,
                                                args.image_column, args.label_column))
    if teacher_fingerprint is not None:  # compared on resume like the source's: the teacher's folder may move
        identity["teacher_weights_sha256"] = teacher_fingerprint
    identity["resumes"], changed = [], {}
    if resume_path is not None:
        saved = read_state(resume_path, verify=False)  # verified by resolve_resume_path
        if "run_identity" in saved:
            changed = compare_run_identity(saved["run_identity"], identity, resume_path)
            identity["resumes"] = saved["run_identity"].get("resumes", []) + [
                {"step": saved["global_step"], "checkpoint": os.path.abspath(resume_path), "changed": changed}]
            for name, (old, new) in changed.items():
                logger.info(f"Resuming with --{name} changed: {old!r} -> {new!r}")
        else:
            logger.warning(f"{resume_path!r} was written before checkpoints recorded their run's settings: they "
                           "cannot be compared with this command's. Make sure they are the same.")
        controller.load_state_dict(saved["controller"])
        global_step, stage_times = saved["global_step"], saved["stage_times"]
        args.bad_images = BadImageTally(saved.get("bad_images"))
        if controller.pruned_blocks:  # the same architecture before the weights are loaded
            transformer.prune_blocks(controller.pruned_blocks)
        logger.info(f"Resuming from {resume_path} at step {global_step} with blocks {transformer.kept_block_indices}")
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {args.output_dir}; starting a new run.")
    if distiller is not None:  # a resumed student may have lost blocks: some must still match the teacher's
        distiller.check_student(transformer, "--teacher_model_name_or_path")

    if args.use_lora:
        add_lora(transformer, args.lora_rank, args.lora_alpha)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()

    optimizer = torch.optim.AdamW(trainable_parameters(transformer), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                                  eps=args.adam_epsilon)
    # the prepared scheduler steps once per process per optimizer step (as in diffusers' training scripts)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    ema = None
    if args.use_ema:
        # over the trainable parameters only: with LoRA, an EMA of the frozen weights would be a wasted copy
        # saved by save_checkpoint as safetensors, not through accelerate's custom-object pickles, so that resuming
        # from a checkpoint folder never unpickles anything (accelerate loads those with weights_only=False)
        ema = EMAModel(trainable_parameters(transformer), decay=args.ema_decay)
    model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if resume_path is not None:
        try:
            accelerator.load_state(resume_path)
        except (RuntimeError, ValueError, KeyError) as error:  # checkpoints without a run identity get here
            raise RunMismatchError(f"`--resume_from_checkpoint`: {resume_path!r} does not fit this model and "
                                   "optimizer (another --pretrained_model_name_or_path, --use_lora, --lora_rank or "
                                   f"target?): {str(error).splitlines()[0]} Resume with the checkpoint's own settings, "
                                   "or start a new run in another `--output_dir`.") from error
        if "learning_rate" in changed:
            set_base_learning_rate(lr_scheduler, args.learning_rate)  # the restored schedule has the old one
    if ema is not None:
        if resume_path is not None:
            load_ema(ema, resume_path, saved.get("ema"))
        ema.to(device)

    # ---- data streams: training batches (exactly resumable) and the fixed pool for CED and the proxies
    collate = PixelCollate(resolution, args.image_column, args.label_column, num_classes, args.skip_bad_images)
    micro_batches_done = global_step * args.gradient_accumulation_steps
    samples_seen = micro_batches_done * args.train_batch_size  # by this process
    latent_shape = (transformer.config.in_channels, transformer.config.sample_size, transformer.config.sample_size)
    null_class = transformer.null_class_label
    loader = training_dataloader(dataset, collate, args.train_batch_size, args.seed, accelerator.process_index,
                                 accelerator.num_processes, skip_samples=samples_seen,
                                 num_workers=args.dataloader_num_workers, shuffle_buffer_size=args.shuffle_buffer_size)
    pool_latents, pool_labels = None, None
    if not controller.finished and num_to_prune:
        pool_latents, pool_labels = build_ced_pool(dataset, vae, resolution, args, num_classes)
    ced_options = CEDOptions(variance=args.ced_variance, estimator=args.ced_estimator, signal=args.ced_signal)
    learned_options = learned_options_from_args(args, args.ranking, "--ranking")  # None unless --ranking learned

    if accelerator.is_main_process:  # every argument has been checked: only now may an earlier run's output go
        if resume_path is None or not is_own_checkpoint(args, resume_path):
            for path in clear_output_dir(args.output_dir, "training", "examples/prune_dit.py", (args.logging_dir,)):
                logger.info(f"--overwrite_output_dir: removed {path} of an earlier run")
        write_marker(args.output_dir, "training", "examples/prune_dit.py")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tracker_config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(f"entprune-{args.model_type}", config=tracker_config)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Pruning {source_name} on {dataset_name}: {transformer.original_num_layers} blocks -> "
                f"{transformer.original_num_layers - num_to_prune}, {args.pruning_mode} schedule, decisions at steps "
                f"{controller.steps}; {args.max_train_steps} steps of {total_batch} images *****")

    def run_pruning_stage(model):
        """Rank, score candidates, decide (on the main process, broadcast), and prune model, optimizer and EMA."""
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.eval()
        ced_scores = None
        if controller.needs_ced():
            def sum_over_processes(tensor):
                return accelerator.reduce(tensor.to(device), "sum").cpu() if accelerator.num_processes > 1 \
                    else tensor

            pool = shard_batches(zip(pool_latents.split(args.ced_batch_size), pool_labels.split(args.ced_batch_size)),
                                 accelerator.process_index, accelerator.num_processes)
            result = score_blocks(args.ranking, unwrapped, objective, pool, args.ced_num_samples,
                                  seed=args.ranking_seed, ced_options=ced_options,
                                  progress=accelerator.is_local_main_process, reduce=sum_over_processes,
                                  process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                                  num_to_prune=controller.remaining_to_prune, learned_options=learned_options)
            ced_scores = dict(zip(result.block_indices, result.scores))
        state = [None]
        if accelerator.is_main_process:
            def proxy_fn(candidates):  # called only when there is a choice to make
                b = args.proxy_batch_size
                ntk_batch = (pool_latents[:b].to(device), pool_labels[:b].to(device))
                zico_batches = [(pool_latents[b * (i + 1): b * (i + 2)].to(device),
                                 pool_labels[b * (i + 1): b * (i + 2)].to(device))
                                for i in range(args.zico_num_batches)]
                scored = score_candidates(unwrapped, objective, candidates, ntk_batch, zico_batches, seed=args.seed,
                                          zico_reduction=args.zico_reduction, progress=True)
                return [(s.ntk_condition_number, s.zico) for s in scored]

            controller.decide(global_step, ced_scores, proxy_fn)
            state = [controller.state_dict()]
        if accelerator.num_processes > 1:  # one decision for all: GPU arithmetic need not agree bit for bit
            broadcast_object_list(state)
            controller.load_state_dict(state[0])
        decision = controller.decisions[-1]
        if decision.pruned_blocks:
            prune_training_state(unwrapped, decision.pruned_blocks, optimizer, ema)
            model = reprepare_model(accelerator, model, unwrapped)
        unwrapped.train()
        summary = ", ".join(f"m={c.num_blocks}: kappa={c.ntk_condition_number:.3g} zico={c.zico:.4g} "
                            f"score={c.combined:.3f}" for c in decision.candidates if c.combined is not None)
        logger.info(f"Stage {decision.stage} at step {global_step}: dropped {decision.pruned_blocks or 'nothing'} "
                    f"-> {decision.num_blocks_after} blocks ({summary or 'no choice to make'})")
        logs = {"pruning/num_blocks": decision.num_blocks_after, "pruning/stage": decision.stage,
                "pruning/dropped": len(decision.pruned_blocks)}
        for c in decision.candidates:  # the proxies of every candidate, by how many blocks it drops
            if c.combined is not None:
                logs.update({f"pruning/ntk_condition_number_m{c.num_blocks}": c.ntk_condition_number,
                             f"pruning/zico_m{c.num_blocks}": c.zico, f"pruning/combined_m{c.num_blocks}": c.combined})
        accelerator.log(logs, step=global_step)
        return model

    # ---- training
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    phase("training")  # SIGTERM now stops the run after the step in progress, with a checkpoint (see preemption.py)
    data_iter = iter(loader)
    step_start = time.perf_counter()
    current_stage_times: list[float] = []

    def close_stage_timing():
        if current_stage_times:  # skip the first steps after a change (warm-up, allocator)
            settled = current_stage_times[min(3, len(current_stage_times) - 1):]
            stage_times.append({"num_blocks": accelerator.unwrap_model(model).num_blocks,
                                "steps": len(current_stage_times),
                                "median_step_seconds": sorted(settled)[len(settled) // 2]})
            current_stage_times.clear()

    while global_step < args.max_train_steps:
        if controller.is_decision_step(global_step):
            close_stage_timing()
            model = run_pruning_stage(model)
            step_start = time.perf_counter()  # ranking and proxies are not training time
        losses = []
        for _ in range(args.gradient_accumulation_steps):
            pixels, labels = batch = next(data_iter)
            args.bad_images.add(batch.bad_images)  # replaced in the batch by --skip_bad_images
            # every random number of a sample comes from (seed, its stream position): the run does not depend on
            # how the global batch is split between processes
            positions = stream_positions(samples_seen, len(pixels), accelerator.process_index,
                                         accelerator.num_processes)
            draws = training_draws(args.seed, positions, latent_shape, args.class_dropout_prob)
            samples_seen += len(pixels)
            pixels, labels = pixels.to(device, dtype=weight_dtype), labels.to(device)
            if args.random_flip:
                pixels = torch.where(draws.flip.to(device)[:, None, None, None], pixels.flip(-1), pixels)
            with accelerator.accumulate(model):
                with torch.no_grad():
                    posterior = vae.encode(pixels).latent_dist
                    latents = posterior.mean + posterior.std * draws.vae_noise.to(device, posterior.mean.dtype)
                latents = latents.float() * vae.config.scaling_factor
                labels = torch.where(draws.drop_label.to(device), null_class, labels)  # CFG dropout, once a sample
                timesteps = objective.timesteps_from_fraction(draws.fractions).to(device)
                noised = objective.add_noise(latents, draws.noise.to(device), timesteps)
                if distiller is None:
                    output = model(noised.noisy, timestep=timesteps, class_labels=labels).sample
                    loss = objective.loss(output.float(), latents, noised).mean()
                else:  # the teacher sees the same noised latents, timesteps and (dropped) labels
                    with distiller.capture(model, global_step) as student_hidden:
                        output = model(noised.noisy, timestep=timesteps, class_labels=labels).sample
                    loss = distiller.loss(objective, output.float(), latents, noised, labels, student_hidden,
                                          global_step).mean()
                # every process learns of a non-finite loss, so none is left waiting in a gradient all-reduce
                if any_process(accelerator, not torch.isfinite(loss.detach()).item()):
                    raise divergence_error(args, f"The training loss is {loss.item()} at step {global_step}: "
                                                 "training diverged.")
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable_parameters(model), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().item())

        if accelerator.sync_gradients:
            if ema is not None:
                ema.step(trainable_parameters(accelerator.unwrap_model(model)))
            global_step += 1
            progress.update(1)
            now = time.perf_counter()
            current_stage_times.append(now - step_start)
            step_start = now
            logs = {"loss": sum(losses) / len(losses), "lr": lr_scheduler.get_last_lr()[0],
                    "num_blocks": accelerator.unwrap_model(model).num_blocks}
            progress.set_postfix(**logs)
            if distiller is not None:  # loss/ground_truth, loss/distill_output, loss/distill_feature
                logs.update(distiller.end_step(step_seconds=current_stage_times[-1]))
            accelerator.log(logs, step=global_step)

            stopping = stop_requested(accelerator)  # SIGTERM on any process: all stop after this same step
            if global_step % args.checkpointing_steps == 0 or stopping:  # saved once, even when both
                saved = save_checkpoint(accelerator, args, global_step, controller, stage_times, ema, identity,
                                        model=model, optimizer=optimizer)
            if stopping:  # exit status 143; no validation: the grace period before SIGKILL is short
                raise preempted(accelerator, saved, global_step)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation(accelerator, model, vae, scheduler, ema, args, global_step)
            step_start = time.perf_counter()  # checkpoints and validation are not training time
    close_stage_timing()
    progress.close()
    phase("export")  # no step boundary left to stop at: a SIGTERM now lets the export finish
    check_finite(accelerator, args, global_step, model, optimizer, ema)  # a last update may have overflowed

    # ---- export: EMA weights, LoRA merged, a plain DiTPipeline (or SiTPipeline) folder beside the checkpoints
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        check_processes_agree(accelerator, accelerator.unwrap_model(model))
    args.bad_images.merge(accelerator)  # every process takes part; the main process reports the total
    distillation = None
    if distiller is not None:  # its config and the teacher's cost; the teacher's memory is freed before the export
        distillation = {"teacher": args.teacher_model_name_or_path or f"{source_name} (the source model)",
                        "teacher_weights_sha256": teacher_fingerprint, **distiller.finish()}
    if accelerator.is_main_process:
        # without accelerate's autocast forward: the speed comparison and the samples run both models alike
        final = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        if ema is not None:
            ema.copy_to(trainable_parameters(final))
        if args.use_lora:
            merge_lora(final)
        final.eval()
        export(args, final, vae, scheduler, id2label, controller, stage_times, source, source_name, dataset_name,
               device, identity, distillation=distillation)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def check_processes_agree(accelerator, model):
    """Every process must end with the same blocks and weights: pruning rebuilt the DDP wrapper mid-training, and a
    process that had stopped receiving its peers' gradients would drift silently. Only the main process exports."""
    with torch.no_grad():
        summary = torch.tensor([float(model.num_blocks)] + [p.double().sum().item() for p in model.parameters()],
                               dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(summary[None]).cpu()
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError("The processes ended with different weights or blocks; the model was not kept in sync "
                           "across processes. Please report this with your accelerate configuration.")
    logger.info(f"Blocks and weights agree across {accelerator.num_processes} processes.")


def log_validation(accelerator, model, vae, scheduler, ema, args, global_step):
    unwrapped = accelerator.unwrap_model(model)
    if ema is not None:  # sample with the EMA weights, then put the training weights back
        ema.store(trainable_parameters(unwrapped))
        ema.copy_to(trainable_parameters(unwrapped))
    labels = validation_labels(args, unwrapped)
    images = sample_images(unwrapped, vae, scheduler, labels, args)
    if ema is not None:
        ema.restore(trainable_parameters(unwrapped))
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    grid = sample_grid(images, rows=1)
    grid.save(os.path.join(folder, f"step-{global_step:06d}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), global_step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(i, caption=str(c)) for i, c in zip(images, labels)]})


def export(args, transformer, vae, scheduler, id2label, controller, stage_times, source, source_name, dataset_name,
           device, identity, distillation=None):
    """Write the pipeline folder into output_dir (staged, then moved in; model_index.json last), the report,
    ced.png and samples.png, and push it if asked."""
    vae = vae.float()
    original = EntPrunedTransformer2DModel.from_pretrained(source, subfolder="transformer",
                                                           revision=args.revision).to(device).eval()
    labels = validation_labels(args, transformer)
    report = {
        "source": source_name, "dataset": dataset_name, "model_type": args.model_type,
        "pruning_mode": args.pruning_mode,
        "ranking": args.ranking,
        "pruned_by": {"method": f"EntPruner ({args.pruning_mode} schedule, CED ranking)" if args.ranking == "ced"
                      else f"{args.pruning_mode} schedule, {args.ranking} ranking (a baseline)",
                      "stages": len(controller.decisions), "train_steps": args.max_train_steps,
                      "dataset": dataset_name},
        "kept_blocks": list(transformer.kept_block_indices),
        "stages": [d.to_dict() for d in controller.decisions],
        "train_step_seconds_by_stage": stage_times,
        "class_mapping": args.class_mapping,  # dataset class -> model class id (`prepare_labels`)
        "skipped_bad_images": args.bad_images.report(),  # unreadable images replaced (--skip_bad_images)
        # what the run was made of; a resumed run lists each resume and the settings that changed (none that change
        # the result: those are refused)
        "run_identity": {"source_weights_sha256": identity["source_weights_sha256"], "dataset": identity["dataset"],
                         "resumes": identity["resumes"]},
        "training": {k: getattr(args, k) for k in ("max_train_steps", "train_batch_size", "learning_rate",
                                                   "lr_scheduler", "use_ema", "use_lora", "mixed_precision",
                                                   "class_dropout_prob", "seed", "pruning_stages", "pruning_steps",
                                                   "rank_once", "ranking", "ranking_seed", "ced_num_samples",
                                                   "ced_variance", "ced_estimator", "ced_signal",
                                                   "proxy_batch_size", "zico_num_batches", "zico_reduction")},
    }
    if args.ranking == "learned":  # its options, resolved (LEARNED_FLAGS stay None for the other rankings)
        report["training"].update({name: getattr(args, name) for name in LEARNED_FLAGS})
    if distillation is not None:  # knowledge distillation: its settings and the teacher's time per step
        report["distillation"] = distillation
    if args.speed_batch_size:
        pipeline_cls = pipeline_class(args.model_type)
        original_pipe = pipeline_cls(transformer=original, vae=vae, scheduler=scheduler)
        pruned_pipe = pipeline_cls(transformer=transformer, vae=vae, scheduler=scheduler)
        for p in (original_pipe, pruned_pipe):
            p.set_progress_bar_config(disable=True)
        speed_labels = [labels[i % len(labels)] for i in range(args.speed_batch_size)]
        report["sampling_speed"] = compare_sampling_speed(
            original_pipe, pruned_pipe, speed_labels, args.num_inference_steps, args.guidance_scale,
            repeats=args.speed_repeats, **sampler_kwargs(args))
        logger.info(f"Sampling speedup {report['sampling_speed']['speedup']:.2f}x "
                    f"(FLOPs ratio {report['sampling_speed']['flops_ratio']:.2f}x)")

    os.makedirs(args.output_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=args.output_dir)
    try:
        folder = os.path.join(staging, "pipeline")
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
        save_pruned_pipeline(folder, transformer, vae, scheduler, id2label=id2label, report=report,
                             dtype=torch.float16 if args.save_fp16 else None,
                             repo_id=repo_id if args.push_to_hub else None, model_type=args.model_type,
                             title=repo_id)
        if any(stage["ced_scores"] for stage in report["stages"]):  # not with --fine_tune_only
            plot_stage_scores(report["stages"], transformer.original_num_layers, os.path.join(folder, "ced.png"))
        before = sample_images(original, vae, scheduler, labels, args)
        after = sample_images(transformer, vae, scheduler, labels, args)
        sample_grid(before + after, rows=2).save(os.path.join(folder, "samples.png"))
        # the index goes out first and in last: a crash mid-move leaves no index beside a half-replaced model
        index = os.path.join(args.output_dir, "model_index.json")
        if os.path.exists(index):
            os.remove(index)
        names = sorted((n for n in os.listdir(folder) if n != MARKER_NAME), key=lambda n: n == "model_index.json")
        for name in names:
            target = os.path.join(args.output_dir, name)
            if os.path.isdir(target):
                shutil.rmtree(target)
            os.replace(os.path.join(folder, name), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"Saved the pruned pipeline ({len(transformer.kept_block_indices)} of "
                f"{transformer.original_num_layers} blocks: {transformer.kept_block_indices}) to {args.output_dir}")
    if args.push_to_hub:
        url = push_pruned_pipeline(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private,
                                   ignore_patterns=["checkpoint-*", ".checkpoint-*", f"{args.logging_dir}/*",
                                                    ".export-*"])
        logger.info(f"Uploaded to {url}")


if __name__ == "__main__":
    main()
