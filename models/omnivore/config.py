"""Omnivore's static configuration and its presets (Swin-T/S/B encoders, one tiny)."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from fmm.nn.swin import Window

MODALITIES = ("image", "video", "rgbd")
# What each modality's input looks like, channels first; an image is a one-frame video.
CHANNELS = {"image": 3, "video": 3, "rgbd": 4}


@dataclass(frozen=True, kw_only=True)
class OmnivoreConfig:
    """A Swin-3D encoder shared by images, videos and RGB-D maps, and one linear head per
    dataset.

    ``patch``: ``(t, h, w)`` pixels per token; ``dim``: the first stage's width, doubled by
    each patch merging; ``depths`` / ``num_heads``: blocks and heads per stage; ``window``:
    the attention window ``(t, h, w)`` in tokens (odd blocks shift it by half).
    ``heads``: ``(name, classes, modality)`` per dataset, ``modality`` one of
    ``image`` ``[B, 3, H, W]``, ``video`` ``[B, 3, T, H, W]``, ``rgbd`` ``[B, 4, H, W]``
    (RGB then depth). ``image_size`` / ``frames``: the batch sizes a data source is checked
    against (the encoder itself takes any size). ``stochastic_depth``: the drop-path rate of
    the last block in training, rising linearly from 0 at the first block over all stages
    (:meth:`drop_path_rates`); TorchMultimodal's ``stochastic_depth_prob``.
    """

    patch: tuple[int, int, int] = (2, 4, 4)
    dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window: tuple[int, int, int] = (8, 7, 7)
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    heads: tuple[tuple[str, int, str], ...] = (
        ("image", 1000, "image"),
        ("rgbd", 19, "rgbd"),
        ("video", 400, "video"),
    )
    image_size: int = 224
    frames: int = 16
    stochastic_depth: float = 0.2

    def __post_init__(self) -> None:
        for name in ("patch", "depths", "num_heads", "window"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        heads = tuple((str(n), int(c), str(m)) for n, c, m in self.heads)
        object.__setattr__(self, "heads", heads)
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"OmnivoreConfig: patch must be 3 positive sizes, got {self.patch}")
        Window(size=self.window)  # its own checks
        if not self.depths or len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"OmnivoreConfig: depths {self.depths} and num_heads {self.num_heads} must "
                "give one entry per stage"
            )
        for name, n, modality in self.heads:
            if modality not in MODALITIES or n < 1:
                raise ValueError(
                    f"OmnivoreConfig: head {name!r} needs classes >= 1 and a modality in "
                    f"{MODALITIES}, got ({n}, {modality!r})"
                )
        if not 0.0 <= self.stochastic_depth < 1.0:
            raise ValueError(
                f"OmnivoreConfig: stochastic_depth must be in [0, 1), got {self.stochastic_depth}"
            )
        if len({n for n, _, _ in self.heads}) != len(self.heads):
            raise ValueError(f"OmnivoreConfig: head names repeat in {self.heads}")
        for i in range(len(self.depths)):
            self.stage(i)  # widths divisible by heads: fail at construction

    def stage(self, i: int) -> TransformerConfig:
        """Stage ``i``'s blocks: width ``dim * 2**i``, GELU MLPs, pre-norm, no drop path."""
        return TransformerConfig(
            width=self.dim * 2**i,
            layers=self.depths[i],
            heads=self.num_heads[i],
            mlp_ratio=self.mlp_ratio,
            norm_eps=self.norm_eps,
        )

    def drop_path_rates(self) -> tuple[tuple[float, ...], ...]:
        """Each block's drop-path rate, per stage: ``stochastic_depth * n / (blocks - 1)``
        for the ``n``-th block counted over all stages (Swin's schedule, as torchvision's
        ``SwinTransformer3d`` computes it; a lone block gets 0)."""
        total, rates, n = sum(self.depths), [], 0
        for depth in self.depths:
            rates.append(
                tuple(self.stochastic_depth * (n + j) / max(total - 1, 1) for j in range(depth))
            )
            n += depth
        return tuple(rates)

    def block(self, i: int, j: int) -> TransformerConfig:
        """Block ``j`` of stage ``i``: :meth:`stage` with that block's drop-path rate."""
        return dataclasses.replace(self.stage(i), drop_path=self.drop_path_rates()[i][j])

    def block_window(self, j: int) -> Window:
        """Block ``j`` of a stage: plain windows when even, shifted by half when odd."""
        shift = (0, 0, 0) if j % 2 == 0 else tuple(w // 2 for w in self.window)
        return Window(size=self.window, shift=shift)

    @property
    def features(self) -> int:
        """The encoder's output width (the last stage's)."""
        return self.dim * 2 ** (len(self.depths) - 1)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities the heads read, in :data:`MODALITIES` order."""
        used = {m for _, _, m in self.heads}
        return tuple(m for m in MODALITIES if m in used)

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> OmnivoreConfig:
        """Inverse of :meth:`to_dict` (JSON turns tuples into lists; ``__post_init__``
        turns them back)."""
        return cls(**d)


def omnivore_swin_t(**overrides) -> OmnivoreConfig:
    """Omnivore Swin-T: 96 wide, depths 2-2-6-2, stochastic depth 0.2 (TorchMultimodal's
    ``omnivore_swin_t``)."""
    return OmnivoreConfig(**overrides)


def omnivore_swin_s(**overrides) -> OmnivoreConfig:
    """Omnivore Swin-S: 96 wide, depths 2-2-18-2, stochastic depth 0.3."""
    return OmnivoreConfig(**{"depths": (2, 2, 18, 2), "stochastic_depth": 0.3, **overrides})


def omnivore_swin_b(**overrides) -> OmnivoreConfig:
    """Omnivore Swin-B: 128 wide, depths 2-2-18-2, heads 4-8-16-32, window 16x7x7,
    stochastic depth 0.3 (TorchMultimodal's; torchvision's image Swin-B uses 0.5)."""
    base = {"dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32)}
    base["stochastic_depth"] = 0.3
    return OmnivoreConfig(**{**base, "window": (16, 7, 7), **overrides})


def omnivore_tiny(**overrides) -> OmnivoreConfig:
    """Two stages 16 and 32 wide on 16 px inputs of 4 frames, three small heads: the
    contract tests' preset (with Swin-T's stochastic depth, 0.2, so they train through it)."""
    base = {
        "dim": 16,
        "depths": (2, 1),
        "num_heads": (1, 2),
        "window": (2, 2, 2),
        "heads": (("image", 5, "image"), ("rgbd", 3, "rgbd"), ("video", 4, "video")),
        "image_size": 16,
        "frames": 4,
    }
    return OmnivoreConfig(**{**base, **overrides})


def omnivore_shapes(**overrides) -> OmnivoreConfig:
    """Sized for the shapes world on a CPU: 32 px images and 8-frame clips, two stages 32 and
    64 wide, heads for shape and colour (images), motion (videos) and the nearest object's
    shape (RGB-D), no stochastic depth (0.1 did not help it: :mod:`train.recipes.omnivore`).
    ``python -m train omnivore`` sets the heads' class counts from its world."""
    base = {
        "dim": 32,
        "depths": (2, 2),
        "num_heads": (2, 4),
        "window": (2, 4, 4),
        "heads": (
            ("shape", 6, "image"),
            ("color", 8, "image"),
            ("motion", 7, "video"),
            ("nearest", 6, "rgbd"),
        ),
        "image_size": 32,
        "frames": 8,
        "stochastic_depth": 0.0,
    }
    return OmnivoreConfig(**{**base, **overrides})
