"""Linear probes: how much of a label a frozen encoder's features hold, read by one linear
layer.

A probe is multinomial logistic regression on standardised features: each feature is
centred and scaled by the probe's training set (as MAE's probe puts a non-affine batch norm
before its head), then a ``[D, classes]`` weight and a bias are fitted from zeros by
full-batch AdamW for a fixed number of steps. Nothing is drawn at random, so a probe is a
function of its inputs and its budget, and two encoders probed with the same budget are
compared on equal terms.

A :class:`Task` names the label to read and which examples train and which test the probe.
:func:`compare` probes the features of a trained encoder and of the same encoder at random
init on the same tasks, and reports the gain in points; the self-supervised recipes
(``python -m train mae``, ``data2vec``) call it on their held-out splits.

Example::

    task = Task(labels=shape, train=seen, test=~seen, classes=6)
    probe = fit(features[seen], shape[seen], classes=6)
    acc = accuracy(probe, features[~seen], shape[~seen])
    report = compare({"shape": task}, trained=f, random_init=f0, headline=("shape",))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from fmm import optim


class Task(NamedTuple):
    """One probe: ``labels [N]`` int64 in ``[0, classes)``, and ``train [N]`` / ``test [N]``
    bool masks over the same ``N`` examples saying which fit the probe and which score it."""

    labels: torch.Tensor
    train: torch.Tensor
    test: torch.Tensor
    classes: int


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A probe's fixed optimisation budget: full-batch AdamW ``steps`` at ``lr`` with
    ``weight_decay`` on the weight (not the bias). The defaults fit a few thousand examples
    of a few hundred features to convergence in well under a second on a CPU."""

    steps: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-3

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not self.lr > 0 or not self.weight_decay >= 0:
            raise ValueError(
                f"lr must be > 0 and weight_decay >= 0, got {self.lr!r}, {self.weight_decay!r}"
            )


def _check(features: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"features must be [N, D] and labels [N], got {tuple(features.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if len(labels) == 0:
        raise ValueError("labels is empty: a probe needs examples to fit and to score")
    if labels.min() < 0 or labels.max() >= classes:
        raise ValueError(
            f"labels must lie in [0, {classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )


def fit(
    features: torch.Tensor, labels: torch.Tensor, *, classes: int, budget: Budget = Budget()
) -> dict[str, torch.Tensor]:
    """Fit a linear probe on ``features [N, D]`` (float, detached) for ``labels [N]``.

    Returns the probe ``{"mean" [D], "std" [D], "weight" [D, classes], "bias" [classes]}``,
    float32 on the features' device.
    """
    _check(features, labels, classes)
    x = features.detach().float()
    mean, std = x.mean(0), x.std(0, correction=0).clamp_min(1e-6)
    x = (x - mean) / std
    params = {
        "weight": x.new_zeros(x.shape[1], classes),
        "bias": x.new_zeros(classes),
    }
    opt = optim.adamw(budget.lr, weight_decay=budget.weight_decay)
    state = opt.init(params)
    y = labels.to(x.device)
    for _ in range(budget.steps):
        with torch.enable_grad():  # callers evaluate under no_grad
            leaves = {k: v.requires_grad_() for k, v in params.items()}
            value = torch.nn.functional.cross_entropy(x @ leaves["weight"] + leaves["bias"], y)
            grads = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()))))
        updates, state = opt.update(grads, state, params)
        params = {k: v.detach() for k, v in optim.apply_updates(params, updates).items()}
    return {"mean": mean, "std": std, **params}


def predict(probe: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Class ids ``[N]`` the probe reads from ``features [N, D]``."""
    x = (features.detach().float() - probe["mean"]) / probe["std"]
    return (x @ probe["weight"] + probe["bias"]).argmax(-1)


def accuracy(probe: dict[str, torch.Tensor], features: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of ``labels [N]`` the probe reads right from ``features [N, D]``."""
    return (predict(probe, features).cpu() == labels.cpu()).float().mean().item()


def score(features: torch.Tensor, task: Task, *, budget: Budget = Budget()) -> float:
    """Fit on ``task.train``'s rows of ``features [N, D]``, score on ``task.test``'s."""
    train, test = task.train.to(features.device), task.test.to(features.device)
    labels = task.labels.to(features.device)
    probe = fit(features[train], labels[train], classes=task.classes, budget=budget)
    return accuracy(probe, features[test], labels[test])


def compare(
    tasks: dict[str, Task],
    *,
    trained: torch.Tensor,
    random_init: torch.Tensor,
    headline: tuple[str, ...],
    budget: Budget = Budget(),
) -> dict[str, float]:
    """Probe a trained encoder's ``trained [N, D]`` and the same encoder's ``random_init
    [N, D]`` features of the same ``N`` examples on every task.

    Returns ``probe_<task>``, ``probe_<task>_random_init`` and ``probe_<task>_gain_points``
    (100 x their difference) per task, and ``probe_accuracy`` /
    ``probe_accuracy_random_init``: the mean over the ``headline`` tasks, with
    ``probe_gain_points`` = 100 x their difference. Accuracies are rounded to 4 places,
    gains to 2.

    Example: ``compare(tasks, trained=f, random_init=f0, headline=("shape_heldout",))``.
    """
    unknown = [name for name in headline if name not in tasks]
    if not headline or unknown:
        raise ValueError(f"headline must name some of the tasks {sorted(tasks)}, got {headline}")
    out: dict[str, float] = {}
    gains: dict[str, float] = {}
    for name, task in tasks.items():
        out[f"probe_{name}"] = score(trained, task, budget=budget)
        out[f"probe_{name}_random_init"] = score(random_init, task, budget=budget)
        gains[f"probe_{name}_gain_points"] = 100 * (
            out[f"probe_{name}"] - out[f"probe_{name}_random_init"]
        )
    mean = sum(out[f"probe_{n}"] for n in headline) / len(headline)
    mean_random = sum(out[f"probe_{n}_random_init"] for n in headline) / len(headline)
    out = {k: round(v, 4) for k, v in out.items()} | {k: round(v, 2) for k, v in gains.items()}
    return {
        "probe_accuracy": round(mean, 4),
        "probe_accuracy_random_init": round(mean_random, 4),
        "probe_gain_points": round(100 * (mean - mean_random), 2),
        **out,
    }
