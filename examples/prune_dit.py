#!/usr/bin/env python
"""Fine-tune a pretrained DiT or SiT on a downstream dataset while pruning whole transformer blocks (EntPruner).

    accelerate launch examples/prune_dit.py  # the embedded tiny digits DiT and data: minutes on a laptop CPU
    accelerate launch examples/prune_dit.py --model_type sit  # the embedded tiny SiT (= examples/prune_sit.py)
    accelerate launch examples/prune_dit.py --pretrained_model_name_or_path facebook/DiT-XL-2-256 \
      --dataset_name <a Hub or local dataset> --target_prune_ratio 0.5 --max_train_steps 100000 \
      --train_batch_size 32 --mixed_precision bf16 --use_ema --checkpointing_steps 5000 --output_dir dit-xl-pruned

A diffusers-style training loop around `diffusers_entprune.EntPruner`: at each of --pruning_stages boundaries over
the first --pruning_steps steps, `pruner.step` ranks the blocks (CED by default) on a fixed pool of training
images, lets the zero-shot proxies (NTK, ZiCo) choose how many to drop, and removes them from the model, its
optimizer state and its EMA; the last stage meets the target. The output folder is a plain `DiTPipeline` (or
`SiTPipeline`) with entprune_report.json, ced.png, samples.png, validation grids, a model card and the checkpoints
that --resume_from_checkpoint latest continues from. SIGTERM (preemption) saves a checkpoint and exits with 143.
"""

import argparse
import contextlib
import dataclasses
import logging
import os
import tempfile

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from diffusers_entprune import EntPrunedTransformer2DModel, EntPruner, save_pruned_pipeline
from diffusers_entprune.checkpoints import RunCheckpoints, check_run_output_dir, remove_stale_staging
from diffusers_entprune.config import add_config_arguments, checked, config_from_args
from diffusers_entprune.data import (
    BadImageTally,
    PixelCollate,
    calibration_batches,
    encode_training_latents,
    load_labelled_dataset,
    training_dataloader,
    vae_scale_factor,
)
from diffusers_entprune.distillation import (
    Distiller,
    Teacher,
    add_distillation_arguments,
    check_teacher,
    distillation_config_from_args,
)
from diffusers_entprune.export import load_id2label
from diffusers_entprune.hub import Secret, check_can_push, push_pruned_pipeline
from diffusers_entprune.latent_cache import (
    CachedCalibration,
    LatentCache,
    cached_training_batches,
    dataset_labels,
    default_latent_cache_dir,
)
from diffusers_entprune.lora import add_lora, merge_lora
from diffusers_entprune.model_types import (
    MODEL_TYPES,
    check_null_class,
    objective_for,
    pipeline_class,
    resolve_source,
    sampler_kwargs,
)
from diffusers_entprune.output_dir import (
    clear_output_dir,
    lock_output_dir,
    move_into,
    write_marker,
)
from diffusers_entprune.pipelines.pipeline_sit import SAMPLERS
from diffusers_entprune.plotting import plot_stage_scores, sample_grid
from diffusers_entprune.preemption import any_process, handle_sigterm, phase, preempted, stop_requested
from diffusers_entprune.randomness import stream_positions, training_draws
from diffusers_entprune.run_identity import fingerprint_dataset, fingerprint_weights, resume_run_identity, run_identity
from diffusers_entprune.speed import StageTimer, compare_sampling_speed
from diffusers_entprune.training_state import check_processes_agree, set_base_learning_rate

logger = get_logger(__name__)
COMMAND = "examples/prune_dit.py"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", help="DiT/SiT pipeline folder or Hub id, e.g. "
                       "facebook/DiT-XL-2-256 (default: the embedded tiny digits DiT, or SiT with --model_type sit).")
    model.add_argument("--model_type", choices=MODEL_TYPES, help="dit (DDPM) or sit (flow); default: read from the "
                       "folder's model_index.json, dit for the embedded base.")
    model.add_argument("--revision", default=None)

    data = parser.add_argument_group("data (default: the embedded downstream digits)")
    data.add_argument("--dataset_name", default=None, help="A Hub dataset id or a path `datasets` can load.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="An imagefolder or a folder of parquet files.")
    data.add_argument("--split", default="train")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument("--resolution", type=checked(int, ">= 1"), help="Default: the model's (sample_size x VAE).")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset instead of downloading it.")
    data.add_argument("--shuffle_buffer_size", type=checked(int, ">= 1"), default=1000, help="With --streaming.")
    data.add_argument("--max_train_samples", type=checked(int, ">= 1"), help="Train on the first N images only.")
    data.add_argument("--random_flip", action="store_true", help="Flip images horizontally at random (DiT does).")
    data.add_argument("--dataloader_num_workers", type=checked(int, ">= 0"), default=0)
    data.add_argument("--cache_dir", default=None, help="`datasets` cache folder.")
    data.add_argument("--class_mapping_file", help="A JSON file {class name: model class id} (default: by name: "
                      "class-id names take that id, the model's labels their ids, new classes the dataset's ids).")
    data.add_argument("--cache_latents", action="store_true", help="Encode the dataset through the VAE once (mean "
                      "and std, and of the flipped image with --random_flip) and train from the cache, as DiT's and "
                      "TinyFusion's trainers do; the same per-sample draws as without it.")
    data.add_argument("--latent_cache_dir", default=None, help="Where --cache_latents keeps its caches, one per "
                      "dataset/VAE/resolution, reused by later runs and `entprune score --latent_cache_dir` "
                      "(default: $HF_HOME/diffusers_entprune/latents).")
    data.add_argument("--skip_bad_images", action="store_true", help="Replace an unreadable image by another of "
                      "its batch with a warning, instead of stopping (counted in entprune_report.json).")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default=None, help="Default: dit-pruned or sit-pruned.")
    train.add_argument("--overwrite_output_dir", action="store_true", help="Start afresh over an earlier run.")
    train.add_argument("--train_batch_size", type=checked(int, ">= 1"), default=32, help="Per process.")
    train.add_argument("--max_train_steps", type=checked(int, ">= 1"), default=800)
    train.add_argument("--gradient_accumulation_steps", type=checked(int, ">= 1"), default=1)
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--learning_rate", type=checked(float, "> 0"), default=None,
                       help="Default: 1e-4, DiT's rate; 1e-3 for the embedded tiny base, which was trained at it.")
    train.add_argument("--lr_scheduler", default="constant", help="A diffusers schedule, e.g. constant, cosine.")
    train.add_argument("--lr_warmup_steps", type=checked(int, ">= 0"), default=0)
    train.add_argument("--adam_beta1", type=checked(float, "in [0, 1)"), default=0.9)
    train.add_argument("--adam_beta2", type=checked(float, "in [0, 1)"), default=0.999)
    train.add_argument("--adam_weight_decay", type=checked(float, ">= 0"), default=0.0)
    train.add_argument("--adam_epsilon", type=checked(float, "> 0"), default=1e-8)
    train.add_argument("--max_grad_norm", type=checked(float, ">= 0", " (0: no gradient clipping)"), default=1.0)
    train.add_argument("--class_dropout_prob", type=checked(float, "in [0, 1)"), default=0.1,
                       help="Classifier-free guidance: replace a sample's label by the null class this often.")
    train.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], help="Default: accelerate's config.")
    train.add_argument("--allow_tf32", action="store_true")
    train.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights and export it.")
    train.add_argument("--ema_decay", type=checked(float, "in [0, 1)"), default=0.9999)
    train.add_argument("--use_lora", action="store_true", help="Train LoRA adapters only (merged at export).")
    train.add_argument("--lora_rank", type=checked(int, ">= 1"), default=16)
    train.add_argument("--lora_alpha", type=checked(float, "> 0"), default=None, help="Default: the rank.")
    train.add_argument("--checkpointing_steps", type=checked(int, ">= 1"), default=500)
    train.add_argument("--checkpoints_total_limit", type=checked(int, ">= 1"), default=None)
    train.add_argument("--resume_from_checkpoint", help='A checkpoint folder, or "latest" (none: start afresh).')
    train.add_argument("--report_to", default=None, help='"tensorboard", "wandb", "all" (default: no tracker).')
    train.add_argument("--logging_dir", default="logs")
    train.add_argument("--validation_steps", type=checked(int, ">= 0", " (0: no validation grids)"), default=200)
    train.add_argument("--validation_class_labels", type=int, nargs="+", help="Default: the first 8 classes.")
    train.add_argument("--guidance_scale", type=checked(float, ">= 0", " (<= 1: no guidance)"), default=4.0)
    train.add_argument("--num_inference_steps", type=checked(int, ">= 1"), default=50)
    train.add_argument("--sampler", choices=SAMPLERS, help="SiT only: SiTPipeline's sampler (default euler).")
    add_config_arguments(parser)  # every EntPrunerConfig field: target, schedule, ranking, CED, proxies, --seed
    add_distillation_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--save_fp16", action="store_true", help="Store the exported weights in float16.")
    out.add_argument("--speed_batch_size", type=checked(int, ">= 0", " (0: no speed comparison)"), default=8,
                     help="Labels per call when timing the original against the pruned pipeline.")
    out.add_argument("--speed_repeats", type=checked(int, ">= 1"), default=3)
    out.add_argument("--push_to_hub", action="store_true")
    out.add_argument("--hub_model_id", default=None, help="Default: the output folder's name.")
    out.add_argument("--hub_token", default=None, help="Default: the login of `hf auth login` / HF_TOKEN.")
    out.add_argument("--hub_private", action="store_true")
    args = parser.parse_args(argv)
    # kept out of every log and tracker config (those take plain values only); `reveal` hands it to the upload
    args.hub_token = Secret(args.hub_token) if args.hub_token is not None else None

    if args.learning_rate is None:
        args.learning_rate = 1e-3 if args.pretrained_model_name_or_path is None else 1e-4
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("Pass at most one of --dataset_name and --train_data_dir.")
    if args.latent_cache_dir is not None and not args.cache_latents:
        parser.error("--latent_cache_dir is where --cache_latents keeps its caches; add --cache_latents (or drop "
                     "--latent_cache_dir).")
    if args.cache_latents and args.streaming:
        parser.error("--cache_latents needs random access to the dataset's rows; drop --streaming or --cache_latents.")
    if args.cache_latents and args.latent_cache_dir is None:
        args.latent_cache_dir = default_latent_cache_dir()
    if args.lr_scheduler not in [s.value for s in SchedulerType]:
        parser.error(f"--lr_scheduler {args.lr_scheduler!r} is not a diffusers schedule; choose one of "
                     f"{[s.value for s in SchedulerType]}.")
    if args.class_mapping_file is not None and not os.path.isfile(args.class_mapping_file):
        parser.error(f"--class_mapping_file {args.class_mapping_file!r} is not a file (a JSON object {{class name: "
                     "model class id}}).")
    if args.pruning_steps is None:
        args.pruning_steps = max(1, args.max_train_steps // 2)
    if args.pruning_steps > args.max_train_steps:
        parser.error(f"--pruning_steps {args.pruning_steps} exceeds --max_train_steps {args.max_train_steps}.")
    if args.use_lora and args.ranking == "taylor":
        parser.error("--ranking taylor needs the gradients of the block weights, which --use_lora freezes; pick "
                     "another --ranking or train without LoRA.")
    # the one place the pruning settings are checked; their resolved values are written back into args
    args.pruning_config = config_from_args(args, error=parser.error)
    args.distillation_config = distillation_config_from_args(args, error=parser.error)
    return args


def resolve_model_type(args) -> None:
    """Fill in --model_type from the pipeline folder (it must agree when given), then the defaults that follow."""
    args.model_type, args.source, args.source_name = resolve_source(args.pretrained_model_name_or_path,
                                                                    args.model_type, args.revision)
    sampler_kwargs(args.model_type, args.sampler)  # refuses --sampler for a DiT
    args.output_dir = args.output_dir or f"{args.model_type}-pruned"
    check_null_class(args.model_type, args.source, args.revision)  # the export must sample with DiTPipeline
    if args.validation_class_labels is not None:  # checked now: validation first samples after training steps
        num_classes = EntPrunedTransformer2DModel.load_config(args.source, subfolder="transformer",
                                                              revision=args.revision).get("num_embeds_ada_norm")
        bad = [c for c in args.validation_class_labels if num_classes is not None and not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"`--validation_class_labels` {bad} are not classes of the model, which has classes "
                             f"0..{num_classes - 1}.")
    if args.distillation_config is not None and args.teacher_model_name_or_path is not None:
        check_teacher(args.teacher_model_name_or_path, args.model_type, args.source, args.revision,
                      features=args.distill_feature_weight > 0)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


@handle_sigterm  # SIGTERM (preemption) stops training at a step boundary with a checkpoint: see preemption.py
def main(argv=None):
    args = parse_args(argv)
    resolve_model_type(args)
    if args.push_to_hub:
        check_can_push()
    resume_path = RunCheckpoints.resolve(args.resume_from_checkpoint, args.output_dir)
    continuing = check_run_output_dir(  # before any heavy work; deletes nothing
        args.output_dir, resume_path, args.overwrite_output_dir, extra_names=(args.logging_dir,), inputs={
            f"--{name}": getattr(args, name) for name in ("train_data_dir", "dataset_name", "cache_dir",
                                                          "class_mapping_file", "teacher_model_name_or_path")}
        | {"--pretrained_model_name_or_path": args.source})

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=args.report_to, project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    # The blocks share one conditioning embedder, so safetensors stores it once and accelerate warns at every
    # checkpoint; reloading restores the tie (a resumed run ends bit-identical, tested), so the warning is noise.
    logging.getLogger("accelerate.utils.other").addFilter(lambda r: "Removed shared tensor" not in r.getMessage())
    logger.info(accelerator.state, main_process_only=False)
    lock = lock_output_dir(accelerator, args.output_dir, COMMAND)  # one run per folder: a second one is refused
    try:
        train(args, accelerator, resume_path, continuing)
    finally:
        if lock is not None:
            lock.release()


def train(args, accelerator, resume_path, continuing):
    if accelerator.is_main_process:  # under the lock, so never the staging folder of a live run
        for path in remove_stale_staging(args.output_dir):  # an interrupted save or export; never a checkpoint
            logger.info(f"Removed {path}, left by an interrupted run.")
    accelerator.wait_for_everyone()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(args.seed)  # training draws are per sample (randomness.training_draws); this seeds whatever else draws
    device = accelerator.device
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- model, objective, data
    transformer = EntPrunedTransformer2DModel.from_pretrained(args.source, subfolder="transformer",
                                                              revision=args.revision)
    source_fingerprint = fingerprint_weights(transformer)  # before any pruning: what a resumed run must start from
    pipe = pipeline_class(args.model_type).from_pretrained(args.source, transformer=transformer, revision=args.revision)
    vae, scheduler = pipe.vae.to(device, dtype=weight_dtype).eval(), pipe.scheduler
    vae.requires_grad_(False)
    id2label = load_id2label(args.source, revision=args.revision)
    num_classes = transformer.config.num_embeds_ada_norm
    objective = objective_for(args.model_type, transformer.config, scheduler)
    resolution = transformer.config.sample_size * vae_scale_factor(vae)
    if args.resolution not in (None, resolution):
        raise ValueError(f"`--resolution`={args.resolution} does not match the model: its latents are "
                         f"{transformer.config.sample_size} wide, i.e. {resolution} px. Drop `--resolution`.")
    dataset, dataset_name, class_mapping = load_labelled_dataset(
        args.dataset_name, args.train_data_dir, args.split, args.dataset_config_name, args.streaming, args.cache_dir,
        args.image_column, args.label_column, num_classes, id2label, args.class_mapping_file, args.max_train_samples,
        log=logger.info)
    distiller = teacher_fingerprint = None
    if args.distillation_config is not None:  # a second, frozen model: never prepared, never in a checkpoint
        teacher = Teacher.from_pretrained(args.teacher_model_name_or_path or args.source, device=device,
                                          revision=None if args.teacher_model_name_or_path else args.revision,
                                          autocast_dtype=weight_dtype)  # computes as the student does
        distiller = Distiller(args.distillation_config, teacher)
        teacher_fingerprint = fingerprint_weights(teacher.model) if args.teacher_model_name_or_path else \
            source_fingerprint  # the default teacher is the source model

    # ---- the pruner, and the state of an interrupted run
    dataset_fingerprint = fingerprint_dataset(dataset, dataset_name, args.split, args.dataset_config_name,
                                              args.image_column, args.label_column)
    latent_cache = None  # with --cache_latents: built below, once the run's settings have been checked
    if args.cache_latents:  # the same first rows' means, read from the cache
        pool = CachedCalibration(lambda: latent_cache, dataset, args.label_column, num_classes,
                                 args.pruning_config.calibration_pool_size, args.ced_batch_size,
                                 vae.config.scaling_factor)
    else:
        pool = calibration_batches(dataset, vae, resolution, args.pruning_config.calibration_pool_size,
                                   args.ced_batch_size, args.image_column, args.label_column, num_classes,
                                   skip_bad_images=args.skip_bad_images)  # encoded at the first stage that ranks
    pruner = EntPruner(args.pruning_config, transformer, objective, pool, accelerator)
    checkpoints = RunCheckpoints(args.output_dir, accelerator, args.checkpoints_total_limit,
                                 learning_rate=args.learning_rate, max_grad_norm=args.max_grad_norm)
    global_step, timer, bad_images = 0, StageTimer(), BadImageTally()
    # everything that makes this run this run, kept in every checkpoint and compared when resuming
    identity = run_identity({**vars(args), "global_batch_size": args.train_batch_size * accelerator.num_processes},
                            source_fingerprint, dataset_fingerprint)
    if teacher_fingerprint is not None:  # compared on resume like the source's: the teacher's folder may move
        identity["teacher_weights_sha256"] = teacher_fingerprint
    identity["resumes"], changed = [], {}
    if resume_path is not None:
        saved = checkpoints.read(resume_path)
        changed = resume_run_identity(identity, saved, resume_path)  # refuses settings that change the result
        pruner.load_state_dict(saved.get("pruner", saved.get("controller")))  # the same architecture, then weights
        global_step, timer, bad_images = saved["global_step"], StageTimer(saved["stage_times"]), \
            BadImageTally(saved.get("bad_images"))
        logger.info(f"Resuming from {resume_path} at step {global_step} with blocks {transformer.kept_block_indices}")
    elif args.resume_from_checkpoint == "latest":
        logger.info(f"No checkpoint in {args.output_dir}; starting a new run.")
    if distiller is not None:  # a resumed student may have lost blocks: some must still match the teacher's
        distiller.check_student(transformer, "--teacher_model_name_or_path")

    # ---- optimizer, schedule, EMA
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
    # over the trainable parameters only (with LoRA, the adapters); saved as safetensors by RunCheckpoints
    ema = EMAModel(trainable_parameters(transformer), decay=args.ema_decay) if args.use_ema else None
    model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if resume_path is not None:
        checkpoints.restore(resume_path, ema)
        if "learning_rate" in changed:
            set_base_learning_rate(lr_scheduler, args.learning_rate)  # the restored schedule has the old one
    if ema is not None:
        ema.to(device)

    samples_seen = global_step * args.gradient_accumulation_steps * args.train_batch_size  # by this process
    latent_shape = (transformer.config.in_channels, transformer.config.sample_size, transformer.config.sample_size)
    if args.cache_latents:  # encoded once (resumably, by every process), before the output folder changes
        latent_cache = LatentCache.build(args.latent_cache_dir, dataset, vae, resolution, args.random_flip,
                                         args.image_column, args.ced_batch_size, args.skip_bad_images, accelerator)
        loader = cached_training_batches(latent_cache, dataset_labels(dataset, args.label_column, num_classes),
                                         args.train_batch_size, args.seed, accelerator.process_index,
                                         accelerator.num_processes, samples_seen, args.skip_bad_images)
    else:
        collate = PixelCollate(resolution, args.image_column, args.label_column, num_classes, args.skip_bad_images)
        loader = training_dataloader(dataset, collate, args.train_batch_size, args.seed, accelerator.process_index,
                                     accelerator.num_processes, skip_samples=samples_seen,
                                     num_workers=args.dataloader_num_workers,
                                     shuffle_buffer_size=args.shuffle_buffer_size)
    if pruner.needs_calibration:  # encoded now, so that an unreadable image stops the run before its folder changes
        pruner.calibration_pool()
    if accelerator.is_main_process:  # every argument has been checked: only now may an earlier run's output go
        if not continuing:
            for path in clear_output_dir(args.output_dir, "training", COMMAND, (args.logging_dir,)):
                logger.info(f"--overwrite_output_dir: removed {path} of an earlier run")
        write_marker(args.output_dir, "training", COMMAND)
        accelerator.init_trackers(f"entprune-{args.model_type}", config={
            k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})
    accelerator.wait_for_everyone()
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Pruning {args.source_name} on {dataset_name}: {transformer.original_num_layers} blocks -> "
                f"{transformer.original_num_layers - pruner.num_to_prune}, {args.pruning_mode} schedule, decisions "
                f"at steps {pruner.decision_steps}; {args.max_train_steps} steps of {total_batch} images *****")

    # ---- training
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    phase("training")  # SIGTERM now stops the run after the step in progress, with a checkpoint (see preemption.py)
    data_iter = iter(loader)
    while global_step < args.max_train_steps:
        if pruner.is_decision_step(global_step):
            timer.close(transformer.num_blocks)
            model = pruner.step(global_step, model, optimizer, ema)  # rank, decide, prune model, optimizer and EMA
        timer.start()
        losses = []
        for _ in range(args.gradient_accumulation_steps):
            pixels, labels = batch = next(data_iter)
            bad_images.add(batch.bad_images)  # replaced in the batch by --skip_bad_images
            # every random number of a sample comes from (seed, its stream position): the run does not depend on
            # how the global batch is split between processes
            positions = stream_positions(samples_seen, len(pixels), accelerator.process_index,
                                         accelerator.num_processes)
            draws = training_draws(args.seed, positions, latent_shape, args.class_dropout_prob)
            samples_seen += len(pixels)
            with accelerator.accumulate(model):
                if latent_cache is not None:  # `pixels` are row indices into the cache
                    latents = latent_cache.training_latents(pixels.tolist(), draws, args.random_flip,
                                                            vae.config.scaling_factor, device)
                else:
                    latents = encode_training_latents(vae, pixels.to(device, dtype=weight_dtype), draws,
                                                      args.random_flip)
                labels = torch.where(draws.drop_label.to(device), transformer.null_class_label, labels.to(device))
                timesteps = objective.timesteps_from_fraction(draws.fractions).to(device)
                noised = objective.add_noise(latents, draws.noise.to(device), timesteps)
                with distiller.capture(model, global_step) if distiller else contextlib.nullcontext() as hidden:
                    output = model(noised.noisy, timestep=timesteps, class_labels=labels).sample.float()
                loss = (objective.loss(output, latents, noised) if distiller is None else  # the teacher sees the
                        distiller.loss(objective, output, latents, noised, labels, hidden, global_step)).mean()
                # every process learns of a non-finite loss, so none is left waiting in a gradient all-reduce
                if any_process(accelerator, not torch.isfinite(loss.detach()).item()):
                    raise checkpoints.divergence_error(f"The training loss is {loss.item()} at step {global_step}: "
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
                ema.step(trainable_parameters(transformer))
            global_step += 1
            progress.update(1)
            logs = {"loss": sum(losses) / len(losses), "lr": lr_scheduler.get_last_lr()[0],
                    "num_blocks": transformer.num_blocks}
            progress.set_postfix(**logs)
            step_seconds = timer.stop()
            if distiller is not None:  # loss/ground_truth, loss/distill_output, loss/distill_feature
                logs.update(distiller.end_step(step_seconds=step_seconds))
            accelerator.log(logs, step=global_step)

            stopping = stop_requested(accelerator)  # SIGTERM on any process: all stop after this same step
            if global_step % args.checkpointing_steps == 0 or stopping:  # saved once, even when both
                state = {"pruner": pruner.state_dict(), "stage_times": timer.stages, "run_identity": identity,
                         "bad_images": bad_images.merge(accelerator)}  # every process's, for the report
                saved_path = checkpoints.save(global_step, state, model=model, optimizer=optimizer, ema=ema)
            if stopping:  # exit status 143; no validation: the grace period before SIGKILL is short
                raise preempted(accelerator, saved_path, global_step)
            if args.validation_steps and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation(accelerator, transformer, vae, scheduler, ema, args, global_step)
    timer.close(transformer.num_blocks)
    progress.close()
    phase("export")  # no step boundary left to stop at: a SIGTERM now lets the export finish
    checkpoints.check_finite(global_step, model, optimizer, ema)  # a last update may have overflowed

    # ---- export: EMA weights, LoRA merged, a plain DiTPipeline (or SiTPipeline) folder beside the checkpoints
    accelerator.wait_for_everyone()
    check_processes_agree(accelerator, transformer)  # pruning re-wrapped DDP: no process may have drifted
    bad_images.merge(accelerator)  # every process's
    report = dataclasses.replace(
        pruner.report(), source=args.source_name, dataset=dataset_name, train_step_seconds_by_stage=timer.stages,
        class_mapping=class_mapping, skipped_bad_images=bad_images.report(),  # dataset class -> model class id
        # what the run was made of; a resumed run lists each resume and the settings that changed
        run_identity={k: identity[k] for k in ("source_weights_sha256", "dataset", "resumes")},
        training={k: getattr(args, k) for k in ("max_train_steps", "train_batch_size", "learning_rate", "seed",
                                                "lr_scheduler", "use_ema", "use_lora", "mixed_precision",
                                                "class_dropout_prob")})
    report.pruned_by.update(train_steps=args.max_train_steps, dataset=dataset_name)  # for the model card
    if distiller is not None:  # its config and the teacher's cost; the teacher's memory is freed before the export
        report.distillation = {"teacher": args.teacher_model_name_or_path or f"{args.source_name} (the source "
                               "model)", "teacher_weights_sha256": teacher_fingerprint, **distiller.finish()}
    if accelerator.is_main_process:
        # without accelerate's autocast forward: the speed comparison and the samples run both models alike
        final = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
        if ema is not None:
            ema.copy_to(trainable_parameters(final))
        if args.use_lora:
            merge_lora(final)
        export(args, final.eval(), vae.float(), scheduler, id2label, report, device)
    accelerator.wait_for_everyone()
    accelerator.end_training()


@torch.no_grad()
def sample_images(pipe, args):
    """The validation classes sampled with ``pipe`` and the run's seed, guidance, steps and SiT sampler."""
    labels = args.validation_class_labels or list(range(min(8, pipe.transformer.config.num_embeds_ada_norm)))
    was_training = pipe.transformer.training
    pipe.transformer.eval()
    pipe.set_progress_bar_config(disable=True)
    # under mixed precision the VAE is half precision and the transformer float32: autocast lets them meet
    with torch.autocast(pipe.vae.device.type, dtype=pipe.vae.dtype, enabled=pipe.vae.dtype != torch.float32):
        images = pipe(class_labels=labels, num_inference_steps=args.num_inference_steps,
                      guidance_scale=args.guidance_scale, generator=torch.manual_seed(args.seed),
                      **sampler_kwargs(args.model_type, args.sampler)).images
    pipe.transformer.train(was_training)
    return images, labels


def log_validation(accelerator, transformer, vae, scheduler, ema, args, global_step):
    if ema is not None:  # sample with the EMA weights, then put the training weights back
        ema.store(trainable_parameters(transformer))
        ema.copy_to(trainable_parameters(transformer))
    pipe = pipeline_class(args.model_type)(transformer=transformer, vae=vae, scheduler=scheduler)
    images, labels = sample_images(pipe, args)
    if ema is not None:
        ema.restore(trainable_parameters(transformer))
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    sample_grid(images, rows=1).save(os.path.join(args.output_dir, "validation", f"step-{global_step:06d}.png"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), global_step,
                                      dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(i, caption=str(c)) for i, c in zip(images, labels)]})


def export(args, transformer, vae, scheduler, id2label, report, device):
    """Measure the speedup, then write the pipeline folder (staged, moved into output_dir beside the checkpoints,
    model_index.json last), the report, ced.png and samples.png, and push it if asked."""
    original = EntPrunedTransformer2DModel.from_pretrained(args.source, subfolder="transformer",
                                                           revision=args.revision).to(device).eval()
    before, after = (pipeline_class(args.model_type)(transformer=t, vae=vae, scheduler=scheduler)
                     for t in (original, transformer))
    if args.speed_batch_size:
        for pipe in (before, after):
            pipe.set_progress_bar_config(disable=True)
        labels = args.validation_class_labels or list(range(min(8, transformer.config.num_embeds_ada_norm)))
        report.sampling_speed = compare_sampling_speed(
            before, after, [labels[i % len(labels)] for i in range(args.speed_batch_size)], args.num_inference_steps,
            args.guidance_scale, repeats=args.speed_repeats, **sampler_kwargs(args.model_type, args.sampler))
        logger.info(f"Sampling speedup {report.sampling_speed['speedup']:.2f}x "
                    f"(FLOPs ratio {report.sampling_speed['flops_ratio']:.2f}x)")
    repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    with tempfile.TemporaryDirectory(prefix=".export-", dir=args.output_dir) as staging:
        folder = os.path.join(staging, "pipeline")
        save_pruned_pipeline(folder, transformer, vae, scheduler, id2label=id2label, report=report,
                             dtype=torch.float16 if args.save_fp16 else None,
                             repo_id=repo_id if args.push_to_hub else None, model_type=args.model_type, title=repo_id)
        if any(stage["ced_scores"] for stage in report.stages):  # not with --fine_tune_only
            plot_stage_scores(report.stages, transformer.original_num_layers, os.path.join(folder, "ced.png"))
        grid = sample_images(before, args)[0] + sample_images(after, args)[0]  # original on top, same seeds
        sample_grid(grid, rows=2).save(os.path.join(folder, "samples.png"))
        move_into(folder, args.output_dir)  # model_index.json out first and in last: never beside a half model
    logger.info(f"Saved the pruned pipeline ({len(transformer.kept_block_indices)} of "
                f"{transformer.original_num_layers} blocks: {transformer.kept_block_indices}) to {args.output_dir}")
    if args.push_to_hub:
        url = push_pruned_pipeline(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private,
                                   ignore_patterns=["checkpoint-*", ".checkpoint-*", f"{args.logging_dir}/*",
                                                    ".export-*"])
        logger.info(f"Uploaded to {url}")


if __name__ == "__main__":
    main()
