"""``python -m train <task> [options]``: the command line of fmm's recipes."""

from __future__ import annotations

import argparse
import sys

from train.recipes import albef as albef_recipe
from train.recipes import clip, generate, mmgpt, serve, vqvae, zeroshot
from train.recipes import flava as flava_recipe
from train.recipes import plan as plan_recipe

TASKS = {
    "clip": (clip, "train a tiny CLIP on the built-in shapes world and evaluate it zero-shot"),
    "vqvae": (vqvae, "train a VQ-VAE image tokeniser on the shapes world"),
    "mmgpt": (
        mmgpt,
        "train a multimodal GPT caption -> image on VQ-VAE tokens of the shapes world",
    ),
    "generate": (generate, "draw images for a caption with a trained mmgpt run, scored by CLIP"),
    "zeroshot": (zeroshot, "rank labels for your images with pretrained CLIP weights"),
    "flava": (
        flava_recipe,
        "pretrain a tiny FLAVA on the shapes world: contrastive, MLM, MIM, ITM and MMM at once",
    ),
    "serve": (serve, "serve a clip or mmgpt run over HTTP: embeddings, search, generation"),
    "plan": (plan_recipe, "per-rank memory of training a model under DDP and FSDP (meta device)"),
    "albef": (
        albef_recipe,
        "train a tiny ALBEF on the shapes world: --task retrieval (image->text R@1) or vqa",
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="fmm training recipes")
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, (recipe, help_text) in TASKS.items():
        recipe.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    TASKS[args.task][0].run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
