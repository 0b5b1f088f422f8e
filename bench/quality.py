"""Head-to-head quality benchmark: EntPruner against other rankings and schedules, at one fine-tuning budget for all.

Every pruned model is made by `examples/prune_dit.py` itself (the same data, objective, optimizer, schedule and
export for every method; only ``--ranking`` / ``--pruning_mode`` differ) on the embedded base and downstream digits,
then sampled and measured by `diffusers_entprune.evaluation` (digit-classifier features, since an ImageNet network
means little on 32x32 digits and cannot be downloaded here):

- ``fine_tune_only``: the unpruned model fine-tuned (the ceiling);
- ``entpruner``: CED ranking, adaptive zero-shot schedule (the paper's method);
- ``ced_fixed``, ``ced_one_shot``: the paper's ablations (CED with even stages / everything at step 0);
- ``random`` (three ranking seeds), ``magnitude``, ``taylor``, ``block_influence``, ``loss``: one-shot pruning by
  other rankings.

Each at several pruning ratios, training seeds and fine-tuning budgets. Budget 0 (right after pruning, no
fine-tuning) exists for one-shot methods: the blocks that the script's first stage would drop are removed from the
base, ranked on the same pool of training images. Progressive schedules have no "after pruning" point; their
first point is the shortest budget. Reference lines: real held-out digits against the same reference (the floor;
180 images, fewer than the generated sets, so the floor is overestimated) and the base before fine-tuning.

Results are appended to a JSON-lines file as they come (a run that stops can be resumed: finished rows are skipped);
``--report`` turns the file into the markdown tables and figures of bench/RESULTS.md.

    python bench/quality.py --quick                         # about 10 minutes on a 2-core CPU
    python bench/quality.py                                 # the full grid (hours on a 2-core CPU; resumable)
    python bench/quality.py --report                        # tables and figures from what has been measured
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = {  # name -> extra arguments of examples/prune_dit.py
    "fine_tune_only": ["--fine_tune_only"],
    "entpruner": ["--ranking", "ced", "--pruning_mode", "adaptive"],
    "ced_fixed": ["--ranking", "ced", "--pruning_mode", "fixed"],
    "ced_one_shot": ["--ranking", "ced", "--pruning_mode", "one_shot"],
    "random_0": ["--ranking", "random", "--pruning_mode", "one_shot", "--ranking_seed", "100"],
    "random_1": ["--ranking", "random", "--pruning_mode", "one_shot", "--ranking_seed", "101"],
    "random_2": ["--ranking", "random", "--pruning_mode", "one_shot", "--ranking_seed", "102"],
    "magnitude": ["--ranking", "magnitude", "--pruning_mode", "one_shot"],
    "taylor": ["--ranking", "taylor", "--pruning_mode", "one_shot"],
    "block_influence": ["--ranking", "block_influence", "--pruning_mode", "one_shot"],
    "loss": ["--ranking", "loss", "--pruning_mode", "one_shot"],
}
QUICK = dict(ratios=[0.5], seeds=[0], budgets=[0, 100], guidance_scales=[4.0], num_samples=500,
             methods=["fine_tune_only", "entpruner", "ced_one_shot", "random_0", "magnitude"])
FULL = dict(ratios=[0.5, 0.25, 0.75], seeds=[0, 1], budgets=[0, 100, 400], guidance_scales=[4.0, 1.5],
            num_samples=1000, methods=list(METHODS))
# The full grid has to fit in about 90 minutes on a 2-core CPU: the long budget is run at the central ratio only
# (the curve's shape is the question there), the side ratios stop at the short budget.
FULL_LONG_BUDGET_RATIOS = [0.5]


def load_script():
    spec = importlib.util.spec_from_file_location("prune_dit", os.path.join(ROOT, "examples", "prune_dit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def row_key(row: dict) -> tuple:
    return (row["model_type"], row["method"], row["ratio"], row["seed"], row["budget"], row["guidance_scale"])


def read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_row(path: str, row: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class Evaluator:
    """Samples a pipeline and measures it against the downstream training images (digit-classifier features)."""

    def __init__(self, args):
        from diffusers_entprune.embedded import load_digits_dataset
        from diffusers_entprune.metrics import DigitsFeatures

        self.args = args
        self.network = DigitsFeatures()
        self.reference = load_digits_dataset("downstream", split="train")

    def __call__(self, pipe, guidance_scale: float) -> dict:
        from diffusers_entprune.evaluation import evaluate_pipeline

        call_kwargs = {"sampler": "euler"} if type(pipe).__name__ == "SiTPipeline" else {}
        metrics, _ = evaluate_pipeline(pipe, self.reference, self.network, num_samples=self.args.num_samples,
                                       seed=self.args.sample_seed, guidance_scale=guidance_scale,
                                       num_inference_steps=self.args.num_inference_steps, batch_size=250,
                                       latency_repeats=0, progress=False, **call_kwargs)
        keep = ("fid", "kid_mean", "kid_std", "precision", "recall", "sfid", "inception_score_mean",
                "class_fidelity")
        return {k: metrics[k] for k in keep}


def base_pipeline(model_type: str):
    from diffusers_entprune.embedded import load_embedded_pipeline

    return load_embedded_pipeline(model_type)


@torch.no_grad()
def pruned_at_step_zero(script, model_type: str, method: str, ratio: float, seed: int):
    """The base with the blocks that the script's first (one-shot) stage drops, ranked on the same pool; and the
    seconds the ranking took."""
    from diffusers_entprune.data import vae_scale_factor
    from diffusers_entprune.embedded import load_digits_dataset
    from diffusers_entprune.importance import CEDOptions, score_blocks
    from diffusers_entprune.model_types import objective_for, pipeline_class, resolve_source
    from diffusers_entprune.models import EntPrunedTransformer2DModel

    args = script.parse_args(["--model_type", model_type, "--seed", str(seed), "--target_prune_ratio", str(ratio),
                              *METHODS[method]])
    _, source, _ = resolve_source(None, model_type)
    transformer = EntPrunedTransformer2DModel.from_pretrained(source, subfolder="transformer").eval()
    pipe = pipeline_class(model_type).from_pretrained(source, transformer=transformer)
    objective = objective_for(model_type, transformer.config, pipe.scheduler)
    dataset = load_digits_dataset("downstream", split="train")
    resolution = transformer.config.sample_size * vae_scale_factor(pipe.vae)
    latents, labels = script.build_ced_pool(dataset, pipe.vae, resolution, args, transformer.config.num_embeds_ada_norm)
    start = time.perf_counter()
    with torch.enable_grad():  # taylor needs gradients
        result = score_blocks(args.ranking, transformer, objective,
                              zip(latents.split(args.ced_batch_size), labels.split(args.ced_batch_size)),
                              args.ced_num_samples, seed=args.ranking_seed,
                              ced_options=CEDOptions(variance=args.ced_variance))
    seconds = time.perf_counter() - start
    num_to_prune = round(ratio * transformer.original_num_layers)
    transformer.prune_blocks(result.ranking[:num_to_prune])
    return pipe, sorted(result.ranking[:num_to_prune]), seconds


def run_script(script, model_type: str, method: str, ratio: float, seed: int, budget: int, output_dir: str):
    argv = ["--model_type", model_type, "--seed", str(seed), "--max_train_steps", str(budget),
            "--output_dir", output_dir, "--overwrite_output_dir", "--validation_steps", "0", "--speed_batch_size", "0",
            "--checkpointing_steps", str(10 * budget), *METHODS[method]]
    if method != "fine_tune_only":
        argv += ["--target_prune_ratio", str(ratio)]
    reset_accelerate()
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # the script's progress bars and logs
        script.main(argv)
    seconds = time.perf_counter() - start
    reset_accelerate()
    with open(os.path.join(output_dir, "entprune_report.json")) as f:
        report = json.load(f)
    return report, seconds


def code_version() -> str:
    """The commit the rows were measured with (a row's numbers are reproducible from it)."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "src", "examples"],
                               capture_output=True, text=True, cwd=ROOT).stdout.strip()
        return commit + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(args):
    from diffusers_entprune.model_types import pipeline_class
    from diffusers_entprune.speed import transformer_flops

    script = load_script()
    evaluate = Evaluator(args)
    done = {row_key(r) for r in read_rows(args.results)}
    base = base_pipeline(args.model_type)
    base_flops = transformer_flops(base.transformer)
    common = dict(model_type=args.model_type, num_samples=args.num_samples,
                  num_inference_steps=args.num_inference_steps, sample_seed=args.sample_seed, commit=code_version())

    def record(row, pipe_or_none, guidance):
        row = {**common, **row, "guidance_scale": guidance}
        if row_key(row) in done:
            return
        started = time.perf_counter()
        row.update(evaluate(pipe_or_none, guidance))
        row["eval_seconds"] = round(time.perf_counter() - started, 1)
        row["date"] = time.strftime("%Y-%m-%d")
        append_row(args.results, row)
        done.add(row_key(row))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                          if k in ("method", "ratio", "seed", "budget", "guidance_scale", "fid", "precision",
                                   "recall", "class_fidelity")}), flush=True)

    # reference lines: the floor (real held-out digits) and the base before fine-tuning
    if ("real", args.model_type) not in {(r["method"], r["model_type"]) for r in read_rows(args.results)}:
        append_row(args.results, {**common, **real_floor(), "method": "real", "ratio": 0.0, "seed": 0, "budget": 0,
                                  "guidance_scale": 0.0, "date": time.strftime("%Y-%m-%d")})
    for guidance in args.guidance_scales:
        record({"method": "base", "ratio": 0.0, "seed": 0, "budget": 0, "kept_blocks": list(range(12)),
                "flops_ratio": 1.0}, base, guidance)

    work = os.path.join(args.work_dir, args.model_type)
    for ratio in args.ratios:
        for seed in args.seeds:
            for method in args.methods:
                if method == "fine_tune_only" and ratio != args.ratios[0]:
                    continue  # the ceiling does not depend on the ratio
                row_ratio = 0.0 if method == "fine_tune_only" else ratio
                for budget in args.budgets:
                    keys = [row_key({**common, "method": method, "ratio": row_ratio, "seed": seed, "budget": budget,
                                     "guidance_scale": g}) for g in args.guidance_scales]
                    if all(k in done for k in keys):
                        continue
                    if budget > 100 and args.long_budget_ratios is not None and ratio not in args.long_budget_ratios:
                        continue
                    if budget == 0:
                        if seed != args.seeds[0]:
                            continue  # no training: the model depends on the ranking alone, not the training seed
                        if method in ("entpruner", "ced_fixed"):
                            continue  # progressive schedules have no point "right after pruning"
                        if method == "fine_tune_only":
                            continue  # that is the base, recorded above
                        pipe, kept_out, rank_seconds = pruned_at_step_zero(script, args.model_type, method, ratio,
                                                                           seed)
                        info = {"pruned_blocks": kept_out, "ranking_seconds": round(rank_seconds, 2),
                                "train_seconds": 0.0}
                    else:
                        folder = os.path.join(work, f"{method}-r{ratio}-s{seed}-b{budget}")
                        report, seconds = run_script(script, args.model_type, method, ratio, seed, budget, folder)
                        pipe = pipeline_class(args.model_type).from_pretrained(folder)
                        info = {"pruned_blocks": report["pruned_block_indices"],
                                "stages": [len(s["pruned_blocks"]) for s in report["stages"]],
                                "train_seconds": round(seconds, 1)}
                    info["flops_ratio"] = base_flops / transformer_flops(pipe.transformer)
                    for guidance in args.guidance_scales:
                        record({"method": method, "ratio": row_ratio, "seed": seed, "budget": budget, **info},
                               pipe, guidance)


def real_floor() -> dict:
    """Real held-out downstream digits against the same reference: the floor of every metric."""
    from diffusers_entprune.embedded import load_digits_dataset
    from diffusers_entprune.evaluation import distribution_metrics, extract_features, reference_images
    from diffusers_entprune.metrics import DigitsFeatures

    network = DigitsFeatures()
    ref_images, ref_labels = reference_images(load_digits_dataset("downstream", split="train"), 32)
    test_images, test_labels = reference_images(load_digits_dataset("downstream", split="test"), 32)
    metrics = distribution_metrics(extract_features(network, ref_images), extract_features(network, test_images),
                                   ref_labels, test_labels, classifies_labels=True)
    return {k: metrics[k] for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "sfid",
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


def report(args):
    rows = [r for r in read_rows(args.results) if r["model_type"] == args.model_type]
    if not rows:
        print(f"no rows for {args.model_type} in {args.results}")
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
    order = [m for m in ("fine_tune_only", "entpruner", "ced_fixed", "ced_one_shot", "random", "magnitude", "taylor",
                         "block_influence", "loss")]
    lines += summary_tables(rows, order)
    for guidance in sorted({r["guidance_scale"] for r in rows if r["method"] not in ("real", "base")}, reverse=True):
        for budget in sorted({r["budget"] for r in rows if r["method"] not in ("real", "base")}):
            lines += [f"**Guidance {guidance}, budget {budget} steps** (mean ± std over seeds; random: over 3 ranking "
                      "seeds x training seeds)", "",
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
    """Methods against (ratio, budget) at the highest guidance scale: FID and class fidelity, mean ± std over seeds,
    the best mean in bold; and per column the winner's margin against the spread between seeds."""
    guidance = max(r["guidance_scale"] for r in rows if r["method"] not in ("real", "base"))
    pruned = [r for r in rows if r["ratio"] > 0 and r["guidance_scale"] == guidance]
    columns = sorted({(r["ratio"], r["budget"]) for r in pruned})
    out = []
    for metric, better in (("fid", min), ("class_fidelity", max)):
        ceiling = [r for r in rows if r["method"] == "fine_tune_only" and r["guidance_scale"] == guidance]
        if ceiling:
            out += ["The unpruned model fine-tuned alike (the ceiling): " + ", ".join(
                f"{budget} steps {summarise([r for r in ceiling if r['budget'] == budget], metric)}"
                for budget in sorted({r["budget"] for r in ceiling})) + ".", ""]
        out += [f"**{metric.replace('_', ' ')} at guidance {guidance}** (columns: pruning ratio / fine-tuning steps; "
                "mean ± std over training seeds, random over 3 ranking seeds too; best mean in bold)", "",
                "| method | " + " | ".join(f"{ratio:.2f} / {budget}" for ratio, budget in columns) + " |",
                "|---|" + "---|" * len(columns)]
        means = {}
        for ratio, budget in columns:
            for method in order:
                chosen = [r[metric] for r in pruned if group_random(r["method"]) == method and r["ratio"] == ratio
                          and r["budget"] == budget]
                if chosen:
                    means[(method, ratio, budget)] = chosen
        for method in order:
            cells = []
            for ratio, budget in columns:
                values = means.get((method, ratio, budget))
                if not values:
                    cells.append("")
                    continue
                best = better(statistics.fmean(v) for (m, r, b), v in means.items() if (r, b) == (ratio, budget))
                text = f"{statistics.fmean(values):.3g}" + (f" ± {statistics.stdev(values):.2g}"
                                                           if len(values) > 1 else "")
                cells.append(f"**{text}**" if statistics.fmean(values) == best else text)
            if any(cells):
                out.append(f"| {method} | " + " | ".join(cells) + " |")
        out.append("")
        verdicts = []
        for ratio, budget in columns:
            ranked = sorted(((statistics.fmean(v), m) for (m, r, b), v in means.items() if (r, b) == (ratio, budget)),
                            reverse=better is max)
            spreads = [statistics.stdev(v) for (m, r, b), v in means.items() if (r, b) == (ratio, budget)
                       and len(v) > 1]
            entpruner = next((mean for mean, m in ranked if m == "entpruner"), None)
            if len(ranked) < 2:
                continue
            margin = abs(ranked[0][0] - ranked[1][0])
            text = (f"{ratio:.2f} / {budget}: {ranked[0][1]} {ranked[0][0]:.3g}, "
                    + (f"ahead of {ranked[1][1]} by {margin:.2g}" if margin else f"tied with {ranked[1][1]}"))
            if spreads:
                text += f" (largest seed std in the column {max(spreads):.2g})"
            if entpruner is not None and ranked[0][1] != "entpruner":
                rank = [m for _, m in ranked].index("entpruner") + 1
                text += f"; entpruner {entpruner:.3g}, rank {rank} of {len(ranked)}"
            verdicts.append(text)
        out += [f"Per column ({metric.replace('_', ' ')}): " + "; ".join(verdicts) + ".", ""]
    return out


def plot(rows, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({r["ratio"] for r in rows if r["ratio"] > 0})
    guidance = max(r["guidance_scale"] for r in rows)
    fig, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 4), squeeze=False)
    for ax, ratio in zip(axes[0], ratios):
        for method in ("fine_tune_only", "entpruner", "ced_fixed", "ced_one_shot", "random", "magnitude", "taylor",
                       "block_influence", "loss"):
            chosen = [r for r in rows if group_random(r["method"]) == method and r["guidance_scale"] == guidance
                      and (r["ratio"] == ratio or method == "fine_tune_only")]
            if method == "fine_tune_only":  # the unpruned curve starts at the base
                chosen += [r for r in rows if r["method"] == "base" and r["guidance_scale"] == guidance]
            budgets = sorted({r["budget"] for r in chosen})
            if not budgets:
                continue
            means = [statistics.fmean(r["fid"] for r in chosen if r["budget"] == b) for b in budgets]
            ax.plot(budgets, means, marker="o", label=method, linestyle="--" if method == "fine_tune_only" else "-")
        for r in rows:
            if r["method"] == "real":
                ax.axhline(r["fid"], color="grey", linewidth=0.8, linestyle=":", label="real held-out digits")
        ax.set_title(f"{args.model_type}: {ratio:.0%} of blocks pruned (guidance {guidance})")
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel("FID (digit-classifier features)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.join(ROOT, "bench", "figures"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "figures", f"quality-{args.model_type}.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="One ratio, one seed, four methods, 500 samples.")
    parser.add_argument("--report", action="store_true", help="Only turn the results file into tables and plots.")
    parser.add_argument("--model_type", choices=("dit", "sit"), default="dit")
    parser.add_argument("--ratios", type=float, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--budgets", type=int, nargs="+", default=None, help="Fine-tuning steps (0: right after).")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=None)
    parser.add_argument("--num_samples", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--sample_seed", type=int, default=1234)
    parser.add_argument("--results", default=None, help="Default: bench/results/quality[-quick].jsonl.")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "build", "quality"))
    args = parser.parse_args()
    args.long_budget_ratios = FULL_LONG_BUDGET_RATIOS if not args.quick and args.ratios is None else None
    preset = QUICK if args.quick else FULL
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.results is None:
        args.results = os.path.join(ROOT, "bench", "results", f"quality{'-quick' if args.quick else ''}.jsonl")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if not args.report:
        started = time.time()
        measure(args)
        print(f"measured in {(time.time() - started) / 60:.1f} min; results in {args.results}")
    report(args)


if __name__ == "__main__":
    main()
