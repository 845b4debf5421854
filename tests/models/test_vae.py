"""Latent diffusion's VAE: parity with TorchMultimodal's ``ldm_variational_autoencoder`` on
identical random weights, the converter's round trip and error list, and the posterior's
laws (the reparameterised draw's moments, the closed-form KL)."""

from __future__ import annotations

import pytest
import torch

import fmm
from fmm.convert import ConversionError
from models.adm import convert, vae
from models.adm.config import VAEConfig, ldm_vae_f8, vae_tiny
from tests.reference import reference

ATOL = 1e-5


def _tmm_vae(cfg: VAEConfig):
    ldm = reference("torchmultimodal.diffusion_labs.models.vae.vae")
    model = ldm.ldm_variational_autoencoder(
        embedding_channels=cfg.embedding_channels, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, z_channels=cfg.z_channels, channels=cfg.channels,
        num_res_blocks=cfg.res_blocks, channel_multipliers=cfg.multipliers,
        norm_groups=cfg.groups, norm_eps=cfg.eps, output_alpha_channel=cfg.alpha_channel,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.mark.parametrize(
    "cfg",
    [vae_tiny(), vae_tiny(multipliers=(1, 2, 2), alpha_channel=True, z_channels=3, embedding_channels=2)],
    ids=["tiny", "three-levels-alpha"],
)  # fmt: skip
def test_vae_equals_torchmultimodal_on_identical_weights(cfg):
    model = _tmm_vae(cfg)
    params = convert.from_torchmultimodal(model.state_dict(), cfg)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x, sample_posterior=False)
        got = vae.apply(params, x, cfg=cfg)
        posterior = model.encode(x)
    torch.testing.assert_close(got["reconstruction"], want.decoder_output, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(got["mean"], posterior.mean, atol=ATOL, rtol=ATOL)
    std = (0.5 * got["log_variance"]).exp()
    torch.testing.assert_close(std, posterior.stddev, atol=ATOL, rtol=ATOL)
    with torch.no_grad():
        decoded = vae.decode(params, got["z"], cfg=cfg)
    torch.testing.assert_close(decoded, model.decode(got["z"]), atol=ATOL, rtol=ATOL)
    model.load_state_dict(convert.to_torchmultimodal(params, cfg))
    again = convert.from_torchmultimodal(model.state_dict(), cfg)
    assert all(torch.equal(a, b) for a, b in zip(fmm.tree.leaves(params), fmm.tree.leaves(again)))


def test_the_vae_converter_lists_every_bad_key():
    cfg = vae_tiny()
    sd = convert.to_torchmultimodal(vae.init(cfg, fmm.random.key(0)), cfg)
    sd.pop("encoder.quant_conv.weight")
    sd["decoder.resnet_decoder.conv_out.bias"] = torch.zeros(7)
    sd["decoder.resnet_decoder.alpha_conv_out.weight"] = torch.zeros(1, 64, 3, 3)
    with pytest.raises(ConversionError) as err:
        convert.from_torchmultimodal(sd, cfg)
    text = str(err.value)
    assert "missing: encoder.quant_conv.weight" in text
    assert "unexpected: decoder.resnet_decoder.alpha_conv_out.weight" in text
    assert "mismatched decoder.resnet_decoder.conv_out.bias: expected [3], got [7]" in text


def test_posterior_draws_have_the_posterior_moments():
    mean = torch.tensor([[-1.0, 0.5, 2.0]]).expand(20000, -1)
    log_variance = torch.tensor([[0.0, -2.0, 1.0]]).expand(20000, -1)
    z = vae.sample_posterior(mean, log_variance, fmm.random.key(0))
    torch.testing.assert_close(z.mean(0), mean[0], atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(0), (0.5 * log_variance[0]).exp(), atol=0.03, rtol=0)


def test_kl_is_the_closed_form_of_torch_distributions():
    mean, log_variance = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    posterior = torch.distributions.Normal(mean, (0.5 * log_variance).exp())
    want = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0))
    got = vae.kl_to_standard_normal(mean, log_variance)
    torch.testing.assert_close(got, want.flatten(1).sum(1))


def test_the_loss_is_a_draw_in_training_and_the_mean_in_evaluation():
    cfg = vae_tiny()
    params = vae.init(cfg, fmm.random.key(0))
    batch = {"images": torch.rand(2, 3, 16, 16) * 2 - 1}
    evaluated, metrics = vae.loss(params, batch, cfg=cfg, key=fmm.random.key(1), train=False)
    assert set(metrics) == {"recon_mse", "kl"}
    torch.testing.assert_close(evaluated, vae.loss(params, batch, cfg=cfg, train=False)[0])
    drawn, _ = vae.loss(params, batch, cfg=cfg, key=fmm.random.key(1))
    assert not torch.allclose(drawn, evaluated)
    with pytest.raises(ValueError, match="height and width divisible by 2"):
        vae.encode(params, torch.rand(1, 3, 15, 16), cfg=cfg)
    with pytest.raises(ValueError, match="not divisible by groups=32"):
        VAEConfig(channels=48, image_size=16, multipliers=(1, 2))


def test_ldm_vae_f8_has_the_keys_and_shapes_of_latent_diffusions_kl_f8():
    ldm = reference("torchmultimodal.diffusion_labs.models.vae.vae")
    cfg = ldm_vae_f8()
    with torch.device("meta"):
        theirs = ldm.ldm_variational_autoencoder(
            embedding_channels=4, in_channels=3, out_channels=3, z_channels=4, channels=128,
            num_res_blocks=2, channel_multipliers=(1, 2, 4, 4),
        ).state_dict()  # fmt: skip
    ours = convert.to_torchmultimodal(convert.from_torchmultimodal(theirs, cfg), cfg)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
