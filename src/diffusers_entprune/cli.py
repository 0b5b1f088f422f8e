"""The ``entprune`` command.

    entprune score --ranking ced --output_dir scores                 # embedded base and downstream data
    entprune score --pretrained_model_name_or_path facebook/DiT-XL-2-256 --dataset_name D --output_dir OUT
    entprune prune --prune_blocks 0 5 11 --output_dir tiny-pruned   # embedded base, no network needed
    entprune prune --scores scores/scores.json --num_prune 3 --output_dir tiny-pruned
    entprune prune --pretrained_model_name_or_path facebook/DiT-XL-2-256 --prune_blocks ... --output_dir OUT
    entprune convert --checkpoint DiT-XL-2-256x256.pt --vae stabilityai/sd-vae-ft-ema --output_dir dit-xl
    entprune convert --checkpoint SiT-XL-2-256x256.pt --model_type sit --vae stabilityai/sd-vae-ft-ema --output_dir S
    entprune eval --pretrained_model_name_or_path tiny-pruned --num_samples 1000 --reference embedded:downstream \
        --output_dir eval                                           # FID, KID, P/R, IS, sFID, class fidelity, speed

``score`` and ``prune`` take DiT and SiT pipeline folders alike (the family is read from ``model_index.json``;
``--model_type sit`` picks the embedded tiny SiT).

``score`` ranks the blocks of a DiT on a dataset (CED or a baseline metric) and writes ``scores.json`` and
``scores.png``.

``prune`` loads a DiT pipeline, removes the given blocks (original indices), writes a plain `DiTPipeline` folder
with ``entprune_report.json``, reloads it with an unmodified `DiTPipeline.from_pretrained`, checks that the reloaded
model gives the same output as the in-memory pruned one, and saves a grid of samples from the original (top rows)
and the pruned model (bottom rows) with the same seeds.
"""

import argparse
import json
import os
import sys

from .config import add_config_arguments, config_from_args
from .importance.ranking import RANKING_METHODS, TARGET_AWARE_METHODS
from .model_types import MODEL_TYPES


def _parse_prune_args(argv):
    parser = argparse.ArgumentParser(prog="entprune prune", description="Remove DiT/SiT blocks and export a pipeline.")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="DiT or SiT pipeline folder or Hub id (default: the embedded tiny digits base).")
    parser.add_argument("--model_type", choices=MODEL_TYPES, default=None,
                        help="dit or sit; read from the folder's model_index.json (needed only to pick the embedded "
                             "tiny SiT).")
    parser.add_argument("--revision", default=None)
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prune_blocks", type=int, nargs="+",
                       help="Original indices of the blocks to remove, e.g. `--prune_blocks 0 5 11`.")
    which.add_argument("--scores", default=None,
                       help="A scores.json from `entprune score`: remove its `--num_prune` least important blocks.")
    parser.add_argument("--num_prune", type=int, default=None, help="With --scores: how many blocks to remove.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace an existing, non-empty output_dir.")
    parser.add_argument("--save_fp16", action="store_true", help="Store weights in float16 (half the size).")
    parser.add_argument("--push_to_hub", action="store_true",
                        help="Upload the folder to the Hub (log in with `hf auth login` or set HF_TOKEN).")
    parser.add_argument("--hub_model_id", default=None, help="Repository id (default: the output folder's name).")
    parser.add_argument("--hub_private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--num_samples_per_row", type=int, default=8, help="Samples per row of the grid (0: none).")
    parser.add_argument("--class_labels", type=int, nargs="+", default=None,
                        help="Classes to sample (default: the first `num_samples_per_row` classes).")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.scores is None) != (args.num_prune is None):
        parser.error("--scores and --num_prune go together.")
    if args.num_prune is not None and args.num_prune < 1:
        parser.error("--num_prune must be >= 1.")
    if args.scores is not None and not os.path.isfile(args.scores):
        parser.error(f"--scores {args.scores!r} is not a file (expected scores.json from `entprune score`).")
    if args.num_samples_per_row < 0:
        parser.error("--num_samples_per_row must be >= 0.")
    if args.num_inference_steps < 1:
        parser.error("--num_inference_steps must be >= 1.")
    if not args.guidance_scale >= 0:
        parser.error(f"--guidance_scale must be >= 0 (<= 1: no classifier-free guidance), got {args.guidance_scale}.")
    return args


def prune_command(argv) -> int:
    args = _parse_prune_args(argv)
    import torch

    from .export import load_id2label, save_pruned_pipeline
    from .hub import check_can_push, push_pruned_pipeline
    from .model_types import check_null_class, pipeline_class, resolve_source
    from .models import EntPrunedTransformer2DModel
    from .output_dir import check_output_dir
    from .plotting import sample_grid

    check_output_dir(args.output_dir, args.overwrite_output_dir, "--output_dir", kind="pipeline",
                     inputs={"--pretrained_model_name_or_path": args.pretrained_model_name_or_path,
                             "--scores": args.scores})
    repo_id = None
    if args.push_to_hub:
        check_can_push()
        repo_id = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    prune_blocks, pruned_by = args.prune_blocks, {"prune_blocks": args.prune_blocks}
    if args.scores is not None:
        try:
            with open(args.scores) as f:
                scores = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"`--scores` {args.scores!r} is not JSON ({error}); pass a scores.json from "
                             "`entprune score`.") from None
        if not isinstance(scores, dict) or "ranking" not in scores:
            raise ValueError(f"`--scores` {args.scores!r} has no `ranking`; pass a scores.json from `entprune score`.")
        prune_blocks = scores["ranking"][: args.num_prune]
        pruned_by = {"scores": os.path.abspath(args.scores), "method": scores.get("method"),
                     "num_prune": args.num_prune}
    model_type, source, source_name = resolve_source(args.pretrained_model_name_or_path, args.model_type, args.revision)
    check_null_class(model_type, source, args.revision)  # the export must sample with DiTPipeline
    pipeline_cls = pipeline_class(model_type)
    transformer = EntPrunedTransformer2DModel.from_pretrained(
        source, subfolder="transformer", revision=args.revision
    ).eval()
    # the blocks are checked before any sampling: a wrong index must not cost a whole sampling run
    transformer.check_prunable(prune_blocks, "--prune_blocks" if args.scores is None else "--num_prune/--scores")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = pipeline_cls.from_pretrained(source, transformer=transformer, revision=args.revision).to(device)
    id2label = load_id2label(source, revision=args.revision)
    labels = args.class_labels or list(range(args.num_samples_per_row))
    if any(not 0 <= label < transformer.null_class_label for label in labels):
        raise ValueError(f"`--class_labels` must lie in 0..{transformer.null_class_label - 1}, got {labels}.")

    def sample(p):
        return p(class_labels=labels, guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps,
                 generator=torch.Generator().manual_seed(args.seed)).images

    original_images = sample(pipe) if args.num_samples_per_row else []
    removed = transformer.prune_blocks(prune_blocks)
    print(f"removed blocks {removed}; kept {transformer.kept_block_indices} "
          f"({transformer.num_blocks}/{transformer.original_num_layers})")
    save_pruned_pipeline(args.output_dir, transformer, pipe.vae, pipe.scheduler, id2label=id2label,
                         overwrite=args.overwrite_output_dir,
                         dtype=torch.float16 if args.save_fp16 else None,
                         report={"source": source_name, "pruned_by": pruned_by}, repo_id=repo_id,
                         model_type=model_type)

    # The saved folder must load with plain diffusers and reproduce the in-memory pruned model exactly.
    reloaded = pipeline_cls.from_pretrained(args.output_dir).to(device)
    latents = torch.randn(2, transformer.config.in_channels, transformer.config.sample_size,
                          transformer.config.sample_size, generator=torch.Generator().manual_seed(args.seed))
    t, y = torch.tensor([10, 500]), torch.tensor([labels[0] if labels else 0, transformer.null_class_label])
    latents, t, y = latents.to(device), t.to(device), y.to(device)
    with torch.no_grad():
        difference = (reloaded.transformer.eval()(latents, t, y).sample - transformer(latents, t, y).sample).abs().max()
    print(f"reloaded with {pipeline_cls.__name__}.from_pretrained: max |difference| to the in-memory model = "
          f"{difference.item():.3g}")

    if args.num_samples_per_row:
        pruned_images = sample(reloaded)
        sample_grid(original_images + pruned_images, rows=2).save(os.path.join(args.output_dir, "samples.png"))
        print(f"sample grid (top: original, bottom: pruned): {os.path.join(args.output_dir, 'samples.png')}")
    with open(os.path.join(args.output_dir, "entprune_report.json")) as f:
        print(json.dumps({k: v for k, v in json.load(f).items() if k != "entprune_version"}))
    if args.push_to_hub:
        print(f"uploaded to {push_pruned_pipeline(args.output_dir, repo_id, private=args.hub_private)}")
    return 0


METHODS = RANKING_METHODS
# `entprune score`'s ranking flags: EntPrunerConfig's, named as in examples/prune_dit.py; the old names still work
SCORE_FIELDS = ("ranking", "seed", "ranking_seed", "target_num_blocks", "ced_num_samples", "ced_batch_size",
                "ced_variance", "ced_estimator", "ced_signal", "ced_per_class", "ced_signed", "ced_timestep_range",
                "ced_num_timestep_buckets", "learned_steps", "learned_group_size", "learned_lora_rank",
                "learned_batch_size")
SCORE_ALIASES = {"ranking": ["--method"], "ced_num_samples": ["--num_samples"], "ced_batch_size": ["--batch_size"],
                 "ced_variance": ["--variance"], "ced_estimator": ["--estimator"], "ced_signal": ["--signal"],
                 "ced_signed": ["--signed"], "ced_per_class": ["--pooled"], "ced_timestep_range": ["--timestep_range"],
                 "ced_num_timestep_buckets": ["--num_timestep_buckets"], "target_num_blocks": ["--num_prune"]}


def _parse_score_args(argv):
    parser = argparse.ArgumentParser(prog="entprune score", description="Rank the transformer blocks of a DiT or SiT.")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="DiT or SiT pipeline folder or Hub id (default: the embedded tiny digits base).")
    parser.add_argument("--model_type", choices=MODEL_TYPES, default=None,
                        help="dit or sit; read from the folder's model_index.json (needed only to pick the embedded "
                             "tiny SiT).")
    parser.add_argument("--revision", default=None)
    data = parser.add_argument_group("data (default: the embedded downstream digits)")
    data.add_argument("--dataset_name", default=None, help="A Hub dataset id or a path `datasets` can load.")
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None, help="A local imagefolder, or a folder of parquet files.")
    data.add_argument("--split", default="train")
    data.add_argument("--streaming", action="store_true")
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default="label")
    data.add_argument("--resolution", type=int, default=None,
                      help="Image size (default: the transformer's sample_size times the VAE's downsampling).")
    data.add_argument("--latent_cache_dir", default=None, help="A latent cache folder, shared with "
                      "examples/prune_dit.py --cache_latents: the dataset is encoded there once and reused.")
    data.add_argument("--class_mapping_file", default=None,
                      help="A JSON file {class name: model class id} for the label column's classes (default: by "
                           "name, see examples/prune_dit.py --help).")
    data.add_argument("--skip_bad_images", action="store_true",
                      help="Leave out unreadable images (truncated, empty, missing) with a warning instead of "
                           "stopping.")
    ranking = add_config_arguments(parser, fields=SCORE_FIELDS, aliases=SCORE_ALIASES,
                                   group_title="ranking (EntPrunerConfig's flags, as in examples/prune_dit.py; "
                                               "--target_num_blocks: needed by the rankings that choose a set for a "
                                               f"target, {', '.join(TARGET_AWARE_METHODS)})")
    ranking.add_argument("--no_prefix_cache", action="store_true", help="Run the naive ablation (for checking).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args(argv)
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("pass at most one of --dataset_name and --train_data_dir.")
    if args.class_mapping_file is not None and not os.path.isfile(args.class_mapping_file):
        parser.error(f"--class_mapping_file {args.class_mapping_file!r} is not a file.")
    if args.resolution is not None and args.resolution < 1:
        parser.error("--resolution must be >= 1.")
    args.config = config_from_args(args, error=parser.error)  # every ranking setting checked here
    if args.ranking in TARGET_AWARE_METHODS and args.target_num_blocks is None:
        parser.error(f"--ranking {args.ranking} chooses the set of blocks to remove for a target: pass "
                     "--target_num_blocks N.")
    return args


def score_command(argv) -> int:
    args = _parse_score_args(argv)
    import time

    from accelerate import Accelerator

    from .data import calibration_batches, load_labelled_dataset, repeat_batches, vae_scale_factor
    from .export import load_id2label
    from .importance import score_blocks
    from .model_types import objective_for, pipeline_class, resolve_source
    from .models import EntPrunedTransformer2DModel
    from .output_dir import check_output_dir, staged_output_dir
    from .plotting import plot_scores
    from .randomness import shard_batches

    check_output_dir(args.output_dir, args.overwrite_output_dir, "--output_dir", kind="scores",
                     inputs={"--pretrained_model_name_or_path": args.pretrained_model_name_or_path,
                             "--train_data_dir": args.train_data_dir, "--dataset_name": args.dataset_name,
                             "--latent_cache_dir": args.latent_cache_dir})
    accelerator = Accelerator()  # one process, or several under `accelerate launch` (statistics are summed)
    config = args.config
    model_type, source, source_name = resolve_source(args.pretrained_model_name_or_path, args.model_type, args.revision)
    device = accelerator.device
    transformer = EntPrunedTransformer2DModel.from_pretrained(source, subfolder="transformer", revision=args.revision)
    pipe = pipeline_class(model_type).from_pretrained(source, transformer=transformer, revision=args.revision)
    pipe.to(device)
    transformer.eval()
    # the target is checked against the model before any data is encoded
    num_to_prune = None if config.target_num_blocks is None else config.num_blocks_to_prune(transformer)
    num_classes = transformer.config.num_embeds_ada_norm
    dataset, dataset_label, class_mapping = load_labelled_dataset(  # the model's own class ids
        args.dataset_name, args.train_data_dir, args.split, args.dataset_config_name, args.streaming, None,
        args.image_column, args.label_column, num_classes, load_id2label(source, revision=args.revision),
        args.class_mapping_file, log=print if accelerator.is_main_process else lambda message: None)
    resolution = args.resolution or transformer.config.sample_size * vae_scale_factor(pipe.vae)
    # the same pool as the pruning script's (its first draws): the first ced_num_samples images, met again if fewer
    latents = calibration_batches(dataset, pipe.vae, resolution, config.ced_num_samples, config.ced_batch_size,
                                  args.image_column, args.label_column, num_classes, cache_dir=args.latent_cache_dir,
                                  skip_bad_images=args.skip_bad_images)
    batches = shard_batches(repeat_batches(latents, config.ced_num_samples), accelerator.process_index,
                            accelerator.num_processes)
    objective = objective_for(model_type, transformer.config, pipe.scheduler)

    start = time.time()
    def sum_over_processes(tensor):
        return accelerator.reduce(tensor.to(device), "sum").cpu() if accelerator.num_processes > 1 else tensor

    result = score_blocks(config.ranking, transformer, objective, batches, config.ced_num_samples,
                          seed=config.ranking_seed, ced_options=config.ced_options,
                          prefix_cache=not args.no_prefix_cache,
                          progress=accelerator.is_local_main_process, reduce=sum_over_processes,
                          process_index=accelerator.process_index, num_processes=accelerator.num_processes,
                          num_to_prune=num_to_prune, learned_options=config.learned_options)
    scores = result.to_dict()
    scores.update(pretrained_model_name_or_path=source_name, model_type=model_type,
                  dataset=dataset_label, split=args.split, resolution=resolution, class_mapping=class_mapping,
                  skipped_bad_images=latents.bad_images,
                  seconds=round(time.time() - start, 2), device=str(device), num_processes=accelerator.num_processes,
                  config=config.to_dict())
    if accelerator.is_main_process:
        with staged_output_dir(args.output_dir, kind="scores", command="entprune score") as tmp:
            with open(os.path.join(tmp, "scores.json"), "w") as f:
                json.dump(scores, f, indent=2)
            plot_scores(scores, os.path.join(tmp, "scores.png"))
        print(f"{config.ranking}: least to most important {scores['ranking']} ({scores['seconds']} s)")
        print(f"wrote {os.path.join(args.output_dir, 'scores.json')} and scores.png")
    # every process leaves together and closes the process group: a rank that exits while another still holds
    # the group open can abort ("terminate called without an active exception"), seen with gloo
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def convert_command(argv) -> int:
    parser = argparse.ArgumentParser(prog="entprune convert", description="An original DiT or SiT checkpoint (.pt or "
                                     ".safetensors) -> a DiTPipeline or SiTPipeline folder.")
    parser.add_argument("--checkpoint", required=True, help="e.g. DiT-XL-2-256x256.pt or SiT-XL-2-256x256.pt, or a "
                        "training checkpoint (its EMA weights are used).")
    parser.add_argument("--model_type", choices=["dit", "sit"], default="dit",
                        help="dit: DDPM-trained (DiTPipeline); sit: flow-trained (SiTPipeline).")
    parser.add_argument("--vae", required=True, help="A diffusers AutoencoderKL folder or Hub id, e.g. "
                        "stabilityai/sd-vae-ft-ema (add --vae_subfolder vae for a pipeline's VAE).")
    parser.add_argument("--vae_subfolder", default=None)
    parser.add_argument("--num_attention_heads", type=int, default=None,
                        help="Needed only for non-standard hidden sizes (S/B/L/XL are known).")
    parser.add_argument("--sample_size", type=int, default=None,
                        help="Latent size; needed only when the checkpoint has no pos_embed.")
    parser.add_argument("--id2label", default=None, help="A JSON file mapping class index to name.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint!r} is not a file.")
    for name in ("num_attention_heads", "sample_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)} (leave it out to read it off the weights).")
    from diffusers import AutoencoderKL

    from .convert import convert_to_pipeline
    from .model_types import load_error
    from .output_dir import check_output_dir

    check_output_dir(args.output_dir, args.overwrite_output_dir, "--output_dir", kind="pipeline",
                     inputs={"--checkpoint": args.checkpoint, "--vae": args.vae, "--id2label": args.id2label})
    id2label = None
    if args.id2label:
        try:
            with open(args.id2label) as f:
                id2label = {int(k): str(v) for k, v in json.load(f).items()}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, ValueError) as error:
            raise ValueError(f"`--id2label` {args.id2label!r} is not a JSON object mapping class indices to names, "
                             f'e.g. {{"0": "tench", "1": "goldfish"}} ({type(error).__name__}: {error}).') from None
    try:
        vae = AutoencoderKL.from_pretrained(args.vae, subfolder=args.vae_subfolder)
    except OSError as error:
        raise load_error("--vae", args.vae, error, "a diffusers AutoencoderKL",
                         " (add `--vae_subfolder vae` for a pipeline folder's VAE)") from error
    out = convert_to_pipeline(args.checkpoint, vae, args.output_dir, args.model_type, args.num_attention_heads,
                              args.sample_size, id2label, overwrite=args.overwrite_output_dir)
    pipeline_class = "DiTPipeline" if args.model_type == "dit" else "diffusers_entprune.SiTPipeline"
    print(f"wrote {out} (load it with {pipeline_class}.from_pretrained)")
    return 0


EMBEDDED_REFERENCES = ("embedded:downstream", "embedded:pretrain")


def _parse_eval_args(argv):
    from .metrics.features import FEATURE_NETWORKS
    from .pipelines.pipeline_sit import SAMPLERS

    parser = argparse.ArgumentParser(prog="entprune eval", description="Sample a DiT/SiT pipeline and measure FID, "
                                     "KID, precision/recall, IS, sFID, class fidelity, latency and FLOPs.")
    parser.add_argument("--pretrained_model_name_or_path", default=None,
                        help="DiT or SiT pipeline folder or Hub id (default: the embedded tiny base).")
    parser.add_argument("--model_type", choices=MODEL_TYPES, default=None,
                        help="Read from the folder's model_index.json (needed only to pick the embedded tiny SiT).")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--reference", default="embedded:downstream",
                        help=f"Real images to compare with: {' or '.join(EMBEDDED_REFERENCES)}, a Hub dataset id, "
                             "or a local imagefolder / parquet folder.")
    parser.add_argument("--reference_split", default="test")
    parser.add_argument("--reference_config_name", default=None)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label", help='"none" for unlabelled reference images.')
    parser.add_argument("--class_mapping_file", default=None,
                        help="A JSON file {class name: model class id} for the reference's classes (default: by "
                             "name, see examples/prune_dit.py --help).")
    parser.add_argument("--max_reference_images", type=int, default=None)
    parser.add_argument("--feature_network", choices=FEATURE_NETWORKS, default=None,
                        help="digits (the embedded classifier; default for the embedded references) or inception "
                             "(FID's Inception-v3 through torchmetrics; needs torch-fidelity; default otherwise).")
    parser.add_argument("--inception_weights", default=None,
                        help="A local FID Inception weights file (pt_inception-2015-12-05), for offline use.")
    parser.add_argument("--class_labels", type=int, nargs="+", default=None,
                        help="Classes to sample, cycled (default: the classes present in the reference data).")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="SiT only (default euler).")
    parser.add_argument("--guidance_channels", type=int, default=None,
                        help="SiT only: guide only the first N latent channels, the others take the conditional "
                             "velocity (3: as DiT's and SiT's own sampling scripts, which the published FIDs used; "
                             "default: all channels, as diffusers).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=64, help="Samples per pipeline call.")
    parser.add_argument("--latency_batch_size", type=int, default=8)
    parser.add_argument("--latency_repeats", type=int, default=3, help="0: do not time.")
    parser.add_argument("--num_grid_images", type=int, default=40, help="Samples in samples.png (0: none).")
    parser.add_argument("--original_model_name_or_path", default=None,
                        help="The unpruned model (folder, Hub id, or 'embedded'): its sampling calls are timed "
                             "interleaved with the evaluated model's on the same machine and batch, and the speedup, "
                             "FLOPs ratio and parameter ratio (original / evaluated) go into metrics.json.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--overwrite_output_dir", action="store_true")
    args = parser.parse_args(argv)
    for name in ("num_samples", "batch_size", "latency_batch_size", "num_inference_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.num_samples < 4:
        parser.error("--num_samples must be >= 4 (precision and recall need k + 1 samples, k = 3).")
    if args.original_model_name_or_path is not None and args.latency_repeats == 0:
        parser.error("--original_model_name_or_path compares sampling speed: give --latency_repeats >= 1.")
    for name in ("latency_repeats", "num_grid_images"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.max_reference_images is not None and args.max_reference_images < 4:
        parser.error("--max_reference_images must be >= 4.")
    if args.guidance_scale < 0:
        parser.error(f"--guidance_scale must be >= 0, got {args.guidance_scale}.")
    if args.guidance_channels is not None and args.guidance_channels < 1:
        parser.error(f"--guidance_channels must be >= 1, got {args.guidance_channels}.")
    if args.inception_weights is not None and not os.path.isfile(args.inception_weights):
        parser.error(f"--inception_weights {args.inception_weights!r} is not a file.")
    if args.class_mapping_file is not None and not os.path.isfile(args.class_mapping_file):
        parser.error(f"--class_mapping_file {args.class_mapping_file!r} is not a file.")
    args.label_column = None if args.label_column.lower() == "none" else args.label_column
    if args.reference.startswith("embedded:") and args.reference not in EMBEDDED_REFERENCES:
        parser.error(f"--reference {args.reference!r} is not embedded data; use one of {EMBEDDED_REFERENCES}.")
    if args.feature_network is None:
        args.feature_network = "digits" if args.reference in EMBEDDED_REFERENCES else "inception"
    return args


def eval_command(argv) -> int:
    args = _parse_eval_args(argv)
    from accelerate import Accelerator
    from PIL import Image

    from .data import prepare_labels
    from .evaluation import evaluate_pipeline
    from .export import load_id2label
    from .metrics import load_feature_network
    from .model_types import check_null_class, pipeline_class, resolve_source, sampler_kwargs
    from .output_dir import check_output_dir, staged_output_dir
    from .plotting import sample_grid

    check_output_dir(args.output_dir, args.overwrite_output_dir, "--output_dir", kind="metrics",
                     inputs={"--pretrained_model_name_or_path": args.pretrained_model_name_or_path,
                             "--reference": args.reference, "--original_model_name_or_path":
                             args.original_model_name_or_path, "--inception_weights": args.inception_weights})
    model_type, source, source_name = resolve_source(args.pretrained_model_name_or_path, args.model_type, args.revision)
    call_kwargs = sampler_kwargs(model_type, args.sampler)  # refuses a sampler for a DiT
    if model_type == "sit":  # recorded in metrics.json's "sampling" with the sampler (None: all channels)
        call_kwargs["guidance_channels"] = args.guidance_channels
        if args.guidance_channels is not None:
            from diffusers import DiTTransformer2DModel

            channels = DiTTransformer2DModel.load_config(source, subfolder="transformer", revision=args.revision)[
                "in_channels"]
            if args.guidance_channels > channels:
                raise ValueError(f"`--guidance_channels`={args.guidance_channels} exceeds the model's {channels} "
                                 "latent channels.")
    elif args.guidance_channels is not None:
        raise ValueError("`--guidance_channels` applies to SiT models only; DiTPipeline guides all latent channels "
                         "and has no such option.")
    feature_network = load_feature_network(args.feature_network, args.inception_weights)  # fails fast if missing
    reference, reference_name = load_reference(args)
    for column in (args.image_column, args.label_column):
        if column is not None and column not in reference.column_names:
            argument = "--image_column" if column == args.image_column else "--label_column"
            raise ValueError(f"`{argument}`={column!r} is not a column of the reference data; columns: "
                             f"{reference.column_names}.")
    if len(reference) < 4:
        raise ValueError(f"`--reference` {args.reference!r} split {args.reference_split!r} has {len(reference)} "
                         "images; at least 4 are needed.")
    check_null_class(model_type, source, args.revision)  # sampled with DiTPipeline
    class_mapping = None
    if args.label_column is not None:  # the classes sampled and compared are the model's ids of the reference's
        from diffusers import DiTTransformer2DModel

        num_classes = DiTTransformer2DModel.load_config(source, subfolder="transformer", revision=args.revision)[
            "num_embeds_ada_norm"]
        reference, class_mapping = prepare_labels(
            reference, args.label_column, num_classes, load_id2label(source, revision=args.revision),
            args.class_mapping_file, f"`--reference`={args.reference!r} (split {args.reference_split!r})", log=print)

    original = None
    if args.original_model_name_or_path is not None:  # resolved before any sampling, so a bad path fails fast
        original_path = None if args.original_model_name_or_path == "embedded" else args.original_model_name_or_path
        original_type, original, original_name = resolve_source(
            original_path, model_type if original_path is None else None, argument="--original_model_name_or_path")
        if original_type != model_type:
            raise ValueError(f"`--original_model_name_or_path` is a {original_type.upper()} model but the evaluated "
                             f"model is {model_type.upper()}; compare a model with its own unpruned source.")
        check_null_class(original_type, original, argument="--original_model_name_or_path")

    accelerator = Accelerator()  # one process, or several under `accelerate launch` (samples are sharded)
    pipe = pipeline_class(model_type).from_pretrained(source, revision=args.revision).to(accelerator.device)
    feature_network.to(accelerator.device)

    metrics, images = evaluate_pipeline(
        pipe, reference, feature_network, num_samples=args.num_samples, seed=args.seed,
        guidance_scale=args.guidance_scale, num_inference_steps=args.num_inference_steps, batch_size=args.batch_size,
        class_labels=args.class_labels, image_column=args.image_column, label_column=args.label_column,
        max_reference_images=args.max_reference_images, latency_batch_size=args.latency_batch_size,
        latency_repeats=args.latency_repeats, accelerator=accelerator, progress=accelerator.is_local_main_process,
        **call_kwargs)
    if original is not None and accelerator.is_main_process:
        metrics["comparison"] = _compare_with_original(pipe, original, original_name, model_type, metrics, args,
                                                       call_kwargs)
    if accelerator.is_main_process:
        metrics["sampling"].setdefault("guidance_channels", None)  # a DiT: DiTPipeline guides all channels
        metrics = {"pretrained_model_name_or_path": source_name, "model_type": model_type,
                   "reference": {"dataset": reference_name, "split": args.reference_split,
                                 "image_column": args.image_column, "label_column": args.label_column,
                                 "class_mapping": class_mapping},
                   **metrics}
        with staged_output_dir(args.output_dir, kind="metrics", command="entprune eval") as tmp:
            with open(os.path.join(tmp, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=2)
            if args.num_grid_images:
                count = min(args.num_grid_images, len(images))
                cols = min(10, count)
                count = count // cols * cols  # full rows only
                grid = (images[:count].permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
                sample_grid([Image.fromarray(image) for image in grid], rows=count // cols).save(
                    os.path.join(tmp, "samples.png"))
        summary = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("fid", "kid_mean", "precision", "recall", "sfid",
                                                              "inception_score_mean", "class_fidelity")
                            if metrics.get(k) is not None)
        print(f"{source_name}: {summary} ({args.num_samples} samples, {metrics['feature_network']} features)")
        print(f"wrote {os.path.join(args.output_dir, 'metrics.json')}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _compare_with_original(pipe, original_source, original_name, model_type, metrics, args, call_kwargs) -> dict:
    """Speed, FLOPs and parameters of the original against the evaluated pipeline, same machine and batch."""
    from .model_types import pipeline_class
    from .speed import compare_sampling_speed, transformer_flops

    original = pipeline_class(model_type).from_pretrained(original_source).to(pipe.device)
    for each in (pipe, original):
        each.set_progress_bar_config(disable=True)
    labels = metrics["sampling"]["class_labels"]
    speed = compare_sampling_speed(original, pipe, [labels[i % len(labels)] for i in range(args.latency_batch_size)],
                                   args.num_inference_steps, args.guidance_scale, repeats=args.latency_repeats,
                                   **call_kwargs)
    original_parameters = sum(p.numel() for p in original.transformer.parameters())
    return {"original_model_name_or_path": original_name,
            "original_num_layers": original.transformer.config.num_layers,
            "speedup": speed["speedup"], "original_seconds_per_call": speed["original_seconds"],
            "seconds_per_call": speed["pruned_seconds"], "batch_size": speed["batch_size"],
            "repeats": speed["repeats"], "device": speed["device"],
            "flops_ratio": transformer_flops(original.transformer, 1) / metrics["flops_per_forward"],
            "parameter_ratio": original_parameters / metrics["transformer_parameters"],
            "timing": "calls of the two pipelines interleaved after a warm-up; median seconds per call"}


def load_reference(args):
    """The reference images of ``args.reference`` / ``reference_split`` / ``reference_config_name`` (embedded data,
    a Hub dataset or a local folder) and a printable name; also used by bench/quality.py."""
    from .data import load_image_dataset
    from .embedded import load_digits_dataset

    if args.reference in EMBEDDED_REFERENCES:
        style = args.reference.split(":")[1]
        return load_digits_dataset(style, split=args.reference_split), f"embedded:digits/{style}"
    local = os.path.isdir(args.reference)
    try:
        dataset = load_image_dataset(None if local else args.reference, args.reference if local else None,
                                     args.reference_split, args.reference_config_name)
    except ConnectionError as error:
        raise ConnectionError(f"`--reference` {args.reference!r} is not a local folder and the Hub could not be "
                              "reached for it (offline mode, HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, or no network); "
                              "download it once with the network on, or pass a local imagefolder / parquet folder or "
                              f"one of {EMBEDDED_REFERENCES}. ({error.__cause__ or error})") from error
    except FileNotFoundError as error:
        raise FileNotFoundError(f"`--reference` {args.reference!r}: {error}") from error
    return dataset, args.reference


COMMANDS = {"score": score_command, "prune": prune_command, "convert": convert_command, "eval": eval_command}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: entprune {{{','.join(COMMANDS)}}} [options]   (entprune <command> --help for details)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
