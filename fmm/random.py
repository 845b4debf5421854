"""Explicit, counter-based random numbers.

A *key* is an ``int64`` tensor of shape ``[2]`` holding two 32-bit words. Every draw is a
pure function of ``(key, element index)`` computed with integer torch ops, so the same key
gives the same numbers eagerly, under ``torch.compile``, under ``torch.func.vmap`` (map over
a batch of keys ``[n, 2]``) and in an activation-checkpoint recompute. No global RNG and
no ``torch.Generator`` is ever consulted.

Example::

    k = fmm.random.key(0)
    k_init, k_drop = fmm.random.split(k)
    w = fmm.random.normal(fmm.random.fold_in(k_init, "proj.weight"), (5, 3)) * 0.02

Keys live on a device; draws land on the key's device (``meta`` included, which lets a
model's shapes be built without memory and materialised later with the same values).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

__all__ = [
    "bernoulli",
    "drop_path",
    "dropout",
    "fold_in",
    "key",
    "normal",
    "random_masking",
    "split",
    "uniform",
]

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for 32-bit words held in int64, with no int64 overflow.

    Signed overflow is undefined in the C++ that inductor emits, so the 32x32-bit product
    is built from two 32x16-bit halves that each fit in 48 bits.
    """
    if c < 2**31:
        # The product stays below 2**63. One use of x, not two: inductor re-traces each
        # use through the whole inlined hash, so uses multiply its codegen time.
        return (x * c) & _MASK32
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash (the "lowbias32" finaliser): every input bit flips ~half."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _check_key(k: torch.Tensor, name: str = "key") -> None:
    if not isinstance(k, torch.Tensor) or k.dtype != torch.int64 or k.shape[-1:] != (2,):
        shape = tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__
        raise TypeError(
            f"{name} must be an int64 tensor of shape [2] made by fmm.random.key, got {shape}"
        )


def _bits(k: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """32 random bits per element of ``counter`` (int64, values < 2**32), keyed by ``k``."""
    return _mix(_mix(counter ^ k[..., 0]) ^ k[..., 1])


def key(seed: int) -> torch.Tensor:
    """A key from an integer seed. Returns ``int64 [2]`` on the CPU.

    Example: ``k = key(0).to("cuda")``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    words = torch.tensor([seed & _MASK32, (seed >> 32) & _MASK32], dtype=torch.int64)
    return torch.stack([_mix(words[0] ^ 0x9E3779B9), _mix(words[1] ^ _mix(words[0]))])


@torch._dynamo.assume_constant_result
def _string_words(data: str) -> list[int]:
    # crc32 of two salted copies: stable across processes, unlike Python's hash(). Dynamo
    # cannot trace zlib, so a compiled caller evaluates this once at trace time (the name
    # is a constant of the graph) instead of breaking the graph.
    raw = data.encode()
    return [zlib.crc32(raw), zlib.crc32(b"fmm:" + raw)]


def _data_words(data: int | str | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(data, str):
        return torch.tensor(_string_words(data), dtype=torch.int64, device=device)
    if isinstance(data, torch.Tensor):
        if data.dtype.is_floating_point or data.dtype.is_complex:
            raise TypeError(f"fold_in data tensor must be an integer tensor, got {data.dtype}")
        d = data.to(torch.int64)
        return torch.stack([d & _MASK32, (d >> 32) & _MASK32], dim=-1)
    if isinstance(data, int) and not isinstance(data, bool):
        return torch.tensor(
            [data & _MASK32, (data >> 32) & _MASK32], dtype=torch.int64, device=device
        )
    raise TypeError(
        f"fold_in data must be an int, str or integer tensor, got {type(data).__name__}"
    )


def _meta_keys(batch_shape: Sequence[int]) -> torch.Tensor:
    # A meta key has no values to hash, only a shape. Deriving one through the ~70 integer
    # ops of the hash costs ~5 ms on meta (their meta kernels are Python refs), which made
    # meta init of a large preset take seconds; the shape alone is all a meta key carries.
    return torch.empty((*batch_shape, 2), dtype=torch.int64, device="meta")


def fold_in(k: torch.Tensor, data: int | str | torch.Tensor) -> torch.Tensor:
    """A new key derived from ``k`` and ``data`` (an int, a name, or a 0-d integer tensor).

    Folding in a parameter's dotted path gives every leaf its own key, so any subtree can be
    (re)initialised alone with the same values. Folding in a step-count tensor gives a fresh
    dropout key per step without recompiling.

    Example: ``fold_in(key(0), "blocks.3.attn.qkv.weight")``.
    """
    _check_key(k)
    d = _data_words(data, k.device)
    if k.device.type == "meta":
        return _meta_keys(torch.broadcast_shapes(k.shape[:-1], d.shape[:-1]))
    a = _mix(k[..., 0] ^ _mix(d[..., 0] ^ 0x85EBCA6B))
    b = _mix(k[..., 1] ^ _mix(d[..., 1] ^ a))
    return torch.stack([a, _mix(a ^ b)], dim=-1)


def split(k: torch.Tensor, num: int = 2) -> torch.Tensor:
    """``num`` independent keys from ``k``, as ``int64 [num, 2]``; unpack with ``a, b = split(k)``."""
    _check_key(k)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if k.device.type == "meta":
        return _meta_keys((*k.shape[:-1], num))
    counter = torch.arange(num, dtype=torch.int64, device=k.device)
    a = _bits(k.unsqueeze(-2), counter)
    b = _bits(k.unsqueeze(-2), counter ^ 0x5BD1E995)
    return torch.stack([a, b], dim=-1)


def _meta_draw(k: torch.Tensor, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor | None:
    # A meta key has no values to hash: hand back the shape alone, fast.
    return (
        torch.empty(tuple(shape), dtype=dtype, device="meta") if k.device.type == "meta" else None
    )


def _counters(shape: Sequence[int], device: torch.device) -> torch.Tensor:
    numel = math.prod(shape)
    if numel > _MASK32:
        raise ValueError(f"cannot draw more than 2**32 numbers from one key, shape {tuple(shape)}")
    return torch.arange(numel, dtype=torch.int64, device=device).reshape(tuple(shape))


def uniform(
    k: torch.Tensor,
    shape: Sequence[int] = (),
    *,
    dtype: torch.dtype = torch.float32,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Uniform numbers in ``[low, high)`` of the given ``shape``.

    Example: ``uniform(key(0), (2, 3))`` -> ``[2, 3]`` float32.
    """
    _check_key(k)
    if (meta := _meta_draw(k, shape, dtype)) is not None:
        return meta
    bits = _bits(k, _counters(shape, k.device))
    if dtype == torch.float64:
        # 32 bits are not enough to fill a double's 53-bit mantissa: draw a second word.
        extra = _bits(k, _counters(shape, k.device) ^ 0x27D4EB2F)
        u = ((bits >> 5).double() * 67108864.0 + (extra >> 6).double()) / 9007199254740992.0
    else:
        u = (bits >> 8).float() * (1.0 / 16777216.0)
    u = u.to(dtype)
    return u * (high - low) + low if (low, high) != (0.0, 1.0) else u


def normal(
    k: torch.Tensor, shape: Sequence[int] = (), *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal numbers of the given ``shape`` (inverse-CDF of a uniform).

    Example: ``normal(key(0), (768, 512)) * 0.02``.
    """
    _check_key(k)
    if (meta := _meta_draw(k, shape, dtype)) is not None:
        return meta
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return _normal_from_bits(_bits(k, _counters(shape, k.device)), work).to(dtype)


def _normal_from_bits(bits: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """32-bit words (int64) -> standard normals in ``work`` precision, always finite."""
    # The centre of 24-bit bucket v, mapped to (-1, 1), is (2v + 1 - 2**24) / 2**24. The
    # numerator is formed in integers, where it is exact (|n| < 2**24 fits a float32
    # mantissa): forming u = (v + 0.5) / 2**24 in float32 first rounds the top bucket to
    # u == 1 and erfinv(1) == inf.
    centred = 2 * (bits >> 8) + (1 - 16777216)
    return math.sqrt(2.0) * torch.erfinv(centred.to(work) * (1.0 / 16777216.0))


def bernoulli(k: torch.Tensor, p: float | torch.Tensor, shape: Sequence[int] = ()) -> torch.Tensor:
    """Booleans of ``shape``, each True with probability ``p``."""
    return uniform(k, shape) < p


def dropout(k: torch.Tensor, x: torch.Tensor, rate: float, *, train: bool = True) -> torch.Tensor:
    """Inverted dropout: zero each element with probability ``rate``, scale the rest.

    Identity when ``train`` is False or ``rate == 0``. ``x``: any shape; returns the same.
    The mask depends only on ``(k, position)``, so a checkpoint recompute draws the same one.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    if not train or rate == 0.0:
        return x
    keep = uniform(k, x.shape) >= rate
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


def drop_path(k: torch.Tensor, x: torch.Tensor, rate: float, *, train: bool = True) -> torch.Tensor:
    """Stochastic depth: zero whole rows of ``x`` (the leading, batch dim) with probability
    ``rate`` and scale the kept rows by ``1 / (1 - rate)``, so ``E[drop_path(x)] = x``.

    Applied to a residual branch, it skips that branch for each dropped example (torchvision's
    ``stochastic_depth`` in mode ``"row"``). Identity when ``train`` is False or ``rate == 0``.
    ``x: [B, ...]``; returns the same shape. The mask depends only on ``(k, row)``.

    Example: ``x = x + drop_path(fold_in(k, "mlp_path"), mlp(p, x), 0.1)``.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path rate must be in [0, 1), got {rate}")
    if not train or rate == 0.0:
        return x
    keep = uniform(k, (x.shape[0],) + (1,) * (x.ndim - 1)) >= rate
    return torch.where(keep, x / (1.0 - rate), torch.zeros((), dtype=x.dtype, device=x.device))


def random_masking(
    k: torch.Tensor, batch: int, num_patches: int, ratio: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-example random masking of ``num_patches`` patches, as a pure function of ``k``.

    Each example ranks its patches by uniform noise and keeps the lowest ``int(num_patches
    * (1 - ratio))`` (the floor, as MAE and TorchMultimodal round). Returns

    - ``keep: [batch, kept]`` int64, the kept patch indices in noise order (gather the
      visible patches with them),
    - ``restore: [batch, num_patches]`` int64, the inverse permutation: position ``i`` of
      ``[visible..., masked...]`` gathered at ``restore`` is patch ``i`` again,
    - ``mask: [batch, num_patches]`` float, 1 where a patch is masked and 0 where kept,

    all on ``k``'s device. The sort is stable, so ties in the noise break the same way
    eagerly, compiled and on every device.

    Example: ``keep, restore, mask = random_masking(key(0), 8, 196, 0.75)`` keeps 49 of 196.
    """
    _check_key(k)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"random_masking ratio must be in [0, 1), got {ratio}")
    kept = int(num_patches * (1 - ratio))
    if kept < 1:
        raise ValueError(
            f"random_masking keeps no patch: num_patches={num_patches} at ratio={ratio}"
        )
    noise = uniform(k, (batch, num_patches))
    shuffle = torch.argsort(noise, dim=1, stable=True)
    restore = torch.argsort(shuffle, dim=1, stable=True)
    # Mask in shuffled order is [0] * kept + [1] * rest; restore puts it back per patch.
    mask = (restore >= kept).to(torch.float32)
    return shuffle[:, :kept], restore, mask
