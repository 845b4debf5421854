"""``python -m train zeroshot``: classify your images with pretrained CLIP weights you have.

::

    python -m train zeroshot --weights ViT-B-16.pt --format open_clip \\
        --vocab bpe_simple_vocab_16e6.txt.gz --labels "a dog,a cat,a car" dog.jpg cat.png

prints, per image, the labels ranked by probability. Weights are read by
:func:`models.clip.convert.load_pretrained` (the config is read off the weights, or from a
Hugging Face ``config.json`` beside them, or given with ``--config``); images go through
CLIP's resize / center-crop / normalise; labels through the CLIP BPE tokenizer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from fmm.templates import check_template, fill_template
from models.clip import convert, encode_image, encode_text
from train.data.tokenizers import CLIPTokenizer
from train.data.transforms import clip_preprocess
from train.recipes import existing_file, number


def _template(text: str) -> str:
    try:
        return check_template(text, name="template")
    except ValueError as e:  # argparse prefixes the flag's name
        raise argparse.ArgumentTypeError(str(e).removeprefix("template ")) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", nargs="+", type=existing_file, help="image files (any format PIL reads)"
    )
    parser.add_argument(
        "--weights", type=existing_file, required=True, help=".pt, .bin or .safetensors"
    )
    parser.add_argument("--format", required=True, choices=convert.FORMATS)
    parser.add_argument(
        "--vocab", type=existing_file, required=True, help="bpe_simple_vocab_16e6.txt.gz"
    )
    parser.add_argument("--labels", required=True, help='comma-separated, e.g. "a dog,a cat"')
    parser.add_argument(
        "--template", default="{}", type=_template,
        help='prompt around each label, exactly one {} (write other braces doubled), '
        'e.g. "a photo of {}."',
    )  # fmt: skip
    parser.add_argument(
        "--config",
        default=None,
        help="open_clip model name (ViT-B-16-quickgelu) or a config JSON (open_clip or HF); "
        "default: read the sizes off the weights",
    )
    parser.add_argument(
        "--act", default="quick_gelu", help="activation when the config is read off the weights"
    )
    parser.add_argument(
        "--top", type=number(at_least=1), default=5, help="rows per image (default 5)"
    )


def _config(spec: str | None):
    if spec is None:
        return None
    path = Path(spec)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return (
            convert.config_from_hf(data)
            if "vision_config" in data
            else convert.config_from_open_clip(data)
        )
    return convert.config_from_open_clip(spec)


def labels_from(text: str) -> list[str]:
    labels = [label.strip() for label in text.split(",") if label.strip()]
    if not labels:
        raise ValueError(f"--labels has no labels: {text!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels repeats a label: {labels}")
    return labels


@torch.no_grad()
def classify(params, cfg, tokenizer: CLIPTokenizer, images: torch.Tensor, prompts: list[str]):
    """``(probs [n_images, n_labels], logits [n_images, n_labels])`` as CLIP computes them."""
    img = encode_image(params, images, cfg=cfg)
    txt = encode_text(params, tokenizer(prompts), cfg=cfg)
    logits = params["logit_scale"].exp() * img @ txt.T
    return logits.softmax(dim=-1), logits


def format_table(
    name: str, labels: list[str], probs: torch.Tensor, logits: torch.Tensor, top: int
) -> str:
    order = probs.argsort(descending=True)[:top].tolist()
    width = max(len(labels[i]) for i in order)
    lines = [name, f"  {'rank':>4}  {'label':<{width}}  {'prob':>6}  {'logit':>7}"]
    for rank, i in enumerate(order, start=1):
        lines.append(f"  {rank:>4}  {labels[i]:<{width}}  {probs[i]:>6.3f}  {logits[i]:>7.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    labels = labels_from(args.labels)
    params, cfg = convert.load_pretrained(
        args.weights, format=args.format, cfg=_config(args.config), act=args.act
    )
    tokenizer = CLIPTokenizer.from_vocab(args.vocab, context_length=cfg.context_length)
    images = clip_preprocess(args.images, size=cfg.image_size)
    prompts = [fill_template(args.template, label, name="--template") for label in labels]
    probs, logits = classify(params, cfg, tokenizer, images, prompts)
    for path, p, z in zip(args.images, probs, logits):
        print(format_table(str(path), labels, p, z, args.top))
    return {
        str(path): {labels[i]: float(p[i]) for i in range(len(labels))}
        for path, p in zip(args.images, probs)
    }
