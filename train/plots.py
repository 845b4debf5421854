"""Plots people would rather look at than read. Written with the non-interactive Agg backend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

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
