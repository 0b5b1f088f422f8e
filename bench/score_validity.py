"""Do the scores predict what they claim? Block rankings against the real cost of removing each block, and the
zero-shot proxies against the real quality of candidate sub-networks, on the embedded base and downstream digits.

1. **Rankings.** For every single block b: remove it from the base (`entprune prune`), fine-tune briefly
   (`examples/prune_dit.py --fine_tune_only`, the same budget for all) and measure FID and class fidelity; the
   quality drop is the difference to the unpruned model fine-tuned alike. Each ranking's scores on the base
   (higher = more important) are compared with the drops by Spearman's rho over the blocks: a ranking that
   predicts well has a clearly positive rho.
2. **Proxies.** For several candidate sub-networks at the first stage boundary (drop the m lowest-CED blocks for
   m = 0..M, and random sets of the same sizes), the NTK condition number (lower = better), ZiCo (higher = better)
   and their equal-weight combination (higher = better, as the controller uses it) are computed on the base, and
   compared by Spearman's rho with the FID after the same short fine-tuning (rho is reported so that positive =
   the proxy orders the candidates as their quality does).

Every ranking is scored: the paper's CED and its estimator options (`SCORE_VARIANTS`), the baselines, and the
set-choosing rankings (``learned``, ``uniform``) at the 50% target. With several ``--seeds`` each single-block
removal is fine-tuned once per training seed: rho is reported per seed (mean ± std), next to the rho between the
seeds' own drops, the test-retest agreement that bounds what any score can reach on this measurement.

    python bench/score_validity.py --quick      # 4 single blocks and 6 candidates, 300 samples (minutes)
    python bench/score_validity.py              # all 12 blocks, 12 candidates, 1000 samples
    python bench/score_validity.py --seeds 0 1 --num_samples 500 --skip_proxies   # rankings only, two seeds

Results go to bench/results/score_validity[-quick]-MODEL.json (``--results``) and are printed as markdown.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import ROOT, Evaluator, base_and_pool, run_prune_dit, script_settings  # noqa: E402

# name -> (ranking method, CEDOptions overrides); the set-choosing rankings score for a 50% target
SCORE_VARIANTS = {
    "ced": ("ced", {}),  # the paper's estimator
    "ced_residual": ("ced", {"estimator": "residual"}),
    "ced_kl": ("ced", {"estimator": "kl"}),
    "ced_w2": ("ced", {"estimator": "w2"}),
    "ced_condition": ("ced", {"signal": "condition"}),
    "ced_residual_condition": ("ced", {"estimator": "residual", "signal": "condition"}),
    "random": ("random", {}),
    "magnitude": ("magnitude", {}),
    "taylor": ("taylor", {}),
    "block_influence": ("block_influence", {}),
    "loss": ("loss", {}),
    "learned": ("learned", {}),
    "uniform": ("uniform", {}),
}


def average_ranks(values) -> list[float]:
    """Ranks 1..n, tied values sharing the mean of their ranks (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: the Pearson correlation of the average ranks (nan when either side is constant)."""
    rx, ry = torch.tensor(average_ranks(list(x)), dtype=torch.float64), torch.tensor(average_ranks(list(y)),
                                                                                        dtype=torch.float64)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = (rx.square().sum() * ry.square().sum()).sqrt()
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


def prune_and_fine_tune(model_type: str, blocks: list[int], steps: int, seed: int, work: str):
    """The embedded base without ``blocks`` (original indices), fine-tuned ``steps`` steps; its pipeline."""
    from diffusers_entprune.cli import main as entprune
    from diffusers_entprune.model_types import pipeline_class

    name = "-".join(map(str, blocks)) or "none"
    pruned, tuned = os.path.join(work, f"pruned-{name}"), os.path.join(work, f"tuned-{name}-s{seed}")
    if blocks:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            entprune(["prune", "--model_type", model_type, "--prune_blocks", *map(str, blocks),
                      "--num_samples_per_row", "0", "--output_dir", pruned, "--overwrite_output_dir"])
    source = pruned if blocks else None
    argv = ["--fine_tune_only", "--max_train_steps", str(steps), "--seed", str(seed), "--output_dir", tuned,
            "--overwrite_output_dir", "--validation_steps", "0", "--speed_batch_size", "0",
            "--checkpointing_steps", str(10 * steps), "--learning_rate", "1e-3"]
    argv += ["--pretrained_model_name_or_path", source] if source else ["--model_type", model_type]
    run_prune_dit(argv)  # a subprocess, as a user runs it
    return pipeline_class(model_type).from_pretrained(tuned)


@torch.no_grad()
def base_scores_and_pool(model_type: str, seed: int):
    """Every ranking's scores on the base (and the seconds each took), the base itself, its objective, the fixed
    pool of examples/prune_dit.py run with ``--model_type model_type --seed seed``, and that run's
    `EntPrunerConfig`."""
    from diffusers_entprune.importance import score_blocks

    settings, config = script_settings(["--model_type", model_type, "--seed", str(seed)])
    _, pipe, objective, (latents, labels) = base_and_pool(settings, config, to_device=False)
    transformer = pipe.transformer
    pool = list(zip(latents.split(config.ced_batch_size), labels.split(config.ced_batch_size)))
    scores, seconds = {}, {}
    for name, (method, options) in SCORE_VARIANTS.items():
        variant = dataclasses.replace(config, ranking=method, **{f"ced_{k}": v for k, v in options.items()})
        start = time.perf_counter()
        with torch.enable_grad():
            result = score_blocks(variant.ranking, transformer, objective, pool, variant.ced_num_samples,
                                  seed=variant.ranking_seed, ced_options=variant.ced_options,
                                  num_to_prune=transformer.num_blocks // 2, learned_options=variant.learned_options)
        seconds[name] = round(time.perf_counter() - start, 2)
        scores[name] = dict(zip(result.block_indices, result.scores))
    return scores, seconds, transformer, objective, (latents, labels), config


def embedded_evaluator(args, model_type: str, num_classes: int):
    """`quality.Evaluator` on the embedded downstream training digits with the digit classifier's features."""
    from diffusers_entprune.model_types import resolve_source

    _, source, _ = resolve_source(None, model_type)
    settings = argparse.Namespace(**vars(args), feature_network="digits", inception_weights=None,
                                  reference="embedded:downstream", reference_split="train", reference_config_name=None,
                                  image_column=None, label_column=None, class_mapping_file=None,
                                  max_reference_images=None, sampler=None, sample_batch_size=250)
    return Evaluator(settings, source, num_classes)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model_type", choices=("dit", "sit"), default="dit")
    parser.add_argument("--steps", type=int, default=100, help="Fine-tuning steps after each removal.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="Training seeds of the fine-tuning after each removal (the first also seeds the scores).")
    parser.add_argument("--num_samples", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--sample_seed", type=int, default=1234)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[4.0])
    parser.add_argument("--candidate_drops", type=int, nargs="+", default=None,
                        help="Candidate sizes m (blocks dropped) at the first stage boundary.")
    parser.add_argument("--random_candidates", type=int, default=1, help="Random candidates per size m > 0.")
    parser.add_argument("--skip_proxies", action="store_true", help="Rankings only (part 1).")
    parser.add_argument("--results", default=None)
    parser.add_argument("--damage_from", default=None,
                        help="Take the single-block drops from this earlier result file instead of measuring them "
                             "again (every ranking is scored anew; the rho's noise is then a bootstrap over blocks).")
    args = parser.parse_args()
    args.num_samples = args.num_samples or (300 if args.quick else 1000)
    args.candidate_drops = args.candidate_drops or ([0, 2, 4] if args.quick else [0, 1, 2, 3, 4, 6])
    started = time.time()
    work = os.path.join(ROOT, "build", "score_validity", args.model_type)
    scores, score_seconds, base, objective, (latents, labels), config = base_scores_and_pool(
        args.model_type, args.seeds[0])
    evaluate = embedded_evaluator(args, args.model_type, base.config.num_embeds_ada_norm)
    num_layers = base.original_num_layers
    guidance = args.guidance_scales[0]

    def quality(blocks, seed):
        pipe = prune_and_fine_tune(args.model_type, blocks, args.steps, seed, work)
        return evaluate(pipe, guidance)

    # 1. rankings against the measured cost of removing each block, once per training seed
    blocks = list(range(num_layers)) if not args.quick else [0, 3, 7, 11]
    if args.damage_from:  # drops measured by an earlier run of this script (one seed: its own)
        with open(args.damage_from) as f:
            earlier = json.load(f)
        blocks = sorted(int(b) for b in earlier["single_block"])
        seed = earlier["settings"].get("seed", args.seeds[0])
        args.seeds = [seed]
        reference = {seed: earlier["reference_fine_tuned"]}
        single = {seed: {b: earlier["single_block"][str(b)] for b in blocks}}
    else:
        reference = {seed: quality([], seed) for seed in args.seeds}
        single = {seed: {b: quality([b], seed) for b in blocks} for seed in args.seeds}
    drops = {seed: {b: {"fid": single[seed][b]["fid"] - reference[seed]["fid"],
                        "class_fidelity": reference[seed]["class_fidelity"] - single[seed][b]["class_fidelity"]}
                    for b in blocks} for seed in args.seeds}
    metrics = ("fid", "class_fidelity")
    rankings = {method: {metric: [spearman([scores[method][b] for b in blocks],
                                           [drops[seed][b][metric] for b in blocks]) for seed in args.seeds]
                         for metric in metrics} for method in scores}
    # how well one seed's drops predict another's: the most any score can reach on this measurement
    pairs = [(a, b) for i, a in enumerate(args.seeds) for b in args.seeds[i + 1:]]
    retest = {metric: [spearman([drops[a][k][metric] for k in blocks], [drops[b][k][metric] for k in blocks])
                       for a, b in pairs] for metric in metrics}
    mean_drops = {b: {metric: sum(drops[seed][b][metric] for seed in args.seeds) / len(args.seeds)
                      for metric in metrics} for b in blocks}
    rankings_on_mean = {method: {metric: spearman([scores[method][b] for b in blocks],
                                                  [mean_drops[b][metric] for b in blocks]) for metric in metrics}
                        for method in scores}

    # the noise of each rho: a bootstrap over the blocks (resampled with replacement, 2000 times), 5th-95th pct
    generator = torch.Generator().manual_seed(0)
    draws = torch.randint(0, len(blocks), (2000, len(blocks)), generator=generator).tolist()

    def bootstrap(method, metric):
        seed = args.seeds[0]
        values = []
        for draw in draws:
            x = [scores[method][blocks[i]] for i in draw]
            y = [drops[seed][blocks[i]][metric] for i in draw]
            if len(set(x)) > 1 and len(set(y)) > 1:
                values.append(spearman(x, y))
        values.sort()
        return [values[int(0.05 * len(values))], values[int(0.95 * len(values)) - 1]] if values else [None, None]

    intervals = {method: {metric: bootstrap(method, metric) for metric in metrics} for method in scores}
    result = {"settings": vars(args), "reference_fine_tuned": reference, "single_block": {
        str(b): {"per_seed": {seed: single[seed][b] for seed in args.seeds},
                 "drop": {seed: drops[seed][b] for seed in args.seeds}, "mean_drop": mean_drops[b],
                 "scores": {m: scores[m][b] for m in scores}} for b in blocks},
        "ranking_spearman_per_seed": rankings, "ranking_spearman_on_mean_drop": rankings_on_mean,
        "retest_spearman": retest, "bootstrap_90": intervals, "score_seconds": score_seconds}

    # 2. proxies against the measured quality of candidates at the first stage
    if not args.skip_proxies and not args.damage_from:
        from diffusers_entprune.controller import combine_proxies
        from diffusers_entprune.proxies import score_candidates

        seed = args.seeds[0]
        order = sorted(range(num_layers), key=lambda b: (scores["ced"][b], b))
        generator = torch.Generator().manual_seed(seed)
        candidates = [sorted(order[:m]) for m in args.candidate_drops]
        for m in args.candidate_drops:
            for _ in range(args.random_candidates if m else 0):
                candidates.append(sorted(torch.randperm(num_layers, generator=generator)[:m].tolist()))
        b = config.proxy_batch_size
        zico_batches = [(latents[b * (i + 1): b * (i + 2)], labels[b * (i + 1): b * (i + 2)])
                        for i in range(config.zico_num_batches)]
        proxies = score_candidates(base, objective, candidates, (latents[:b], labels[:b]), zico_batches,
                                   seed=seed, zico_reduction=config.zico_reduction)
        combined = combine_proxies([p.ntk_condition_number for p in proxies], [p.zico for p in proxies])
        measured = [quality(c, seed) for c in candidates]
        fids = [m["fid"] for m in measured]
        result["proxy_spearman"] = {  # positive: the proxy's "better" goes with lower FID
            "ntk_condition_number": spearman([p.ntk_condition_number for p in proxies], fids),
            "zico": -spearman([p.zico for p in proxies], fids),
            "combined": -spearman(combined, fids),
            "blocks_dropped": spearman([len(c) for c in candidates], fids),
        }
        result["candidates"] = [{"blocks": c, "ntk_condition_number": p.ntk_condition_number, "zico": p.zico,
                                 "combined": s, **m} for c, p, s, m in zip(candidates, proxies, combined, measured)]
    result.update(minutes=round((time.time() - started) / 60, 1), date=time.strftime("%Y-%m-%d"),
                  torch=torch.__version__)
    path = args.results or os.path.join(ROOT, "bench", "results",
                                        f"score_validity{'-quick' if args.quick else ''}-{args.model_type}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print_tables(result, args, len(blocks), guidance)
    print(f"\nwrote {path} ({result['minutes']} min)")


def mean_std(values) -> str:
    import statistics

    if len(values) == 1:
        return f"{values[0]:+.2f}"
    return f"{statistics.fmean(values):+.2f} ± {statistics.stdev(values):.2f}"


def print_tables(result, args, num_blocks, guidance):
    seeds = len(args.seeds)
    print(f"Rankings against the measured drop after removing one block and fine-tuning {args.steps} steps "
          f"({num_blocks} blocks, {args.num_samples} samples, guidance {guidance}, {seeds} training seed(s)); "
          "Spearman rho per seed (mean ± std over seeds), and against the drop averaged over the seeds:\n")
    print("| ranking | rho, FID increase | rho, class-fidelity loss | 90% bootstrap over blocks (FID / class fid.) | "
          "rho on mean drop (FID / class fid.) | scoring time |\n|---|---|---|---|---|---|")

    def interval(pair):
        return "n/a" if pair[0] is None else f"[{pair[0]:+.2f}, {pair[1]:+.2f}]"

    for method, rho in result["ranking_spearman_per_seed"].items():
        on_mean, boot = result["ranking_spearman_on_mean_drop"][method], result["bootstrap_90"][method]
        print(f"| {method} | {mean_std(rho['fid'])} | {mean_std(rho['class_fidelity'])} | "
              f"{interval(boot['fid'])} / {interval(boot['class_fidelity'])} | "
              f"{on_mean['fid']:+.2f} / {on_mean['class_fidelity']:+.2f} | {result['score_seconds'][method]} s |")
    if result["retest_spearman"]["fid"]:
        retest = result["retest_spearman"]
        print(f"| *seed vs seed (test-retest)* | {mean_std(retest['fid'])} | {mean_std(retest['class_fidelity'])} "
              "| | |")
    if "proxy_spearman" in result:
        print(f"\nProxies against FID after pruning each of {len(result['candidates'])} candidates and fine-tuning "
              f"{args.steps} steps; Spearman rho (positive = the proxy orders candidates as their quality does):\n")
        print("| proxy | rho |\n|---|---|")
        for name, rho in result["proxy_spearman"].items():
            print(f"| {name} | {rho:+.2f} |")


if __name__ == "__main__":
    main()
