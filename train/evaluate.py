"""Zero-shot classification on held-out shapes-world images."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from train.data import WorldConfig, class_names, eval_set, is_holdout, prompt_templates


def class_embeddings(
    embed_text: Callable[[list[str]], torch.Tensor], names: list[str], templates: tuple[str, ...]
) -> torch.Tensor:
    """One unit vector per class: the renormalised mean of its prompts' embeddings. ``[C, E]``."""
    prompts = [t.format(name) for name in names for t in templates]
    emb = embed_text(prompts).reshape(len(names), len(templates), -1)
    return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)


def zero_shot_accuracy(
    world: WorldConfig,
    encode_images: Callable[[torch.Tensor], torch.Tensor],
    embed_text: Callable[[list[str]], torch.Tensor],
    *,
    n_per_class: int = 20,
    seed: int = 1,
    batch_size: int = 256,
) -> dict:
    """Top-1 accuracy over every colour x shape class on fresh single-object images.

    ``encode_images``: ``[B, 3, H, W]`` pixels in ``[0, 1]`` -> ``[B, E]``;
    ``embed_text``: list of prompts -> ``[P, E]``. Returns ``top1`` over all classes and
    ``top1_seen`` / ``top1_unseen`` split by whether the colour-shape combination was held
    out of training (unseen combinations test composition).
    """
    images, labels = eval_set(world, n_per_class, seed=seed)
    classes = class_embeddings(embed_text, class_names(world), prompt_templates())
    preds = torch.cat(
        [
            (encode_images(images[i : i + batch_size]) @ classes.T).argmax(-1).cpu()
            for i in range(0, len(images), batch_size)
        ]
    )
    correct = preds == labels
    unseen = is_holdout(world, labels)
    mean = lambda m: round(correct[m].float().mean().item(), 4) if m.any() else None
    return {
        "top1": round(correct.float().mean().item(), 4),
        "top1_seen": mean(~unseen),
        "top1_unseen": mean(unseen),
        "classes": len(class_names(world)),
        "images": len(labels),
        "predictions": preds,
        "labels": labels,
    }
