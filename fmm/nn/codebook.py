"""Vector quantisation: nearest-code lookup, the straight-through estimator, and a codebook
learned by exponential moving averages held as explicit state.

The codebook ``{"weight": [num_codes, dim]}`` is a param leaf that gradients never touch;
it is recomputed from EMA statistics ``{"cluster_size": [K], "embed_sum": [K, dim]}`` by
pure functions that return new tensors (no buffer is mutated in a forward pass, so
``vmap``, ``torch.compile`` and a repeated call all see the same inputs and outputs).

Example::

    book = init_codebook(64, 16, fmm.random.key(0))
    ema = init_ema_state(book)
    z_st, codes, z_q = quantize(book, z)                # z: [B, h, w, 16]
    ema = ema_update(ema, z, codes, decay=0.99)         # after the optimizer step
    book = {"weight": codebook_from_ema(ema)}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmm import checks, random

Params = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def init_codebook(
    num_codes: int, dim: int, key: torch.Tensor, *, std: float = 1.0, dtype=torch.float32
) -> Params:
    """``{"weight": [num_codes, dim]}`` drawn from ``N(0, std**2)``."""
    if num_codes < 1 or dim < 1:
        raise ValueError(f"init_codebook: num_codes and dim must be >= 1, got {num_codes}, {dim}")
    return {"weight": random.normal(key, (num_codes, dim), dtype=dtype) * std}


def init_ema_state(codebook: Params) -> State:
    """EMA statistics consistent with ``codebook``: every code counted once at its own value,
    so :func:`codebook_from_ema` of the fresh state (nearly) returns the codebook itself."""
    weight = codebook["weight"].detach()
    return {
        "cluster_size": torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device),
        "embed_sum": weight.clone(),
    }


def _check_z(weight: torch.Tensor, z: torch.Tensor, name: str) -> None:
    if not z.is_floating_point() or z.ndim < 1 or z.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{name}: z must be a float tensor [..., {weight.shape[1]}] for a codebook "
            f"{list(weight.shape)}, got {z.dtype} {list(z.shape)}"
        )


def nearest_codes(codebook: Params, z: torch.Tensor) -> torch.Tensor:
    """Index of the closest code (squared Euclidean distance) for each vector of ``z: [..., dim]``.

    Returns int64 ``[...]`` in ``[0, num_codes)``.
    """
    weight = codebook["weight"]
    _check_z(weight, z, "nearest_codes")
    flat = z.reshape(-1, z.shape[-1])
    # |z|^2 is the same for every code, so argmin needs only |e|^2 - 2 z.e.
    dist = (weight * weight).sum(-1)[None, :] - 2.0 * flat @ weight.T
    return dist.argmin(-1).reshape(z.shape[:-1])


def lookup(codebook: Params, codes: torch.Tensor) -> torch.Tensor:
    """The code vectors of ``codes: [...]`` (int64): ``[..., dim]``."""
    weight = codebook["weight"]
    dims = tuple(codes.shape) if isinstance(codes, torch.Tensor) else ("...",)
    checks.check_ids("codes", codes, dims, high=weight.shape[0])
    return F.embedding(codes, weight)


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Forward value ``z_q``, gradient the identity onto ``z`` (the straight-through estimator).

    ``z``, ``z_q``: the same shape. Nothing flows back into ``z_q``.
    """
    if z.shape != z_q.shape:
        raise ValueError(
            f"straight_through: z and z_q must have one shape, got {list(z.shape)} "
            f"and {list(z_q.shape)}"
        )
    return z + (z_q - z).detach()


def quantize(codebook: Params, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Snap ``z: [..., dim]`` to its nearest codes.

    Returns ``(z_st [..., dim], codes [...] int64, z_q [..., dim])``: ``z_q`` the chosen code
    vectors (detached from the codebook, which EMA updates learn), and ``z_st`` equal to
    ``z_q`` in value with the straight-through gradient onto ``z``.
    """
    codes = nearest_codes(codebook, z.detach())
    z_q = F.embedding(codes, codebook["weight"].detach())
    return straight_through(z, z_q), codes, z_q


def ema_update(state: State, z: torch.Tensor, codes: torch.Tensor, *, decay: float = 0.99) -> State:
    """New EMA statistics after seeing encoder outputs ``z: [..., dim]`` assigned to ``codes: [...]``.

    ``cluster_size <- decay * cluster_size + (1 - decay) * counts`` and likewise for the sum
    of the vectors assigned to each code. Pure: ``state`` is left untouched.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_update: decay must be in [0, 1), got {decay}")
    embed_sum = state["embed_sum"]
    _check_z(embed_sum, z, "ema_update")
    if codes.shape != z.shape[:-1]:
        raise ValueError(
            f"ema_update: codes must be z's shape without the last axis, got codes "
            f"{list(codes.shape)} and z {list(z.shape)}"
        )
    num_codes = embed_sum.shape[0]
    flat_z = z.detach().reshape(-1, z.shape[-1]).to(embed_sum.dtype)
    onehot = F.one_hot(codes.reshape(-1), num_codes).to(embed_sum.dtype)
    counts = onehot.sum(0)
    sums = onehot.T @ flat_z
    return {
        "cluster_size": torch.lerp(counts, state["cluster_size"], decay),
        "embed_sum": torch.lerp(sums, embed_sum, decay),
    }


def codebook_from_ema(state: State, *, eps: float = 1e-5) -> torch.Tensor:
    """Code vectors ``[K, dim]``: each code's EMA mean, with Laplace-smoothed cluster sizes so
    a code that received nothing does not divide by zero."""
    size = state["cluster_size"]
    total = size.sum()
    smoothed = (size + eps) / (total + size.shape[0] * eps) * total
    return state["embed_sum"] / smoothed[:, None]


def restart_dead_codes(
    state: State, z: torch.Tensor, key: torch.Tensor, *, threshold: float = 1e-3
) -> tuple[State, torch.Tensor]:
    """Move every code whose EMA cluster size fell below ``threshold`` onto a random vector
    of ``z: [..., dim]`` (a current encoder output), so no code stays unused for good.

    Returns ``(new_state, dead [K] bool)``; a restarted code starts with cluster size 1 at
    its new vector. Pure: ``state`` is left untouched; the draw depends only on ``key``.
    """
    embed_sum = state["embed_sum"]
    _check_z(embed_sum, z, "restart_dead_codes")
    flat_z = z.detach().reshape(-1, z.shape[-1]).to(embed_sum.dtype)
    if flat_z.shape[0] == 0:
        raise ValueError("restart_dead_codes: z holds no vectors to restart codes from")
    num_codes = embed_sum.shape[0]
    pick = (random.uniform(key, (num_codes,)) * flat_z.shape[0]).long()
    pick = pick.clamp(max=flat_z.shape[0] - 1).to(flat_z.device)
    dead = state["cluster_size"] < threshold
    one = torch.ones_like(state["cluster_size"])
    return {
        "cluster_size": torch.where(dead, one, state["cluster_size"]),
        "embed_sum": torch.where(dead[:, None], flat_z[pick], embed_sum),
    }, dead


def code_usage(codes: torch.Tensor, num_codes: int) -> dict[str, torch.Tensor]:
    """How evenly ``codes: [...]`` (int64) spread over the codebook.

    Returns 0-d tensors ``perplexity`` (``exp`` of the entropy of the code histogram: 1 when
    one code is used, ``num_codes`` when all are used equally) and ``fraction_used``.
    """
    checks.check_ids("codes", codes, tuple(codes.shape), high=num_codes)
    # A histogram of static size (bincount's length depends on the values), so a compiled
    # loss that reports usage stays one graph.
    flat = codes.reshape(-1)
    counts = torch.zeros(num_codes, dtype=torch.int64, device=codes.device)
    counts = counts.scatter_add(0, flat, torch.ones_like(flat))
    p = counts.double() / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum()
    return {"perplexity": entropy.exp().float(), "fraction_used": (counts > 0).float().mean()}
