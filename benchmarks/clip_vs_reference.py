"""fmm's CLIP train step against open_clip's and TorchMultimodal's, on the same weights.

One step is forward, the symmetric contrastive loss, backward, global-norm clipping to 1.0
and AdamW (lr 1e-3, weight decay 0.1), for every contender:

- fmm: ``fmm.step.make_train_step`` over ``models.clip.loss``, eager and compiled;
- open_clip: its ``CLIP`` module and its own ``ClipLoss``, ``torch.nn.utils.clip_grad_norm_``
  and ``torch.optim.AdamW`` (default foreach kernels), eager and with the module compiled;
- TorchMultimodal: its ``CLIP`` (``CLIPViTEncoder`` + ``CLIPTextEncoder``) and its own
  ``ContrastiveLossWithTemperature``, likewise.

All start from identical weights (ours exported with ``models.clip.convert``) and the same
batch; the first losses are printed side by side as a check that they compute the same
thing. Same process, same threads, medians of ``--repeats`` steps after ``--warmup``, timed
round-robin (one step of each contender per round) so load changes hit all alike.
The activation is quick_gelu for all, TorchMultimodal's only choice.

Run from the repo root (needs the parity extras, see README)::

    python benchmarks/clip_vs_reference.py                 # clip_tiny, batch 128
    python benchmarks/clip_vs_reference.py --config small --batch-size 64
    python benchmarks/clip_vs_reference.py --quick         # micro model, eager only
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
from _common import interleaved_ms, pure_step, random_batch
from train_step import CONFIGS

import fmm
from models import clip
from models.clip import convert

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.reference import reference  # test-only reference packages


def fmm_step(cfg, params, *, compile: bool):
    return pure_step(lambda p, b, k: clip.loss(p, b, cfg=cfg), params, compile=compile)


def open_clip_model(cfg, params):
    oc = reference("open_clip")
    vision = dict(
        image_size=cfg.image_size, layers=cfg.image_layers, width=cfg.image_width,
        patch_size=cfg.patch_size, head_width=cfg.image_width // cfg.image_heads,
    )  # fmt: skip
    text = dict(
        context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.text_width,
        heads=cfg.text_heads, layers=cfg.text_layers,
    )  # fmt: skip
    model = oc.model.CLIP(cfg.embed_dim, vision, text, quick_gelu=True)
    model.load_state_dict(convert.to_open_clip(params, cfg), strict=True)
    loss = oc.loss.ClipLoss()

    def forward(batch):
        img, txt, scale = model(batch["images"], batch["tokens"])
        return loss(img, txt, scale)

    return model, forward


def torchmultimodal_model(cfg, params):
    tmm = reference("torchmultimodal.models.clip.model")
    image = reference("torchmultimodal.models.clip.image_encoder")
    text = reference("torchmultimodal.models.clip.text_encoder")
    losses = reference("torchmultimodal.modules.losses.contrastive_loss_with_temperature")
    model = tmm.CLIP(
        encoder_a=image.CLIPViTEncoder(
            cfg.embed_dim, patch_size=cfg.patch_size, image_size=cfg.image_size,
            width=cfg.image_width, heads=cfg.image_heads, layers=cfg.image_layers,
        ),
        encoder_b=text.CLIPTextEncoder(
            cfg.embed_dim, context_length=cfg.context_length, vocab_size=cfg.vocab_size,
            width=cfg.text_width, dim_feedforward=int(cfg.text_width * cfg.mlp_ratio),
            heads=cfg.text_heads, layers=cfg.text_layers,
        ),
    )  # fmt: skip
    model.load_state_dict(convert.to_torchmultimodal(params, cfg), strict=True)
    loss = losses.ContrastiveLossWithTemperature(logit_scale=float(params["logit_scale"]))

    def forward(batch):
        out = model(batch["images"], batch["tokens"])
        return loss(out.embeddings_a, out.embeddings_b)

    return torch.nn.ModuleList([model, loss]), forward


def module_step(module, forward, *, compile: bool):
    """A torch.optim train step over ``module`` (clip to 1.0, AdamW as fmm's OPTIMIZER)."""
    decay = [p for n, p in module.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in module.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3,
    )
    loss_fn = torch.compile(forward) if compile else forward

    def run(batch):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()
        return loss.detach()

    return run


def contenders(cfg, params, compile: bool):
    """name -> a zero-argument builder of ``step(batch) -> loss`` (fresh weights each)."""
    out = {"fmm eager": lambda: fmm_step(cfg, params, compile=False)}
    for name, build in (("open_clip", open_clip_model), ("torchmultimodal", torchmultimodal_model)):
        out[f"{name} eager"] = lambda b=build: module_step(*b(cfg, params), compile=False)
    if compile:
        out["fmm compiled"] = lambda: fmm_step(cfg, params, compile=True)
        for name, build in (
            ("open_clip", open_clip_model),
            ("torchmultimodal", torchmultimodal_model),
        ):
            out[f"{name} compiled"] = lambda b=build: module_step(*b(cfg, params), compile=True)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--quick", action="store_true", help="micro model, batch 8, eager only")
    args = parser.parse_args()
    if args.quick:
        args.config, args.batch_size, args.repeats, args.warmup = "micro", 8, 3, 1
    if args.compile is None:
        args.compile = not args.quick
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(CONFIGS[args.config](), act="quick_gelu")
    params = clip.init(cfg, fmm.random.key(0))
    batch = random_batch(cfg, args.batch_size)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    print(f"config {args.config} ({fmm.tree.count(params):,} params), batch {args.batch_size}")

    steps, first_loss = {}, {}
    for name, build in contenders(cfg, params, args.compile).items():
        step = build()
        start = time.perf_counter()
        try:
            first_loss[name] = float(step(batch))
        except Exception as e:  # a reference that does not compile is a result, not a crash
            print(f"{name:24s} failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            continue
        steps[name] = lambda s=step: s(batch)
        print(
            f"{name:24s} first step {time.perf_counter() - start:6.1f} s, loss {first_loss[name]:.6f}"
        )
    ms = interleaved_ms(steps, warmup=args.warmup, repeats=args.repeats)

    references = [n for n in ms if not n.startswith("fmm")]
    best = min(references, key=ms.get) if references else None
    print(f"\n{'':24s} {'ms/step':>9s} {'vs fastest reference':>21s}")
    for name, t in ms.items():
        ratio = f"{ms[best] / t:20.2f}x" if best else ""
        print(f"{name:24s} {t:9.2f} {ratio}")
    if best:
        print(f"\nfastest reference: {best} ({ms[best]:.2f} ms/step)")
        for name in ("fmm eager", "fmm compiled"):
            if name in ms:
                print(f"{name} speedup vs fastest reference: {ms[best] / ms[name]:.2f}x")


if __name__ == "__main__":
    main()
