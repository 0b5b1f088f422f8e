"""Speed in one run: sampling speedup of depth-pruned DiTs against the FLOPs ratio, and the cost of scoring.

For each config (the embedded base, a DiT-S/2-like transformer and the real DiT-XL/2-256 transformer config, the
last two with random weights and small batches), in a fresh process each:

- `bench/speedup.py`: transformer forward and full `DiTPipeline` call of the original and of copies with 25%, 50%
  and 75% of the blocks removed, interleaved rounds, medians, against the FLOPs ratio (the physical limit);
- `bench/ced_cost.py`: CED scoring with the prefix cache against naive block ablation, on the same draws (time
  ratio, and the check that both give the same scores);
- `bench/proxy_cost.py`: one adaptive decision's proxies (NTK condition number + ZiCo of three candidates).

It prints the markdown tables recorded in bench/RESULTS.md, writes every raw number to ``--output_json`` and plots
speedup against FLOPs ratio to bench/figures/speed.png.

    python bench/speed.py                                    # ~10 minutes on a 2-core CPU
    python bench/speed.py --configs embedded s2 --xl_proxies # XL proxies add ~8 minutes and 12 GiB on CPU
    python bench/speed.py --device cuda --dtype bfloat16     # on a GPU (CED and proxies stay float32)
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
CONFIGS = ("embedded", "s2", "xl")
SCORING_CONFIG = {"embedded": "tiny", "s2": "s2", "xl": "xl"}  # bench/ced_cost.py's names for the same sizes
CED_SAMPLES = {"embedded": (256, 64), "s2": (64, 16), "xl": (2, 2)}  # (N, batch): XL is minutes per sample on CPU
PROXY_BATCH = {"embedded": 8, "s2": 8, "xl": 2}
SPEEDUP_ARGS = {"embedded": ["--repeats", "7"], "s2": ["--repeats", "5"], "xl": ["--repeats", "3"]}


def run_json(command: list[str], env: dict) -> dict:
    """Run a bench script in a fresh process and return the JSON object on its last stdout line."""
    print("+ " + " ".join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in command), flush=True)
    out = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args) -> dict:
    env = {**os.environ, "PYTHONPATH": BENCH + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if args.num_threads:
        env["OMP_NUM_THREADS"] = str(args.num_threads)
    work = os.path.join(ROOT, "build", "speed")
    os.makedirs(work, exist_ok=True)
    results = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
               "device": args.device, "dtype": args.dtype, "configs": {}}
    for config in args.configs:
        entry = results["configs"][config] = {}
        speed_json = os.path.join(work, f"speedup-{config}.json")
        command = [os.path.join(BENCH, "speedup.py"), "--config", config, "--device", args.device,
                   "--dtype", args.dtype, "--output_json", speed_json, *SPEEDUP_ARGS[config]]
        if args.num_threads:
            command += ["--num_threads", str(args.num_threads)]
        print("+ " + " ".join(command), flush=True)
        subprocess.run([sys.executable, *command], check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        with open(speed_json) as f:
            entry["sampling"] = json.load(f)
        num_samples, batch = CED_SAMPLES[config]
        entry["ced"] = run_json([os.path.join(BENCH, "ced_cost.py"), "--config", SCORING_CONFIG[config],
                                 "--num_samples", str(num_samples), "--batch_size", str(batch)], env)
        if config != "xl" or args.xl_proxies:
            entry["proxies"] = run_json([os.path.join(BENCH, "proxy_cost.py"), "--config", SCORING_CONFIG[config],
                                         "--proxy_batch_size", str(PROXY_BATCH[config]), "--single"], env)
    return results


def tables(results: dict) -> str:
    lines = [f"Date {results['date']}, torch {results['torch']}, {results['cpu_count']} CPUs, {results['device']} "
             f"{results['dtype']}.", "",
             "| config | blocks kept | FLOPs ratio (forward) | forward speedup | FLOPs ratio (call) "
             "| pipeline-call speedup | original call |", "|---|---|---|---|---|---|---|"]
    for config, entry in results["configs"].items():
        sampling = entry["sampling"]
        args = sampling["args"]
        num_blocks = sampling["rows"][0]["kept_blocks"]
        for row in sampling["rows"]:
            lines.append(f"| {config} (batch {args['batch_size']}, {args['num_inference_steps']} steps) | "
                         f"{row['kept_blocks']}/{num_blocks} | {row['forward_flops_ratio']:.2f} | "
                         f"{row['forward_speedup']:.2f} | {row['sampling_flops_ratio']:.2f} | "
                         f"{row['sampling_speedup']:.2f} | "
                         + (f"{row['sampling_median_s']:.3g} s |" if row is sampling["rows"][0] else "|"))
    lines += ["", "| config | CED N | prefix-cached | naive | ratio | same scores | proxies (3 candidates) "
              "| proxy peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for config, entry in results["configs"].items():
        ced, proxies = entry["ced"], entry.get("proxies")
        same = ced["max_relative_score_difference"] == 0 and ced["same_ranking"]
        proxy_cells = (f"{proxies['seconds']} s (batch {proxies['proxy_batch_size']}) | {proxies['peak_rss_gib']} GiB"
                       if proxies else "not run (`--xl_proxies`) | -")
        lines.append(f"| {config} | {ced['num_samples']} | {ced['cached_seconds']:.2f} s | "
                     f"{ced['naive_seconds']:.2f} s | {ced['time_ratio_cached_over_naive']} | "
                     f"{'yes' if same else 'NO'} | {proxy_cells} |")
    return "\n".join(lines)


def plot(results: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    limit = 1.0
    for config, entry in results["configs"].items():
        rows = entry["sampling"]["rows"]
        for kind, marker in (("forward", "o"), ("sampling", "s")):
            x = [row[f"{kind}_flops_ratio"] for row in rows]
            y = [row[f"{kind}_speedup"] for row in rows]
            limit = max(limit, *x, *y)
            ax.plot(x, y, marker=marker, label=f"{config}: {'forward' if kind == 'forward' else 'pipeline call'}")
    ax.plot([1, limit], [1, limit], color="grey", linestyle=":", label="speedup = FLOPs ratio")
    ax.set_xlabel("FLOPs ratio original / pruned")
    ax.set_ylabel("measured speedup")
    ax.set_title(f"Depth-pruned DiTs ({results['device']}, {results['date']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--xl_proxies", action="store_true", help="Also time XL's proxies (slow and large on CPU).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--num_threads", type=int, default=None, help="Threads per measuring process.")
    parser.add_argument("--output_json", default=os.path.join(ROOT, "build", "speed", "speed.json"))
    parser.add_argument("--figure", default=os.path.join(BENCH, "figures", "speed.png"))
    args = parser.parse_args()
    results = measure(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump(results, f, indent=2)
    print(tables(results))
    print(f"wrote {args.output_json} and {plot(results, args.figure)}")


if __name__ == "__main__":
    main()
