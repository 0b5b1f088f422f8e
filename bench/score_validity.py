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

    python bench/score_validity.py --quick      # 4 single blocks and 6 candidates, 300 samples (minutes)
    python bench/score_validity.py              # all 12 blocks, 12 candidates, 1000 samples

Results go to bench/results/score_validity[-quick].json and are printed as markdown.
"""

import argparse
import contextlib
import io
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import ROOT, Evaluator, load_script, reset_accelerate  # noqa: E402


def spearman(x, y) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def prune_and_fine_tune(script, model_type: str, blocks: list[int], steps: int, seed: int, work: str):
    """The embedded base without ``blocks`` (original indices), fine-tuned ``steps`` steps; its pipeline."""
    from diffusers_entprune.cli import main as entprune
    from diffusers_entprune.model_types import pipeline_class

    name = "-".join(map(str, blocks)) or "none"
    pruned, tuned = os.path.join(work, f"pruned-{name}"), os.path.join(work, f"tuned-{name}-s{seed}")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if blocks:
            entprune(["prune", "--model_type", model_type, "--prune_blocks", *map(str, blocks),
                      "--num_samples_per_row", "0", "--output_dir", pruned, "--overwrite_output_dir"])
        source = pruned if blocks else None
        argv = ["--fine_tune_only", "--max_train_steps", str(steps), "--seed", str(seed), "--output_dir", tuned,
                "--overwrite_output_dir", "--validation_steps", "0", "--speed_batch_size", "0",
                "--checkpointing_steps", str(10 * steps), "--learning_rate", "1e-3"]
        argv += ["--pretrained_model_name_or_path", source] if source else ["--model_type", model_type]
        reset_accelerate()
        script.main(argv)
        reset_accelerate()
    return pipeline_class(model_type).from_pretrained(tuned)


@torch.no_grad()
def base_scores_and_pool(script, model_type: str, seed: int):
    """Every ranking's scores on the base, the base itself, its objective and the script's fixed pool."""
    from diffusers_entprune.data import vae_scale_factor
    from diffusers_entprune.embedded import load_digits_dataset
    from diffusers_entprune.importance import RANKING_METHODS, CEDOptions, score_blocks
    from diffusers_entprune.model_types import objective_for, pipeline_class, resolve_source
    from diffusers_entprune.models import EntPrunedTransformer2DModel

    args = script.parse_args(["--model_type", model_type, "--seed", str(seed)])
    _, source, _ = resolve_source(None, model_type)
    transformer = EntPrunedTransformer2DModel.from_pretrained(source, subfolder="transformer").eval()
    pipe = pipeline_class(model_type).from_pretrained(source, transformer=transformer)
    objective = objective_for(model_type, transformer.config, pipe.scheduler)
    resolution = transformer.config.sample_size * vae_scale_factor(pipe.vae)
    latents, labels = script.build_ced_pool(load_digits_dataset("downstream", split="train"), pipe.vae, resolution,
                                            args, transformer.config.num_embeds_ada_norm)
    scores = {}
    for method in RANKING_METHODS:
        with torch.enable_grad():
            result = score_blocks(method, transformer, objective,
                                  zip(latents.split(args.ced_batch_size), labels.split(args.ced_batch_size)),
                                  args.ced_num_samples, seed=seed, ced_options=CEDOptions(variance=args.ced_variance))
        scores[method] = dict(zip(result.block_indices, result.scores))
    return scores, transformer, objective, (latents, labels), args


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model_type", choices=("dit", "sit"), default="dit")
    parser.add_argument("--steps", type=int, default=100, help="Fine-tuning steps after each removal.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_samples", type=int, default=None)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--sample_seed", type=int, default=1234)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[4.0])
    parser.add_argument("--candidate_drops", type=int, nargs="+", default=None,
                        help="Candidate sizes m (blocks dropped) at the first stage boundary.")
    parser.add_argument("--random_candidates", type=int, default=1, help="Random candidates per size m > 0.")
    args = parser.parse_args()
    args.num_samples = args.num_samples or (300 if args.quick else 1000)
    args.candidate_drops = args.candidate_drops or ([0, 2, 4] if args.quick else [0, 1, 2, 3, 4, 6])
    started = time.time()
    script = load_script()
    evaluate = Evaluator(args)
    work = os.path.join(ROOT, "build", "score_validity", args.model_type)
    scores, base, objective, (latents, labels), script_args = base_scores_and_pool(script, args.model_type,
                                                                                   args.seed)
    num_layers = base.original_num_layers
    guidance = args.guidance_scales[0]

    def quality(blocks):
        pipe = prune_and_fine_tune(script, args.model_type, blocks, args.steps, args.seed, work)
        return evaluate(pipe, guidance)

    # 1. rankings against the measured cost of removing each block
    reference = quality([])
    blocks = list(range(num_layers)) if not args.quick else [0, 3, 7, 11]
    single = {b: quality([b]) for b in blocks}
    drops = {b: {"fid": single[b]["fid"] - reference["fid"],
                 "class_fidelity": reference["class_fidelity"] - single[b]["class_fidelity"]} for b in blocks}
    rankings = {method: {metric: spearman([scores[method][b] for b in blocks], [drops[b][metric] for b in blocks])
                         for metric in ("fid", "class_fidelity")} for method in scores}

    # 2. proxies against the measured quality of candidates at the first stage
    from diffusers_entprune.controller import combine_proxies
    from diffusers_entprune.proxies import score_candidates

    order = sorted(range(num_layers), key=lambda b: (scores["ced"][b], b))
    generator = torch.Generator().manual_seed(args.seed)
    candidates = [sorted(order[:m]) for m in args.candidate_drops]
    for m in args.candidate_drops:
        for _ in range(args.random_candidates if m else 0):
            candidates.append(sorted(torch.randperm(num_layers, generator=generator)[:m].tolist()))
    b = script_args.proxy_batch_size
    zico_batches = [(latents[b * (i + 1): b * (i + 2)], labels[b * (i + 1): b * (i + 2)])
                    for i in range(script_args.zico_num_batches)]
    proxies = score_candidates(base, objective, candidates, (latents[:b], labels[:b]), zico_batches,
                               seed=args.seed, zico_reduction=script_args.zico_reduction)
    combined = combine_proxies([p.ntk_condition_number for p in proxies], [p.zico for p in proxies])
    measured = [quality(c) for c in candidates]
    fids = [m["fid"] for m in measured]
    proxy_rho = {  # positive: the proxy's "better" goes with lower FID
        "ntk_condition_number": spearman([p.ntk_condition_number for p in proxies], fids),
        "zico": -spearman([p.zico for p in proxies], fids),
        "combined": -spearman(combined, fids),
        "blocks_dropped": spearman([len(c) for c in candidates], fids),
    }

    result = {"settings": vars(args), "reference_fine_tuned": reference, "single_block": {
        str(b): {**single[b], "drop": drops[b], "scores": {m: scores[m][b] for m in scores}} for b in blocks},
        "ranking_spearman": rankings,
        "candidates": [{"blocks": c, "ntk_condition_number": p.ntk_condition_number, "zico": p.zico,
                        "combined": s, **m} for c, p, s, m in zip(candidates, proxies, combined, measured)],
        "proxy_spearman": proxy_rho, "minutes": round((time.time() - started) / 60, 1),
        "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__}
    path = os.path.join(ROOT, "bench", "results", f"score_validity{'-quick' if args.quick else ''}-{args.model_type}"
                        ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)

    print(f"Rankings against the measured drop after removing one block and fine-tuning {args.steps} steps "
          f"({len(blocks)} blocks, {args.num_samples} samples, guidance {guidance}); Spearman rho:\n")
    print("| ranking | rho with FID increase | rho with class-fidelity loss |\n|---|---|---|")
    for method, rho in rankings.items():
        print(f"| {method} | {rho['fid']:+.2f} | {rho['class_fidelity']:+.2f} |")
    print(f"\nProxies against FID after pruning each of {len(candidates)} candidates and fine-tuning {args.steps} "
          "steps; Spearman rho (positive = the proxy orders candidates as their quality does):\n")
    print("| proxy | rho |\n|---|---|")
    for name, rho in proxy_rho.items():
        print(f"| {name} | {rho:+.2f} |")
    print(f"\nwrote {path} ({result['minutes']} min)")


if __name__ == "__main__":
    main()
