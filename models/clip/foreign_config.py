"""CLIP configs from and to the reference projects' own config files: Hugging Face's
``config.json`` (:func:`config_from_hf`, :func:`config_beside`, :func:`config_to_hf`) and
open_clip's model configs (:func:`config_from_open_clip`, :data:`OPEN_CLIP_CONFIGS`,
:func:`config_to_open_clip`). :mod:`models.clip.convert` re-exports them beside the weight
converters."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from fmm.convert import ConversionError
from models.clip.config import CLIPConfig

_HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh"}


def mlp_widths(image: tuple[int, int], text: tuple[int, int]) -> dict[str, float | int]:
    """The :class:`CLIPConfig` fields for towers of ``(width, MLP hidden width)``: one
    ``mlp_ratio`` when it reproduces both hidden widths exactly (every published CLIP),
    else each tower's ``image_mlp_dim`` / ``text_mlp_dim``.

    Example: ``mlp_widths((768, 3072), (512, 2048)) == {"mlp_ratio": 4.0}``.
    """
    ratio = image[1] / image[0]
    if all(int(width * ratio) == hidden for width, hidden in (image, text)):
        return {"mlp_ratio": ratio}
    return {"image_mlp_dim": image[1], "text_mlp_dim": text[1]}


def _get(obj: Any, key: str) -> Any:
    return obj[key] if isinstance(obj, Mapping) else getattr(obj, key)


def config_from_hf(hf_config: Any) -> CLIPConfig:
    """Our config from a ``transformers.CLIPConfig`` (or its ``config.json`` as a dict/path)."""
    if isinstance(hf_config, (str, Path)):
        hf_config = json.loads(Path(hf_config).read_text())
    vision, text = _get(hf_config, "vision_config"), _get(hf_config, "text_config")
    acts = {_get(vision, "hidden_act"), _get(text, "hidden_act")}
    if len(acts) != 1 or next(iter(acts)) not in _HF_ACTS:
        raise ValueError(f"config_from_hf: unsupported hidden_act {sorted(acts)}")
    epses = {_get(vision, "layer_norm_eps"), _get(text, "layer_norm_eps")}
    if len(epses) != 1:
        raise ValueError(f"config_from_hf: towers differ in layer_norm_eps {sorted(epses)}")
    return CLIPConfig(
        embed_dim=_get(hf_config, "projection_dim"),
        image_size=_get(vision, "image_size"),
        patch_size=_get(vision, "patch_size"),
        image_width=_get(vision, "hidden_size"),
        image_layers=_get(vision, "num_hidden_layers"),
        image_heads=_get(vision, "num_attention_heads"),
        in_channels=_get(vision, "num_channels"),
        context_length=_get(text, "max_position_embeddings"),
        vocab_size=_get(text, "vocab_size"),
        text_width=_get(text, "hidden_size"),
        text_layers=_get(text, "num_hidden_layers"),
        text_heads=_get(text, "num_attention_heads"),
        **mlp_widths(
            (_get(vision, "hidden_size"), _get(vision, "intermediate_size")),
            (_get(text, "hidden_size"), _get(text, "intermediate_size")),
        ),
        act=_HF_ACTS[acts.pop()],
        norm_eps=epses.pop(),
        init_logit_scale=float(_get(hf_config, "logit_scale_init_value")),
    )


# open_clip's model configs for the ViT CLIPs (its model_configs/*.json), as plain data.
_OPENAI_TEXT = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12)
OPEN_CLIP_CONFIGS: dict[str, dict] = {
    "ViT-B-32": dict(
        embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=32),
        text_cfg=_OPENAI_TEXT,
    ),
    "ViT-B-16": dict(
        embed_dim=512, vision_cfg=dict(image_size=224, layers=12, width=768, patch_size=16),
        text_cfg=_OPENAI_TEXT,
    ),
    "ViT-L-14": dict(
        embed_dim=768, vision_cfg=dict(image_size=224, layers=24, width=1024, patch_size=14),
        text_cfg=dict(_OPENAI_TEXT, width=768, heads=12),
    ),
    "ViT-L-14-336": dict(
        embed_dim=768, vision_cfg=dict(image_size=336, layers=24, width=1024, patch_size=14),
        text_cfg=dict(_OPENAI_TEXT, width=768, heads=12),
    ),
    "ViT-H-14": dict(
        embed_dim=1024,
        vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80, patch_size=14),
        text_cfg=dict(_OPENAI_TEXT, width=1024, heads=16, layers=24),
    ),
}  # fmt: skip


def config_from_open_clip(name_or_dict: str | Mapping | Path) -> CLIPConfig:
    """Our config from an open_clip model name (``"ViT-B-16"``, ``"ViT-B-16-quickgelu"``, any
    of :data:`OPEN_CLIP_CONFIGS`), an open_clip model-config dict, or a path to its JSON.

    open_clip's default activation is exact GELU; OpenAI's weights need ``-quickgelu``
    (or ``"quick_gelu": true`` in the dict).
    """
    quick = False
    if isinstance(name_or_dict, Path) or (
        isinstance(name_or_dict, str) and name_or_dict.endswith(".json")
    ):
        spec = json.loads(Path(name_or_dict).read_text())
    elif isinstance(name_or_dict, str):
        name = name_or_dict.removesuffix("-quickgelu")
        quick = name != name_or_dict
        if name not in OPEN_CLIP_CONFIGS:
            raise ValueError(
                f"config_from_open_clip: unknown model name {name_or_dict!r}; known: "
                f"{sorted(OPEN_CLIP_CONFIGS)} (optionally with -quickgelu), or pass its config dict"
            )
        spec = OPEN_CLIP_CONFIGS[name]
    else:
        spec = dict(name_or_dict)
    vision, text = spec["vision_cfg"], spec["text_cfg"]
    if isinstance(vision.get("layers"), (list, tuple)):
        raise ValueError("config_from_open_clip: ResNet image towers are not supported")
    # open_clip sizes each tower's MLP as int(width * mlp_ratio), its ratio defaulting to 4.
    hidden = {n: int(c["width"] * c.get("mlp_ratio", 4.0)) for n, c in (("v", vision), ("t", text))}
    return CLIPConfig(
        embed_dim=spec["embed_dim"],
        image_size=vision["image_size"],
        patch_size=vision["patch_size"],
        image_width=vision["width"],
        image_layers=vision["layers"],
        image_heads=vision["width"] // vision.get("head_width", 64),
        context_length=text.get("context_length", 77),
        vocab_size=text.get("vocab_size", 49408),
        text_width=text["width"],
        text_layers=text["layers"],
        text_heads=text["heads"],
        **mlp_widths((vision["width"], hidden["v"]), (text["width"], hidden["t"])),
        act="quick_gelu" if quick or spec.get("quick_gelu", False) else "gelu",
    )


def config_beside(path: Path) -> CLIPConfig:
    """The config of a Hugging Face ``config.json`` (the one beside a weights file); a file
    of another kind (open_clip's, fmm's, another model's, not JSON) is a
    :class:`fmm.convert.ConversionError` that says what it found and what to pass instead.

    Example: ``cfg = config_beside(Path("clip-vit-base-patch32/config.json"))``.
    """
    use = "pass cfg= (--config at the command line) or remove it to read the sizes off the weights"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(
            f"config.json beside the weights ({path}) is unreadable: {e}; {use}"
        ) from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a JSON {type(data).__name__}, not a config; {use}")
    model_type = data.get("model_type")
    if "vision_cfg" in data and "text_cfg" in data:
        raise ConversionError(
            f"{path} is an open_clip model config, not a Hugging Face one: pass "
            f"cfg=config_from_open_clip({str(path)!r}) (--config {path}), or format='open_clip' "
            "if the weights are open_clip's"
        )
    required = {f.name for f in fields(CLIPConfig) if f.default is MISSING}
    if required <= data.keys():
        raise ConversionError(
            f"{path} is an fmm CLIPConfig, not a Hugging Face config: pass "
            f"cfg=CLIPConfig(**json.load(open({str(path)!r}))) for these weights"
        )
    if model_type not in (None, "clip") or not {"vision_config", "text_config"} <= data.keys():
        found = f"a Hugging Face {model_type!r} config" if model_type else "no CLIP config"
        raise ConversionError(
            f"{path} is {found} (keys {sorted(data)[:8]}), not a Hugging Face CLIPConfig with "
            f"vision_config and text_config; {use}"
        )
    try:
        return config_from_hf(data)
    except (KeyError, AttributeError) as e:
        raise ConversionError(
            f"{path} lacks {e.args[0]!r}: cannot build the CLIP config; {use}"
        ) from None


def config_to_hf(cfg: CLIPConfig) -> dict:
    """A ``transformers.CLIPConfig`` as its ``config.json`` dict, the inverse of
    :func:`config_from_hf`. The text tower's ``eos_token_id`` is the largest id (CLIP's, and
    every fmm tokenizer's, end of text), where ``CLIPModel`` pools as fmm does.

    Example: ``config_from_hf(config_to_hf(cfg)) == cfg`` (for a ``cfg`` with sdpa attention).
    """
    images_only(cfg, "config_to_hf")
    act = {ours: theirs for theirs, ours in _HF_ACTS.items()}
    shared = dict(hidden_act=act[cfg.act], layer_norm_eps=cfg.norm_eps)
    vision = dict(
        shared, hidden_size=cfg.image_width, intermediate_size=cfg.image_transformer.hidden,
        num_hidden_layers=cfg.image_layers, num_attention_heads=cfg.image_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, num_channels=cfg.in_channels,
        projection_dim=cfg.embed_dim,
    )  # fmt: skip
    text = dict(
        shared, hidden_size=cfg.text_width, intermediate_size=cfg.text_transformer.hidden,
        num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.context_length, vocab_size=cfg.vocab_size,
        projection_dim=cfg.embed_dim, bos_token_id=cfg.vocab_size - 2,
        eos_token_id=cfg.vocab_size - 1, pad_token_id=0,
    )  # fmt: skip
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": cfg.init_logit_scale,
        "vision_config": vision,
        "text_config": text,
    }


def images_only(cfg: CLIPConfig, what: str) -> None:
    """The foreign layouts have square image towers only: a video CLIP (``cfg.frames``) and a
    rectangular (audio) tower are refused."""
    if cfg.frames is not None:
        raise ValueError(
            f"{what}: cfg has a video tower (frames={cfg.frames}); open_clip, Hugging Face "
            "and TorchMultimodal CLIPs take images only"
        )
    if not isinstance(cfg.image_size, int):
        raise ValueError(
            f"{what}: cfg has a (height, width) tower (image_size={cfg.image_size}, an audio "
            "tower's); open_clip, Hugging Face and TorchMultimodal CLIPs take one square side"
        )


def _open_clip_ratio(width: int, hidden: int, tower: str) -> float:
    ratio = hidden / width
    if int(width * ratio) != hidden:  # open_clip sizes a tower's MLP as int(width * ratio)
        raise ValueError(f"config_to_open_clip: the {tower} MLP width {hidden} is not "
                         f"int({width} * ratio) for any ratio open_clip can be given")  # fmt: skip
    return ratio


def config_to_open_clip(cfg: CLIPConfig) -> dict:
    """An open_clip model config (``open_clip.CLIP(**config)``, the ``model_cfg`` of an
    ``open_clip_config.json``), the inverse of :func:`config_from_open_clip`. open_clip has
    exact and quick GELU only, and LayerNorm's default eps: other configs are a
    ``ValueError`` saying which field.

    Example: ``open_clip.CLIP(**config_to_open_clip(cfg))`` loads ``to_open_clip(params, cfg)``.
    """
    images_only(cfg, "config_to_open_clip")
    if cfg.act not in ("gelu", "quick_gelu"):
        raise ValueError(f"config_to_open_clip: open_clip has no {cfg.act!r} activation")
    if cfg.norm_eps != 1e-5:
        raise ValueError(
            f"config_to_open_clip: open_clip's LayerNorm eps is 1e-5, not {cfg.norm_eps}"
        )
    if cfg.image_width % cfg.image_heads:
        raise ValueError("config_to_open_clip: image_width must be a multiple of image_heads")
    vision = dict(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.image_width,
        layers=cfg.image_layers, head_width=cfg.image_width // cfg.image_heads,
        mlp_ratio=_open_clip_ratio(cfg.image_width, cfg.image_transformer.hidden, "image"),
    )  # fmt: skip
    text = dict(
        context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
        heads=cfg.text_heads, layers=cfg.text_layers,
        mlp_ratio=_open_clip_ratio(cfg.text_width, cfg.text_transformer.hidden, "text"),
    )  # fmt: skip
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.act == "quick_gelu",
        "vision_cfg": vision,
        "text_cfg": text,
    }
