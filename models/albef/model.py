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

from fmm import checks, fusion, nn, random
from fmm.nn import towers
from fmm.nn.transformer import BlockFn
from models import bert
from models.albef.config import _INIT_STD, ALBEFConfig

Params = dict[str, Any]

TEMP_RANGE = (0.001, 0.5)
# The parts a momentum encoder copies (ALBEF keeps momentum copies of these, not of heads).
MOMENTUM_PARTS = ("image", "text", "fusion", "vision_proj", "text_proj")


def init(cfg: ALBEFConfig, key: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> Params:
    """Fresh params for ``cfg``, a pure function of ``(cfg, key)``; a ``meta`` key gives
    shapes only. Example: ``params = init(albef_tiny(), fmm.random.key(0))``."""
    checks.check_type("cfg", cfg, ALBEFConfig)
    dev, wi, wt = key.device, cfg.image_width, cfg.text.width
    k = lambda name: random.fold_in(key, name)
    params: Params = {
        "image": towers.init_vit(cfg.image_tower, k("image"), dtype=dtype),
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


def _check_images(params: Params, images, cfg: ALBEFConfig, name: str = "images") -> None:
    want = ("batch", cfg.in_channels, cfg.image_size, cfg.image_size)
    checks.check_float(name, images, want, like=params["image"]["patch"]["weight"])


def _check_pairs(params: Params, images, input_ids, attention_mask, cfg: ALBEFConfig) -> None:
    _check_images(params, images, cfg)
    bert.check_inputs(
        input_ids, cfg=cfg.text, attention_mask=attention_mask, batch_of=("images", images)
    )


def _encode_image(params: Params, images, cfg: ALBEFConfig, block_fn=None) -> torch.Tensor:
    return towers.vit(params["image"], images, cfg=cfg.image_tower, block_fn=block_fn).sequence


def _encode_text(params: Params, input_ids, cfg: ALBEFConfig, attention_mask, key, train,
                 block_fn=None) -> torch.Tensor:  # fmt: skip
    return towers.text(
        params["text"], input_ids, cfg=cfg.text.tower, valid=attention_mask, key=key,
        train=train, block_fn=block_fn,
    ).sequence  # fmt: skip


def _fuse(params: Params, text_tokens, image_tokens, cfg: ALBEFConfig, attention_mask, key, train,
          block_fn=None) -> torch.Tensor:  # fmt: skip
    mask = None if attention_mask is None else nn.padding_mask(attention_mask)
    return fusion.cross_attention_fusion(
        params["fusion"], text_tokens, image_tokens, cfg=cfg.fusion, mask=mask, key=key,
        train=train, block_fn=block_fn,
    )  # fmt: skip


def encode_image(
    params: Params, images: torch.Tensor, *, cfg: ALBEFConfig, block_fn: BlockFn | None = None
) -> torch.Tensor:
    """ViT tokens after the final norm: ``images [B, C, H, W] -> [B, 1 + grid², image_width]``
    (token 0 is [CLS]). ``params``: the full tree or a momentum tree."""
    checks.check_params(params, init=init, cfg=cfg, only=("image",))
    _check_images(params, images, cfg)
    return _encode_image(params, images, cfg, block_fn)


def encode_text(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """BERT tokens ``input_ids [B, S] -> [B, S, text width]`` (token 0 is [CLS]);
    ``attention_mask [B, S]``: True/1 for real tokens."""
    checks.check_params(params, init=init, cfg=cfg, only=("text",))
    bert.check_inputs(input_ids, cfg=cfg.text, attention_mask=attention_mask)
    return _encode_text(params, input_ids, cfg, attention_mask, key, train, block_fn)


def fuse(
    params: Params,
    text_tokens: torch.Tensor,
    image_tokens: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    train: bool = False,
    block_fn: BlockFn | None = None,
) -> torch.Tensor:
    """The multimodal encoder: ``text_tokens [B, S, Wt]`` attend to themselves (padding
    excluded by ``attention_mask [B, S]``) and to ``image_tokens [B, P, Wi]`` -> ``[B, S, Wt]``.
    """
    checks.check_params(params, init=init, cfg=cfg, only=("fusion",))
    like = params["fusion"]["blocks"][0]["attn"]["qkv"]["weight"] if cfg.fusion_layers else None
    checks.check_float("text_tokens", text_tokens, ("batch", "seq", cfg.text.width), like=like)
    checks.check_float(
        "image_tokens", image_tokens, ("batch", "patches", cfg.image_width), like=like
    )
    checks.check_same_batch(("text_tokens", text_tokens), ("image_tokens", image_tokens))
    if attention_mask is not None:
        checks.check_mask("attention_mask", attention_mask, text_tokens.shape[:2])
    return _fuse(params, text_tokens, image_tokens, cfg, attention_mask, key, train, block_fn)


def _check_features(name: str, tokens: torch.Tensor, weight) -> None:
    checks.check_float(name, tokens, ("batch", "seq", weight.shape[1]), like=weight)


def _projected(params: Params, part: str, tokens: torch.Tensor) -> torch.Tensor:
    return F.normalize(nn.linear(params[part], nn.pool_cls(tokens)), dim=-1)


def image_embedding(params: Params, image_tokens: torch.Tensor) -> torch.Tensor:
    """Unit-norm contrastive embedding of the image [CLS]: ``[B, P, Wi] -> [B, embed]``."""
    checks.check_keys(params, ("vision_proj",), name="params")
    _check_features("image_tokens", image_tokens, params["vision_proj"]["weight"])
    return _projected(params, "vision_proj", image_tokens)


def text_embedding(params: Params, text_tokens: torch.Tensor) -> torch.Tensor:
    """Unit-norm contrastive embedding of the text [CLS]: ``[B, S, Wt] -> [B, embed]``."""
    checks.check_keys(params, ("text_proj",), name="params")
    _check_features("text_tokens", text_tokens, params["text_proj"]["weight"])
    return _projected(params, "text_proj", text_tokens)


def embed_image(params: Params, images: torch.Tensor, *, cfg: ALBEFConfig) -> torch.Tensor:
    """Unit-norm image embeddings for retrieval: ``[B, C, H, W] -> [B, embed_dim]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("image", "vision_proj"))
    _check_images(params, images, cfg)
    return _projected(params, "vision_proj", _encode_image(params, images, cfg))


def embed_text(
    params: Params,
    input_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit-norm text embeddings for retrieval: ``[B, S] -> [B, embed_dim]``."""
    checks.check_params(params, init=init, cfg=cfg, only=("text", "text_proj"))
    bert.check_inputs(input_ids, cfg=cfg.text, attention_mask=attention_mask)
    text = _encode_text(params, input_ids, cfg, attention_mask, None, False)
    return _projected(params, "text_proj", text)


def logit_scale(params: Params) -> torch.Tensor:
    """The zero-shot scale ``[]``, ``1 / temperature``: logits are
    ``scale * embed_image @ embed_text.T``, as the contrastive loss scores them."""
    return 1.0 / temperature(params)


def image_shape(cfg: ALBEFConfig) -> tuple[int, int, int]:
    """``(C, H, W)`` of the images the model reads."""
    return (cfg.in_channels, cfg.image_size, cfg.image_size)


def temperature(params: Params) -> torch.Tensor:
    """The learned temperature projected into ALBEF's range [0.001, 0.5] (no edit of params)."""
    checks.check_keys(params, ("log_temp",), name="params")
    return params["log_temp"].exp().clamp(*TEMP_RANGE)


def itm_logits(params: Params, fused: torch.Tensor) -> torch.Tensor:
    """Image-text matching logits on the fused [CLS]: ``[B, S, W] -> [B, 2]`` (index 1 = match)."""
    checks.check_keys(params, ("itm_head",), name="params")
    _check_features("fused", fused, params["itm_head"]["weight"])
    return _itm_logits(params, fused)


def _itm_logits(params: Params, fused: torch.Tensor) -> torch.Tensor:
    return nn.linear(params["itm_head"], nn.pool_cls(fused))


def mlm_logits(params: Params, fused: torch.Tensor, *, cfg: ALBEFConfig) -> torch.Tensor:
    """Masked-token logits ``[B, S, W] -> [B, S, vocab]`` (BERT's head, tied decoder)."""
    checks.check_params(params, init=init, cfg=cfg, only=("mlm_head", "text"))
    _check_features("fused", fused, params["mlm_head"]["dense"]["weight"])
    return _mlm_logits(params, fused, cfg)


def _mlm_logits(params: Params, fused: torch.Tensor, cfg: ALBEFConfig) -> torch.Tensor:
    h = params["mlm_head"]
    x = F.gelu(nn.linear(h["dense"], fused))
    x = nn.layer_norm(h["norm"], x, eps=cfg.text.norm_eps)
    return F.linear(x, params["text"]["token"]["weight"], h["bias"])


def vqa_logits(params: Params, fused: torch.Tensor) -> torch.Tensor:
    """Answer logits on the fused [CLS] of question + image: ``[B, S, W] -> [B, num_answers]``.

    A classifier over a fixed answer set, where ALBEF itself decodes answers with a
    generative decoder (see docs/flava_albef.md)."""
    if not isinstance(params, dict) or "vqa_head" not in params:
        raise ValueError("params have no 'vqa_head' (built with num_answers=0)")
    _check_features("fused", fused, params["vqa_head"]["fc1"]["weight"])
    return _vqa_logits(params, fused)


def _vqa_logits(params: Params, fused: torch.Tensor) -> torch.Tensor:
    return nn.mlp(params["vqa_head"], nn.pool_cls(fused))


_ENCODERS = ("image", "text", "fusion")


def _apply(params: Params, images, input_ids, cfg: ALBEFConfig, attention_mask, block_fn=None):
    image = _encode_image(params, images, cfg, block_fn)
    text = _encode_text(params, input_ids, cfg, attention_mask, None, False, block_fn)
    fused = _fuse(params, text, image, cfg, attention_mask, None, False, block_fn)
    return {"image": image, "text": text, "fused": fused}


def apply(
    params: Params,
    images: torch.Tensor,
    input_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
    block_fn: BlockFn | None = None,
) -> dict[str, torch.Tensor]:
    """All three encoders on matched pairs. ``images [B, C, H, W]``, ``input_ids [B, S]`` ->
    ``{"image": [B, P, Wi], "text": [B, S, Wt], "fused": [B, S, Wt]}``.

    Example::

        cfg = albef_tiny()
        out = apply(init(cfg, fmm.random.key(0)), images, ids, cfg=cfg)
        match_prob = itm_logits(params, out["fused"]).softmax(-1)[:, 1]
    """
    checks.check_params(params, init=init, cfg=cfg, only=_ENCODERS)
    _check_pairs(params, images, input_ids, attention_mask, cfg)
    return _apply(params, images, input_ids, cfg, attention_mask, block_fn)


def _vqa(params: Params, images, question_ids, cfg: ALBEFConfig, attention_mask):
    return _vqa_logits(params, _apply(params, images, question_ids, cfg, attention_mask)["fused"])


def _check_vqa(params: Params, cfg: ALBEFConfig) -> None:
    if not cfg.num_answers:
        raise ValueError("cfg has num_answers=0: VQA needs a config built with_answers(...)")
    checks.check_params(params, init=init, cfg=cfg, only=(*_ENCODERS, "vqa_head"))


def vqa(
    params: Params,
    images: torch.Tensor,
    question_ids: torch.Tensor,
    *,
    cfg: ALBEFConfig,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Answer logits for questions about images: ``[B, C, H, W], [B, S] -> [B, num_answers]``."""
    _check_vqa(params, cfg)
    _check_images(params, images, cfg)
    checks.check_ids(
        "question_ids", question_ids, ("batch", range(1, cfg.text.max_positions + 1)),
        high=cfg.text.vocab_size, hint=f"max_positions={cfg.text.max_positions}",
    )  # fmt: skip
    checks.check_same_batch(("images", images), ("question_ids", question_ids))
    if attention_mask is not None:
        checks.check_mask("attention_mask", attention_mask, question_ids.shape, of="question_ids")
    return _vqa(params, images, question_ids, cfg, attention_mask)


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
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    parts = (*_ENCODERS, "vision_proj", "text_proj", "itm_head")
    checks.check_params(params, init=init, cfg=cfg, only=parts)
    _check_images(params, images, cfg)
    bert.check_inputs(input_ids, cfg=cfg.text, attention_mask=attention_mask)
    image = _encode_image(params, images, cfg)
    text = _encode_text(params, input_ids, cfg, attention_mask, None, False)
    sim = _projected(params, "vision_proj", image) @ _projected(params, "text_proj", text).T
    k = min(k, sim.shape[1])
    top = sim.topk(k, dim=1).indices  # [N, k]
    n = image.shape[0]
    pair_text = text[top.flatten()]  # [N*k, S, W]
    pair_mask = None if attention_mask is None else attention_mask[top.flatten()]
    pair_image = image.repeat_interleave(k, dim=0)
    fused = _fuse(params, pair_text, pair_image, cfg, pair_mask, None, False)
    match = _itm_logits(params, fused).softmax(-1)[:, 1].reshape(n, k)
    return (sim - 1.0).scatter(1, top, match)
