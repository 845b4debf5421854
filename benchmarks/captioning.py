"""CoCa greedy captioning: fmm's cached decoding against the references' own generation,
on identical random weights, in one process with the same threads.

TorchMultimodal's and open_clip's CoCa are different models (see ``models.coca.config``),
so each is raced against fmm on its own layout (``fmm.init`` weights converted with
``to_torchmultimodal`` / ``to_open_clip``):

- ``torchmultimodal loop``: TorchMultimodal has no generate; the image queries are computed
  once, then every step reruns its text and multimodal decoders over the whole caption,
  padded to the fixed text length its modules require;
- ``open_clip loop``: what ``CoCa.generate(generation_type="top_k", top_k=1)`` runs (the
  image encoded once, the full forward on the growing caption each step), written out
  because ``generate`` needs transformers' ``BeamSearchScorer``, which transformers 5
  removed;
- ``fmm eager`` / ``fmm compiled``: ``models.coca.generate_captions`` (the image encoded
  once, one prefill filling the cross-attention keys, one cached decode step per token;
  ``compile=True`` compiles the decode step with inductor, its one-off compile excluded).

Every contender's greedy tokens must equal fmm eager's (checked, printed). Sizes: ``small``
(256 wide, 4 + 4 + 4 layers) and ``base`` (``coca_vit_b32``'s widths and depths, with a text
length of ``--tokens + 2``).

Run from the repo root (a few minutes at the defaults on a 2-core CPU)::

    python benchmarks/captioning.py                        # small and base, batch 8, 32 tokens
    python benchmarks/captioning.py --sizes small --repeats 5
    python benchmarks/captioning.py --quick                # seconds; a micro model, eager
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import interleaved_ms, print_vs_fastest

import fmm
from models import coca

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference import reference  # test-only reference packages

SOT = 1
WIDTH = 22


def sizes(tokens: int) -> dict[str, coca.CoCaConfig]:
    context = tokens + 2  # the start token, the generated ones, the class token
    return {
        "micro": coca.coca_tiny(context_length=context),
        "small": coca.coca_tiny(
            image_size=64, patch_size=16, image_width=256, image_layers=4, image_heads=4,
            text_width=256, embed_dim=256, text_layers=4, text_heads=4, decoder_layers=4,
            decoder_heads=4, pool_heads=4, caption_queries=32, vocab_size=1024,
            context_length=context,
        ),
        "base": coca.coca_vit_b32(context_length=context),
    }  # fmt: skip


# --------------------------------------------------------------------------- references


def torchmultimodal_loop(cfg, params, images, steps):
    m = reference("torchmultimodal.models.coca.coca_model")
    model = m.coca_vit(
        vision_patch_size=cfg.patch_size, vision_dim_feedforward=cfg.image_tower.transformer.hidden,
        vision_n_layer=cfg.image_layers, vision_n_head=cfg.image_heads,
        vocab_size=cfg.vocab_size, num_text_positions=cfg.context_length,
        text_hidden_dim=cfg.text_width, text_n_layer=cfg.text_layers, text_n_head=cfg.text_heads,
        text_dim_feedforward=cfg.text_tower.transformer.hidden, text_output_dim=cfg.embed_dim,
        fusion_n_layer=cfg.decoder_layers, fusion_n_head=cfg.decoder_heads,
        fusion_dim_feedforward=cfg.decoder_blocks[0].hidden,
        multimodal_output_projection_dim=cfg.vocab_size, pooler_input_embed_dim=cfg.image_width,
        pooler_output_embed_dim=cfg.text_width, pooler_n_head=cfg.pool_heads,
        image_size=cfg.image_size, pooler_n_queries=cfg.caption_queries, pad_idx=cfg.pad_id,
    ).eval()  # fmt: skip
    model.load_state_dict(coca.to_torchmultimodal(params, cfg), strict=True)
    length = cfg.context_length - 1

    @torch.no_grad()
    def run():
        queries = model.vision_pooler(model.vision_encoder(images).last_hidden_state)[0]
        seq = torch.full((len(images), 1), SOT)
        for _ in range(steps):
            _, states = model.text_decoder(F.pad(seq, (0, length - seq.shape[1])))
            logits = model.multimodal_decoder(states, queries)[:, seq.shape[1] - 1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        return seq[:, 1:]

    return run


def open_clip_loop(cfg, params, images, steps):
    CoCa = reference("open_clip.coca_model").CoCa
    # pad_id -1: no generated id is taken for padding (open_clip masks padding keys).
    model = CoCa(
        embed_dim=cfg.embed_dim,
        multimodal_cfg=dict(
            context_length=cfg.context_length - 1, vocab_size=cfg.vocab_size,
            width=cfg.text_width, heads=cfg.decoder_heads, layers=cfg.decoder_layers,
            mlp_ratio=cfg.decoder_blocks[0].hidden / cfg.text_width,
        ),
        text_cfg=dict(
            context_length=cfg.context_length - 1, vocab_size=cfg.vocab_size,
            width=cfg.text_width, heads=cfg.text_heads, layers=cfg.text_layers,
            mlp_ratio=cfg.text_tower.transformer.hidden / cfg.text_width, embed_cls=True,
            output_tokens=True, pad_id=-1,
        ),
        vision_cfg=dict(
            image_size=cfg.image_size, layers=cfg.image_layers, width=cfg.image_width,
            head_width=cfg.image_width // cfg.image_heads, patch_size=cfg.patch_size,
            mlp_ratio=cfg.image_tower.transformer.hidden / cfg.image_width,
            attentional_pool=True, attn_pooler_heads=cfg.pool_heads,
            attn_pooler_queries=cfg.caption_queries + 1, output_tokens=True,
        ),
        pad_id=-1,
    ).eval()  # fmt: skip
    model.load_state_dict(coca.to_open_clip(params, cfg), strict=True)

    @torch.no_grad()
    def run():
        latent, embs = model._encode_image(images)
        seq = torch.full((len(images), 1), SOT)
        for _ in range(steps):
            out = model(images, seq, image_latent=latent, image_embs=embs, output_labels=False)
            seq = torch.cat([seq, out["logits"][:, -1].argmax(-1, keepdim=True)], dim=1)
        return seq[:, 1:]

    return run


# --------------------------------------------------------------------------- the race


def race(name: str, cfg, reference_loop, images, steps, *, compile: bool, warmup, repeats):
    params = coca.init(cfg, fmm.random.key(0))

    def ours(compiled: bool):
        return lambda: (
            coca.generate_captions(
                params, images, cfg=cfg, sot_id=SOT, max_new_tokens=steps, compile=compiled
            ).tokens
        )

    calls = {"fmm eager": ours(False), name: reference_loop(cfg, params, images, steps)}
    if compile:
        calls["fmm compiled"] = ours(True)
    want = calls["fmm eager"]()
    for who, call in calls.items():
        same = torch.equal(call(), want)  # also compiles fmm's step before timing
        print(f"  {who:{WIDTH}s} greedy tokens identical to fmm eager: {same}")
        if not same:
            raise SystemExit(f"{who} generated other tokens than fmm: not the same model")
    ms = interleaved_ms(calls, warmup=warmup, repeats=repeats)
    print("  (the ms/step column: one whole greedy generation of the batch, image included)")
    print_vs_fastest(ms, [name], width=WIDTH)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--quick", action="store_true", help="micro model, 4 tokens, eager")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batch_size, args.tokens, args.repeats, args.warmup = "micro", 2, 4, 1, 0
    compile = not args.quick if args.compile is None else args.compile
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    table = sizes(args.tokens)
    for size in args.sizes.split(","):
        base = table[size]
        g = torch.Generator().manual_seed(0)
        images = torch.randn(args.batch_size, *base.image_shape, generator=g)
        for layout, cfg, loop in (
            ("torchmultimodal", base, torchmultimodal_loop),
            ("open_clip", coca.open_clip_style(base), open_clip_loop),
        ):
            n = fmm.tree.count(coca.init(cfg, fmm.random.key(0).to("meta")))
            print(f"\n{size} ({layout} layout, {n:,} params): batch {args.batch_size}, "
                  f"{args.tokens} greedy tokens")  # fmt: skip
            race(f"{layout} loop", cfg, loop, images, args.tokens, compile=compile,
                 warmup=args.warmup, repeats=args.repeats)  # fmt: skip


if __name__ == "__main__":
    main()
