"""Plots a person would rather look at than read: block scores, and CED over timestep buckets."""

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def sample_grid(images: list, rows: int, min_width: int = 768):
    """A grid of PIL samples (diffusers' `make_image_grid`), enlarged without smoothing to at least ``min_width``
    pixels: small models make small images that are hard to judge at their own size."""
    from diffusers.utils import make_image_grid

    grid = make_image_grid(images, rows=rows, cols=len(images) // rows)
    scale = max(1, min_width // grid.width)
    return grid.resize((grid.width * scale, grid.height * scale), resample=0)  # 0 = nearest neighbour


def plot_scores(scores: dict, path: str) -> str:
    """Bar chart of one score per block (least important blocks highlighted) and, for CED, a heatmap of the
    per-timestep-bucket scores. ``scores`` is what ``ImportanceResult.to_dict()`` returns."""
    blocks, values, ranking = scores["block_indices"], scores["scores"], scores["ranking"]
    buckets = scores.get("bucket_scores")
    rows = 2 if buckets else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(6, 0.35 * len(blocks) + 2), 3.2 * rows), squeeze=False)
    ax = axes[0][0]
    lowest = set(ranking[: max(1, len(ranking) // 4)])
    ax.bar([str(b) for b in blocks], values, color=["tab:red" if b in lowest else "tab:blue" for b in blocks])
    ax.set_xlabel("block (original index)")
    ax.set_ylabel(scores["method"])
    ax.set_title(f"{scores['method']} per block (red: least important quarter), N={scores.get('num_samples')}")
    if buckets:
        ax = axes[1][0]
        matrix = [[row[k] for row in buckets] for k in range(len(buckets[0]))]  # bucket x block
        image = ax.imshow(matrix, aspect="auto", origin="lower", cmap="viridis")
        ax.set_xticks(range(len(blocks)), [str(b) for b in blocks])
        low, high = scores["options"].get("timestep_range", (0.0, 1.0))
        edges = [low + (high - low) * k / len(matrix) for k in range(len(matrix) + 1)]
        ax.set_yticks(range(len(matrix)), [f"{edges[k]:.2f}-{edges[k + 1]:.2f}" for k in range(len(matrix))])
        ax.set_xlabel("block (original index)")
        ax.set_ylabel("t / T")
        ax.set_title("CED per timestep bucket")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stage_scores(stages: list[dict], original_num_layers: int, path: str) -> str:
    """CED of every block at each pruning stage (one line per stage), the blocks dropped at that stage crossed.

    ``stages`` are the decisions of `AdaptivePruningController` as dicts (``StageDecision.to_dict()``).
    """
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * original_num_layers + 2), 3.6))
    colors = plt.get_cmap("viridis")
    for k, stage in enumerate(stages):
        scores = {int(b): v for b, v in stage["ced_scores"].items()}
        if not scores:  # the target was met earlier: nothing ranked at this stage
            continue
        blocks = sorted(scores)
        color = colors(k / max(1, len(stages) - 1))
        ax.plot(blocks, [scores[b] for b in blocks], "o-", color=color, markersize=4,
                label=f"stage {stage['stage']} (step {stage['step']}): -{len(stage['pruned_blocks'])}")
        dropped = [b for b in stage["pruned_blocks"] if b in scores]
        ax.plot(dropped, [scores[b] for b in dropped], "x", color="tab:red", markersize=10, markeredgewidth=2)
    ax.set_xticks(range(original_num_layers))
    ax.set_xlabel("block (original index)")
    ax.set_ylabel("CED")
    values = [v for stage in stages for v in stage["ced_scores"].values()]
    if values and min(values) > 0:  # CED spans orders of magnitude between blocks
        ax.set_yscale("log")
    elif values:  # signed CED (or a zero): symmetric log around zero
        ax.set_yscale("symlog", linthresh=max(1e-6, min((abs(v) for v in values if v), default=1.0)))
    ax.set_title("CED per block at each pruning stage (red x: dropped at that stage)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
