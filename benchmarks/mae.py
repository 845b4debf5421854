"""fmm's MAE train step against TorchMultimodal's ``MaskedAutoEncoder``, same weights, and
against fmm's own encoder run on every patch.

One step is MAE's objective on one batch (mask ``cfg.ratio`` of the patches, 75% for
images, encode the visible ones, decode all, the normalised-pixel loss on the masked ones),
backward, global-norm clipping to 1.0 and AdamW (lr 1e-3, weight decay 0.1 on matrices):

- fmm: ``fmm.step.make_train_step`` over ``models.mae.loss``, eager and compiled;
- TorchMultimodal: its ``MaskedAutoEncoder`` in training mode (it draws its own mask with
  ``torch.rand``), the same loss (``models.mae.masked_loss``) on its outputs, with
  ``torch.optim.AdamW`` and ``clip_grad_norm_``, eager and with the forward compiled;
- fmm unmasked encoder: the same encoder on all patches (``models.mae.encode`` without a
  key, a mean-square loss on its output), no decoder: the step MAE's masking saves.

Both start from identical weights (ours exported with ``to_torchmultimodal``; its bias-MLP
dropout set to 0, as the fmm step runs ``train=True`` with the config's own). Before the
timing, one forward on each with the very same mask (TorchMultimodal handed fmm's masking
noise, as tests/models/test_mae.py does) prints both losses as a check. Medians of
``--repeats`` steps after ``--warmup``, timed round-robin so load changes hit all alike.
Goals: fmm compiled >= 1.3x the fastest reference; the unmasked encoder step ~3x MAE's.

Run from the repo root (needs the parity extras)::

    python benchmarks/mae.py                       # mae_vit_b16 (ViT-B/16, 224²), batch 8
    python benchmarks/mae.py --quick               # mae_tiny, eager only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from _common import print_vs_fastest, pure_step, race_steps
from clip_vs_reference import module_step

import fmm
import models
from models import mae
from models.family import example_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models.test_mae import reference_model  # test-only reference packages


def fmm_step(cfg, params, *, compile: bool, masked: bool = True):
    name = mae.model.INPUTS[cfg.modality]
    if masked:
        loss = lambda p, b, k: mae.loss(p, b, cfg=cfg, key=k)
    else:

        def loss(p, b, k):
            value = mae.encode(p, b[name], cfg=cfg).sequence.float().pow(2).mean()
            return value, {}

    return pure_step(loss, params, compile=compile)


def torchmultimodal_model(cfg, params):
    model = reference_model(cfg).train()
    model.load_state_dict(mae.to_torchmultimodal(params, cfg), strict=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    name = mae.model.INPUTS[cfg.modality]

    def forward(batch):
        out = model(batch[name])
        return mae.masked_loss(
            out.decoder_pred, out.label_patches, out.mask, norm_pix=cfg.norm_pix_loss
        )

    return model, forward


def same_mask_losses(cfg, params, batch) -> tuple[float, float]:
    """fmm's and TorchMultimodal's loss on ``batch`` under one mask (a correctness check)."""
    _, forward = torchmultimodal_model(cfg, params)
    key = fmm.random.key(5)
    x = batch[mae.model.INPUTS[cfg.modality]]
    noise = fmm.random.uniform(fmm.random.fold_in(key, "mask"), (x.shape[0], cfg.patches))
    rand = torch.rand
    torch.rand = lambda *shape, **kw: noise.clone()
    try:
        with torch.no_grad():
            theirs = float(forward(batch))
    finally:
        torch.rand = rand
    with torch.no_grad():
        ours = float(mae.loss(params, batch, cfg=cfg, key=key, train=False)[0])
    return ours, theirs


def contenders(cfg, params, compile: bool) -> dict:
    """name -> a zero-argument builder of ``step(batch) -> loss`` (fresh weights each)."""
    out = {
        "fmm eager": lambda: fmm_step(cfg, params, compile=False),
        "torchmultimodal eager": lambda: module_step(
            *torchmultimodal_model(cfg, params), compile=False
        ),
        "fmm unmasked encoder eager": lambda: fmm_step(cfg, params, compile=False, masked=False),
    }
    if compile:
        out["fmm compiled"] = lambda: fmm_step(cfg, params, compile=True)
        out["torchmultimodal compiled"] = lambda: module_step(
            *torchmultimodal_model(cfg, params), compile=True
        )
        out["fmm unmasked encoder compiled"] = lambda: fmm_step(
            cfg, params, compile=True, masked=False
        )
    return out


def run_mae(preset: str, batch_size: int, *, compile: bool, warmup: int, repeats: int):
    """Time every contender; print the same-mask losses, ms/step and fmm's ratios."""
    cfg = models.get_config(preset)
    params = mae.init(cfg, fmm.random.key(0))
    batch = example_batch(mae.batch_fields(cfg), fmm.random.key(2), batch_size=batch_size)
    print(
        f"mae {preset} ({fmm.tree.count(params):,} params): {cfg.modality} "
        f"{list(cfg.input_shape)}, {cfg.patches} patches, {cfg.kept} visible "
        f"({cfg.ratio:.0%} masked), {cfg.decoder} decoder, batch {batch_size}"
    )
    ours, theirs = same_mask_losses(cfg, params, batch)
    print(f"same mask: fmm loss {ours:.6f}, torchmultimodal {theirs:.6f}")
    ms = race_steps(contenders(cfg, params, compile), batch, warmup=warmup, repeats=repeats,
                    width=30)  # fmt: skip
    print_vs_fastest(ms, [n for n in ms if n.startswith("torchmultimodal")], width=30)
    for mode in ("eager", "compiled"):
        full, masked = ms.get(f"fmm unmasked encoder {mode}"), ms.get(f"fmm {mode}")
        if full and masked:
            print(f"unmasked encoder step / MAE step ({mode}): {full / masked:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="mae_vit_b16", choices=sorted(mae.PRESETS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--quick", action="store_true", help="mae_tiny, batch 4, eager")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.batch_size, args.repeats, args.warmup = "mae_tiny", 4, 3, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    compile = not args.quick if args.compile is None else args.compile
    run_mae(args.preset, args.batch_size, compile=compile, warmup=args.warmup, repeats=args.repeats)


if __name__ == "__main__":
    main()
