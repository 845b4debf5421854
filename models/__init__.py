"""Model families. Each is ``(config, init, apply, ...)``; presets are zero-argument builders.

Example::

    import fmm, models
    cfg = models.get_config("clip_vit_b16")
    params = models.clip.init(cfg, fmm.random.key(0))
"""

from collections.abc import Callable
from types import ModuleType
from typing import Any

from models import albef, bert, clip, flava, gpt, mmgpt, vqvae

REGISTRY: dict[str, Callable[[], Any]] = {**clip.PRESETS}
_FAMILIES = {clip.CLIPConfig: clip}
REGISTRY.update(gpt.PRESETS)
_FAMILIES[gpt.GPTConfig] = gpt
REGISTRY.update(vqvae.PRESETS)
_FAMILIES[vqvae.VQVAEConfig] = vqvae
REGISTRY.update(mmgpt.PRESETS)
_FAMILIES[mmgpt.MMGPTConfig] = mmgpt
REGISTRY.update(bert.PRESETS)
_FAMILIES[bert.BertConfig] = bert
REGISTRY.update(flava.PRESETS)
_FAMILIES[flava.FLAVAConfig] = flava
REGISTRY.update(albef.PRESETS)
_FAMILIES[albef.ALBEFConfig] = albef


def get_config(name: str, **overrides: Any) -> Any:
    """The config of preset ``name`` (keyword ``overrides`` go to the preset builder)."""
    try:
        builder = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(REGISTRY)}") from None
    return builder(**overrides)


def family_of(cfg: Any) -> ModuleType:
    """The family module (with ``init``, ``apply``, ...) that a config belongs to."""
    try:
        return _FAMILIES[type(cfg)]
    except KeyError:
        raise TypeError(f"no model family for config type {type(cfg).__name__}") from None


__all__ = [
    "REGISTRY",
    "albef",
    "bert",
    "clip",
    "family_of",
    "flava",
    "get_config",
    "gpt",
    "mmgpt",
    "vqvae",
]
