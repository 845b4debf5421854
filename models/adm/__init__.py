"""ADM: the diffusion U-Net of "Diffusion Models Beat GANs" (and DALL-E 2's decoder, the
same U-Net conditioned on CLIP image embeddings), and latent diffusion's VAE.

Two contracts (:class:`models.family.Family`): ``FAMILY`` ("adm", the U-Net: its loss is
``fmm.diffusion``'s on the cosine schedule) and ``VAE_FAMILY`` ("vae": reconstruction plus
KL). ``unet.apply`` with ``cfg`` bound is an ``fmm.diffusion`` denoiser.

Example::

    from models.adm import adm_tiny, unet
    cfg = adm_tiny()
    params = unet.init(cfg, fmm.random.key(0))
    out = unet.apply(params, torch.randn(2, 3, 16, 16), torch.tensor([0, 999]), cfg=cfg)
"""

from models.adm import convert, dalle2, layers, unet, vae
from models.adm.config import (
    ADMConfig,
    VAEConfig,
    adm_tiny,
    adm_unet,
    dalle2_decoder,
    dalle2_tiny,
    ldm_vae_f8,
    vae_tiny,
)
from models.adm.convert import from_torchmultimodal, to_torchmultimodal
from models.family import Converter, Family

PRESETS = {
    "adm_unet": adm_unet,
    "adm_tiny": adm_tiny,
    "dalle2_decoder": dalle2_decoder,
    "dalle2_tiny": dalle2_tiny,
}
VAE_PRESETS = {"ldm_vae_f8": ldm_vae_f8, "vae_tiny": vae_tiny}
_TMM = {"torchmultimodal": Converter(from_=from_torchmultimodal, to=to_torchmultimodal)}

FAMILY = Family(
    name="adm",
    config=ADMConfig,
    presets=PRESETS,
    init=unet.init,
    loss=unet.loss,
    batch=unet.batch_fields,
    converters=_TMM,
    doc="diffusion U-Net (ADM; DALL-E 2's decoder conditioned on CLIP image embeddings)",
)

VAE_FAMILY = Family(
    name="vae",
    config=VAEConfig,
    presets=VAE_PRESETS,
    init=vae.init,
    loss=vae.loss,
    batch=vae.batch_fields,
    converters=_TMM,
    doc="latent-diffusion autoencoder with a diagonal Gaussian posterior",
)

__all__ = [
    "FAMILY",
    "PRESETS",
    "VAE_FAMILY",
    "VAE_PRESETS",
    "ADMConfig",
    "VAEConfig",
    "adm_tiny",
    "adm_unet",
    "convert",
    "dalle2",
    "dalle2_decoder",
    "dalle2_tiny",
    "from_torchmultimodal",
    "layers",
    "ldm_vae_f8",
    "to_torchmultimodal",
    "unet",
    "vae",
]
