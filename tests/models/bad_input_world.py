"""What the bad-input table is made of: :class:`Arg` (what an argument is, so a spoil
knows how to spoil it), :class:`Entry`, the world of tiny presets with good arguments
(:func:`world`, built once), other presets' params (``OTHER``) and :func:`entry`, which
appends to ``ENTRIES``.

The entries themselves live in ``bad_input_table`` (init of every family, clip, gpt and
``fmm.decoding``, bert, vqvae, mmgpt, flava, albef) and ``bad_input_families`` (blip2,
mdetr, adm, vae, clap, ``fmm.diffusion``, coca).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

import fmm
from fmm import checks, decoding, tree
from models import adm, albef, bert, blip2, clip, coca, flava, gpt, mdetr, mmgpt, vqvae


def random_params(init: Callable, cfg: Any, device: str = "cpu") -> dict:
    """Params of ``cfg``'s shapes, drawn quickly (values do not matter to these checks)."""
    if device == "meta":
        return init(cfg, fmm.random.key(0).to("meta"))
    g = torch.Generator().manual_seed(0)
    shapes = checks.param_shapes(init, cfg)
    return tree.unflatten({k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()})


@dataclasses.dataclass(frozen=True)
class Arg:
    """What an argument is, so the strategies know how to spoil it.

    ``kind``: ``"image"`` (float [B, C, H, W]), ``"float"`` (other float tensors),
    ``"ids"`` (integer ids in ``[0, high)``, sequence axis 1 bounded by ``max_len``),
    ``"mask"``, ``"params"`` (``other`` builds params of another preset), ``"cfg"``.
    ``batch_of``: another argument whose batch size this one must share. ``sized``: the
    last axis has a size the function fixes (a width), so changing it is an error.
    """

    kind: str
    high: int | None = None
    max_len: int | None = None
    other: Callable[[], Any] | None = None
    batch_of: str | None = None
    sized: bool = True


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    good: Callable[[], dict[str, Any]]  # argument name (as the message shows it) -> value
    call: Callable[[dict[str, Any]], Any]
    args: dict[str, Arg]


# ----------------------------------------------------------------------------- the world

CLIP, GPT, BERT = clip.clip_tiny(), gpt.gpt_tiny(), bert.bert_tiny()
VQ, FLAVA = vqvae.vqvae_shapes(), flava.flava_tiny()
MM = mmgpt.mmgpt_shapes(text_len=5, image_len=6)  # short, so generating images is quick
ALBEF = albef.albef_tiny(num_answers=3)
BLIP2, MDETR = blip2.blip2_tiny(), mdetr.mdetr_tiny()
COCA = coca.coca_tiny()
DALLE2, VAE = adm.dalle2_tiny(), adm.vae_tiny()  # the conditioned U-Net: every input it reads
B = 2
# More of the world (bad_input_families' data): each part takes the world so far.
WORLD_PARTS: list[Callable[[dict[str, Any]], dict[str, Any]]] = []


@functools.cache
def world() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)

    def ids(high: int, seq: int, low: int = 0) -> torch.Tensor:
        return torch.randint(low, high, (B, seq), generator=g)

    w = {name: random_params(fam.init, cfg) for name, fam, cfg in FAMILIES}
    w["images32"] = torch.rand(B, 3, 32, 32, generator=g)
    w["clip_tokens"] = ids(CLIP.vocab_size, 7)
    w["gpt_tokens"] = ids(GPT.vocab_size, 9)
    w["bert_ids"] = ids(BERT.vocab_size, 6, low=1)
    w["mm_text"] = ids(MM.text_vocab, MM.text_len)
    w["mm_codes"] = ids(MM.image_vocab, MM.image_len)
    w["flava_ids"] = ids(FLAVA.vocab_size, FLAVA.max_positions, low=4)
    w["albef_ids"] = ids(ALBEF.text.vocab_size, 8, low=4)
    w["albef_state"] = albef.init_state(ALBEF, w["albef"], KEY)
    spec = GPT.decoder_spec
    w["gpt_cache"] = decoding.prefill(
        w["gpt"], w["gpt_tokens"], decoding.init_cache(spec, B, 12), cfg=spec
    )[1]
    for part in WORLD_PARTS:
        w.update(part(w))
    return w


FAMILIES = [
    ("clip", clip, CLIP),
    ("gpt", gpt, GPT),
    ("bert", bert, BERT),
    ("vqvae", vqvae, VQ),
    ("mmgpt", mmgpt, MM),
    ("flava", flava, FLAVA),
    ("albef", albef, ALBEF),
    ("blip2", blip2, BLIP2),
    ("coca", coca, COCA),
    ("mdetr", mdetr, MDETR),
    ("adm", adm.unet, DALLE2),
    ("vae", adm.vae, VAE),
]


@functools.cache
def meta_params(init: Callable, cfg: Any) -> Any:
    return random_params(init, cfg, "meta")


def _other(init: Callable, cfg: Any, part: str | None = None) -> Callable[[], Any]:
    # Another preset's params, on the meta device: shapes are all the check reads.
    def build() -> Any:
        p = meta_params(init, cfg)
        return p[part] if part else p

    return build


OTHER = {
    "clip": _other(clip.init, clip.clip_vit_b32()),
    "gpt": _other(gpt.init, gpt.gpt2_small()),
    "bert": _other(bert.init, bert.minilm_l6()),
    "vqvae": _other(vqvae.init, vqvae.vqvae_shapes_4x4()),
    "mmgpt": _other(mmgpt.init, mmgpt.mmgpt_shapes(text_vocab=32)),
    "flava": _other(flava.init, flava.flava_model()),
    "flava.image": _other(flava.init, flava.flava_model(), "image"),
    "flava.text": _other(flava.init, flava.flava_model(), "text"),
    "albef": _other(albef.init, albef.albef_base(num_answers=3)),
    # Small neighbours: any other shapes make the point (blip2_tiny has no knobs: a
    # replaced config).
    "blip2": _other(blip2.init, dataclasses.replace(BLIP2, queries=4, image_width=32)),
    "mdetr": _other(mdetr.init, mdetr.mdetr_tiny(vocab_size=32)),
    "coca": _other(coca.init, coca.coca_tiny(vocab_size=32, image_width=32)),
    "adm": _other(adm.unet.init, adm.dalle2_tiny(embed_dim=32)),
    "vae": _other(adm.vae.init, adm.vae_tiny(res_blocks=2)),
}


def _image(**kw) -> Arg:
    return Arg("image", **kw)


def _ids(high: int, max_len: int | None = None, **kw) -> Arg:
    return Arg("ids", high=high, max_len=max_len, **kw)


def _w(*names: str, **more: Callable[[dict], Any]) -> Callable[[], dict[str, Any]]:
    """Good arguments: ``"shown=world_key"`` pairs, plus computed ones (built once; each
    call gets a fresh dict, and spoiling makes new tensors, so nothing is shared wrongly)."""

    @functools.cache
    def build_once() -> dict[str, Any]:
        w = world()
        out = {}
        for item in names:
            shown, _, key = item.partition("=")
            out[shown] = w[key or shown]
        out.update({k: f(w) for k, f in more.items()})
        return out

    return lambda: dict(build_once())


KEY = fmm.random.key(0)
ENTRIES: list[Entry] = []


def entry(name: str, good, call, **args: Arg) -> None:
    ENTRIES.append(Entry(name, good, call, args))
