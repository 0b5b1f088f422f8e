"""Head-to-head quality benchmark: EntPruner against every ranking, schedule and recovery recipe the package offers,
at equal fine-tuning budgets, for any DiT/SiT and dataset.

Every pruned model is made by `examples/prune_dit.py` itself (the same data, objective, optimizer, schedule and
export for every method; only the method's flags differ), then sampled and measured by
`diffusers_entprune.evaluation`. By default on the embedded tiny DiT (or ``--model_type sit``) and the embedded
downstream digits, with the embedded digit classifier as feature network (an ImageNet Inception means little on
32 px digits and cannot be downloaded here); with ``--pretrained_model_name_or_path``, ``--dataset_name`` /
``--train_data_dir``, ``--reference`` and ``--feature_network inception`` the same grid runs on DiT-XL/2 and CUB on a
GPU (bench/README.md has that command). Methods (`METHODS`, `KD_ARGS`):

- ``fine_tune_only``: the unpruned model fine-tuned alike (the ceiling);
- ``entpruner``: CED ranking, adaptive zero-shot schedule (the paper's method); ``ced_fixed`` / ``ced_one_shot``
  (its ablations); ``entpruner_residual`` / ``ced_residual_one_shot``: the same with the residual conditional
  entropy estimator;
- ``random`` (ranking seed 100 + training seed), ``magnitude``, ``taylor``, ``block_influence``, ``loss``: one-shot
  pruning by other rankings; ``uniform``: evenly spaced blocks (TinyFusion's "oracle", every other block at 50%);
  ``learned``: recoverability-aware learned selection (Gumbel-softmax over block groups with LoRA);
- ``+kd`` / ``+kdft`` after any pruning method: distillation from the source model / from a teacher fine-tuned on
  the downstream data (``--kd_teacher``; by default the grid's own ``fine_tune_only`` run at its longest budget).

Each at several pruning ratios, training seeds and fine-tuning budgets. Budget 0 (right after pruning, no
fine-tuning) exists for one-shot methods: the blocks that the script's first stage would drop, ranked on the same
pool of training images, removed from the base; its row carries the ranking's cost. Progressive schedules have no
"after pruning" point. Reference lines: real held-out images against the same reference (the floor) and the base
before fine-tuning.

Rows are appended to a JSON-lines file as they come; a run that stops resumes where it stopped (finished rows are
skipped). ``--report`` turns the file into the markdown tables and figures of bench/RESULTS.md.

    python bench/quality.py --quick                         # about 10 minutes on a 2-core CPU
    python bench/quality.py                                 # the grid of issue 13 (hours on a 2-core CPU)
    python bench/quality.py --report                        # tables and figures from what has been measured
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "prune_dit.py")  # run as a user runs it, never imported

METHODS = {  # name -> arguments of examples/prune_dit.py; {seed} is the training seed
    "fine_tune_only": ["--fine_tune_only"],
    "entpruner": ["--ranking", "ced", "--pruning_mode", "adaptive"],
    "entpruner_residual": ["--ranking", "ced", "--ced_estimator", "residual", "--pruning_mode", "adaptive"],
    "ced_fixed": ["--ranking", "ced", "--pruning_mode", "fixed"],
    "ced_one_shot": ["--ranking", "ced", "--pruning_mode", "one_shot"],
    "ced_residual_one_shot": ["--ranking", "ced", "--ced_estimator", "residual", "--pruning_mode", "one_shot"],
    "random": ["--ranking", "random", "--pruning_mode", "one_shot", "--ranking_seed", "1{seed:02d}"],
    "random_0": ["--ranking", "random", "--pruning_mode", "one_shot", "--ranking_seed", "100"],  # rows of 2026-11
    "random_1": ["--ranking", "random", "--pruning_mode", "one_shot", "--ranking_seed", "101"],
    "random_2": ["--ranking", "random", "--pruning_mode", "one_shot", "--ranking_seed", "102"],
    "magnitude": ["--ranking", "magnitude", "--pruning_mode", "one_shot"],
    "taylor": ["--ranking", "taylor", "--pruning_mode", "one_shot"],
    "block_influence": ["--ranking", "block_influence", "--pruning_mode", "one_shot"],
    "loss": ["--ranking", "loss", "--pruning_mode", "one_shot"],
    "uniform": ["--ranking", "uniform", "--pruning_mode", "one_shot"],
    "learned": ["--ranking", "learned", "--pruning_mode", "one_shot"],
}
# distillation: output KD mixed half and half with the ground truth, plus masked feature KD that decays to 0 over
# the run; "+kd" from the source model (the script's default teacher), "+kdft" from `--kd_teacher`, a model
# fine-tuned on the downstream data (e.g. this grid's own fine_tune_only output at its longest budget)
KD_SUFFIX = "+kd"
KD_FT_SUFFIX = "+kdft"
KD_ARGS = ["--distill_output_weight", "0.5", "--distill_feature_weight", "1.0"]
PROGRESSIVE = {"entpruner", "entpruner_residual", "ced_fixed"}  # no "right after pruning" point
# the contenders of issue 13, in table order
CONTENDERS = ["fine_tune_only", "entpruner", "entpruner_residual", "entpruner_residual+kdft", "learned", "taylor",
              "block_influence", "block_influence+kdft", "uniform", "random"]
QUICK = dict(ratios=[0.5], seeds=[0], budgets=[0, 100], guidance_scales=[4.0], num_samples=500,
             methods=["fine_tune_only", "entpruner", "ced_one_shot", "random_0", "magnitude"])
FULL = dict(ratios=[0.5, 0.75], seeds=[0, 1, 2], budgets=[0, 100, 400], guidance_scales=[4.0, 1.5],
            num_samples=1000, methods=CONTENDERS)
TABLE_ORDER = ["fine_tune_only", "entpruner", "ced_fixed", "ced_one_shot", "entpruner_residual",
               "ced_residual_one_shot", "learned", "taylor", "block_influence", "loss", "uniform", "random",
               "magnitude"]


def method_args(method: str, seed: int, kd_teacher: str | None = None) -> list[str]:
    base, _, suffix = method.partition("+")
    suffix = "+" + suffix if suffix else ""
    if base not in METHODS or suffix not in ("", KD_SUFFIX, KD_FT_SUFFIX):
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}, +kd (distillation from the "
                         "source model) or +kdft (from --kd_teacher)")
    if suffix and base == "fine_tune_only":
        raise ValueError(f"fine_tune_only{suffix} would distil into the unpruned model; leave {suffix} off")
    extra = []
    if suffix == KD_SUFFIX:
        extra = KD_ARGS
    elif suffix == KD_FT_SUFFIX:
        if kd_teacher is None:
            raise ValueError(f"{method!r} distils from a fine-tuned teacher: pass --kd_teacher (a pipeline folder, "
                             "e.g. a fine_tune_only output of this grid)")
        extra = KD_ARGS + ["--teacher_model_name_or_path", kd_teacher]
    return [a.format(seed=seed) for a in METHODS[base]] + extra


def run_prune_dit(argv: list[str], num_processes: int = 1) -> None:
    """Run examples/prune_dit.py with ``argv`` as a user does: ``python examples/prune_dit.py ...``, or
    ``accelerate launch --num_processes N examples/prune_dit.py ...`` for N > 1; its output is captured, and the end
    of its stderr shown if it fails."""
    command = [sys.executable, SCRIPT, *argv] if num_processes <= 1 else \
        ["accelerate", "launch", "--num_processes", str(num_processes), SCRIPT, *argv]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed (exit status {completed.returncode}):\n"
                           f"{completed.stderr[-4000:]}")


def script_settings(argv: list[str]):
    """The model, data and pruning settings that examples/prune_dit.py takes from ``argv``: its model and data flags
    (with its defaults) and its `EntPrunerConfig`, built as the script builds it (`add_config_arguments`,
    `config_from_args`: the script's pruning flags, --seed included, are the config's fields). Its other flags are
    ignored. Returns (namespace, config)."""
    from diffusers_entprune.config import add_config_arguments, config_from_args

    parser = argparse.ArgumentParser(prog=SCRIPT, allow_abbrev=False)
    for name in ("pretrained_model_name_or_path", "model_type", "revision", "dataset_name", "dataset_config_name",
                 "train_data_dir", "class_mapping_file"):
        parser.add_argument(f"--{name}", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--skip_bad_images", action="store_true")
    add_config_arguments(parser)
    settings, _ = parser.parse_known_args(argv)
    return settings, config_from_args(settings, error=parser.error)


@torch.no_grad()
def base_and_pool(settings, config, to_device: bool = True):
    """The source model of ``settings`` (`script_settings`), its pipeline and objective, and the calibration pool
    (latents, labels) that examples/prune_dit.py ranks on: the VAE means of the first
    ``config.calibration_pool_size`` training images, encoded in batches of ``config.ced_batch_size``
    (`data.calibration_batches`) and repeated when the data is shorter, as `EntPruner.calibration_pool` does."""
    from diffusers_entprune.data import calibration_batches, collect_pool, load_labelled_dataset, vae_scale_factor
    from diffusers_entprune.export import load_id2label
    from diffusers_entprune.model_types import objective_for, pipeline_class, resolve_source
    from diffusers_entprune.models import EntPrunedTransformer2DModel

    model_type, source, _ = resolve_source(settings.pretrained_model_name_or_path, settings.model_type,
                                           settings.revision)
    transformer = EntPrunedTransformer2DModel.from_pretrained(source, subfolder="transformer",
                                                              revision=settings.revision).eval()
    pipe = pipeline_class(model_type).from_pretrained(source, transformer=transformer, revision=settings.revision)
    if to_device:
        pipe = pipe.to(device())
    objective = objective_for(model_type, transformer.config, pipe.scheduler)
    num_classes = transformer.config.num_embeds_ada_norm
    dataset, _, _ = load_labelled_dataset(  # as the script loads it
        settings.dataset_name, settings.train_data_dir, settings.split, settings.dataset_config_name, False, None,
        settings.image_column, settings.label_column, num_classes, load_id2label(source, revision=settings.revision),
        settings.class_mapping_file, settings.max_train_samples)
    resolution = transformer.config.sample_size * vae_scale_factor(pipe.vae)
    pool = collect_pool(calibration_batches(  # as EntPruner.calibration_pool collects it
        dataset, pipe.vae, resolution, config.calibration_pool_size, config.ced_batch_size, settings.image_column,
        settings.label_column, num_classes, skip_bad_images=settings.skip_bad_images), config.calibration_pool_size)
    return model_type, pipe, objective, pool


def row_key(row: dict) -> tuple:
    return (row.get("model", "embedded"), row["model_type"], row["method"], row["ratio"], row["seed"],
            row["budget"], row["guidance_scale"])


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def data_args(args) -> list[str]:
    """The model and data flags every training run gets."""
    out = []
    for name in ("pretrained_model_name_or_path", "dataset_name", "train_data_dir", "image_column", "label_column"):
        value = getattr(args, name)
        if value is not None:
            out += [f"--{name}", str(value)]
    if args.pretrained_model_name_or_path is None:
        out += ["--model_type", args.model_type]
    return out


def user_args(args) -> list[str]:
    """``--script_args``, placed last so that they override the benchmark's own defaults (e.g. checkpointing)."""
    return shlex.split(args.script_args or "")


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def labelled_reference(args, split: str, source: str, num_classes: int):
    """``--reference``'s ``split``, its labels made the model's class ids (by name or ``--class_mapping_file``),
    as `entprune eval` does."""
    from diffusers_entprune.cli import load_reference
    from diffusers_entprune.data import prepare_labels
    from diffusers_entprune.export import load_id2label

    reference, name = load_reference(argparse.Namespace(reference=args.reference, reference_split=split,
                                                        reference_config_name=args.reference_config_name))
    label_column = args.label_column or "label"
    if label_column in reference.column_names:
        reference, _ = prepare_labels(reference, label_column, num_classes, load_id2label(source),
                                      args.class_mapping_file, f"`--reference`={args.reference!r} (split {split!r})")
    return reference, name


def reference_label_column(args, reference) -> str | None:
    label_column = args.label_column or "label"
    return label_column if label_column in reference.column_names else None


class Evaluator:
    """Samples a pipeline and measures it against the reference images (``--reference`` with ``--feature_network``)."""

    def __init__(self, args, source: str, num_classes: int):
        from diffusers_entprune.metrics import load_feature_network

        self.args = args
        self.network = load_feature_network(args.feature_network, args.inception_weights).to(device())
        self.reference, self.reference_name = labelled_reference(args, args.reference_split, source, num_classes)

    def __call__(self, pipe, guidance_scale: float) -> dict:
        from diffusers_entprune.evaluation import evaluate_pipeline

        call_kwargs = {"sampler": self.args.sampler or "euler"} if type(pipe).__name__ == "SiTPipeline" else {}
        metrics, _ = evaluate_pipeline(pipe.to(device()), self.reference, self.network,
                                       image_column=self.args.image_column or "image",
                                       label_column=reference_label_column(self.args, self.reference),
                                       num_samples=self.args.num_samples, seed=self.args.sample_seed,
                                       guidance_scale=guidance_scale, num_inference_steps=self.args.num_inference_steps,
                                       batch_size=self.args.sample_batch_size,
                                       max_reference_images=self.args.max_reference_images, latency_repeats=0,
                                       progress=False, **call_kwargs)
        keep = ("fid", "kid_mean", "kid_std", "precision", "recall", "sfid", "inception_score_mean",
                "class_fidelity")
        return {k: metrics.get(k) for k in keep}


@torch.no_grad()
def pruned_at_step_zero(args, method: str, ratio: float, seed: int):
    """The base with the blocks that the script's first (one-shot) stage drops, ranked on the same pool; and the
    seconds the ranking took."""
    from diffusers_entprune.importance import score_blocks

    settings, config = script_settings([*data_args(args), "--seed", str(seed), "--target_prune_ratio", str(ratio),
                                        *method_args(method, seed, args.kd_teacher), *user_args(args)])
    _, pipe, objective, (latents, labels) = base_and_pool(settings, config)
    transformer = pipe.transformer
    num_to_prune = config.num_blocks_to_prune(transformer)
    start = time.perf_counter()
    with torch.enable_grad():  # taylor and learned need gradients
        result = score_blocks(config.ranking, transformer, objective,
                              list(zip(latents.split(config.ced_batch_size), labels.split(config.ced_batch_size))),
                              config.ced_num_samples, seed=config.ranking_seed, ced_options=config.ced_options,
                              num_to_prune=num_to_prune, learned_options=config.learned_options)
    seconds = time.perf_counter() - start
    transformer.prune_blocks(result.ranking[:num_to_prune])
    return pipe, sorted(result.ranking[:num_to_prune]), seconds


def run_script(args, method: str, ratio: float, seed: int, budget: int, output_dir: str):
    argv = [*data_args(args), "--seed", str(seed), "--max_train_steps", str(budget), "--output_dir", output_dir,
            "--overwrite_output_dir", "--resume_from_checkpoint", "latest",  # a stopped run continues
            "--validation_steps", "0", "--speed_batch_size", "0",
            "--checkpointing_steps", str(10 * budget), *method_args(method, seed, args.kd_teacher)]
    if method != "fine_tune_only":
        argv += ["--target_prune_ratio", str(ratio)]
    argv += user_args(args)
    start = time.perf_counter()
    run_prune_dit(argv, args.num_processes)  # a subprocess, as a user runs it
    seconds = time.perf_counter() - start
    with open(os.path.join(output_dir, "entprune_report.json")) as f:
        report = json.load(f)
    return report, seconds


def code_version() -> str:
    """The commit the rows were measured with (a row's numbers are reproducible from it)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src", "examples"],
                               capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return commit + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(args):
    from diffusers_entprune.model_types import pipeline_class, resolve_source
    from diffusers_entprune.speed import transformer_flops

    done = {row_key(r) for r in read_rows(args.results)}
    model_type, source, source_name = resolve_source(args.pretrained_model_name_or_path, args.model_type)
    base = pipeline_class(model_type).from_pretrained(source)
    evaluate = Evaluator(args, source, base.transformer.config.num_embeds_ada_norm)
    base_flops = transformer_flops(base.transformer)
    num_layers = base.transformer.config.num_layers
    common = dict(model=args.pretrained_model_name_or_path or "embedded", model_type=model_type,
                  dataset=args.dataset_name or args.train_data_dir or "embedded", reference=evaluate.reference_name,
                  feature_network=args.feature_network, num_samples=args.num_samples,
                  num_inference_steps=args.num_inference_steps, sample_seed=args.sample_seed,
                  script_args=args.script_args, kd_teacher=args.kd_teacher, commit=code_version())

    def record(row, pipe, guidance):
        row = {**common, **row, "guidance_scale": guidance}
        if row_key(row) in done:
            return
        started = time.perf_counter()
        row.update(evaluate(pipe, guidance))
        row["eval_seconds"] = round(time.perf_counter() - started, 1)
        row["date"] = time.strftime("%Y-%m-%d")
        append_row(args.results, row)
        done.add(row_key(row))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k in ("method", "ratio", "seed", "budget", "guidance_scale", "fid", "precision",
                                   "recall", "class_fidelity", "train_seconds")}), flush=True)

    # reference lines: the floor (real held-out images) and the base before fine-tuning
    if args.real_split and not any(r["method"] == "real" and row_key(r)[:2] == (common["model"], model_type)
                                   for r in read_rows(args.results)):
        floor = real_floor(args, evaluate, source, base)
        append_row(args.results, {**common, **floor, "method": "real", "ratio": 0.0, "seed": 0, "budget": 0,
                                  "guidance_scale": 0.0, "date": time.strftime("%Y-%m-%d")})
    for guidance in args.guidance_scales:
        record({"method": "base", "ratio": 0.0, "seed": 0, "budget": 0, "kept_blocks": list(range(num_layers)),
                "flops_ratio": 1.0}, base, guidance)

    work = os.path.join(args.work_dir, common["model"].replace("/", "--"), model_type)

    def measure_point(method, ratio, seed, budget):
        """Make the model of one grid point (prune and fine-tune, or prune only at budget 0) and record its rows."""
        row_ratio = 0.0 if method == "fine_tune_only" else ratio
        keys = [row_key({**common, "method": method, "ratio": row_ratio, "seed": seed, "budget": budget,
                         "guidance_scale": g}) for g in args.guidance_scales]
        if all(k in done for k in keys):
            return
        if budget == 0:
            pipe, kept_out, rank_seconds = pruned_at_step_zero(args, method, ratio, seed)
            info = {"pruned_blocks": kept_out, "ranking_seconds": round(rank_seconds, 2), "train_seconds": 0.0}
        else:
            folder = os.path.join(work, f"{method}-r{ratio}-s{seed}-b{budget}")
            report, seconds = run_script(args, method, ratio, seed, budget, folder)
            pipe = pipeline_class(model_type).from_pretrained(folder)
            info = {"pruned_blocks": report["pruned_block_indices"],
                    "stages": [len(s["pruned_blocks"]) for s in report["stages"]], "train_seconds": round(seconds, 1)}
            if "distillation" in report:
                info["distillation"] = report["distillation"]
        info["flops_ratio"] = base_flops / transformer_flops(pipe.transformer)
        for guidance in args.guidance_scales:
            record({"method": method, "ratio": row_ratio, "seed": seed, "budget": budget, **info}, pipe, guidance)

    if args.kd_teacher is None and any(m.endswith(KD_FT_SUFFIX) for m in args.methods):
        # the +kdft teacher: this grid's own unpruned model fine-tuned for the longest budget (first seed), made first
        ratio, seed, longest = args.ratios[0], args.seeds[0], max(args.budgets)
        measure_point("fine_tune_only", ratio, seed, longest)
        args.kd_teacher = os.path.join(work, f"fine_tune_only-r{ratio}-s{seed}-b{longest}")
        common["kd_teacher"] = args.kd_teacher
    for budget in args.budgets:  # the short budgets first: every method gets a first number early
        for ratio in args.ratios:
            for seed in args.seeds:
                for method in args.methods:
                    if method == "fine_tune_only" and ratio != args.ratios[0]:
                        continue  # the ceiling does not depend on the ratio
                    if budget == 0:
                        if seed != args.seeds[0] and method != "random":
                            continue  # no training: the model depends on the ranking alone, not the training seed
                        if method.split("+")[0] in PROGRESSIVE or method == "fine_tune_only":
                            continue  # no point "right after pruning" / that is the base, recorded above
                        if "+" in method:
                            continue  # distillation acts in training only: same blocks as without it
                    measure_point(method, ratio, seed, budget)


def real_floor(args, evaluate, source: str, base) -> dict:
    """Real held-out images (``--real_split`` of the reference) against the reference: the floor of every metric."""
    from diffusers_entprune.data import vae_scale_factor
    from diffusers_entprune.evaluation import distribution_metrics, extract_features, reference_images

    config = base.transformer.config
    resolution = config.sample_size * vae_scale_factor(base.vae)
    held_out, _ = labelled_reference(args, args.real_split, source, config.num_embeds_ada_norm)
    label_column = reference_label_column(args, evaluate.reference)
    ref_images, ref_labels = reference_images(evaluate.reference, resolution, args.image_column or "image",
                                              label_column, indices=list(range(min(
                                                  len(evaluate.reference),
                                                  args.max_reference_images or len(evaluate.reference)))))
    test_images, test_labels = reference_images(held_out, resolution, args.image_column or "image", label_column)
    network = evaluate.network
    classifies = args.feature_network == "digits" and label_column is not None  # the classifier's own classes
    metrics = distribution_metrics(extract_features(network, ref_images.to(device())),
                                   extract_features(network, test_images.to(device())),
                                   ref_labels, test_labels, classifies_labels=classifies)
    return {k: metrics.get(k) for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "sfid",
                                        "inception_score_mean", "class_fidelity")} | {"num_real": len(test_images)}


# ------------------------------------------------------------------------------------------------------ report


def summarise(rows, metric):
    values = [r[metric] for r in rows if r.get(metric) is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.3g}"
    return f"{mean:.3g} ± {statistics.stdev(values):.2g}"


def group_random(method: str) -> str:
    return "random" if method.startswith("random_") else method


def table_order(rows) -> list[str]:
    """Methods in `TABLE_ORDER`, each followed by its +kd variant, then any other method present."""
    present = {group_random(r["method"]) for r in rows if r["method"] not in ("real", "base")}
    order = [m for base in TABLE_ORDER for m in (base, base + KD_SUFFIX, base + KD_FT_SUFFIX) if m in present]
    return order + sorted(present - set(order))


def report(args):
    model = args.pretrained_model_name_or_path or "embedded"
    rows = [r for r in read_rows(args.results) if r["model_type"] == args.model_type
            and r.get("model", "embedded") == model]
    if not rows:
        print(f"no rows for {model} ({args.model_type}) in {args.results}")
        return
    real = next((r for r in rows if r["method"] == "real"), None)
    base = [r for r in rows if r["method"] == "base"]
    lines = []
    if real:
        lines.append(f"Reference lines: real held-out digits ({real['num_real']} images) FID {real['fid']:.3g}, "
                     f"precision {real['precision']:.3f}, recall {real['recall']:.3f}, class fidelity "
                     f"{real['class_fidelity']:.3f}; the base before fine-tuning: " + ", ".join(
                         f"guidance {r['guidance_scale']}: FID {r['fid']:.3g}, class fidelity "
                         f"{r['class_fidelity']:.3f}" for r in base) + ".")
        lines.append("")
    order = table_order(rows)
    lines += summary_tables(rows, order)
    for guidance in sorted({r["guidance_scale"] for r in rows if r["method"] not in ("real", "base")}, reverse=True):
        for budget in sorted({r["budget"] for r in rows if r["method"] not in ("real", "base")}):
            lines += [f"**Guidance {guidance}, budget {budget} steps** (mean ± std over seeds; `random` over "
                      "its ranking seeds too)", "",
                      "| ratio | method | FID | KID | precision | recall | class fidelity | sFID | FLOPs ratio "
                      "| ranking / training s |", "|---|---|---|---|---|---|---|---|---|---|"]
            for ratio in sorted({r["ratio"] for r in rows}):
                for method in order:
                    chosen = [r for r in rows if group_random(r["method"]) == method and r["ratio"] == ratio
                              and r["budget"] == budget and r["guidance_scale"] == guidance]
                    if not chosen:
                        continue
                    timing = f"{summarise(chosen, 'ranking_seconds')} / {summarise(chosen, 'train_seconds')}"
                    lines.append(f"| {ratio:.2f} | {method} | {summarise(chosen, 'fid')} | "
                                 f"{summarise(chosen, 'kid_mean')} | {summarise(chosen, 'precision')} | "
                                 f"{summarise(chosen, 'recall')} | {summarise(chosen, 'class_fidelity')} | "
                                 f"{summarise(chosen, 'sfid')} | {summarise(chosen, 'flops_ratio')} | {timing} |")
            lines.append("")
    text = "\n".join(lines)
    print(text)
    plot(rows, args)
    return text


def summary_tables(rows, order) -> list[str]:
    """Methods against (ratio, budget), per guidance scale: FID and class fidelity, mean ± std over seeds, the best
    mean in bold; and per column the winner's margin over the runner-up against their spread between seeds."""
    out = []
    for guidance in sorted({r["guidance_scale"] for r in rows if r["method"] not in ("real", "base")}, reverse=True):
        pruned = [r for r in rows if r["ratio"] > 0 and r["guidance_scale"] == guidance]
        columns = sorted({(r["ratio"], r["budget"]) for r in pruned})
        for metric, better in (("fid", min), ("class_fidelity", max)):
            out += metric_table(rows, pruned, columns, order, metric, better, guidance)
    return out


def metric_table(rows, pruned, columns, order, metric, better, guidance) -> list[str]:
    out = []
    ceiling = [r for r in rows if r["method"] == "fine_tune_only" and r["guidance_scale"] == guidance]
    if ceiling:
        out += ["The unpruned model fine-tuned alike (the ceiling): " + ", ".join(
            f"{budget} steps {summarise([r for r in ceiling if r['budget'] == budget], metric)}"
            for budget in sorted({r["budget"] for r in ceiling})) + ".", ""]
    out += [f"**{metric.replace('_', ' ')} at guidance {guidance}** (columns: pruning ratio / fine-tuning steps; "
            "mean ± std over training seeds, `random` over its ranking seeds too; best mean in bold)", "",
            "| method | " + " | ".join(f"{ratio:.2f} / {budget}" for ratio, budget in columns) + " |",
            "|---|" + "---|" * len(columns)]
    values = {}
    for ratio, budget in columns:
        for method in order:
            chosen = [r[metric] for r in pruned if group_random(r["method"]) == method and r["ratio"] == ratio
                      and r["budget"] == budget and r.get(metric) is not None]
            if chosen:
                values[(method, ratio, budget)] = chosen

    def mean_std(v):
        return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    for method in order:
        cells = []
        for ratio, budget in columns:
            v = values.get((method, ratio, budget))
            if not v:
                cells.append("")
                continue
            best = better(statistics.fmean(x) for (m, r, b), x in values.items() if (r, b) == (ratio, budget))
            mean, std = mean_std(v)
            text = f"{mean:.3g}" + (f" ± {std:.2g}" if len(v) > 1 else "")
            cells.append(f"**{text}**" if mean == best else text)
        if any(cells):
            out.append(f"| {method} | " + " | ".join(cells) + " |")
    out.append("")
    verdicts = []
    for ratio, budget in columns:
        ranked = sorted(((*mean_std(v), len(v), m) for (m, r, b), v in values.items() if (r, b) == (ratio, budget)),
                        reverse=better is max)
        if len(ranked) < 2:
            continue
        (mean1, std1, n1, first), (mean2, std2, n2, second) = ranked[0], ranked[1]
        margin = abs(mean1 - mean2)
        # "beyond the spread": the two means are further apart than the sum of their seed standard deviations
        clear = n1 > 1 and n2 > 1 and margin > std1 + std2
        text = (f"{ratio:.2f} / {budget}: **{first}** {mean1:.3g} ± {std1:.2g} (n={n1}), ahead of {second} "
                f"{mean2:.3g} ± {std2:.2g} (n={n2}) by {margin:.2g}, "
                + ("one run each, no seed spread" if n1 == 1 or n2 == 1 else
                   "beyond the spread" if clear else "within the spread"))
        names = [m for *_, m in ranked]
        for reference in ("entpruner",):
            if reference in names and first != reference:
                text += f"; {reference} rank {names.index(reference) + 1} of {len(ranked)}"
        verdicts.append(text)
    if verdicts:
        out += [f"Winners ({metric.replace('_', ' ')}, guidance {guidance}): " + "; ".join(verdicts) + ".", ""]
    return out


def plot(rows, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows if r["ratio"] > 0})
    guidance = max(r["guidance_scale"] for r in rows)
    network = next((r.get("feature_network", "digits") for r in rows if r["method"] != "real"), "digits")
    fig, axes = plt.subplots(1, len(ratios), figsize=(6 * len(ratios), 4.5), squeeze=False)
    methods = table_order(rows)
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}  # one colour per method, in every panel
    for ax, ratio in zip(axes[0], ratios):
        for method in methods:
            chosen = [r for r in rows if group_random(r["method"]) == method and r["guidance_scale"] == guidance
                      and (r["ratio"] == ratio or method == "fine_tune_only")]
            if method == "fine_tune_only":  # the unpruned curve starts at the base
                chosen += [r for r in rows if r["method"] == "base" and r["guidance_scale"] == guidance]
            budgets = sorted({r["budget"] for r in chosen})
            if not budgets:
                continue
            means = [statistics.fmean(r["fid"] for r in chosen if r["budget"] == b) for b in budgets]
            ax.plot(budgets, means, marker="o", label=method, color=colors[method],
                    linestyle="--" if method == "fine_tune_only" else (":" if "+" in method else "-"))
        for r in rows:
            if r["method"] == "real":
                ax.axhline(r["fid"], color="grey", linewidth=0.8, linestyle=":", label="real held-out images")
        ax.set_title(f"{rows[0].get('model', 'embedded')} {args.model_type}: {ratio:.0%} of blocks pruned "
                     f"(guidance {guidance})", fontsize=9)
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel(f"FID ({network} features)")
        ax.set_yscale("log")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.join(ROOT, "bench", "figures"), exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.results))[0]
    model = (args.pretrained_model_name_or_path or "").replace("/", "--")
    path = os.path.join(ROOT, "bench", "figures", f"{stem}-{model + '-' if model else ''}{args.model_type}.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="One ratio, one seed, five methods, 500 samples.")
    parser.add_argument("--report", action="store_true", help="Only turn the results file into tables and plots.")
    model = parser.add_argument_group("model and data (default: the embedded tiny model and downstream digits)")
    model.add_argument("--pretrained_model_name_or_path", default=None, help="A DiT or SiT pipeline folder or Hub id.")
    model.add_argument("--model_type", choices=("dit", "sit"), default="dit",
                       help="Picks the embedded model; read from the folder otherwise.")
    model.add_argument("--dataset_name", default=None, help="Training data: a Hub dataset id or local path.")
    model.add_argument("--train_data_dir", default=None, help="Training data: an imagefolder or parquet folder.")
    model.add_argument("--image_column", default=None)
    model.add_argument("--label_column", default=None)
    model.add_argument("--class_mapping_file", default=None,
                       help="JSON {class name: model class id}, for training and reference data alike.")
    model.add_argument("--script_args", default="",
                       help='More flags for every examples/prune_dit.py run, e.g. "--train_batch_size 32 '
                            '--mixed_precision bf16 --learning_rate 1e-4 --use_ema".')
    model.add_argument("--num_processes", type=int, default=1,
                       help="> 1: each run is an `accelerate launch --num_processes N` subprocess.")
    ev = parser.add_argument_group("evaluation")
    ev.add_argument("--reference", default="embedded:downstream",
                    help="Real images to compare with: embedded:downstream, a Hub dataset id or a local folder.")
    ev.add_argument("--reference_split", default="train",
                    help="Split of --reference the samples are compared with (default train: the downstream "
                         "training images, as in the 2026-11 rows).")
    ev.add_argument("--reference_config_name", default=None)
    ev.add_argument("--real_split", default="test",
                    help="A held-out split of --reference measured against it: the floor ('' to skip).")
    ev.add_argument("--max_reference_images", type=int, default=None)
    ev.add_argument("--feature_network", choices=("digits", "inception"), default=None,
                    help="Default: digits for embedded references, inception otherwise.")
    ev.add_argument("--inception_weights", default=None, help="A local FID Inception weights file (offline).")
    ev.add_argument("--num_samples", type=int, default=None)
    ev.add_argument("--num_inference_steps", type=int, default=25)
    ev.add_argument("--sampler", default=None, help="SiT only (default euler).")
    ev.add_argument("--sample_batch_size", type=int, default=250)
    ev.add_argument("--sample_seed", type=int, default=1234)
    ev.add_argument("--guidance_scales", type=float, nargs="+", default=None)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--ratios", type=float, nargs="+", default=None)
    grid.add_argument("--seeds", type=int, nargs="+", default=None)
    grid.add_argument("--budgets", type=int, nargs="+", default=None, help="Fine-tuning steps (0: right after).")
    grid.add_argument("--methods", nargs="+", default=None,
                      help=f"From {sorted(METHODS)}; add +kd to a pruning method for distillation from the source "
                           "model, +kdft for distillation from --kd_teacher.")
    grid.add_argument("--kd_teacher", default=None,
                      help="The teacher of the +kdft methods: a pipeline folder fine-tuned on the downstream data. "
                           "Default: the grid's own fine_tune_only run at its longest budget (first ratio and "
                           "seed), made before the other runs.")
    grid.add_argument("--results", default=None, help="Default: bench/results/quality-grid.jsonl (quick: "
                                                      "quality-quick.jsonl).")
    grid.add_argument("--work_dir", default=os.path.join(ROOT, "build", "quality"))
    args = parser.parse_args()
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for method in args.methods:  # before any heavy work
        try:
            method_args(method, 0, args.kd_teacher or "the grid's own fine_tune_only run")
        except ValueError as error:
            parser.error(f"--methods: {error}")
    if args.dataset_name is not None and args.train_data_dir is not None:
        parser.error("pass at most one of --dataset_name and --train_data_dir")
    if args.feature_network is None:
        args.feature_network = "digits" if args.reference.startswith("embedded:") else "inception"
    if args.class_mapping_file is not None:
        args.script_args = f"{args.script_args} --class_mapping_file {shlex.quote(args.class_mapping_file)}"
    if args.results is None:
        args.results = os.path.join(ROOT, "bench", "results", f"quality-{'quick' if args.quick else 'grid'}.jsonl")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.report:
        started = time.time()
        measure(args)
        print(f"measured in {(time.time() - started) / 60:.1f} min; results in {args.results}")
    report(args)


if __name__ == "__main__":
    main()
