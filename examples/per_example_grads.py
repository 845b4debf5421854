"""Per-example gradients of the CLIP loss with ``vmap(grad(...))``, and two uses for them.

A batch gradient is the mean of per-example gradients, but the mean hides which examples
pull hardest. Because a fmm model is a pure function of its params, ``torch.func.grad``
gives the gradient of one example's loss and ``torch.func.vmap`` maps that over the batch
in one vectorised pass: no Python loop and no hooks.

CLIP's contrastive loss couples the examples of a batch (each one's negatives are the
others), so "one example's loss" needs a definition. We take example ``i``'s term of the
symmetric InfoNCE loss: its image against every caption and its caption against every
image, where the *other* examples' embeddings are computed once and detached. The mean
of these terms equals ``clip.loss`` exactly; example ``i``'s gradient flows only through
its own image and caption (this is how differentially private CLIP training bounds each
example's influence).

Uses shown: DP-SGD-style clipping of each example's gradient before averaging, and
ranking examples by gradient norm (which captions pull the model hardest).

Run from the repo root (about 10 s on a laptop CPU)::

    python examples/per_example_grads.py
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import fmm
from fmm.optim import global_norm
from models import clip
from train.data import WordTokenizer, WorldConfig, scene_stream


def per_example_grads(params, batch, cfg):
    """Every example's gradient and loss: ``(grads, losses [B])``, where each leaf of
    ``grads`` gains a leading ``[B]`` axis."""
    images, tokens = batch["images"], batch["tokens"]
    banks = clip.detached_embeddings(params, batch, cfg=cfg)
    grad_one = torch.func.grad_and_value(clip.example_loss)
    # in_dims: params shared (None); image, tokens and index mapped (0); the banks shared.
    batched = torch.func.vmap(grad_one, in_dims=(None, 0, 0, 0, None, None))
    return batched(params, images, tokens, torch.arange(len(images)), *banks, cfg=cfg)


def loop_grads(params, batch, cfg):
    """The same gradients one example at a time: the reference that vmap must match."""
    images, tokens = batch["images"], batch["tokens"]
    banks = clip.detached_embeddings(params, batch, cfg=cfg)
    grad_one = torch.func.grad(clip.example_loss)
    grads = [
        grad_one(params, images[i], tokens[i], torch.tensor(i), *banks, cfg=cfg)
        for i in range(len(images))
    ]
    return fmm.tree.stack(grads)


def norms_per_example(grads) -> torch.Tensor:
    """The global L2 norm of each example's gradient: ``[B]``."""
    squares = [g.reshape(len(g), -1).square().sum(dim=1) for g in fmm.tree.leaves(grads)]
    return torch.stack(squares).sum(dim=0).sqrt()


def dp_clipped_mean(grads, max_norm: float):
    """DP-SGD's aggregate: scale each example's gradient to norm <= ``max_norm``, average.

    (DP-SGD then adds Gaussian noise of std ``sigma * max_norm / B``; omitted here.)
    """
    scale = (max_norm / (norms_per_example(grads) + 1e-6)).clamp(max=1.0)
    return fmm.tree.map(lambda g: (g * scale.view(-1, *[1] * (g.ndim - 1))).mean(dim=0), grads)


def max_abs_diff(a, b) -> float:
    """The largest elementwise difference between two trees of the same structure."""
    return max((x - y).abs().max().item() for x, y in zip(fmm.tree.leaves(a), fmm.tree.leaves(b)))


def shapes_batch(tokenizer, batch_size: int, context_length: int):
    """A batch of the built-in shapes world (images normalised as in training), and its captions."""
    scenes = next(scene_stream(WorldConfig(), batch_size, seed=0))
    images = (scenes.images - 0.5) / 0.25
    tokens = tokenizer.encode(scenes.captions, context_length)
    return {"images": images, "tokens": tokens}, scenes.captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--max-norm", type=float, default=None, help="DP-SGD clipping norm (default: the median)"
    )
    args = parser.parse_args()

    tokenizer = WordTokenizer.for_world(WorldConfig())
    # "math" attention batches under vmap; SDPA's CPU kernel has no vmap rule, so vmap
    # would run that op one example at a time (and warn).
    cfg = dataclasses.replace(clip.clip_tiny(vocab_size=tokenizer.vocab_size), attn_impl="math")
    params = clip.init(cfg, fmm.random.key(0))
    batch, captions = shapes_batch(tokenizer, args.batch_size, cfg.context_length)
    print(f"clip_tiny: {fmm.tree.count(params):,} params, batch of {args.batch_size}")

    grads, losses = per_example_grads(params, batch, cfg)
    shape = list(fmm.tree.flatten(grads)["image.proj.weight"].shape)
    print(f"each grad leaf gains a batch axis: image.proj.weight {shape}")
    full, _ = clip.loss(params, batch, cfg=cfg)
    print(f"mean of per-example losses {losses.mean():.6f} == clip.loss {full:.6f}")
    diff = max_abs_diff(grads, loop_grads(params, batch, cfg))
    largest = max(g.abs().max().item() for g in fmm.tree.leaves(grads))
    print(
        f"max |vmap - loop| over all per-example grads: {diff:.2e} (largest |grad| {largest:.2f})"
    )

    norms = norms_per_example(grads)
    print("per-example grad norms:", " ".join(f"{n:.3f}" for n in norms.tolist()))
    for i in norms.argsort(descending=True)[:3].tolist():
        print(f"  pulls hardest ({norms[i]:.3f}): {captions[i]!r}")

    # Clipping at the median norm (a common starting point) scales down half the examples;
    # the mean gradient's norm before and after shows how much that changes the update.
    max_norm = norms.median().item() if args.max_norm is None else args.max_norm
    plain = global_norm(fmm.tree.map(lambda g: g.mean(dim=0), grads))
    clipped = global_norm(dp_clipped_mean(grads, max_norm))
    print(f"DP-SGD clipping at {max_norm:.3f}: mean-grad norm {plain:.3f} -> {clipped:.3f}")


if __name__ == "__main__":
    main()
