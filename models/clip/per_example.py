"""One example's share of CLIP's contrastive loss, for per-example gradients.

CLIP's loss couples a batch (each example's negatives are the others). Example ``i``'s
term here is its image against every caption and its caption against every image, with
the *other* examples' embeddings computed once and held constant. The mean of the terms
equals :func:`models.clip.loss`, and ``vmap(grad(example_loss))`` gives every example's
gradient in one pass (as differentially private training needs).

Example::

    bank = detached_embeddings(params, batch, cfg=cfg)
    grads = vmap(grad(example_loss), in_dims=(None, 0, 0, 0, None, None))(
        params, batch["images"], batch["tokens"], torch.arange(B), *bank, cfg=cfg)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fmm import checks
from fmm.losses import logit_scale_value
from models.clip.config import CLIPConfig
from models.clip.model import (
    Params,
    _check_images,
    _check_tokens,
    _encode_image,
    _encode_text,
    encode_image,
    encode_text,
    init,
)


def detached_embeddings(
    params: Params, batch: dict[str, torch.Tensor], *, cfg: CLIPConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's ``(image_embeds [B, E], text_embeds [B, E])``, computed without grad."""
    checks.check_keys(batch, ("images", "tokens"))
    with torch.no_grad():
        return (
            encode_image(params, batch["images"], cfg=cfg),
            encode_text(params, batch["tokens"], cfg=cfg),
        )


def example_loss(
    params: Params,
    image: torch.Tensor,
    tokens: torch.Tensor,
    index: torch.Tensor,
    bank_images: torch.Tensor,
    bank_texts: torch.Tensor,
    *,
    cfg: CLIPConfig,
) -> torch.Tensor:
    """Example ``index``'s symmetric InfoNCE term. ``image [3, H, W]`` (``[3, frames, H, W]``
    for a video tower), ``tokens [T]``,
    ``index []`` int64, banks ``[B, E]`` from :func:`detached_embeddings`. Returns ``[]``."""
    checks.check_params(params, init=init, cfg=cfg)
    checks.check_float("image", image, cfg.input_shape)
    _check_images(params, image[None], cfg, "image")
    checks.check_int("tokens", tokens, (range(1, cfg.context_length + 1),))
    _check_tokens(tokens[None], cfg, "tokens")
    checks.check_int("index", index, ())
    for name, bank in (("bank_images", bank_images), ("bank_texts", bank_texts)):
        checks.check_float(name, bank, ("batch", cfg.embed_dim))
    checks.check_same_batch(("bank_images", bank_images), ("bank_texts", bank_texts))
    img = _encode_image(params, image[None], cfg, True, None)[0]
    txt = _encode_text(params, tokens[None], cfg, True, None)[0]
    # Swap the live embeddings into the example's own row so the positive pair carries the
    # gradient while the negatives stay constants; `where` rather than an indexed
    # assignment keeps this pure, so vmap batches it over `index`.
    own = (torch.arange(len(bank_texts), device=index.device) == index)[:, None]
    texts, images = torch.where(own, txt, bank_texts), torch.where(own, img, bank_images)
    scale = logit_scale_value(params["logit_scale"])
    return 0.5 * (
        F.cross_entropy(scale * texts @ img, index) + F.cross_entropy(scale * images @ txt, index)
    )
