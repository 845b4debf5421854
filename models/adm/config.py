"""Static configuration of the ADM U-Net (and the DALL-E 2 decoder built on it) and of the
latent-diffusion VAE, with their presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fmm.diffusion.predict import PREDICTIONS


def _positive(owner: str, **sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def _grouped(owner: str, groups: int, channels: tuple[int, ...]) -> None:
    bad = [c for c in channels if c % groups]
    if bad:
        raise ValueError(f"{owner}: channel widths {bad} are not divisible by groups={groups}")


@dataclass(frozen=True, kw_only=True)
class ADMConfig:
    """Every static choice of an ADM U-Net ("Diffusion Models Beat GANs", TorchMultimodal's
    ``ADMUNet``).

    ``channels[i]``: the width at level ``i``; every level but the last ends in a
    downsampling residual block (and the decoder's mirrored levels in an upsampling one), so
    ``image_size`` must be divisible by ``2 ** (len(channels) - 1)``. ``attention[i]``: an attention
    block after each residual block of level ``i``. ``res_blocks``: residual blocks per
    level in the encoder (the decoder has one more).

    Conditioning: the timestep is embedded (sinusoids of ``time_embed_dim``, then an MLP to
    ``cond_dim``) and drives every residual block by scale-shift norm. ``embed_dim`` set: a
    conditioning embedding ``[B, embed_dim]`` (DALL-E 2's CLIP image embedding) is projected
    to ``cond_dim`` and added to the timestep embedding, and to ``cond_tokens`` tokens of
    width ``cond_dim`` that every attention block prepends to its keys and values; it is
    ``cond[cond_key]`` of a denoiser's ``cond`` dict (TorchMultimodal's ``embed_name``).
    ``null_embedding``: a learned embedding that stands in for a dropped condition
    (classifier-free guidance); ``cond_dropout`` is the rate the loss drops it at.

    ``learned_variance``: the output has ``2 * in_channels`` channels, the second half the
    interpolation value ``v`` of the learned variance, mapped to ``[0, 1]`` as
    ``(v + 1) / 2`` (TorchMultimodal's ``adm_unet``). ``dropout``: before each residual
    block's second convolution. ``timesteps``: the diffusion steps the loss draws ``t`` from.

    Training choices the output's meaning depends on: ``prediction``, what the prediction
    channels estimate (``"noise"``, ``"v"`` or ``"x0"``: ``fmm.diffusion.predict``; a sampler
    must be told it), and ``snr_gamma``, the loss's Min-SNR-γ weighting
    (``fmm.diffusion.min_snr_weights``; None: the plain MSE). TorchMultimodal's ADM predicts
    noise unweighted, the defaults.
    """

    image_size: int = 64
    in_channels: int = 4
    channels: tuple[int, ...] = (512, 1024, 1536, 2048)
    attention: tuple[bool, ...] = (False, True, True, True)
    res_blocks: int = 3
    time_embed_dim: int = 512
    cond_dim: int = 2048
    embed_dim: int | None = 768
    cond_key: str = "context"
    cond_tokens: int = 4
    null_embedding: bool = False
    cond_dropout: float = 0.0
    heads: int = 1
    groups: int = 32
    eps: float = 1e-5
    dropout: float = 0.1
    learned_variance: bool = True
    timesteps: int = 1000
    prediction: str = "noise"
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        object.__setattr__(self, "attention", tuple(bool(a) for a in self.attention))
        owner = "ADMConfig"
        _positive(
            owner, image_size=self.image_size, in_channels=self.in_channels,
            res_blocks=self.res_blocks, time_embed_dim=self.time_embed_dim,
            cond_dim=self.cond_dim, cond_tokens=self.cond_tokens, heads=self.heads,
            groups=self.groups, timesteps=self.timesteps,
        )  # fmt: skip
        if not self.channels or len(self.attention) != len(self.channels):
            raise ValueError(
                f"{owner}: attention must give one flag per level of channels={self.channels}, "
                f"got {self.attention}"
            )
        _grouped(owner, self.groups, self.channels)
        if any(c % self.heads for c in self.channels):
            raise ValueError(f"{owner}: channels {self.channels} not divisible by heads")
        if self.image_size % 2**self.num_resize:
            raise ValueError(
                f"{owner}: image_size={self.image_size} is not divisible by "
                f"2 ** num_resize = {2**self.num_resize}"
            )
        if self.embed_dim is not None:
            _positive(owner, embed_dim=self.embed_dim)
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"{owner}: prediction must be one of {PREDICTIONS}, got {self.prediction!r}"
            )
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise ValueError(f"{owner}: snr_gamma must be > 0 or None, got {self.snr_gamma!r}")
        if self.null_embedding and self.embed_dim is None:
            raise ValueError(f"{owner}: null_embedding needs embed_dim (a condition to replace)")
        if not 0.0 <= self.cond_dropout < 1.0 or (self.cond_dropout and not self.null_embedding):
            raise ValueError(
                f"{owner}: cond_dropout must be in [0, 1) and needs null_embedding, "
                f"got {self.cond_dropout}"
            )

    @property
    def num_resize(self) -> int:
        """Resolution halvings (TorchMultimodal's ``num_resize``). Fixed by the levels: with
        fewer, its decoder would concatenate skips of two resolutions."""
        return len(self.channels) - 1

    @property
    def out_channels(self) -> int:
        """Channels of the U-Net's output: the prediction, then the variance values if learned."""
        return self.in_channels * (2 if self.learned_variance else 1)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """The latent-diffusion autoencoder (TorchMultimodal's ``ldm_variational_autoencoder``).

    The encoder halves the resolution between consecutive ``multipliers`` levels (widths
    ``channels * m``), ends in ``2 * z_channels`` maps, and a 1x1 convolution turns them into
    the mean and log-variance of an ``embedding_channels``-wide diagonal Gaussian posterior;
    the decoder mirrors it (one more residual block per level). ``kl_weight``: the KL term's
    weight in the loss.
    """

    image_size: int = 256
    in_channels: int = 3
    out_channels: int = 3
    z_channels: int = 4
    embedding_channels: int = 4
    channels: int = 128
    res_blocks: int = 2
    multipliers: tuple[int, ...] = (1, 2, 4, 4)
    dropout: float = 0.0
    groups: int = 32
    eps: float = 1e-6
    alpha_channel: bool = False
    kl_weight: float = 1e-6

    def __post_init__(self) -> None:
        object.__setattr__(self, "multipliers", tuple(self.multipliers))
        owner = "VAEConfig"
        _positive(
            owner, image_size=self.image_size, in_channels=self.in_channels,
            out_channels=self.out_channels, z_channels=self.z_channels,
            embedding_channels=self.embedding_channels, channels=self.channels,
            res_blocks=self.res_blocks, groups=self.groups,
        )  # fmt: skip
        if not self.multipliers or any(m < 1 for m in self.multipliers):
            raise ValueError(f"{owner}: multipliers must be positive, got {self.multipliers}")
        _grouped(owner, self.groups, self.widths)
        if self.image_size % self.downsample:
            raise ValueError(
                f"{owner}: image_size={self.image_size} is not divisible by {self.downsample}"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """The encoder's widths: the first convolution's, then each level's."""
        return tuple(self.channels * m for m in (1, *self.multipliers))

    @property
    def downsample(self) -> int:
        """Pixels per latent along each side."""
        return 2 ** (len(self.multipliers) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    def to_dict(self) -> dict:
        return asdict(self)


def adm_unet(**overrides) -> ADMConfig:
    """TorchMultimodal's ``adm_unet()`` defaults: widths 512-2048 over 4 levels, attention
    at the three lower resolutions, a 768-wide condition, learned variance; 64 px latents."""
    return ADMConfig(**overrides)


def adm_tiny(**overrides) -> ADMConfig:
    """An unconditional U-Net small enough for tests: 16 px RGB, widths 32 and 64."""
    return ADMConfig(
        **{
            "image_size": 16, "in_channels": 3, "channels": (32, 64),
            "attention": (False, True), "res_blocks": 1,
            "time_embed_dim": 32, "cond_dim": 64, "embed_dim": None, **overrides,
        }
    )  # fmt: skip


def dalle2_decoder(**overrides) -> ADMConfig:
    """TorchMultimodal's ``dalle2_decoder()`` U-Net: ``adm_unet`` conditioned on a 768-wide
    CLIP image embedding with a learned null embedding, dropped at rate 0.1 in training."""
    return ADMConfig(
        **{"cond_key": "clip_image", "null_embedding": True, "cond_dropout": 0.1, **overrides}
    )


def dalle2_tiny(**overrides) -> ADMConfig:
    """``dalle2_decoder`` at test size: 16 px RGB, conditioned on a 64-wide CLIP embedding (``clip_tiny``'s)."""
    return adm_tiny(
        **{
            "embed_dim": 64,
            "cond_key": "clip_image",
            "null_embedding": True,
            "cond_dropout": 0.1,
            **overrides,
        }
    )


def ldm_vae_f8(**overrides) -> VAEConfig:
    """Latent diffusion's KL-f8 autoencoder: 256 px RGB -> 32 x 32 x 4 latents."""
    return VAEConfig(**overrides)


def vae_tiny(**overrides) -> VAEConfig:
    """A VAE small enough for tests: 16 px RGB -> 8 x 8 x 4 latents, widths 32 and 64."""
    return VAEConfig(
        **{"image_size": 16, "channels": 32, "res_blocks": 1, "multipliers": (1, 2), **overrides}
    )
