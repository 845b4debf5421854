"""The table of every public model function and how a careless user can spoil its arguments.

``ENTRIES`` lists each public function of every family (and ``fmm.decoding``'s entry points)
with good arguments on a tiny preset (built once, in ``bad_input_world.world``) and an
``Arg`` per argument saying what it is, so ``test_bad_input`` knows how to spoil it. Here:
init of every family, clip, gpt and ``fmm.decoding``, bert, vqvae, mmgpt, flava and albef;
``bad_input_families`` adds blip2, mdetr, adm, vae, clap, ``fmm.diffusion`` and coca. A new
family adds its entries to one of the two (what they are made of: ``bad_input_world``).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

import fmm
from fmm import decoding
from models import albef, bert, clip, flava, gpt, mmgpt, vqvae
from tests.models import bad_input_families  # noqa: F401  (appends its entries)
from tests.models.bad_input_world import (
    ALBEF,
    BERT,
    CLIP,
    ENTRIES,
    FAMILIES,
    FLAVA,
    GPT,
    KEY,
    MM,
    OTHER,
    VQ,
    Arg,
    B,
    _ids,
    _image,
    _w,
    entry,
)

__all__ = ["ENTRIES", "Arg"]


# --- init of every family: the config's type
for fam_name, fam, cfg in FAMILIES:
    other_cfg = GPT if fam is not gpt else CLIP
    entry(
        f"{fam_name}.init",
        lambda cfg=cfg: {"cfg": cfg},
        lambda a, fam=fam: fam.init(a["cfg"], KEY.to("meta")),
        cfg=Arg("cfg", other=lambda other_cfg=other_cfg: other_cfg),
    )

# --- CLIP
clip_images = _w("params=clip", "images=images32")
clip_tokens = _w("params=clip", "tokens=clip_tokens")
for fn in (clip.encode_image, clip.image_features):
    entry(
        f"clip.{fn.__name__}", clip_images, lambda a, fn=fn: fn(a["params"], a["images"], cfg=CLIP),
        images=_image(), params=Arg("params", other=OTHER["clip"]),
    )  # fmt: skip
for fn in (clip.encode_text, clip.text_features):
    entry(
        f"clip.{fn.__name__}", clip_tokens, lambda a, fn=fn: fn(a["params"], a["tokens"], cfg=CLIP),
        tokens=_ids(CLIP.vocab_size, CLIP.context_length),
        params=Arg("params", other=OTHER["clip"]),
    )  # fmt: skip
entry(
    "clip.apply", _w("params=clip", "images=images32", "tokens=clip_tokens"),
    lambda a: clip.apply(a["params"], a["images"], a["tokens"], cfg=CLIP),
    images=_image(), tokens=_ids(CLIP.vocab_size, CLIP.context_length, batch_of="images"),
    params=Arg("params", other=OTHER["clip"]),
)  # fmt: skip
entry(
    "clip.loss", _w("params=clip", "batch['images']=images32", "batch['tokens']=clip_tokens"),
    lambda a: clip.loss(
        a["params"], {"images": a["batch['images']"], "tokens": a["batch['tokens']"]}, cfg=CLIP
    ),
    **{"batch['images']": _image(),
       "batch['tokens']": _ids(CLIP.vocab_size, CLIP.context_length, batch_of="batch['images']")},
    params=Arg("params", other=OTHER["clip"]),
)  # fmt: skip
entry(
    "clip.example_loss",
    _w("params=clip", image=lambda w: w["images32"][0], tokens=lambda w: w["clip_tokens"][0],
       bank_images=lambda w: torch.randn(B, CLIP.embed_dim),
       bank_texts=lambda w: torch.randn(B, CLIP.embed_dim)),
    lambda a: clip.example_loss(a["params"], a["image"], a["tokens"], torch.tensor(0),
                                a["bank_images"], a["bank_texts"], cfg=CLIP),
    image=Arg("float"), bank_images=Arg("float"), bank_texts=Arg("float", batch_of="bank_images"),
    params=Arg("params", other=OTHER["clip"]),
)  # fmt: skip

# --- GPT and fmm.decoding
gpt_params = Arg("params", other=OTHER["gpt"])
entry(
    "gpt.apply", _w("params=gpt", "tokens=gpt_tokens"),
    lambda a: gpt.apply(a["params"], a["tokens"], cfg=GPT),
    tokens=_ids(GPT.vocab_size, GPT.context_length), params=gpt_params,
)  # fmt: skip
entry(
    "gpt.loss",
    _w("params=gpt", "batch['tokens']=gpt_tokens", **{"batch['mask']": lambda w: w["gpt_tokens"] > 3}),
    lambda a: gpt.loss(a["params"], {"tokens": a["batch['tokens']"], "mask": a["batch['mask']"]},
                       cfg=GPT),
    **{"batch['tokens']": _ids(GPT.vocab_size, GPT.context_length + 1),
       "batch['mask']": Arg("mask", batch_of="batch['tokens']")},
    params=gpt_params,
)  # fmt: skip
entry(
    "decoding.generate", _w("params=gpt", "prompt=gpt_tokens"),
    lambda a: decoding.generate(a["params"], a["prompt"], cfg=GPT, max_new_tokens=2),
    prompt=_ids(GPT.vocab_size), params=gpt_params,
)  # fmt: skip
entry(
    "decoding.prefill",
    _w("params=gpt", "tokens=gpt_tokens",
       cache=lambda w: decoding.init_cache(GPT.decoder_spec, B, 12)),
    lambda a: decoding.prefill(a["params"], a["tokens"], a["cache"], cfg=GPT),
    tokens=_ids(GPT.vocab_size), params=gpt_params,
)  # fmt: skip
entry(
    "decoding.decode_step",
    _w("params=gpt", "cache=gpt_cache", token=lambda w: w["gpt_tokens"][:, -1]),
    lambda a: decoding.decode_step(a["params"], a["token"], a["cache"], cfg=GPT),
    token=_ids(GPT.vocab_size), params=gpt_params,
)  # fmt: skip

# --- BERT
bert_params = Arg("params", other=OTHER["bert"])
bert_good = _w("params=bert", "input_ids=bert_ids",
               attention_mask=lambda w: w["bert_ids"] > 5,
               token_type_ids=lambda w: (w["bert_ids"] > 30).long())  # fmt: skip
bert_text = dict(
    input_ids=_ids(BERT.vocab_size, BERT.max_positions),
    attention_mask=Arg("mask", batch_of="input_ids"),
    token_type_ids=_ids(BERT.type_vocab_size, batch_of="input_ids"),
    params=bert_params,
)
for fn in (bert.apply, bert.sentence_embedding):
    entry(
        f"bert.{fn.__name__}", bert_good,
        lambda a, fn=fn: fn(a["params"], a["input_ids"], cfg=BERT,
                            attention_mask=a["attention_mask"], token_type_ids=a["token_type_ids"]),
        **bert_text,
    )  # fmt: skip
_bert_fields = ("tokens", "attention_mask", "token_type_ids")
entry(
    "bert.loss",
    _w("params=bert", "batch['tokens']=bert_ids",
       **{"batch['attention_mask']": lambda w: w["bert_ids"] > 5,
          "batch['token_type_ids']": lambda w: (w["bert_ids"] > 30).long()}),
    lambda a: bert.loss(a["params"], {f: a[f"batch[{f!r}]"] for f in _bert_fields}, cfg=BERT,
                        key=KEY),
    **{"batch['tokens']": _ids(BERT.vocab_size, BERT.max_positions),
       "batch['attention_mask']": Arg("mask", batch_of="batch['tokens']"),
       "batch['token_type_ids']": _ids(BERT.type_vocab_size, batch_of="batch['tokens']")},
    params=bert_params,
)  # fmt: skip
entry(
    "bert.mean_pool",
    _w(hidden=lambda w: torch.randn(B, 6, 64), attention_mask=lambda w: w["bert_ids"] > 5),
    lambda a: bert.mean_pool(a["hidden"], a["attention_mask"]),
    hidden=Arg("float", sized=False), attention_mask=Arg("mask", batch_of="hidden"),
)  # fmt: skip
entry(
    "bert.pooler", _w("params=bert", hidden=lambda w: torch.randn(B, 6, 64)),
    lambda a: bert.pooler(a["params"], a["hidden"]), hidden=Arg("float"),
)  # fmt: skip

# --- VQ-VAE
vq_params = Arg("params", other=OTHER["vqvae"])
for fn in (vqvae.encode, vqvae.encode_latents, vqvae.apply):
    entry(
        f"vqvae.{fn.__name__}", _w("params=vqvae", "images=images32"),
        lambda a, fn=fn: fn(a["params"], a["images"], cfg=VQ), images=_image(), params=vq_params,
    )  # fmt: skip
entry(
    "vqvae.decode", _w("params=vqvae", codes=lambda w: torch.randint(0, 128, (B, 8, 8))),
    lambda a: vqvae.decode(a["params"], a["codes"], cfg=VQ),
    codes=_ids(VQ.codebook_size), params=vq_params,
)  # fmt: skip
entry(
    "vqvae.decode_latents", _w("params=vqvae", z_q=lambda w: torch.randn(B, 8, 8, VQ.code_dim)),
    lambda a: vqvae.decode_latents(a["params"], a["z_q"], cfg=VQ),
    z_q=Arg("float"), params=vq_params,
)  # fmt: skip
entry(
    "vqvae.loss", _w("params=vqvae", "batch['images']=images32"),
    lambda a: vqvae.loss(a["params"], {"images": a["batch['images']"]}, cfg=VQ),
    **{"batch['images']": _image()}, params=vq_params,
)  # fmt: skip
entry(
    "vqvae.update_codebook",
    _w("params=vqvae", "images=images32",
       state=lambda w: vqvae.init_codebook_state(w["vqvae"])),
    lambda a: vqvae.update_codebook(a["params"], a["state"], a["images"], cfg=VQ, key=KEY),
    images=_image(), params=vq_params,
)  # fmt: skip

# --- multimodal GPT
mm_params = Arg("params", other=OTHER["mmgpt"])
mm_tokens = _w("params=mmgpt", tokens=lambda w: mmgpt.sequence(w["mm_text"], w["mm_codes"], cfg=MM))
for fn in (mmgpt.apply, mmgpt.features, mmgpt.embed_tokens):
    entry(
        f"mmgpt.{fn.__name__}", mm_tokens, lambda a, fn=fn: fn(a["params"], a["tokens"], cfg=MM),
        tokens=_ids(MM.vocab_size, MM.seq_len), params=mm_params,
    )  # fmt: skip
entry(
    "mmgpt.loss", _w("params=mmgpt", "batch['text']=mm_text", "batch['codes']=mm_codes"),
    lambda a: mmgpt.loss(a["params"], {"text": a["batch['text']"], "codes": a["batch['codes']"]},
                         cfg=MM, key=KEY),
    **{"batch['text']": _ids(MM.text_vocab),
       "batch['codes']": _ids(MM.image_vocab, batch_of="batch['text']")},
    params=mm_params,
)  # fmt: skip
entry(
    "mmgpt.sequence", _w("text=mm_text", "codes=mm_codes"),
    lambda a: mmgpt.sequence(a["text"], a["codes"], cfg=MM),
    text=_ids(MM.text_vocab), codes=_ids(MM.image_vocab, batch_of="text"),
)  # fmt: skip
entry(
    "mmgpt.generate_images", _w("params=mmgpt", "text=mm_text"),
    lambda a: mmgpt.generate_images(a["params"], a["text"], cfg=MM, temperature=0.0),
    text=_ids(MM.text_vocab), params=mm_params,
)  # fmt: skip

# --- FLAVA
flava_params = Arg("params", other=OTHER["flava"])
entry(
    "flava.encode_image",
    _w("images=images32", params=lambda w: w["flava"]["image"],
       patch_mask=lambda w: torch.rand(B, FLAVA.num_patches) < 0.3),
    lambda a: flava.encode_image(a["params"], a["images"], cfg=FLAVA, patch_mask=a["patch_mask"]),
    images=_image(), patch_mask=Arg("mask", batch_of="images"),
    params=Arg("params", other=OTHER["flava.image"]),
)  # fmt: skip
entry(
    "flava.encode_text",
    _w("input_ids=flava_ids", params=lambda w: w["flava"]["text"],
       attention_mask=lambda w: w["flava_ids"] > 5),
    lambda a: flava.encode_text(a["params"], a["input_ids"], cfg=FLAVA,
                                attention_mask=a["attention_mask"]),
    input_ids=_ids(FLAVA.vocab_size, FLAVA.max_positions),
    attention_mask=Arg("mask", batch_of="input_ids"),
    params=Arg("params", other=OTHER["flava.text"]),
)  # fmt: skip
entry(
    "flava.encode_multimodal",
    _w("params=flava", image_hidden=lambda w: torch.randn(B, 17, 64),
       text_hidden=lambda w: torch.randn(B, 5, 64), text_mask=lambda w: torch.ones(B, 5) > 0),
    lambda a: flava.encode_multimodal(a["params"], a["image_hidden"], a["text_hidden"], cfg=FLAVA,
                                      text_mask=a["text_mask"]),
    image_hidden=Arg("float"), text_hidden=Arg("float", batch_of="image_hidden"),
    text_mask=Arg("mask", batch_of="text_hidden"), params=flava_params,
)  # fmt: skip
entry(
    "flava.embed_image", _w("params=flava", "images=images32"),
    lambda a: flava.embed_image(a["params"], a["images"], cfg=FLAVA),
    images=_image(), params=flava_params,
)  # fmt: skip
entry(
    "flava.embed_text", _w("params=flava", "input_ids=flava_ids"),
    lambda a: flava.embed_text(a["params"], a["input_ids"], cfg=FLAVA),
    input_ids=_ids(FLAVA.vocab_size, FLAVA.max_positions), params=flava_params,
)  # fmt: skip
entry(
    "flava.apply", _w("params=flava", "images=images32", "input_ids=flava_ids"),
    lambda a: flava.apply(a["params"], a["images"], a["input_ids"], cfg=FLAVA),
    images=_image(), input_ids=_ids(FLAVA.vocab_size, FLAVA.max_positions, batch_of="images"),
    params=flava_params,
)  # fmt: skip
_tokenizer = flava.random_codebook_tokenizer(
    fmm.random.key(5), patch_size=FLAVA.patch_size, codebook_size=FLAVA.image_vocab_size
)
_flava_fields = ("images", "tokens", "attention_mask", "image_codes")
entry(
    "flava.loss",
    _w("params=flava", "batch['images']=images32", "batch['tokens']=flava_ids",
       **{"batch['attention_mask']": lambda w: w["flava_ids"] > 5,
          "batch['image_codes']": lambda w: _tokenizer(w["images32"])}),
    lambda a: flava.loss(a["params"], {f: a[f"batch[{f!r}]"] for f in _flava_fields},
                         cfg=FLAVA, key=KEY),
    **{"batch['images']": _image(),
       "batch['tokens']": _ids(FLAVA.vocab_size, FLAVA.max_positions, batch_of="batch['images']"),
       "batch['attention_mask']": Arg("mask", batch_of="batch['tokens']"),
       "batch['image_codes']": _ids(FLAVA.image_vocab_size, batch_of="batch['images']")},
    params=flava_params,
)  # fmt: skip

# --- ALBEF
albef_params = Arg("params", other=OTHER["albef"])
albef_text = dict(
    input_ids=_ids(ALBEF.text.vocab_size, ALBEF.text.max_positions),
    attention_mask=Arg("mask", batch_of="input_ids"),
)
albef_good = _w("params=albef", "images=images32", "input_ids=albef_ids",
                attention_mask=lambda w: w["albef_ids"] > 5)  # fmt: skip
entry(
    "albef.encode_image", _w("params=albef", "images=images32"),
    lambda a: albef.encode_image(a["params"], a["images"], cfg=ALBEF),
    images=_image(), params=albef_params,
)  # fmt: skip
entry(
    "albef.encode_text", albef_good,
    lambda a: albef.encode_text(a["params"], a["input_ids"], cfg=ALBEF,
                                attention_mask=a["attention_mask"]),
    **albef_text, params=albef_params,
)  # fmt: skip
entry(
    "albef.fuse",
    _w("params=albef", text_tokens=lambda w: torch.randn(B, 8, 64),
       image_tokens=lambda w: torch.randn(B, 65, 64), attention_mask=lambda w: w["albef_ids"] > 5),
    lambda a: albef.fuse(a["params"], a["text_tokens"], a["image_tokens"], cfg=ALBEF,
                         attention_mask=a["attention_mask"]),
    text_tokens=Arg("float"), image_tokens=Arg("float", batch_of="text_tokens"),
    attention_mask=Arg("mask", batch_of="text_tokens"), params=albef_params,
)  # fmt: skip
for fn in (albef.apply, albef.rank_texts):
    entry(
        f"albef.{fn.__name__}", albef_good,
        lambda a, fn=fn: fn(a["params"], a["images"], a["input_ids"], cfg=ALBEF,
                            attention_mask=a["attention_mask"]),
        images=_image(), **albef_text, params=albef_params,
    )  # fmt: skip
entry(
    "albef.vqa", _w("params=albef", "images=images32", "question_ids=albef_ids"),
    lambda a: albef.vqa(a["params"], a["images"], a["question_ids"], cfg=ALBEF),
    images=_image(),
    question_ids=_ids(ALBEF.text.vocab_size, ALBEF.text.max_positions, batch_of="images"),
    params=albef_params,
)  # fmt: skip
entry(
    "albef.momentum_features",
    _w("images=images32", "input_ids=albef_ids",
       momentum=lambda w: albef.init_momentum(w["albef"])),
    lambda a: albef.momentum_features(a["momentum"], a["images"], a["input_ids"], cfg=ALBEF),
    images=_image(),
    input_ids=_ids(ALBEF.text.vocab_size, ALBEF.text.max_positions, batch_of="images"),
    momentum=Arg("params", other=functools.cache(lambda: albef.init_momentum(OTHER["albef"]()))),
)  # fmt: skip


entry(
    "albef.embed_image", _w("params=albef", "images=images32"),
    lambda a: albef.embed_image(a["params"], a["images"], cfg=ALBEF),
    images=_image(), params=albef_params,
)  # fmt: skip
entry(
    "albef.embed_text", albef_good,
    lambda a: albef.embed_text(a["params"], a["input_ids"], cfg=ALBEF,
                               attention_mask=a["attention_mask"]),
    **albef_text, params=albef_params,
)  # fmt: skip


def _albef_batch(a: dict[str, Any]) -> dict[str, Any]:
    fields = ("images", "tokens", "attention_mask", "idx", "answers")
    return {f: a[f"batch[{f!r}]"] for f in fields if f"batch[{f!r}]" in a}


albef_batch = {
    "batch['images']": _image(),
    "batch['tokens']": _ids(
        ALBEF.text.vocab_size, ALBEF.text.max_positions, batch_of="batch['images']"
    ),
    "batch['attention_mask']": Arg("mask", batch_of="batch['tokens']"),
}
entry(
    "albef.loss",
    _w("params=albef", "state=albef_state", "batch['images']=images32",
       "batch['tokens']=albef_ids",
       **{"batch['attention_mask']": lambda w: w["albef_ids"] > 5,
          "batch['idx']": lambda w: torch.arange(B)}),
    lambda a: albef.loss(a["params"], _albef_batch(a), cfg=ALBEF, key=KEY, state=a["state"]),
    **albef_batch, params=albef_params,
    state=Arg("params", other=functools.cache(
        lambda: albef.init_state(albef.albef_base(num_answers=3), OTHER["albef"](), KEY.to("meta"))
    )),
)  # fmt: skip
entry(
    "albef.loss[vqa]",
    _w("params=albef", "batch['images']=images32", "batch['tokens']=albef_ids",
       **{"batch['attention_mask']": lambda w: w["albef_ids"] > 5,
          "batch['answers']": lambda w: torch.tensor([0, 2])}),
    lambda a: albef.loss(a["params"], _albef_batch(a), cfg=ALBEF),
    **albef_batch, **{"batch['answers']": _ids(3, batch_of="batch['images']")},
    params=albef_params,
)  # fmt: skip
