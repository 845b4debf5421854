"""MAE's static configuration and its presets (TorchMultimodal's image and audio MAEs, two tiny)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fmm.nn import TransformerConfig
from fmm.nn.swin import Window

DECODERS = ("vit", "swin")
MODALITIES = ("image", "audio")


@dataclass(frozen=True, kw_only=True)
class MAEConfig:
    """A masked autoencoder: a ViT encoder over the visible patches of an input, a light
    decoder that fills the masked ones with a learned mask token and predicts their pixels.

    ``input_size``: ``(height, width)`` of the input, for audio ``(frames, mels)`` of a
    spectrogram ``[B, 1, frames, mels]``; ``in_channels``: 3 for images, 1 for audio;
    ``patch_size``: pixels per patch side. ``width`` / ``layers`` / ``heads`` / ``mlp_dim``:
    the encoder; ``decoder_*``: the decoder. ``ratio``: the share of patches masked (0.75 for
    images, 0.8 for audio, as MAE and AudioMAE); ``norm_pix_loss``: the target of each patch
    is its own pixels normalised to zero mean and unit variance (MAE's better target).

    ``decoder``: ``"vit"`` (global attention, MAE's) or ``"swin"`` (AudioMAE's: Swin V2
    windows of ``window`` patches over the ``(frames, mels)`` patch grid, odd blocks shifted
    by ``shift``; :class:`fmm.nn.swin.Window` with ``v2=True``); ``bias_dropout``: dropout
    on the Swin decoder's position-bias MLP in training (TorchMultimodal's 0.1).
    ``use_cls_in_decoder``: the decoder sees the class token too (TorchMultimodal: yes for
    images, no for the Swin decoder, whose windows tile the patch grid alone).
    ``norm_eps``: the encoder's and a ViT decoder's layer norms (1e-6); the Swin decoder's
    norms use ``swin_norm_eps`` (1e-5, TorchMultimodal's default there).
    """

    modality: str = "image"
    input_size: tuple[int, int] = (224, 224)
    in_channels: int = 3
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    decoder: str = "vit"
    decoder_width: int = 512
    decoder_layers: int = 8
    decoder_heads: int = 16
    decoder_mlp_dim: int = 2048
    window: tuple[int, int] = (4, 4)
    shift: tuple[int, int] = (2, 0)
    bias_dropout: float = 0.0
    use_cls_in_decoder: bool = True
    ratio: float = 0.75
    norm_pix_loss: bool = True
    norm_eps: float = 1e-6
    swin_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("input_size", "window", "shift"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.modality not in MODALITIES:
            raise ValueError(
                f"MAEConfig: modality must be one of {MODALITIES}, got {self.modality!r}"
            )
        if self.decoder not in DECODERS:
            raise ValueError(f"MAEConfig: decoder must be one of {DECODERS}, got {self.decoder!r}")
        h, w = self.input_size
        if self.patch_size < 1 or h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"MAEConfig: input_size={self.input_size} must be positive multiples of "
                f"patch_size={self.patch_size}"
            )
        if self.width % 4 or self.decoder_width % 4:
            raise ValueError(
                f"MAEConfig: width={self.width} and decoder_width={self.decoder_width} must be "
                "multiples of 4 (their fixed 2-d sin-cos positions)"
            )
        if not 0.0 <= self.ratio < 1.0 or int(self.patches * (1 - self.ratio)) < 1:
            raise ValueError(
                f"MAEConfig: ratio={self.ratio} must be in [0, 1) and keep a patch of "
                f"{self.patches}"
            )
        if self.decoder == "swin" and self.use_cls_in_decoder:
            raise ValueError(
                "MAEConfig: the swin decoder tiles the patch grid: use_cls_in_decoder=False"
            )
        # Building the stacks and windows checks them (widths by heads, shifts by windows),
        # so a bad config fails here rather than in its first forward.
        built = [self.encoder, self.decoder_stack]
        if self.decoder == "swin":
            built += [self.block_window(i) for i in range(2)]

    @property
    def grid(self) -> tuple[int, int]:
        """Patches along height and width (for audio: along frames and mels)."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def kept(self) -> int:
        """Visible patches per example: the floor of ``patches * (1 - ratio)``."""
        return int(self.patches * (1 - self.ratio))

    @property
    def patch_dim(self) -> int:
        """Values per patch, the decoder's prediction width: ``patch_size² * in_channels``."""
        return self.patch_size**2 * self.in_channels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One input: ``(C, H, W)``; audio ``(1, frames, mels)``."""
        return (self.in_channels, *self.input_size)

    @property
    def encoder(self) -> TransformerConfig:
        return TransformerConfig(
            width=self.width, layers=self.layers, heads=self.heads, mlp_dim=self.mlp_dim,
            norm_eps=self.norm_eps,
        )  # fmt: skip

    @property
    def decoder_stack(self) -> TransformerConfig:
        eps = self.swin_norm_eps if self.decoder == "swin" else self.norm_eps
        return TransformerConfig(
            width=self.decoder_width, layers=self.decoder_layers, heads=self.decoder_heads,
            mlp_dim=self.decoder_mlp_dim, norm_eps=eps,
        )  # fmt: skip

    def block_window(self, i: int) -> Window:
        """Swin decoder block ``i``'s window over the ``(1, frames, mels)`` patch grid:
        even blocks unshifted, odd ones by ``shift``, fitted to the grid."""
        shift = (0, 0, 0) if i % 2 == 0 else (0, *self.shift)
        window = Window(
            size=(1, *self.window), shift=shift, v2=True, bias_dropout=self.bias_dropout
        )
        return window.fit((1, *self.grid))

    def to_dict(self) -> dict:
        return asdict(self)


def mae_vit_b16() -> MAEConfig:
    """TorchMultimodal's ``image_mae()``: ViT-B/16 encoder on 224² images, 8-layer decoder."""
    return MAEConfig()


def mae_vit_l16() -> MAEConfig:
    """TorchMultimodal's ``vit_l_16_image_mae()``: a ViT-L/16 encoder."""
    return MAEConfig(width=1024, layers=24, heads=16, mlp_dim=4096)


def _audio(**encoder) -> MAEConfig:
    # AudioMAE: 1024 frames x 128 mels, 16² patches (64 x 8), 80% masked, a 16-layer Swin
    # decoder with 4x4 windows (TorchMultimodal's audio_mae presets).
    return MAEConfig(
        modality="audio", input_size=(1024, 128), in_channels=1, ratio=0.8, decoder="swin",
        decoder_layers=16, use_cls_in_decoder=False, bias_dropout=0.1, **encoder,
    )  # fmt: skip


def mae_audio_vit_s16() -> MAEConfig:
    """TorchMultimodal's ``vit_s_16_audio_mae()``."""
    return _audio(width=384, layers=12, heads=6, mlp_dim=1536)


def mae_audio_vit_b16() -> MAEConfig:
    """TorchMultimodal's ``vit_b_16_audio_mae()``."""
    return _audio(width=768, layers=12, heads=12, mlp_dim=3072)


def mae_audio_vit_l16() -> MAEConfig:
    """TorchMultimodal's ``vit_l_16_audio_mae()``."""
    return _audio(width=1024, layers=24, heads=16, mlp_dim=4096)


def mae_tiny(*, image_size: int = 32) -> MAEConfig:
    """A small image MAE for tests and CPU recipes: 32² images in 4² patches (64), a
    2-layer width-64 encoder, a 1-layer width-32 decoder."""
    return MAEConfig(
        input_size=(image_size, image_size), patch_size=4, width=64, layers=2, heads=4,
        mlp_dim=128, decoder_width=32, decoder_layers=1, decoder_heads=2, decoder_mlp_dim=64,
    )  # fmt: skip


def mae_audio_tiny(*, frames: int = 64, mels: int = 32) -> MAEConfig:
    """A small audio MAE for tests and CPU recipes: ``[B, 1, 64, 32]`` spectrograms in 8²
    patches (an 8 x 4 grid), a 2-layer width-32 encoder, a 2-layer Swin decoder (one
    unshifted block, one shifted) of width 32 and 4x4 windows."""
    return MAEConfig(
        modality="audio", input_size=(frames, mels), in_channels=1, patch_size=8, width=32,
        layers=2, heads=2, mlp_dim=64, decoder="swin", decoder_width=32, decoder_layers=2,
        decoder_heads=2, decoder_mlp_dim=64, use_cls_in_decoder=False, ratio=0.8,
        bias_dropout=0.1,
    )  # fmt: skip
