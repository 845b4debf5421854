"""Generate images from a caption with a trained multimodal GPT, and score them with CLIP.

``python -m train generate --ckpt runs/mmgpt --prompt "a red circle above a blue square"
--n 8 --out grid.png`` samples ``--n`` images, writes them as a PNG grid and, with
``--clip runs/clip``, prints the fraction whose colour and shape CLIP recognises as the
prompt's.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

import fmm
from models import clip, mmgpt, vqvae
from train.data import WorldConfig, class_names, prompt_templates
from train.evaluate import class_embeddings
from train.loop import Run, load_run
from train.plots_generation import save_image_grid
from train.recipes import add_device_argument, device_of, number

VQVAE_FILE = "vqvae.safetensors"
GUIDANCE = 3.0  # classifier-free guidance scale; measured best of 1, 2, 3, 5 (docs/generation.md)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ckpt", type=Path, required=True, help="run directory of `python -m train mmgpt`"
    )
    parser.add_argument(
        "--prompt", default="a red circle", help="caption to draw (default: %(default)r)"
    )
    parser.add_argument(
        "--n", type=number(at_least=1), default=8, help="images to sample (default: %(default)s)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="PNG grid to write (default: <ckpt>/generated.png)"
    )
    parser.add_argument(
        "--clip", type=Path, default=None, help="a `python -m train clip` run to score the images"
    )
    parser.add_argument(
        "--temperature",
        type=number(float, at_least=0),
        default=1.0,
        help="0 for greedy (default: %(default)s)",
    )
    parser.add_argument(
        "--top-k",
        type=number(at_least=1),
        default=None,
        help="sample among the k likeliest codes (default: all)",
    )
    parser.add_argument(
        "--guidance",
        type=number(float, at_least=0),
        default=GUIDANCE,
        help="classifier-free guidance scale against the empty caption; 1 turns it off "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=number(at_least=0), default=0, help="sampling seed (default: %(default)s)"
    )
    add_device_argument(parser)


def drawing_kit(run: Run) -> dict:
    """What a saved ``mmgpt`` run needs to draw, from :func:`train.loop.load_run`'s
    :class:`~train.loop.Run`: ``{"cfg", "params", "vqvae_cfg", "vqvae_params", "tokenizer",
    "world"}``, its copy of the VQ-VAE checked key by key, on the run's params' device.

    Example: ``kit = drawing_kit(load_run("runs/mmgpt", family="mmgpt"))``.
    """
    vq_cfg = vqvae.VQVAEConfig.from_dict(run.config["vqvae"])
    device = fmm.tree.leaves(run.params)[0].device
    like = vqvae.init(vq_cfg, fmm.random.key(0).to("meta"))
    return {
        "cfg": run.cfg,
        "params": run.params,
        "vqvae_cfg": vq_cfg,
        "vqvae_params": run.more_params(VQVAE_FILE, like=like, device=device),
        "tokenizer": run.tokenizer,
        "world": world_from_dict(run.config["world"]),
    }


def world_from_dict(d: dict, kind: type = WorldConfig):
    """Inverse of ``dataclasses.asdict(world)`` after a JSON round trip (lists back to
    tuples), for a ``kind`` of world: :class:`WorldConfig` or the video world's config."""
    fix = lambda k, v: (
        tuple(map(tuple, v)) if k == "holdout" else tuple(v) if isinstance(v, list) else v
    )
    return kind(**{k: fix(k, v) for k, v in d.items()})


def draw(
    run: dict,
    prompts: list[str],
    *,
    key: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """Images ``[len(prompts), 3, H, W]`` (pixels clamped to ``[0, 1]``), one per prompt.

    ``guidance``: classifier-free guidance scale against the empty caption (1: none).
    """
    cfg, vq_cfg = run["cfg"], run["vqvae_cfg"]
    device = fmm.tree.leaves(run["params"])[0].device
    text = run["tokenizer"].encode(prompts, cfg.text_len).to(device)
    codes = mmgpt.generate_images(
        run["params"],
        text,
        cfg=cfg,
        key=key.to(device),
        temperature=temperature,
        top_k=top_k,
        guidance=guidance,
        null_text=run["tokenizer"].encode([""], cfg.text_len).to(device),
    )
    with torch.no_grad():
        grid = codes.reshape(len(prompts), vq_cfg.grid, vq_cfg.grid)
        return vqvae.decode(run["vqvae_params"], grid, cfg=vq_cfg).clamp(0, 1)


Judge = Callable[[torch.Tensor], torch.Tensor]


def caption_judge(
    params, cfg: clip.CLIPConfig, tokenizer, candidates: list[str], *,
    templates: tuple[str, ...] = ("{}",), device: torch.device | str = "cpu",
) -> Judge:  # fmt: skip
    """CLIP as a zero-shot judge: ``inputs -> [N]`` the index of the candidate (each the mean
    of its ``templates``' embeddings) that ranks first for each input. Inputs are pixels in
    ``[0, 1]``: images ``[N, 3, H, W]``, or clips ``[N, 3, T, H, W]`` for a video tower.

    Example: ``caption_judge(params, cfg, tok, ["a red circle moves left"])(clips)``.
    """
    from train.recipes.clip import normalize_images

    with torch.no_grad():
        texts = class_embeddings(
            lambda texts: clip.encode_text(
                params, tokenizer.encode(texts, cfg.context_length).to(device), cfg=cfg
            ),
            candidates,
            templates,
        )

    def judge(inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            ranks = [
                (clip.encode_image(params, normalize_images(x).to(device), cfg=cfg) @ texts.T)
                .argmax(-1)
                .cpu()
                for x in inputs.split(256)
            ]
        return torch.cat(ranks)

    return judge


def clip_judge(
    clip_dir: str | Path, candidates: list[str], *, templates: tuple[str, ...] = ("{}",),
    device: torch.device | str = "cpu",
) -> Judge:  # fmt: skip
    """:func:`caption_judge` of a saved ``python -m train clip`` run (an image or a video
    tower, ``--modality video``)."""
    run = load_run(clip_dir, family="clip", device=device)
    return caption_judge(
        run.params, run.cfg, run.tokenizer, candidates, templates=templates, device=device
    )


def clip_classifier(
    clip_dir: str | Path, world: WorldConfig, *, device: torch.device | str = "cpu"
) -> Judge:
    """A zero-shot colour x shape classifier from a ``python -m train clip`` run:
    ``images [N, 3, H, W]`` in ``[0, 1]`` -> class ids ``[N]`` (``color * n_shapes + shape``)."""
    return clip_judge(clip_dir, class_names(world), templates=prompt_templates(), device=device)


def consistency(hits: torch.Tensor, unseen: torch.Tensor) -> dict[str, float]:
    """The judge's agreement: ``hits [N]`` bool (the judge picked the prompt's own caption or
    class), split by ``unseen [N]`` bool (a combination held out of training). Returns
    ``{"consistency": seen share, "consistency_unseen_combos": unseen share}`` (NaN if none)."""
    share = lambda mask: round(hits[mask].float().mean().item(), 4)
    return {"consistency": share(~unseen), "consistency_unseen_combos": share(unseen)}


def split_rates(hits: torch.Tensor, unseen: torch.Tensor, name: str) -> dict[str, float]:
    """``hits [N]`` bool as rates: ``{name: all, name_seen: ..., name_unseen: ...}``, split by
    ``unseen [N]`` bool (a combination held out of training); NaN where a split is empty.

    Example: ``split_rates(said == truth, is_holdout(world, labels), "caption_colour")``.
    """
    hits = hits.float()
    rate = lambda x: round(x.mean().item(), 4)
    return {
        name: rate(hits),
        f"{name}_seen": rate(hits[~unseen]),
        f"{name}_unseen": rate(hits[unseen]),
    }


def first_word(words: list[str], names: tuple[str, ...]) -> str | None:
    """The first of ``words`` that is one of ``names`` (a caption's colour or shape), or None."""
    return next((w for w in words if w in names), None)


def prompt_classes(prompt: str, world: WorldConfig) -> list[int]:
    """Class ids of the (colour, shape) pairs a prompt names, in order: "a red circle above a
    blue square" -> [red circle, blue square]. A shape takes the last colour before it."""
    words = re.findall(r"[a-z]+", prompt.lower())
    found, colour = [], None
    for word in words:
        if word in world.colors:
            colour = world.colors.index(word)
        elif word in world.shapes and colour is not None:
            found.append(colour * len(world.shapes) + world.shapes.index(word))
            colour = None
    return found


def run(args: argparse.Namespace) -> dict:
    """Sample, save the grid, score with CLIP if asked; returns the printed summary."""
    device = device_of(args)
    loaded = drawing_kit(load_run(args.ckpt, family="mmgpt", device=device))
    world = loaded["world"]
    targets = prompt_classes(args.prompt, world)
    images = draw(
        loaded,
        [args.prompt] * args.n,
        key=fmm.random.key(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
        guidance=args.guidance,
    )
    summary: dict = {"prompt": args.prompt, "n": args.n, "guidance": args.guidance}
    if args.clip is not None:
        if not targets:
            raise SystemExit(
                f"--prompt {args.prompt!r} names no colour-shape pair of the shapes world "
                f"(colours {world.colors}, shapes {world.shapes}): nothing to score"
            )
        predicted = clip_classifier(args.clip, world, device=device)(images)
        hits = torch.isin(predicted, torch.tensor(targets))
        names = class_names(world)
        summary["clip_predictions"] = [names[i] for i in predicted.tolist()]
        summary["consistency"] = round(hits.float().mean().item(), 4)
    out = args.out or args.ckpt / "generated.png"
    title = f"{args.prompt!r}" + (
        f": CLIP agrees on {summary['consistency']:.0%}" if "consistency" in summary else ""
    )
    save_image_grid(images, out, columns=min(args.n, 8), title=title)
    summary["out"] = str(out)
    print(json.dumps(summary))
    return summary
