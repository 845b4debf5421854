"""VQ-VAE's static configuration and its presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True)
class VQVAEConfig:
    """Every static choice of a VQ-VAE: a conv encoder that halves the resolution once per
    entry of ``channels``, a codebook of ``codebook_size`` vectors of width ``code_dim``
    learned by EMA, and a mirrored decoder.

    ``commitment``: weight of the commitment loss. ``decay``: EMA decay of the codebook
    statistics (0.95 rather than the usual 0.99: a run of a few hundred steps needs the
    codebook to follow the encoder quickly). ``dead_threshold``: a code whose EMA cluster
    size (vectors per batch, smoothed) falls below it is restarted on a current encoder
    output by ``update_codebook``.
    """

    image_size: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (48, 96)
    res_blocks: int = 2
    res_hidden: int = 48
    code_dim: int = 32
    codebook_size: int = 128
    commitment: float = 0.25
    decay: float = 0.95
    eps: float = 1e-5
    dead_threshold: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"VQVAEConfig: channels must be positive widths, got {self.channels}")
        for name in ("image_size", "in_channels", "res_hidden", "code_dim", "codebook_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"VQVAEConfig: {name} must be >= 1, got {getattr(self, name)}")
        if self.res_blocks < 0:
            raise ValueError(f"VQVAEConfig: res_blocks must be >= 0, got {self.res_blocks}")
        if self.image_size % self.downsample:
            raise ValueError(
                f"VQVAEConfig: image_size={self.image_size} is not a multiple of the "
                f"downsampling factor {self.downsample} (2 ** len(channels))"
            )
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"VQVAEConfig: decay must be in [0, 1), got {self.decay}")

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return 2 ** len(self.channels)

    @property
    def grid(self) -> int:
        """Codes per side: an image becomes ``grid x grid`` codes."""
        return self.image_size // self.downsample

    def to_dict(self) -> dict:
        """Plain JSON-ready fields (for ``config.json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VQVAEConfig:
        """Inverse of :meth:`to_dict` (JSON turns tuples into lists)."""
        return cls(**{**d, "channels": tuple(d["channels"])})


def vqvae_shapes(**overrides) -> VQVAEConfig:
    """Sized for the shapes world on a CPU: 32 px images -> an 8 x 8 grid of 128 codes."""
    return VQVAEConfig(**overrides)


def vqvae_shapes_4x4(**overrides) -> VQVAEConfig:
    """A coarser tokeniser: 32 px images -> a 4 x 4 grid of 256 codes (shorter sequences)."""
    return VQVAEConfig(**{"channels": (32, 64, 64), "codebook_size": 256, **overrides})
