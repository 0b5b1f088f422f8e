"""Plots a person would rather look at than read: block scores, and CED over timestep buckets."""

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


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
