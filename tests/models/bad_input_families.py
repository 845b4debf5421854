"""The bad-input table's entries for blip2, mdetr, adm (the U-Net, DALL-E 2's CLIP
condition), vae, clap (CLIP's audio preset) and ``fmm.diffusion``'s entry points that take
a user's tensors, and coca.

One entry per distinct boundary: where two public functions run the same check helper under
the same names (blip2's ``itm_logits`` / ``clm_logits`` / ``qformer``, ``ddpm_step`` /
``ddim_step``), one stands for both. Imported by ``bad_input_table``, which holds them all.

Inputs of a fully convolutional network (the U-Net, the VAE, MDETR's padded images) take
any height and width (divisible by the downsampling), so their ``Arg`` is not ``sized``: a
changed side is no error there. A sampler step's index ``i`` is 0-d, which the ``ids``
spoils (an empty sequence axis) cannot make; it is checked in ``fmm.diffusion.samplers``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from fmm import diffusion as fd
from models import adm, blip2, clip, coca, mdetr
from tests.models.bad_input_world import (
    BLIP2,
    CLIP,
    COCA,
    DALLE2,
    GPT,
    KEY,
    MDETR,
    OTHER,
    VAE,
    WORLD_PARTS,
    Arg,
    B,
    _ids,
    _image,
    _w,
    entry,
    random_params,
)

CLAP = clip.clap_tiny()
BLIP2_LM = blip2.blip2_gpt_tiny()
SCHEDULE = adm.unet.schedule(DALLE2)
SPACED = fd.spaced(SCHEDULE, 10)
IMAGE_TOKENS = 1 + (BLIP2.image_size // BLIP2.patch_size) ** 2


def _part(w: dict[str, Any]) -> dict[str, Any]:
    g = torch.Generator().manual_seed(2)

    def ids(high: int, seq: int, low: int = 0) -> torch.Tensor:
        return torch.randint(low, high, (B, seq), generator=g)

    part = {
        "clap": random_params(clip.init, CLAP),
        "blip2_lm": random_params(blip2.init, BLIP2_LM),
        "spectrograms": torch.randn(B, 1, *CLAP.image_size, generator=g),
        "coca_tokens": ids(COCA.vocab_size, 7, low=1),  # no pad_id (0)
        "blip2_ids": ids(BLIP2.vocab_size, 7, low=2),  # no pad_id (0): every row has text
        "lm_tokens": ids(BLIP2_LM.lm.vocab_size, 5),
        "mdetr_ids": ids(MDETR.text.vocab_size, 6, low=2),  # no pad_id (1)
        "pixels16": torch.rand(B, 3, 16, 16, generator=g) * 2 - 1,
    }
    # MDETR's own init: random batch-norm statistics (negative variances) give NaN boxes,
    # which the loss's Hungarian step refuses.
    part["mdetr"] = mdetr.init(MDETR, KEY)
    with torch.no_grad():
        part["mdetr_out"] = mdetr.apply(part["mdetr"], w["images32"], part["mdetr_ids"], cfg=MDETR)
    return part


WORLD_PARTS.append(_part)


# --- CLAP: CLIP's image tower on log-mel spectrograms [B, 1, frames, mels]
entry(
    "clap.encode_image", _w("params=clap", "images=spectrograms"),
    lambda a: clip.encode_image(a["params"], a["images"], cfg=CLAP),
    images=_image(), params=Arg("params", other=OTHER["clip"]),
)  # fmt: skip

# --- CoCa
coca_params = Arg("params", other=OTHER["coca"])
entry(
    "coca.encode_image", _w("params=coca", "images=images32"),
    lambda a: coca.encode_image(a["params"], a["images"], cfg=COCA),
    images=_image(), params=coca_params,
)  # fmt: skip
entry(
    "coca.encode_text", _w("params=coca", "tokens=coca_tokens"),
    lambda a: coca.encode_text(a["params"], a["tokens"], cfg=COCA),
    tokens=_ids(COCA.vocab_size, COCA.context_length - 1), params=coca_params,
)  # fmt: skip
entry(
    "coca.apply", _w("params=coca", "images=images32", "tokens=coca_tokens"),
    lambda a: coca.apply(a["params"], a["images"], a["tokens"], cfg=COCA),
    images=_image(), tokens=_ids(COCA.vocab_size, COCA.context_length - 1, batch_of="images"),
    params=coca_params,
)  # fmt: skip
entry(
    "coca.loss", _w("params=coca", "batch['images']=images32", "batch['tokens']=coca_tokens"),
    lambda a: coca.loss(a["params"], {"images": a["batch['images']"],
                                      "tokens": a["batch['tokens']"]}, cfg=COCA),
    **{"batch['images']": _image(),
       "batch['tokens']": _ids(COCA.vocab_size, COCA.context_length,
                               batch_of="batch['images']")},
    params=coca_params,
)  # fmt: skip
entry(
    "coca.generate_captions", _w("params=coca", "images=images32"),
    lambda a: coca.generate_captions(a["params"], a["images"], cfg=COCA, sot_id=1,
                                     max_new_tokens=2),
    images=_image(), params=coca_params,
)  # fmt: skip

# --- BLIP-2
blip2_params = Arg("params", other=OTHER["blip2"])
entry(
    "blip2.encode_image", _w("params=blip2", "images=images32"),
    lambda a: blip2.encode_image(a["params"], a["images"], cfg=BLIP2),
    images=_image(), params=blip2_params,
)  # fmt: skip
entry(
    "blip2.qformer",
    _w("params=blip2", "input_ids=blip2_ids", attention_mask=lambda w: w["blip2_ids"] > 4,
       image_embeds=lambda w: torch.randn(B, IMAGE_TOKENS, BLIP2.image_width)),
    lambda a: blip2.qformer(a["params"], cfg=BLIP2, input_ids=a["input_ids"],
                            attention_mask=a["attention_mask"], image_embeds=a["image_embeds"]),
    image_embeds=Arg("float"),
    input_ids=_ids(BLIP2.vocab_size, BLIP2.max_positions, batch_of="image_embeds"),
    attention_mask=Arg("mask", batch_of="input_ids"), params=blip2_params,
)  # fmt: skip
entry(
    "blip2.caption_logits", _w("params=blip2_lm", "images=images32", "tokens=lm_tokens"),
    lambda a: blip2.caption_logits(a["params"], a["images"], a["tokens"], cfg=BLIP2_LM),
    images=_image(),
    tokens=_ids(BLIP2_LM.lm.vocab_size, BLIP2_LM.lm.context_length - BLIP2_LM.queries,
                batch_of="images"),
    params=blip2_params,
)  # fmt: skip
entry(
    "blip2.itc_similarities",
    _w(image_feats=lambda w: torch.randn(B, BLIP2.queries, BLIP2.embed_dim),
       text_feats=lambda w: torch.randn(B + 1, BLIP2.embed_dim)),
    lambda a: blip2.itc_similarities(a["image_feats"], a["text_feats"], 0.07),
    image_feats=Arg("float", sized=False),  # its embed is what text_feats must match
    text_feats=Arg("float"),
)  # fmt: skip
_blip2_fields = ("images", "tokens", "attention_mask")
entry(
    "blip2.loss",
    _w("params=blip2", "batch['images']=images32", "batch['tokens']=blip2_ids",
       **{"batch['attention_mask']": lambda w: w["blip2_ids"] > 4}),
    lambda a: blip2.loss(a["params"], {f: a[f"batch[{f!r}]"] for f in _blip2_fields},
                         cfg=BLIP2, key=KEY),
    **{"batch['images']": _image(),
       "batch['tokens']": _ids(BLIP2.vocab_size, BLIP2.max_positions, batch_of="batch['images']"),
       "batch['attention_mask']": Arg("mask", batch_of="batch['tokens']")},
    params=blip2_params,
)  # fmt: skip

# --- MDETR (padded images: any side up to image_size)
mdetr_params = Arg("params", other=OTHER["mdetr"])
entry(
    "mdetr.apply",
    _w("params=mdetr", "images=images32", "tokens=mdetr_ids",
       image_mask=lambda w: torch.ones(B, 32, 32, dtype=torch.bool)),
    lambda a: mdetr.apply(a["params"], a["images"], a["tokens"], cfg=MDETR,
                          image_mask=a["image_mask"]),
    images=_image(sized=False), tokens=_ids(MDETR.text.vocab_size, MDETR.max_tokens,
                                            batch_of="images"),
    image_mask=Arg("mask", batch_of="images"), params=mdetr_params,
)  # fmt: skip
_mdetr_fields = ("images", "tokens", "boxes", "token_map", "box_valid")
# The images and tokens go through apply's helper under batch[...] names: not spoiled again.
entry(
    "mdetr.loss",
    _w("params=mdetr", "batch['images']=images32", "batch['tokens']=mdetr_ids",
       **{"batch['boxes']": lambda w: torch.tensor([[0.5, 0.5, 0.4, 0.3]]).expand(B, 2, 4),
          "batch['token_map']": lambda w: torch.eye(2, 6, dtype=torch.bool).expand(B, 2, 6),
          "batch['box_valid']": lambda w: torch.tensor([[True, False]]).expand(B, 2)}),
    lambda a: mdetr.loss(a["params"], {f: a[f"batch[{f!r}]"] for f in _mdetr_fields}, cfg=MDETR,
                         key=KEY),
    **{"batch['boxes']": Arg("float", batch_of="batch['images']"),
       "batch['token_map']": Arg("mask", batch_of="batch['boxes']"),
       "batch['box_valid']": Arg("mask", batch_of="batch['boxes']")},
    params=mdetr_params,
)  # fmt: skip
entry(
    "mdetr.ground",
    _w(out=lambda w: w["mdetr_out"], phrase_map=lambda w: torch.eye(2, 6, dtype=torch.bool)
       .expand(B, 2, 6)),
    lambda a: mdetr.ground(a["out"], a["phrase_map"]),
    phrase_map=Arg("mask", sized=False, batch_of="out"),  # any phrase length up to classes
)  # fmt: skip

entry(
    "mdetr.match_cost",
    _w(out=lambda w: w["mdetr_out"],
       targets=lambda w: torch.rand(B, 2, MDETR.classes + 1),
       target_boxes=lambda w: torch.rand(B, 2, 4)),
    lambda a: mdetr.match_cost(a["out"], a["targets"], a["target_boxes"], cfg=MDETR),
    targets=Arg("float", batch_of="out"), target_boxes=Arg("float", batch_of="targets"),
)  # fmt: skip

# --- ADM: the U-Net (DALL-E 2's decoder at test size) and its CLIP condition
adm_params = Arg("params", other=OTHER["adm"])
_cond = f"cond[{DALLE2.cond_key!r}]"
_embed = lambda w: torch.randn(B, DALLE2.embed_dim)
entry(
    "adm.unet.apply",
    _w("params=adm", "x_t=pixels16", t=lambda w: torch.tensor([0, DALLE2.timesteps - 1]),
       **{_cond: _embed}),
    lambda a: adm.unet.apply(a["params"], a["x_t"], a["t"], {DALLE2.cond_key: a[_cond]},
                             cfg=DALLE2),
    x_t=_image(sized=False), t=_ids(DALLE2.timesteps, batch_of="x_t"),
    **{_cond: Arg("float", batch_of="x_t")}, params=adm_params,
)  # fmt: skip
_images, _cond_field = "batch['images']", f"batch[{DALLE2.cond_key!r}]"
entry(
    "adm.unet.loss", _w("params=adm", f"{_images}=pixels16", **{_cond_field: _embed}),
    lambda a: adm.unet.loss(
        a["params"], {"images": a[_images], DALLE2.cond_key: a[_cond_field]}, cfg=DALLE2, key=KEY
    ),
    **{_images: _image(sized=False), _cond_field: Arg("float", batch_of=_images)},
    params=adm_params,
)  # fmt: skip
entry(
    "adm.dalle2.clip_condition",
    _w("clip_params=clip", "images=images32", cfg=lambda w: DALLE2, clip_cfg=lambda w: CLIP),
    lambda a: adm.dalle2.clip_condition(a["clip_params"], a["images"], clip_cfg=a["clip_cfg"],
                                        cfg=a["cfg"]),
    images=_image(), clip_params=Arg("params", other=OTHER["clip"]),
    cfg=Arg("cfg", other=lambda: GPT), clip_cfg=Arg("cfg", other=lambda: GPT),
)  # fmt: skip

# --- the VAE (latent diffusion's autoencoder)
vae_params = Arg("params", other=OTHER["vae"])
latents = functools.partial(torch.randn, B, VAE.embedding_channels, 8, 8)
entry(
    "vae.encode", _w("params=vae", "images=pixels16"),
    lambda a: adm.vae.encode(a["params"], a["images"], cfg=VAE),
    images=_image(sized=False), params=vae_params,
)  # fmt: skip
entry(
    "vae.decode", _w("params=vae", z=lambda w: latents()),
    lambda a: adm.vae.decode(a["params"], a["z"], cfg=VAE), z=_image(sized=False), params=vae_params,
)  # fmt: skip
entry(  # encode's image check; only the whole tree's params check is apply's own
    "vae.apply", _w("params=vae", "images=pixels16"),
    lambda a: adm.vae.apply(a["params"], a["images"], cfg=VAE), params=vae_params,
)  # fmt: skip
entry(
    "vae.loss", _w("params=vae", "batch['images']=pixels16"),
    lambda a: adm.vae.loss(a["params"], {"images": a["batch['images']"]}, cfg=VAE, key=KEY),
    **{"batch['images']": _image(sized=False)}, params=vae_params,
)  # fmt: skip
entry(
    "vae.sample_posterior", _w(mean=lambda w: latents(), log_variance=lambda w: latents()),
    lambda a: adm.vae.sample_posterior(a["mean"], a["log_variance"], KEY),
    log_variance=Arg("float", batch_of="mean"),  # mean takes any rank: only its dtype is fixed
)  # fmt: skip

# --- fmm.diffusion over the U-Net (its own checks name params, cond: see adm.unet.apply)
denoise = functools.partial(adm.unet.apply, cfg=DALLE2)
entry(
    "diffusion.q_sample",
    _w("x0=pixels16", t=lambda w: torch.tensor([0, SCHEDULE.steps - 1])),
    lambda a: fd.q_sample(SCHEDULE, a["x0"], a["t"], KEY),
    x0=Arg("float", sized=False), t=_ids(SCHEDULE.steps, batch_of="x0"),
)  # fmt: skip
entry(
    "diffusion.ddim_step", _w("params=adm", "x=pixels16"),
    lambda a: fd.ddim_step(denoise, a["params"], a["x"], torch.tensor(SPACED.steps - 1), KEY,
                           schedule=SPACED, learned_variance=DALLE2.learned_variance),
    x=Arg("float", sized=False),
)  # fmt: skip
entry(
    "diffusion.diffusion_loss", _w("params=adm", "x0=pixels16"),
    lambda a: fd.diffusion_loss(denoise, a["params"], a["x0"], KEY, schedule=SCHEDULE,
                                learned_variance=DALLE2.learned_variance),
    x0=Arg("float", sized=False),
)  # fmt: skip
