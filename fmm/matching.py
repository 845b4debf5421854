"""Exact minimum-cost bipartite matching (the Hungarian step of DETR-style training).

:func:`linear_sum_assignment` is the shortest-augmenting-path algorithm with dual
potentials (Kuhn-Munkres in Jonker-Volgenant's form), ``O(n^2 m)`` for ``n <= m``, in plain
Python over float64 lists. Why our own and not scipy's: queries x targets are small (100 x
a few per image, so a batch costs milliseconds of host time), fmm keeps scipy out of its
runtime dependencies, and ``tests/fmm/test_matching.py`` holds it equal to brute force
over all permutations and to ``scipy.optimize.linear_sum_assignment``.

:func:`match` runs it per example on the host as one opaque op (``fmm::hungarian_match``,
a ``torch.library`` custom op): a compiled train step calls it as a single node whose
inside dynamo never traces, so the step stays one graph while the solver runs eagerly on
the CPU. Its output is integer indices: no gradient flows through a matching.

Example::

    rows, cols = linear_sum_assignment(torch.tensor([[4.0, 1.0], [2.0, 0.0], [3.0, 2.0]]))
    # rows [0, 1], cols [1, 0]: total 1 + 2
"""

from __future__ import annotations

import math

import torch


def linear_sum_assignment(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignment of rows to distinct columns of ``cost: [n, m]`` with the least total
    cost, ``min(n, m)`` pairs, as ``scipy.optimize.linear_sum_assignment``: ``(rows, cols)``,
    two int64 ``[min(n, m)]`` tensors with ``rows`` ascending. Finite costs only.
    """
    if cost.ndim != 2:
        raise ValueError(f"linear_sum_assignment: cost must be [n, m], got {list(cost.shape)}")
    c = cost.detach().to("cpu", torch.float64)
    if not torch.isfinite(c).all():
        raise ValueError("linear_sum_assignment: cost has inf or nan entries")
    transposed = c.shape[0] > c.shape[1]
    rows_of = _assign_rows((c.T if transposed else c).tolist())  # column of each row
    pairs = [(col, row) if transposed else (row, col) for row, col in enumerate(rows_of)]
    pairs.sort()
    rows = torch.tensor([p[0] for p in pairs], dtype=torch.int64)
    cols = torch.tensor([p[1] for p in pairs], dtype=torch.int64)
    return rows, cols


def _assign_rows(c: list[list[float]]) -> list[int]:
    """Column of each row for ``n <= m`` rows: rows enter one at a time, each along the
    shortest augmenting path under reduced costs ``c[i][j] - u[i] - v[j]`` (kept >= 0)."""
    n = len(c)
    m = len(c[0]) if n else 0
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner = [0] * (m + 1)  # owner[j]: the row (1-based) holding column j; column 0 is a sentinel
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        dist, back, done = [math.inf] * (m + 1), [0] * (m + 1), [False] * (m + 1)
        while owner[j0]:
            done[j0] = True
            row, ui = c[owner[j0] - 1], u[owner[j0]]
            delta, j1 = math.inf, 0
            for j in range(1, m + 1):
                if not done[j]:
                    reduced = row[j - 1] - ui - v[j]
                    if reduced < dist[j]:
                        dist[j], back[j] = reduced, j0
                    if dist[j] < delta:
                        delta, j1 = dist[j], j
            for j in range(m + 1):
                if done[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    dist[j] -= delta
            j0 = j1
        while j0:  # flip the path: each column on it passes to the row before it
            j1 = back[j0]
            owner[j0] = owner[j1]
            j0 = j1
    col_of = [0] * n
    for j in range(1, m + 1):
        if owner[j]:
            col_of[owner[j] - 1] = j - 1
    return col_of


@torch.library.custom_op("fmm::hungarian_match", mutates_args=())
def _hungarian_match(cost: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    out = torch.full(valid.shape, -1, dtype=torch.int64)
    cost, valid = cost.cpu(), valid.cpu()
    for b in range(cost.shape[0]):
        targets = valid[b].nonzero().flatten()
        if targets.numel() == 0:
            continue
        queries, picked = linear_sum_assignment(cost[b][:, targets])
        out[b, targets[picked]] = queries
    return out.to(valid.device)


@_hungarian_match.register_fake
def _(cost: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return valid.new_empty(valid.shape, dtype=torch.int64)


def match(cost: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """For each target, the query of the least-cost one-to-one matching of its example.

    ``cost: [B, Q, T]`` (query ``q`` taking target ``t``), ``valid: [B, T]`` bool (False =
    a padding target, never matched; default all real). Returns ``query_of: [B, T]``
    int64, -1 for padding targets (and for targets beyond the ``Q`` matched when an
    example has more real targets than queries). Runs on the host, outside autograd.

    Example: ``query_of = match(cost_matrix, batch["box_valid"])``.
    """
    if cost.ndim != 3:
        raise ValueError(f"match: cost must be [batch, queries, targets], got {list(cost.shape)}")
    if valid is None:
        valid = torch.ones(cost.shape[::2], dtype=torch.bool, device=cost.device)
    if valid.dtype != torch.bool or valid.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(
            f"match: valid must be bool [{cost.shape[0]}, {cost.shape[2]}] for cost "
            f"{list(cost.shape)}, got {valid.dtype} {list(valid.shape)}"
        )
    return _hungarian_match(cost.detach(), valid)
