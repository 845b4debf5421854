"""Model families. Each package exports ``FAMILY`` (:class:`models.family.Family`), its
contract with the machinery; the registry below is built by iterating over them.

Example::

    import fmm, models
    cfg = models.get_config("clip_vit_b16")
    family = models.family_of(cfg)            # models.clip.FAMILY
    params = family.init(cfg, fmm.random.key(0))
"""

from collections.abc import Callable
from typing import Any

from models import (
    adm,
    albef,
    bert,
    blip2,
    clip,
    coca,
    data2vec,
    flava,
    gpt,
    mae,
    mdetr,
    mmgpt,
    omnivore,
    videogpt,
    vqvae,
)
from models.family import Family

# Adding a family: one package under models/ and its module in this tuple.
_PACKAGES = (
    clip,
    bert,
    gpt,
    vqvae,
    mmgpt,
    flava,
    albef,
    omnivore,
    videogpt,
    mae,
    data2vec,
    adm,
    blip2,
    mdetr,
    coca,
)
FAMILIES: tuple[Family, ...] = (
    *(package.FAMILY for package in _PACKAGES),
    videogpt.VQVAE_FAMILY,  # the videogpt package's second contract: its video tokenizer
    adm.VAE_FAMILY,  # the adm package's second contract: latent diffusion's VAE
)


def _registry() -> dict[str, Callable[[], Any]]:
    registry: dict[str, Callable[[], Any]] = {}
    for family in FAMILIES:
        for name, build in family.presets.items():
            if name in registry:
                raise ValueError(f"preset {name!r} is declared by two families")
            registry[name] = build
    return registry


REGISTRY: dict[str, Callable[[], Any]] = _registry()
_BY_CONFIG: dict[type, Family] = {family.config: family for family in FAMILIES}
_BY_NAME: dict[str, Family] = {family.name: family for family in FAMILIES}


def get_config(name: str, **overrides: Any) -> Any:
    """The config of preset ``name`` (keyword ``overrides`` go to the preset builder)."""
    try:
        builder = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; available: {sorted(REGISTRY)}") from None
    return builder(**overrides)


def family_of(cfg: Any) -> Family:
    """The :class:`~models.family.Family` a config belongs to."""
    try:
        return _BY_CONFIG[type(cfg)]
    except KeyError:
        raise TypeError(f"no model family for config type {type(cfg).__name__}") from None


def get_family(name: str) -> Family:
    """The family named ``name`` (``"clip"``, ``"flava"``, ...)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; available: {sorted(_BY_NAME)}") from None


__all__ = [
    "FAMILIES",
    "REGISTRY",
    "Family",
    "adm",
    "albef",
    "bert",
    "blip2",
    "clip",
    "coca",
    "data2vec",
    "family_of",
    "flava",
    "get_config",
    "get_family",
    "gpt",
    "mae",
    "mdetr",
    "mmgpt",
    "omnivore",
    "vqvae",
]
