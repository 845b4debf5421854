"""ALBEF as pure functions: encoders, the multimodal (fusion) encoder and the heads.

Param tree (PyTorch layouts, so converters are key maps)::

    image.patch.{weight [W, 3, p, p], bias}   patch embedding (torchvision's conv_proj)
    image.cls                   [W]           class token
    image.pos                   [grid*grid + 1, W]
    image.transformer.blocks.N  pre-norm ViT blocks (eps 1e-6)
    image.norm                  final layer norm
    text.*                      a BERT encoder without pooler (models.bert)
    fusion.blocks.N             post-norm blocks whose cross-attention reads the image tokens
    vision_proj / text_proj     {weight [embed, W], bias}: [CLS] -> contrastive embedding
    log_temp                    []  log of the contrastive temperature (projected into
                                [0.001, 0.5]); a log so an optimizer step changes it by a
                                ratio, as CLIP's logit scale, not by lr-sized jumps that
                                would pin a 0.07 temperature to its bound within 100 steps
    itm_head                    {weight [2, W], bias}: matched / not matched
    mlm_head.{dense, norm, bias [vocab]}   BERT's MLM transform; the decoder weight is the
                                tied word embedding ``text.token.weight`` (one leaf, used twice)
    vqa_head.{fc1, fc2}         answer classifier on the fused [CLS] (if cfg.num_answers)

The momentum encoders and the feature queues are not params: see :mod:`models.albef.state`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import repeat

from fmm import fusion, nn, random
from models import bert
from models.albef.config import ALBEFConfig

Params = dict[str, Any]

_INIT_STD = 0.02
TEMP_RANGE = (0.001, 0.5)
# The parts a momentum encoder copies (ALBEF keeps momentum copies of these, not of heads).
MOMENTUM_PARTS = ("image", "text", "fusion", "vision_proj", "text_proj")


def init(cfg: ALBEFConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, a pure function of ``(cfg, key)``; a ``meta`` key gives
    shapes only. Example: ``params = init(albef_tiny(), fmm.random.key(0))``."""
    ki, dev, wi, wt = random.fold_in(key, "image"), key.device, cfg.image_width, cfg.text.width
    k = lambda name: random.fold_in(key, name)
    image = {
        "patch": nn.init_patch_embed(
            cfg.patch_size, cfg.in_channels, wi, random.fold_in(ki, "patch"), dtype=dtype
        ),
        "cls": random.normal(random.fold_in(ki, "cls"), (wi,), dtype=dtype) * _INIT_STD,
        "pos": random.normal(random.fold_in(ki, "pos"), (cfg.grid**2 + 1, wi), dtype=dtype)
        * _INIT_STD,
        "transformer": nn.init_transformer(
            cfg.image_transformer, random.fold_in(ki, "transformer"), dtype=dtype
        ),
        "norm": nn.init_layer_norm(wi, device=dev, dtype=dtype),
    }
    params: Params = {
        "image": image,
        "text": bert.init(cfg.text, k("text"), dtype=dtype),
        "fusion": fusion.init_cross_attention_fusion(cfg.fusion, k("fusion"), dtype=dtype),
        "vision_proj": nn.init_linear(wi, cfg.embed_dim, k("vision_proj"), dtype=dtype),
        "text_proj": nn.init_linear(wt, cfg.embed_dim, k("text_proj"), dtype=dtype),
        "log_temp": torch.full((), math.log(cfg.temp), dtype=dtype, device=dev),
        "itm_head": nn.init_linear(wt, 2, k("itm_head"), std=_INIT_STD, dtype=dtype),
        "mlm_head": {
            "dense": nn.init_linear(wt, wt, k("mlm_dense"), std=_INIT_STD, dtype=dtype),
            "norm": nn.init_layer_norm(wt, device=dev, dtype=dtype),
            "bias": torch.zeros(cfg.text.vocab_size, dtype=dtype, device=dev),
        },
    }
    if cfg.num_answers:
        params["vqa_head"] = nn.init_mlp(
            wt, 2 * wt, k("vqa_head"), out_dim=cfg.num_answers, dtype=dtype
        )
    return params


def _check_images(images: torch.Tensor, cfg: ALBEFConfig) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"images must be a floating-point tensor [batch, C, H, W], got {got}")
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(
            f"images must have shape [batch, {', '.join(map(str, want))}], got {list(images.shape)}"
        )


def encode_image(params: Params, images: torch.Tensor, *, cfg: ALBEFConfig) -> torch.Tensor:
    """ViT tokens after the final norm: ``images [B, C, H, W] -> [B, 1 + grid², image_width]``
    (token 0 is [CLS]). ``params``: the full tree or a momentum tree."""
    _check_images(images, cfg)
    p = params["image"]
    x = nn.patch_embed(p["patch"], images)
    cls = repeat(p["cls"], "d -> b 1 d", b=x.shape[0]).to(x.dtype)
    x = torch.cat([cls, x], dim=1) + p["pos"]
    x = nn.transformer(p["transformer"], x, cfg=cfg.image_transformer)
    return nn.layer_norm(p["norm"], x, eps=cfg.image_norm_eps)


def encode_text(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """BERT tokens ``input_ids [B, S] -> [B, S, text width]`` (token 0 is [CLS]);
    ``attention_mask [B, S]``: True/1 for real tokens."""
    return bert.apply(
        params["text"], input_ids, cfg=cfg.text, attention_mask=attention_mask, key=key, train=train
    )


def fuse(
    params: Params,
    text_tokens: torch.Tensor,
    image_tokens: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
) -> torch.Tensor:
    """The multimodal encoder: ``text_tokens [B, S, Wt]`` attend to themselves (padding
    excluded by ``attention_mask [B, S]``) and to ``image_tokens [B, P, Wi]`` -> ``[B, S, Wt]``.
    """
    mask = None if attention_mask is None else nn.padding_mask(attention_mask)
    return fusion.cross_attention_fusion(
        params["fusion"], text_tokens, image_tokens, cfg=cfg.fusion, mask=mask, key=key,
        train=train,
    )  # fmt: skip


def image_embedding(params: Params, image_tokens: torch.Tensor) -> torch.Tensor:
    """Unit-norm contrastive embedding of the image [CLS]: ``[B, P, Wi] -> [B, embed]``."""
    return F.normalize(nn.linear(params["vision_proj"], nn.pool_cls(image_tokens)), dim=-1)


def text_embedding(params: Params, text_tokens: torch.Tensor) -> torch.Tensor:
    """Unit-norm contrastive embedding of the text [CLS]: ``[B, S, Wt] -> [B, embed]``."""
    return F.normalize(nn.linear(params["text_proj"], nn.pool_cls(text_tokens)), dim=-1)


def temperature(params: Params) -> torch.Tensor:
    """The learned temperature projected into ALBEF's range [0.001, 0.5] (no edit of params)."""
    return params["log_temp"].exp().clamp(*TEMP_RANGE)


def itm_logits(params: Params, fused: torch.Tensor) -> torch.Tensor:
    """Image-text matching logits on the fused [CLS]: ``[B, S, W] -> [B, 2]`` (index 1 = match)."""
    return nn.linear(params["itm_head"], nn.pool_cls(fused))


def mlm_logits(params: Params, fused: torch.Tensor, *, cfg: ALBEFConfig) -> torch.Tensor:
    """Masked-token logits ``[B, S, W] -> [B, S, vocab]`` (BERT's head, tied decoder)."""
    h = params["mlm_head"]
    x = F.gelu(nn.linear(h["dense"], fused))
    x = nn.layer_norm(h["norm"], x, eps=cfg.text.norm_eps)
    return F.linear(x, params["text"]["token"]["weight"], h["bias"])


def vqa_logits(params: Params, fused: torch.Tensor) -> torch.Tensor:
    """Answer logits on the fused [CLS] of question + image: ``[B, S, W] -> [B, num_answers]``.

    A classifier over a fixed answer set, where ALBEF itself decodes answers with a
    generative decoder (see docs/flava_albef.md)."""
    if "vqa_head" not in params:
        raise ValueError("vqa_logits: params have no 'vqa_head' (built with num_answers=0)")
    return nn.mlp(params["vqa_head"], nn.pool_cls(fused))


def apply(
    params: Params,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All three encoders on matched pairs. ``images [B, C, H, W]``, ``input_ids [B, S]`` ->
    ``{"image": [B, P, Wi], "text": [B, S, Wt], "fused": [B, S, Wt]}``.

    Example::

        cfg = albef_tiny()
        out = apply(init(cfg, fmm.random.key(0)), images, ids, cfg=cfg)
        match_prob = itm_logits(params, out["fused"]).softmax(-1)[:, 1]
    """
    if images.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"images {list(images.shape)} and input_ids {list(input_ids.shape)} must have the "
            "same batch size"
        )
    image = encode_image(params, images, cfg=cfg)
    text = encode_text(params, input_ids, cfg=cfg, attention_mask=attention_mask)
    fused = fuse(params, text, image, cfg=cfg, attention_mask=attention_mask)
    return {"image": image, "text": text, "fused": fused}


def vqa(
    params: Params,
    images: torch.Tensor,
    question_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Answer logits for questions about images: ``[B, C, H, W], [B, S] -> [B, num_answers]``."""
    out = apply(params, images, question_ids, cfg=cfg, attention_mask=attention_mask)
    return vqa_logits(params, out["fused"])


def rank_texts(
    params: Params,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
    k: int = 8,
) -> torch.Tensor:
    """Retrieval head: scores ``[N_images, N_texts]`` of every text for every image.

    ALBEF's two stages: the contrastive similarity picks each image's top ``k`` texts, the
    ITM head re-scores those fused pairs (probability of a match, in [0, 1]); the other
    texts score ``-1 + similarity`` (below every re-ranked one, still in ITC order).
    ``images [N, C, H, W]``, ``input_ids [T, S]``. Example: ``rank_texts(...).argmax(1)``.
    """
    if k < 1:
        raise ValueError(f"rank_texts: k must be >= 1, got {k}")
    image = encode_image(params, images, cfg=cfg)
    text = encode_text(params, input_ids, cfg=cfg, attention_mask=attention_mask)
    sim = image_embedding(params, image) @ text_embedding(params, text).T
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # [N, k]
    n = image.shape[0]
    pair_text = text[top.flatten()]  # [N*k, S, W]
    pair_mask = None if attention_mask is None else attention_mask[top.flatten()]
    pair_image = image.repeat_interleave(k, dim=0)
    fused = fuse(params, pair_text, pair_image, cfg=cfg, attention_mask=pair_mask)
    match = itm_logits(params, fused).softmax(-1)[:, 1].reshape(n, k)
    return (sim - 1.0).scatter(1, top, match)
