"""Plots people would rather look at than read. Written with the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from train.checkpoint import atomic_write


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(
    losses: list[float] | dict[str, list[float]], path: str | Path, *, title: str = ""
) -> None:
    """Save a loss curve (raw and moving average) to ``path`` (PNG), atomically.

    ``losses``: one list, or ``{name: list}`` for several curves on one axis.
    """
    curves = {"loss": losses} if isinstance(losses, list) else losses
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, values in curves.items():
        steps = range(1, len(values) + 1)
        line = ax.plot(steps, values, alpha=0.25, linewidth=0.8)[0]
        ax.plot(
            steps, _smooth(values, max(1, len(values) // 50)), color=line.get_color(), label=name
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_class_accuracy(
    correct: torch.Tensor,
    labels: torch.Tensor,
    rows: list[str],
    cols: list[str],
    path: str | Path,
    *,
    unseen: torch.Tensor | None = None,
    title: str = "",
) -> None:
    """Save a ``rows x cols`` heatmap of per-class accuracy (PNG), atomically.

    ``correct``, ``labels``: ``[N]`` (label = row * len(cols) + col); ``unseen``: ``[N]`` bool,
    classes never seen in training get a box.
    """
    n = len(rows) * len(cols)
    hits = torch.zeros(n).index_add_(0, labels, correct.float())
    counts = torch.zeros(n).index_add_(0, labels, torch.ones(len(labels)))
    grid = (hits / counts.clamp_min(1)).reshape(len(rows), len(cols))
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 1.0 + 0.5 * len(rows)), dpi=110)
    image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(cols)), cols, rotation=30)
    ax.set_yticks(range(len(rows)), rows)
    for r in range(len(rows)):
        for c in range(len(cols)):
            value = grid[r, c].item()
            ax.text(
                c,
                r,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if value < 0.6 else "black",
            )
    if unseen is not None:
        for label in labels[unseen].unique().tolist():
            r, c = divmod(label, len(cols))
            ax.add_patch(
                plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(
        title
        + ("\n(red boxes: combinations never seen in training)" if unseen is not None else ""),
        fontsize=9,
    )
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_accuracy_bars(
    accuracy: dict[str, float], path: str | Path, *, title: str = "", most: int = 100
) -> None:
    """Save a horizontal bar chart of ``{class name: accuracy}``, worst class at the top
    (PNG), atomically. The figure grows with the classes (one readable row each); past
    ``most`` classes it shows the ``most // 2`` worst and best and says how many it left out.
    """
    ranked = sorted(accuracy.items(), key=lambda item: (item[1], item[0]))
    left_out = max(0, len(ranked) - most)
    if left_out:
        gap = (f"... {left_out} classes ...", float("nan"))
        ranked = [*ranked[: most // 2], gap, *ranked[len(ranked) - most // 2 :]]
    names = [name for name, _ in ranked]
    values = [value for _, value in ranked]
    width = max([len(n) for n in names] + [10])
    fig, ax = plt.subplots(figsize=(6.0 + 0.07 * width, 1.4 + 0.2 * len(names)), dpi=110)
    rows = range(len(names))
    ax.barh(rows, [0 if v != v else v for v in values], color="tab:blue")
    for r, value in zip(rows, values):
        if value == value:  # not the gap's NaN
            ax.text(min(value, 0.9) + 0.01, r, f"{value:.2f}", va="center", fontsize=7)
    ax.set_yticks(list(rows), names, fontsize=7)
    ax.set_ylim(len(names) - 0.5, -0.5)  # worst first, at the top
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
