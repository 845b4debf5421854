"""Evaluation on the user's own data: retrieval recall on a pairs table, zero-shot on an
ImageFolder, for any family that serves embeddings (``FAMILY.serving``: clip, flava, albef).

- :func:`retrieval` (``--val-data``): every image embedded once, every caption once;
  image->text R@k counts an image as found when ANY of its captions ranks within k, and
  text->image R@k asks for each caption's one image (the COCO / Flickr30k protocol).
- :func:`zero_shot` (``--zeroshot-data``): class names from the folder names (``_`` read as
  a space), each class's prompts (``--template``, else :func:`default_templates`) embedded,
  averaged and renormalised (CLIP's ensembling); top-1, top-5 and per-class top-1.

Ranks are computed in blocks of at most :data:`BLOCK_ELEMENTS` similarities (64 MiB of
float32), so memory stays bounded whatever the size: 5k images x 25k captions (COCO's test
split) is 125M scores, done as 8 blocks. A tie counts against the model (a caption scoring
the same as the right one ranks above it), so a collapsed model scores zero, not one.

Example::

    embedder = embedder_for(run.family, run.params, run.cfg, run.tokenizer,
                            transform=partial(eval_transform, size=32, mean=MEAN, std=STD))
    figures = retrieval(open_table("val.csv"), embedder)    # {"image_to_text_r1": ...}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from fmm.templates import fill_template
from train.evaluate import class_embeddings

KS = (1, 5, 10)
BLOCK_ELEMENTS = 2**24
SHOWN_BAD = 5  # skipped images named in the figures
# CLIP's seven-template ImageNet ensemble (the CLIP repo's notebook "Prompt_Engineering_for_
# ImageNet": the subset its authors found best), plus the bare name.
CLIP_TEMPLATES = (
    "{}",
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
# A text tower trained from scratch on the user's captions knows their words only: the
# ensemble's "photo", "origami", "video game" are noise to it. Measured on the shapes world
# (clip --data on 20000 exported scenes, 600 steps, the 48-class heldout ImageFolder):
# top-1 0.991 with the bare name, 0.935 with CLIP_TEMPLATES.
SCRATCH_TEMPLATES = ("{}",)


def default_templates(tokenizer) -> tuple[str, ...]:
    """The prompt templates zero-shot uses without ``--template``: CLIP's ensemble for a
    text tower that reads CLIP's BPE (converted or fine-tuned weights, whose words came from
    web-scale captions), the bare class name for a tower trained on the user's own captions
    (a run's byte-level BPE or word tokenizer)."""
    from train.data.tokenizers import CLIPRunTokenizer, CLIPTokenizer

    return (
        CLIP_TEMPLATES
        if isinstance(tokenizer, (CLIPRunTokenizer, CLIPTokenizer))
        else SCRATCH_TEMPLATES
    )


@dataclass(frozen=True)
class Embedder:
    """How one model embeds: ``transform(PIL RGB image) -> [3, H, W] float32`` (runs in the
    loader's workers, so it must pickle), ``images([B, 3, H, W]) -> [B, E]`` and
    ``texts(list of B str) -> [B, E]``, both unit-norm, on ``device``."""

    transform: Callable[[Any], torch.Tensor]
    images: Callable[[torch.Tensor], torch.Tensor]
    texts: Callable[[list[str]], torch.Tensor]
    device: torch.device
    templates: tuple[str, ...] = CLIP_TEMPLATES  # zero-shot's default (:func:`default_templates`)


def embedder_for(
    family, params, cfg, tokenizer, *, transform, device: torch.device | str = "cpu"
) -> Embedder:
    """An :class:`Embedder` over ``family.serving`` (``embed_image`` / ``embed_text``), the
    texts tokenised with ``tokenizer.encode(texts, length)`` to the length the family's
    ``tokens`` field allows. A family whose batch has an ``attention_mask`` (ALBEF) gets one
    from the tokenizer's padding, as it trained with."""
    serving = family.serving
    if serving is None or serving.embed_image is None or serving.embed_text is None:
        raise ValueError(f"a {family.name} model serves no image and text embeddings to rank")
    if tokenizer is None:
        raise ValueError(f"this {family.name} model has no tokenizer: its texts cannot be embedded")
    fields = family.batch(cfg)
    length = fields["tokens"].limits["seq"]
    masked = "attention_mask" in fields
    pad = getattr(tokenizer, "pad_id", 0)
    device = torch.device(device)

    def texts(batch: list[str]) -> torch.Tensor:
        tokens = tokenizer.encode(batch, length).to(device)
        extra = {"attention_mask": tokens != pad} if masked else {}
        return serving.embed_text(params, tokens, cfg=cfg, **extra)

    def images(batch: torch.Tensor) -> torch.Tensor:
        return serving.embed_image(params, batch.to(device), cfg=cfg)

    return Embedder(
        transform=transform, images=images, texts=texts, device=device,
        templates=default_templates(tokenizer),
    )  # fmt: skip


# --- the figures, from embeddings -------------------------------------------------------------


def _rows_per_block(width: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(width, 1))


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: torch.Tensor,
    *,
    ks: Sequence[int] = KS,
) -> dict:
    """Recall@k both ways. ``image_emb [N, E]``, ``text_emb [M, E]`` (unit norm);
    ``text_image [M]`` int64: the image of each caption. An image without a caption is a
    distractor for text->image only.

    Returns ``{"image_to_text_r1": ..., "text_to_image_r1": ..., "images": N, "captions": M}``
    for each k in ``ks``.

    Example: with ``image_emb == text_emb == torch.eye(3)`` and ``text_image = [0, 1, 2]``
    every R@k is 1.0.
    """
    n, m = len(image_emb), len(text_emb)
    text_image = text_image.to(image_emb.device)
    captioned = torch.zeros(n, dtype=torch.bool, device=image_emb.device)
    captioned[text_image] = True
    # image -> text: the rank of an image's best caption among the other images' captions.
    i2t = []
    for start in range(0, n, _rows_per_block(m)):
        sims = image_emb[start : start + _rows_per_block(m)] @ text_emb.T  # [b, M]
        rows = torch.arange(start, start + len(sims), device=sims.device)
        own = text_image[None, :] == rows[:, None]
        best = sims.masked_fill(~own, float("-inf")).amax(dim=1, keepdim=True)
        i2t.append(((sims >= best) & ~own).sum(dim=1))
    i2t = torch.cat(i2t)[captioned] if n else torch.zeros(0)
    # text -> image: the rank of a caption's image among all images (itself not counted).
    t2i = []
    for start in range(0, m, _rows_per_block(n)):
        sims = text_emb[start : start + _rows_per_block(n)] @ image_emb.T  # [b, N]
        own = sims.gather(1, text_image[start : start + len(sims), None])
        t2i.append((sims >= own).sum(dim=1) - 1)
    t2i = torch.cat(t2i) if m else torch.zeros(0)
    recall = lambda ranks, k: round((ranks < k).float().mean().item(), 4) if len(ranks) else None
    out = {f"image_to_text_r{k}": recall(i2t, k) for k in ks}
    out |= {f"text_to_image_r{k}": recall(t2i, k) for k in ks}
    return out | {"images": n, "captions": m}


def zero_shot_scores(
    image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor, *, top: int = 5
) -> dict:
    """Top-1 and top-``top`` accuracy of the nearest class embedding. ``image_emb [N, E]``,
    ``class_emb [C, E]``, ``labels [N]`` int64. Returns ``{"top1", "top5", "hits" [N] bool
    (top-1), "predictions" [N]}``."""
    k = min(top, len(class_emb))
    ranked = torch.cat(
        [
            (block @ class_emb.T).topk(k, dim=1).indices.cpu()
            for block in image_emb.split(_rows_per_block(len(class_emb)))
        ]
    )
    labels = labels.cpu()
    hits = ranked[:, 0] == labels
    in_top = (ranked == labels[:, None]).any(dim=1)
    return {
        "top1": round(hits.float().mean().item(), 4),
        f"top{top}": round(in_top.float().mean().item(), 4),
        "hits": hits,
        "predictions": ranked[:, 0],
    }


def per_class_accuracy(hits: torch.Tensor, labels: torch.Tensor, names: Sequence[str]) -> dict:
    """``{class name: top-1 accuracy}`` for every class with images (``hits``, ``labels [N]``)."""
    count = torch.bincount(labels, minlength=len(names))
    right = torch.bincount(labels, weights=hits.double(), minlength=len(names))
    return {
        name: round(right[c].item() / count[c].item(), 4)
        for c, name in enumerate(names)
        if count[c]
    }


# --- reading a table's images through a DataLoader ------------------------------------------


class _Images(Dataset):
    """Rows ``rows`` of a table, decoded and transformed in the workers; an unreadable image
    comes back as ``None`` (counted, never fatal)."""

    def __init__(self, table, rows: Sequence[int], transform) -> None:
        self.table, self.rows, self.transform = table, list(rows), transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        from train.data.images import BadSample, decode

        row = self.rows[j]
        where = self.table.where(row)
        try:
            image = decode(self.table.image_bytes(row), where=where)
        except (BadSample, OSError, ValueError) as e:
            return j, None, f"{where}: {getattr(e, 'reason', e)}"
        return j, self.transform(image), None


def _collate(items):
    good = [(j, x) for j, x, _ in items if x is not None]
    index = torch.tensor([j for j, _ in good], dtype=torch.int64)
    images = torch.stack([x for _, x in good]) if good else None
    return index, images, [bad for _, _, bad in items if bad is not None]


def embed_images(
    table, rows: Sequence[int], embedder: Embedder, *, batch_size: int, workers: int, desc: str
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``(embeddings [K, E], kept [K] positions in rows, bad)``: the readable images of
    ``rows``, in order, and a line per unreadable one."""
    loader = DataLoader(
        _Images(table, rows, embedder.transform), batch_size=batch_size, num_workers=workers,
        collate_fn=_collate, pin_memory=embedder.device.type == "cuda",
    )  # fmt: skip
    embedded, kept, bad = [], [], []
    with torch.no_grad():
        for index, images, failed in tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True):
            bad += failed
            if images is not None:
                embedded.append(embedder.images(images))
                kept.append(index)
    if not embedded:
        raise ValueError(f"{desc}: none of the {len(rows)} images could be read ({bad[:1]})")
    return torch.cat(embedded), torch.cat(kept), bad


def embed_texts(texts: list[str], embedder: Embedder, *, batch_size: int, desc: str):
    """``[len(texts), E]``, ``batch_size`` texts per model call."""
    chunks = range(0, len(texts), batch_size)
    with torch.no_grad():
        return torch.cat(
            [
                embedder.texts(texts[i : i + batch_size])
                for i in tqdm(chunks, desc=desc, unit="batch", dynamic_ncols=True)
            ]
        )


def _skipped(bad: list[str]) -> dict:
    return {"skipped_images": len(bad), "skipped_examples": bad[:SHOWN_BAD]} if bad else {}


def retrieval(table, embedder: Embedder, *, batch_size: int = 256, workers: int = 0) -> dict:
    """Recall@1/5/10 both ways on a pairs table (see :func:`retrieval_recall`). Rows naming
    the same image (one ``where``: a CSV with a row per caption) are one image with all
    their captions; unreadable images are skipped with their captions and counted."""
    if table.kind != "pairs":
        raise ValueError(
            f"--val-data: retrieval needs image-caption pairs, got a {table.kind} table"
        )
    first, captions = {}, {}  # where -> first row, where -> captions
    for row in range(len(table)):
        where = table.where(row)
        first.setdefault(where, row)
        captions.setdefault(where, []).extend(t for t in table.texts(row) if t.strip())
    rows = list(first.values())
    image_emb, kept, bad = embed_images(
        table, rows, embedder, batch_size=batch_size, workers=workers, desc="eval images"
    )
    texts, text_image = [], []
    for position, row in enumerate(kept.tolist()):
        found = captions[table.where(rows[row])]
        texts += found
        text_image += [position] * len(found)
    if not texts:
        raise ValueError("--val-data: no readable image has a caption to retrieve")
    text_emb = embed_texts(texts, embedder, batch_size=batch_size, desc="eval captions")
    figures = retrieval_recall(image_emb, text_emb, torch.tensor(text_image, dtype=torch.int64))
    return figures | _skipped(bad)


def zero_shot(
    table,
    embedder: Embedder,
    *,
    templates: Sequence[str] | None = None,
    batch_size: int = 256,
    workers: int = 0,
) -> dict:
    """Zero-shot top-1 / top-5 over an ImageFolder table's classes (``templates``: default
    ``embedder.templates``).

    Returns ``{"zero_shot_top1", "zero_shot_top5", "zero_shot_per_class": {name: acc},
    "zero_shot_classes", "zero_shot_images", "zero_shot_templates"}`` (and the skipped
    images' count), plus ``"hits"`` / ``"labels"`` tensors for the per-class plot.
    """
    if table.kind != "classes":
        raise ValueError(
            f"--zeroshot-data: zero-shot needs an ImageFolder, got a {table.kind} table"
        )
    templates = embedder.templates if templates is None else templates
    names = list(table.class_names)  # the folder names, "_" read as a space
    for template in templates:
        fill_template(template, "x", name="--template")  # refuse a bad one before any work
    rows = range(len(table))
    image_emb, kept, bad = embed_images(
        table, rows, embedder, batch_size=batch_size, workers=workers, desc="zero-shot images"
    )
    labels = torch.tensor([table.label(r) for r in kept.tolist()], dtype=torch.int64)

    def batched(prompts: list[str]) -> torch.Tensor:
        return embed_texts(prompts, embedder, batch_size=batch_size, desc="zero-shot prompts")

    # Checked templates hold one bare {} and doubled braces only, so the str.format that
    # class_embeddings applies fills them exactly as fill_template does.
    classes = class_embeddings(batched, names, tuple(templates))
    scores = zero_shot_scores(image_emb, classes.to(image_emb.device), labels)
    return {
        "zero_shot_top1": scores["top1"],
        "zero_shot_top5": scores["top5"],
        "zero_shot_per_class": per_class_accuracy(scores["hits"], labels, names),
        "zero_shot_classes": len(names),
        "zero_shot_images": len(labels),
        "zero_shot_templates": list(templates),
        **_skipped(bad),
        "hits": scores["hits"],
        "labels": labels,
    }
