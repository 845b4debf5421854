"""Zero-shot classification on held-out shapes-world images, and the Fréchet distance
between two sets of embeddings (FID's formula in any feature space)."""

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


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to features ``a: [N, D]`` and ``b: [M,
    D]``: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (FID's formula; here in
    any embedding space, e.g. a judge CLIP's). Covariances are unbiased (``N, M >= 2``).

    Computed in float64 by eigendecomposition: with ``R = S_a^(1/2)`` (symmetric),
    ``(S_a S_b)^(1/2)`` has the trace of ``(R S_b R)^(1/2)``, a symmetric PSD matrix, so the
    trace is the sum of the square roots of its eigenvalues (rounding's tiny negative ones
    clamped to 0), with no general matrix square root and no complex parts.

    Example: ``frechet_distance(judge(samples), judge(real_images))`` is 0 for equal sets.
    """
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"{name} must be [N, D] features with N >= 2, got {list(x.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same width, got {a.shape[1]} and {b.shape[1]}")
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    mean = (a.mean(0) - b.mean(0)).square().sum()
    return float(mean + cov_a.trace() + cov_b.trace() - 2 * cross)
