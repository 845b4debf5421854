"""int8 weight-only quantization of param trees, as a pure transform.

``quantize(params)`` returns a new tree in which every eligible 2-D ``weight`` leaf (linear
layers, embedding tables) is a :class:`QuantizedWeight`: int8 values ``[out, in]`` and one
fp32 scale per output channel ``[out]`` (``weight ≈ values * scale[:, None]``, symmetric,
no zero point). Model code runs unchanged on the result: a ``QuantizedWeight`` is a
tensor-like leaf that implements ``__torch_function__``, so

- ``F.linear(x, w, b)`` (``fmm.nn.linear``, tied output heads calling ``F.linear``
  directly) runs fbgemm's dynamic int8 linear on CPU (activations quantized per call,
  int8 x int8 -> int32, rescaled), the fastest CPU int8 path we measured
  (``benchmarks/quant.py``);
- ``F.embedding(ids, w)`` gathers int8 rows and rescales only those;
- any other torch function sees the dequantized float weight (correct, not fast).

Why a tensor-like leaf rather than a tensor subclass or a branch in ``fmm.nn.linear``:
the packed fbgemm weight is a ``ScriptObject``, not a tensor, so it cannot live inside a
wrapper subclass; and a branch in ``linear`` would miss models that call ``F.linear`` on a
tied embedding. The leaf is immutable data (values, scales and the packed form built once
from them), so ``apply`` on quantized params stays a pure function of its inputs.

Example::

    q = fmm.quant.quantize(params)                    # pure: params is untouched
    emb = clip.encode_image(q, images, cfg=cfg)       # same call as with fp32 params
    fmm.quant.size_bytes(q) / fmm.quant.size_bytes(params)   # ~0.26 for CLIP
    fmm.quant.save_quantized("clip-int8.safetensors", q)
    q2 = fmm.quant.load_quantized("clip-int8.safetensors")
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmm import tree
from fmm.io import atomic_write

__all__ = [
    "QuantizedWeight",
    "dequantize",
    "is_quantized",
    "load_quantized",
    "quantize",
    "quantize_weight",
    "save_quantized",
    "size_bytes",
]

Tree = Any
FORMAT = "fmm-int8"
# 2-D weights that are neither linear maps nor lookup tables read through F.embedding:
# a VQ codebook is searched with arithmetic on the raw tensor.
DEFAULT_SKIP = ("codebook",)


def _fbgemm_pack(values: torch.Tensor, scale: torch.Tensor) -> Any:
    """fbgemm's prepacked form of an int8 per-channel weight, or ``None`` off CPU."""
    if values.device.type != "cpu" or "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    with warnings.catch_warnings():
        # Quantized tensor constructors warn of a future deprecation; the packed form is
        # the only entry to fbgemm's kernel today, and it never leaves this module.
        warnings.simplefilter("ignore")
        zeros = torch.zeros(values.shape[0], dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(values, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(qweight, None)


class QuantizedWeight:
    """An int8 weight ``values [out, in]`` with per-output-channel ``scale [out]`` (fp32).

    ``dtype`` is the float dtype the weight stood for (what ``F.linear`` returns and what
    ``leaf.dtype`` reports to code that sizes buffers from a weight). ``shape``/``device``
    read like a tensor's. Build one with :func:`quantize_weight`.
    """

    __slots__ = ("dtype", "packed", "scale", "values")

    def __init__(self, values: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype):
        if values.dtype != torch.int8 or values.ndim != 2:
            raise ValueError(
                f"QuantizedWeight: values must be int8 [out, in], got {values.dtype} "
                f"{list(values.shape)}"
            )
        if scale.shape != values.shape[:1] or not scale.is_floating_point():
            raise ValueError(
                f"QuantizedWeight: scale must be float [{values.shape[0]}] (one per output "
                f"channel), got {scale.dtype} {list(scale.shape)}"
            )
        if not dtype.is_floating_point:
            raise ValueError(f"QuantizedWeight: dtype must be a float dtype, got {dtype}")
        self.values = values.contiguous()
        self.scale = scale.to(torch.float32).contiguous()
        self.dtype = dtype
        self.packed = _fbgemm_pack(self.values, self.scale)

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return 2

    @property
    def device(self) -> torch.device:
        return self.values.device

    def numel(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        """Bytes stored (int8 values plus fp32 scales), as saved on disk."""
        return self.values.nbytes + self.scale.nbytes

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``values * scale[:, None]``: ``[out, in]``."""
        return (self.values.float() * self.scale[:, None]).to(dtype or self.dtype)

    def to(self, *args: Any, **kwargs: Any) -> QuantizedWeight:
        """Move to a device (``to("cuda")``); the int8 values stay int8. A float dtype
        argument changes the compute dtype only."""
        device, dtype = None, None
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.dtype):
                dtype = a
            elif isinstance(a, (str, torch.device)):
                device = torch.device(a)
        out = QuantizedWeight.__new__(QuantizedWeight)
        out.values = self.values.to(device) if device is not None else self.values
        out.scale = self.scale.to(device) if device is not None else self.scale
        out.dtype = dtype if dtype is not None and dtype.is_floating_point else self.dtype
        same = device is None or out.values.device == self.values.device
        out.packed = self.packed if same else _fbgemm_pack(out.values, out.scale)
        return out

    def __repr__(self) -> str:
        return f"QuantizedWeight(int8{list(self.shape)}, dtype={self.dtype}, device={self.device})"

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.shape[-1] != self.shape[1]:
            raise ValueError(
                f"linear: input has {x.shape[-1]} features but the quantized weight is "
                f"{list(self.shape)} [out, in]: got input {list(x.shape)}"
            )
        fast = (
            self.packed is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not (torch.is_grad_enabled() and x.requires_grad)
        )
        if not fast:
            return F.linear(x, self.dequantize(x.dtype), bias)
        # reduce_range: 7-bit activations keep fbgemm's u8 x s8 pair sums from saturating
        # int16 (the setting torch's own dynamic quantization uses on x86).
        if not bool(torch.isfinite(x.sum())):
            # fbgemm's range ignores a NaN among finite values and returns finite garbage
            # (or raises if all are NaN): compute as fp32 would, so non-finite values
            # propagate. A sum is the cheapest full pass that NaN and inf survive (a sum
            # that merely overflows takes the exact path too, which is still correct).
            return F.linear(x, self.dequantize(x.dtype), bias)
        y = torch.ops.quantized.linear_dynamic(x.contiguous(), self.packed, True)
        return y if bias is None else y + bias

    def _embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.values[ids].float() * self.scale[ids, None]).to(self.dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight, bias = _bind(args, kwargs, ("input", "weight", "bias"))
            if isinstance(weight, cls) and not isinstance(x, cls) and not isinstance(bias, cls):
                return weight._linear(x, bias)
        if func is F.embedding:
            ids, weight = _bind(args, kwargs, ("input", "weight"))
            # max_norm renormalises the table in place: leave that to the float path.
            if isinstance(weight, cls) and kwargs.get("max_norm") is None and len(args) <= 3:
                return weight._embedding(ids)
        # Anything else computes on the float weight: correct, if not compressed.
        unwrap = lambda a: a.dequantize() if isinstance(a, cls) else a
        return func(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs))


def _bind(args: Sequence, kwargs: dict, names: tuple[str, ...]) -> list:
    got = list(args[: len(names)])
    return got + [kwargs.get(n) for n in names[len(got) :]]


def quantize_weight(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel int8 of a float ``weight [out, in]``.

    Each row's scale is ``max|row| / 127``, so every row uses the full int8 range and the
    rounding error per entry is at most ``scale / 2``. An all-zero row gets scale 1.
    """
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.ndim != 2:
        got = (
            f"{weight.dtype} {list(weight.shape)}"
            if isinstance(weight, torch.Tensor)
            else type(weight).__name__
        )
        raise ValueError(f"quantize_weight: weight must be a float tensor [out, in], got {got}")
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    values = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return QuantizedWeight(values, scale, dtype=weight.dtype)


def _eligible(name: str, leaf: Any, min_size: int, skip: Sequence[str]) -> bool:
    parts = name.split(".")
    return (
        isinstance(leaf, torch.Tensor)
        and leaf.is_floating_point()
        and leaf.ndim == 2
        and parts[-1] == "weight"
        and leaf.numel() >= min_size
        and not any(s in parts for s in skip)
    )


def quantize(
    params: Tree,
    *,
    min_size: int = 4096,
    skip: Sequence[str] = DEFAULT_SKIP,
    where: Callable[[str, torch.Tensor], bool] | None = None,
) -> Tree:
    """A new tree with each eligible weight replaced by a :class:`QuantizedWeight`.

    Eligible: a 2-D float leaf named ``weight`` with at least ``min_size`` entries (small
    matrices gain nothing and cost the most relative accuracy) and no path component in
    ``skip``. ``where(name, leaf)``, if given, replaces that rule. Other leaves (norms,
    biases, position tables, conv patches, the logit scale) are shared, not copied.
    Already quantized leaves pass through, so quantizing twice is quantizing once.

    Example: ``q = quantize(clip.init(clip_tiny(), fmm.random.key(0)))``.
    """
    if not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"quantize: min_size must be an int >= 1, got {min_size!r}")
    if isinstance(skip, str):
        raise TypeError(f"quantize: skip must be a sequence of names, got the string {skip!r}")
    pick = where or (lambda name, leaf: _eligible(name, leaf, min_size, skip))

    def one(name: str, leaf: Any) -> Any:
        if isinstance(leaf, QuantizedWeight) or not pick(name, leaf):
            return leaf
        return quantize_weight(leaf)

    return tree.map_with_path(one, params)


def dequantize(params: Tree) -> Tree:
    """The float tree that a quantized one stands for (each weight ``values * scale``)."""
    return tree.map(lambda x: x.dequantize() if isinstance(x, QuantizedWeight) else x, params)


def is_quantized(params: Tree) -> bool:
    """Whether any leaf of ``params`` is a :class:`QuantizedWeight`."""
    return any(isinstance(x, QuantizedWeight) for x in tree.leaves(params))


def size_bytes(params: Tree) -> int:
    """Bytes of the stored data of every leaf (int8 values plus scales for quantized ones)."""
    return sum(x.nbytes for x in tree.leaves(params))


def save_quantized(path: str | os.PathLike, params: Tree) -> None:
    """Write a (possibly partly) quantized tree to one safetensors file, atomically.

    A quantized leaf ``name`` is stored as ``name`` (int8 values) and ``name.scale``; the
    file's metadata lists those names and their float dtypes, so :func:`load_quantized`
    rebuilds exactly the tree that was saved.
    """
    flat, quantized = {}, {}
    for name, leaf in tree.flatten(params).items():
        if isinstance(leaf, QuantizedWeight):
            flat[name] = leaf.values.detach().cpu().contiguous()
            flat[f"{name}.scale"] = leaf.scale.detach().cpu().contiguous()
            quantized[name] = str(leaf.dtype).removeprefix("torch.")
        elif isinstance(leaf, torch.Tensor):
            flat[name] = leaf.detach().cpu().contiguous()
        else:
            raise TypeError(f"save_quantized: leaf {name!r} is a {type(leaf).__name__}")
    meta = {"format": FORMAT, "quantized": json.dumps(quantized, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=meta))


def load_quantized(path: str | os.PathLike) -> Tree:
    """Read a tree written by :func:`save_quantized` (on CPU, packed for fbgemm).

    Example: ``q = load_quantized(run_dir / "params-int8.safetensors")``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_quantized: no file at {path}")
    try:
        flat = load_file(path)
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(header_len)).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"load_quantized: corrupt file {path}: {e}") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"load_quantized: {path} is not an {FORMAT} file (format={metadata.get('format')!r}); "
            "plain checkpoints load with train.checkpoint.load_params"
        )
    quantized = json.loads(metadata["quantized"])
    missing = sorted(n for n in quantized if n not in flat or f"{n}.scale" not in flat)
    if missing:
        raise ValueError(f"load_quantized: {path} lacks values or scales for {missing}")
    out: dict[str, Any] = {}
    for name, t in flat.items():
        if name.endswith(".scale") and name[: -len(".scale")] in quantized:
            continue
        if name in quantized:
            dtype = getattr(torch, quantized[name])
            out[name] = QuantizedWeight(t, flat[f"{name}.scale"], dtype=dtype)
        else:
            out[name] = t
    return tree.unflatten(out)
