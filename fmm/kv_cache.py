"""The key/value cache of :mod:`fmm.decoding` and one model step over it.

:class:`DecoderSpec` says what decoding needs to know about a decoder-only model;
:func:`init_cache` preallocates the cache pytree (its layout is in :mod:`fmm.decoding`'s
docstring); :func:`run_cached` runs tokens through the model's blocks (:func:`fmm.nn.block`
with its layer of the cache: pre- or post-norm, with or without cross-attention), which
write their keys/values into given slots and attend over the whole cache under a mask built
from explicit offsets. :mod:`fmm.decoding` builds ``prefill``, ``decode_step`` and
``generate`` on these; most callers want that module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fmm.nn.transformer import TransformerConfig, transformer

Params = dict[str, Any]
Cache = dict[str, Any]


def _blocks_of(params: Params) -> Sequence[Params]:
    return params["transformer"]["blocks"]


@dataclass(frozen=True, kw_only=True)
class DecoderSpec:
    """What decoding needs to know about a decoder-only model (hashable, so compile guards
    on it cheaply; build it once per config, e.g. with ``functools.cache``).

    ``transformer``: the stack's config; its blocks are :func:`fmm.nn.block`s (pre- or
    post-norm, optionally cross-attending); or a tuple of one config per block for a stack
    whose blocks differ (CoCa: unimodal blocks, then cross-attending ones), all of one
    width.
    ``embed(params, tokens [B, S], positions [B, S]) -> [B, S, width]``: token (and position)
    embedding; ``positions`` are per-sequence position ids, 0 at each prompt's first token.
    ``head(params, h [B, S, width]) -> logits [B, S, vocab]``: final norm and output layer.
    ``blocks(params)``: the list of block params (default ``params["transformer"]["blocks"]``).
    ``max_positions``: the longest sequence ``embed`` supports (``None``: unbounded).
    ``vocab_size``: token ids must lie in ``[0, vocab_size)`` (``None``: not checked).
    ``init`` and ``config``: the model's ``init(config, key)``; given, the decoding entry
    points check the whole param tree against it (otherwise only the blocks, against
    ``transformer``).
    """

    transformer: TransformerConfig | tuple[TransformerConfig, ...]
    embed: Callable[[Params, torch.Tensor, torch.Tensor], torch.Tensor]
    head: Callable[[Params, torch.Tensor], torch.Tensor]
    blocks: Callable[[Params], Sequence[Params]] = _blocks_of
    max_positions: int | None = None
    vocab_size: int | None = None
    init: Callable[[Any, torch.Tensor], Params] | None = None
    config: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.transformer, tuple) and len({c.width for c in self.transformer}) > 1:
            raise ValueError("DecoderSpec: the transformer's block configs differ in width")

    @property
    def configs(self) -> tuple[TransformerConfig, ...]:
        """One config per block."""
        t = self.transformer
        return t if isinstance(t, tuple) else (t,) * t.layers

    @property
    def layers(self) -> int:
        return len(self.configs)

    @property
    def cross_dim(self) -> int | None:
        """The context width of the cross-attending blocks (None: no block cross-attends)."""
        return next((c.cross_dim for c in self.configs if c.cross_dim is not None), None)


def cache_len(cache: Cache, entry: str = "k") -> int | None:
    """Slots of the cache's self-attention buffers (``entry="ck"``: its context length);
    None when no layer holds that entry."""
    return next((layer[entry].shape[2] for layer in cache["layers"] if entry in layer), None)


def as_spec(cfg: Any) -> DecoderSpec:
    """``cfg`` itself if it is a :class:`DecoderSpec`, else its ``decoder_spec`` attribute
    (a model config such as ``models.gpt.GPTConfig``); ``TypeError`` otherwise."""
    if isinstance(cfg, DecoderSpec):
        return cfg
    spec = getattr(cfg, "decoder_spec", None)
    if isinstance(spec, DecoderSpec):
        return spec
    raise TypeError(
        f"cfg must be a DecoderSpec or a config with a decoder_spec attribute, "
        f"got {type(cfg).__name__}"
    )


def init_cache(
    cfg: Any,
    batch: int,
    max_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    context_len: int | None = None,
) -> Cache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (prompt included).

    ``k``/``v``: zeros ``[batch, heads, max_len, head_dim]`` per layer; ``pos``/``start``:
    zeros ``[batch]``. A model with cross-attention also gets ``ck``/``cv``
    ``[batch, heads, context_len, head_dim]``, filled by :func:`prefill`.

    Example: ``cache = init_cache(spec, 4, 128)``.
    """
    spec = as_spec(cfg)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if spec.max_positions is not None and max_len > spec.max_positions:
        raise ValueError(
            f"init_cache: max_len={max_len} exceeds the model's {spec.max_positions} positions"
        )
    cross = spec.cross_dim is not None
    if cross and (context_len is None or context_len < 1):
        raise ValueError(
            f"init_cache: a cross-attending model needs context_len >= 1, got {context_len}"
        )

    def zeros(t: TransformerConfig, length: int) -> torch.Tensor:
        shape = (batch, t.heads, length, t.width // t.heads)
        return torch.zeros(shape, dtype=dtype, device=device)

    layers = []
    for t in spec.configs:
        layer = {} if t.cross_only else {"k": zeros(t, max_len), "v": zeros(t, max_len)}
        if t.cross_dim is not None:
            layer["ck"], layer["cv"] = zeros(t, context_len), zeros(t, context_len)
        layers.append(layer)
    cache: Cache = {
        "layers": layers,
        "pos": torch.zeros(batch, dtype=torch.int64, device=device),
        "start": torch.zeros(batch, dtype=torch.int64, device=device),
    }
    if cross:
        cache["context_mask"] = torch.ones(batch, context_len, dtype=torch.bool, device=device)
    return cache


def _self_mask(slots: torch.Tensor, start: torch.Tensor, max_len: int) -> torch.Tensor:
    """``[B, 1, S, max_len]``: the query in slot ``s`` sees real keys in slots ``<= s``.

    A padding query also sees itself, so its softmax row is never empty: an all-masked row
    would be NaN, and NaN * 0 attention weight in a later layer is still NaN.
    """
    j = torch.arange(max_len, device=slots.device)
    s = slots[:, :, None]
    visible = ((j >= start[:, None, None]) & (j <= s)) | (j == s)
    return visible[:, None]


def run_cached(
    params: Params,
    tokens: torch.Tensor,
    cache: Cache,
    spec: DecoderSpec,
    slots: torch.Tensor,
    start: torch.Tensor,
    positions: torch.Tensor,
    donate: bool,
    context: torch.Tensor | None,
    last_only: bool = False,
) -> tuple[torch.Tensor, list[Params]]:
    """Run ``tokens [B, S]`` through the model, their keys/values written at ``slots [B, S]``
    of every layer's cache; queries see the cache's real slots (from ``start [B]``) up to
    their own. ``positions [B, S]``: position ids. ``context [B, T, cross_dim]``: fills the
    cross-attention keys/values (a first prefill; ``None``: those already in the cache).
    ``donate``: write the cache's buffers in place. Returns ``(logits [B, S or 1, vocab],
    new layer caches)``.
    """
    x = spec.embed(params, tokens, positions)
    max_len = cache_len(cache)
    mask = None if max_len is None else _self_mask(slots, start, max_len)
    cmask = cache["context_mask"][:, None, None, :] if "context_mask" in cache else None
    x, layers = transformer(
        {"blocks": spec.blocks(params)}, x, cfg=spec.configs, cache=cache["layers"], slots=slots,
        donate=donate, mask=mask, context=context, context_mask=cmask,
    )  # fmt: skip
    # The output layer is often the largest matmul: skip it where no one reads the logits.
    return spec.head(params, x[:, -1:] if last_only else x), layers
