"""A late-fusion classifier on the shapes world: image + caption -> the first object's shape.

``models.arch.late_fusion`` wires three parts given as functions plus params subtrees:
per-modality encoders (a small conv net for images, a bag of word embeddings for
captions), a fusion layer from ``fmm.fusion`` and a head. The model is these few lines of
configuration; training is ``fmm.step.make_train_step`` with ``fmm.optim.adamw``.

The same architecture with only the image encoder is the image-only baseline, so the
printout shows what the caption adds on held-out scenes (one object each, including
colour/shape combinations never rendered in training).

Run from the repo root (about 1.5-2 minutes on 2 CPU cores, both runs)::

    python examples/late_fusion.py --steps 200 --fusion deepset

With these defaults it printed held-out accuracy 1.000 (image+caption) vs 0.482 (image
only): the caption names the shape, the 200-step conv net is still learning it.
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

import fmm
from fmm import fusion, nn, optim
from fmm.nn.conv import conv2d, init_conv2d
from fmm.step import init_state, make_train_step
from models import arch
from train.data import WordTokenizer, WorldConfig, sample_scenes, scene_stream

CONTEXT = 16


def init_image_encoder(key: torch.Tensor, width: int) -> dict:
    """Two strided convs: ``[B, 3, 32, 32] -> [B, width]`` after mean pooling."""
    return {
        "conv1": init_conv2d(3, width, 4, fmm.random.fold_in(key, 0)),
        "conv2": init_conv2d(width, width, 3, fmm.random.fold_in(key, 1)),
    }


def image_encoder(params: dict, images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W] -> [B, width]``."""
    x = F.relu(conv2d(params["conv1"], images, stride=4))
    x = F.relu(conv2d(params["conv2"], x, stride=2, padding=1))
    return x.mean(dim=(2, 3))


def text_encoder(params: dict, tokens: torch.Tensor) -> torch.Tensor:
    """Mean of the word embeddings of non-pad tokens: ``[B, T] -> [B, width]``."""
    valid = (tokens != WordTokenizer.pad_id).unsqueeze(-1).float()
    return (nn.embed(params, tokens) * valid).sum(1) / valid.sum(1).clamp(min=1.0)


def build(modalities, fusion_kind: str, vocab: int, classes: int, width: int, key):
    """``(params, apply)`` of a late-fusion classifier over ``modalities``."""
    encoders = {"image": image_encoder, "text": text_encoder}
    enc_params = {
        "image": init_image_encoder(fmm.random.fold_in(key, "image"), width),
        "text": nn.init_embedding(vocab, width, fmm.random.fold_in(key, "text")),
    }
    dims = {m: width for m in modalities}
    if fusion_kind == "concat":
        fcfg = fusion.ConcatConfig(dims=dims)
        fparams, fuse, fused_dim = {}, partial(fusion.concat, cfg=fcfg), fcfg.out_dim
    else:
        fcfg = fusion.DeepSetConfig(
            dims=dims, dim=width, hidden=2 * width, out_dim=width, attention=True
        )
        fparams = fusion.init_deepset(fcfg, fmm.random.fold_in(key, "fusion"))
        fuse, fused_dim = partial(fusion.deepset, cfg=fcfg), width
    params = {
        "encoders": {m: enc_params[m] for m in modalities},
        "fusion": fparams,
        "head": nn.init_linear(fused_dim, classes, fmm.random.fold_in(key, "head")),
    }
    apply = partial(
        arch.late_fusion,
        encoders={m: encoders[m] for m in modalities},
        fusion=fuse,
        head=nn.linear,
    )
    return params, apply


def inputs(scenes, tokenizer, modalities) -> dict[str, torch.Tensor]:
    """Scenes as the model's input mapping, pixels centred to roughly unit scale."""
    all_inputs = {
        "image": (scenes.images - 0.5) / 0.25,
        "text": tokenizer.encode(scenes.captions, CONTEXT),
    }
    return {m: all_inputs[m] for m in modalities}


def train_and_eval(modalities, args, world, tokenizer) -> float:
    """Train one classifier and return its held-out accuracy."""
    params, apply = build(
        modalities,
        args.fusion,
        tokenizer.vocab_size,
        len(world.shapes),
        args.width,
        fmm.random.key(args.seed),
    )

    def loss_fn(p, batch, key):
        logits = apply(p, batch["inputs"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return F.cross_entropy(logits, batch["labels"]), {"accuracy": acc.detach()}

    step = make_train_step(loss_fn, optim.adamw(args.lr, weight_decay=0.0))
    state = init_state(params, optim.adamw(args.lr, weight_decay=0.0), key=fmm.random.key(1))
    stream = scene_stream(world, args.batch, seed=args.seed)
    desc = f"train {'+'.join(modalities)}"
    with tqdm(range(args.steps), desc=desc, unit="step", dynamic_ncols=True) as bar:
        for _ in bar:
            scenes = next(stream)
            batch = {"inputs": inputs(scenes, tokenizer, modalities), "labels": scenes.shapes}
            state, metrics = step(state, batch)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
    held_out = sample_scenes(
        world, args.eval, generator=torch.Generator().manual_seed(args.seed + 1), split="eval"
    )
    with torch.no_grad():
        logits = apply(state["params"], inputs(held_out, tokenizer, modalities))
    return (logits.argmax(-1) == held_out.shapes).float().mean().item()


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--eval", type=int, default=512)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--fusion", choices=("concat", "deepset"), default="deepset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the image-only run")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    world = WorldConfig()
    tokenizer = WordTokenizer.for_world(world)
    runs = [("image", "text")] + ([] if args.no_baseline else [("image",)])
    results = {"+".join(m): train_and_eval(m, args, world, tokenizer) for m in runs}
    for name, acc in results.items():
        print(f"held-out shape accuracy, {name:>10}: {acc:.3f}")
    return results


if __name__ == "__main__":
    main()
