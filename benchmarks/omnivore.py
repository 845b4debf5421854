"""fmm's Omnivore train step against TorchMultimodal's ``Omnivore`` module, same weights.

One step is Omnivore's joint objective on one batch of each modality (images, clips, RGB-D
maps; each modality encoded once, every head's cross-entropy summed), backward, global-norm
clipping to 1.0 and AdamW (lr 1e-3, weight decay 0.1 on matrices):

- fmm: ``fmm.step.make_train_step`` over ``models.omnivore.loss``, eager and compiled;
- TorchMultimodal: its ``Omnivore`` (``SwinTransformer3d`` with ``PatchEmbedOmnivore``)
  with ``torch.optim.AdamW`` and ``clip_grad_norm_``, eager and with the loss compiled.

Both start from identical weights (ours exported with ``to_torchmultimodal``; the Kinetics
head's dropout set to 0, as ours has none) and the same batch; the first losses are printed
side by side as a check. Medians of ``--repeats`` steps after ``--warmup``, timed
round-robin so load changes hit all alike. Goal: fmm compiled >= 1.2x the fastest reference.

Run from the repo root (needs the parity extras)::

    python benchmarks/omnivore.py                  # omnivore_shapes, batch 16 per modality
    python benchmarks/omnivore.py --quick          # omnivore_tiny, eager only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import print_vs_fastest, pure_step, race_steps
from clip_vs_reference import module_step

import fmm
import models
from models import omnivore
from models.family import example_batch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models.test_omnivore import reference_model  # test-only reference packages


def fmm_step(cfg, params, *, compile: bool):
    return pure_step(lambda p, b, k: omnivore.loss(p, b, cfg=cfg), params, compile=compile)


def torchmultimodal_model(cfg, params):
    model = reference_model(cfg).train()
    model.load_state_dict(omnivore.to_torchmultimodal(params, cfg), strict=True)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0

    def forward(batch):
        feats = {m: model.encoder(_video(batch[omnivore.model.INPUTS[m]])) for m in cfg.modalities}
        return sum(
            F.cross_entropy(model.heads[name](feats[m]), batch[f"{name}_labels"])
            for name, _, m in cfg.heads
        )

    return model, forward


def _video(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2) if x.ndim == 4 else x  # TorchMultimodal takes [B, C, T, H, W] only


def omnivore_contenders(cfg, params, compile: bool) -> dict:
    """name -> a zero-argument builder of ``step(batch) -> loss`` (fresh weights each)."""
    out = {
        "fmm eager": lambda: fmm_step(cfg, params, compile=False),
        "torchmultimodal eager": lambda: module_step(
            *torchmultimodal_model(cfg, params), compile=False
        ),
    }
    if compile:
        out["fmm compiled"] = lambda: fmm_step(cfg, params, compile=True)
        out["torchmultimodal compiled"] = lambda: module_step(
            *torchmultimodal_model(cfg, params), compile=True
        )
    return out


def run_omnivore(preset: str, batch_size: int, *, compile: bool, warmup: int, repeats: int):
    """Time every contender; print the first losses, ms/step and fmm's ratios."""
    # Stochastic depth off: TorchMultimodal draws its drops from the global RNG, so only the
    # deterministic step gives both sides the same work and the same first loss.
    cfg = models.get_config(preset, stochastic_depth=0.0)
    params = omnivore.init(cfg, fmm.random.key(0))
    batch = example_batch(omnivore.batch_fields(cfg), fmm.random.key(2), batch_size=batch_size)
    print(f"omnivore {preset} ({fmm.tree.count(params):,} params), batch {batch_size} x "
          f"{len(cfg.modalities)} modalities")  # fmt: skip
    contenders = omnivore_contenders(cfg, params, compile)
    ms = race_steps(contenders, batch, warmup=warmup, repeats=repeats, width=26)
    print_vs_fastest(ms, [n for n in ms if not n.startswith("fmm")], width=26)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="omnivore_shapes", choices=sorted(omnivore.PRESETS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--quick", action="store_true", help="omnivore_tiny, batch 4, eager")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.batch_size, args.repeats, args.warmup = "omnivore_tiny", 4, 3, 1
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    compile = not args.quick if args.compile is None else args.compile
    run_omnivore(
        args.preset, args.batch_size, compile=compile, warmup=args.warmup, repeats=args.repeats
    )


if __name__ == "__main__":
    main()
