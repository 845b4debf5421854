"""Laws of fmm.diffusion: the forward marginals, round trips, DDIM(eta=1) == DDPM, guidance
at scale 1, inpainting, and a sampler step compiled once for every step."""

import functools

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

import fmm
from fmm import diffusion as fd

C, H, W, B, T = 3, 5, 7, 4, 30


def linear_toy(params, x, t, cond):
    """A linear denoiser: ``a[t] x + conv(x)`` (+ the ``text`` conditioning), ``[B, C, H, W]``."""
    out = params["a"][t][:, None, None, None] * x + F.conv2d(x, params["w"], padding=1)
    if cond and "text" in cond:
        out = out + (cond["text"] @ params["text"])[:, :, None, None]
    return out


@pytest.fixture(scope="module")
def params():
    k = fmm.random.split(fmm.random.key(0), 3)
    return {
        "a": fmm.random.uniform(k[0], (T,), low=0.2, high=0.8),
        "w": fmm.random.normal(k[1], (C, C, 3, 3)) * 0.1,
        "text": fmm.random.normal(k[2], (2, C)),
    }


def test_forward_marginals_match_the_schedule():
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    n = 20000
    x0 = torch.tensor([0.8, -0.5]).repeat(n // 2).reshape(n, 1, 1, 1)
    for step in (0, 11, T - 1):
        t = torch.full((n,), step)
        x_t, _ = fd.q_sample(s, x0, t, fmm.random.key(step))
        for value in (0.8, -0.5):
            rows = x_t[x0 == value]
            mean = float(s.sqrt_alphas_cumprod[step]) * value
            var = 1.0 - float(s.alphas_cumprod[step])
            # Five standard errors of the sample mean and the sample variance.
            assert abs(float(rows.mean()) - mean) < 5 * (var / rows.numel()) ** 0.5
            assert abs(float(rows.var()) - var) < 5 * var * (2 / rows.numel()) ** 0.5


def test_q_sample_is_a_pure_function_of_the_key():
    s = fd.gaussian_schedule(fd.linear_betas(T))
    x0, t = torch.zeros(2, C, H, W), torch.tensor([3, 7])
    a, b = fd.q_sample(s, x0, t, fmm.random.key(1)), fd.q_sample(s, x0, t, fmm.random.key(1))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a[0], fd.q_sample(s, x0, t, fmm.random.key(2))[0])


@pytest.mark.parametrize("to", fd.PREDICTIONS)
@pytest.mark.parametrize("source", fd.PREDICTIONS)
def test_prediction_conversions_round_trip(source, to):
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    k = fmm.random.split(fmm.random.key(2), 2)
    x0 = fmm.random.uniform(k[0], (B, C, H, W), low=-1.0, high=1.0)
    t = torch.tensor([0, 4, 15, T - 1])
    x_t, noise = fd.q_sample(s, x0, t, k[1])
    out = fd.target(s, source, x0, noise, t)
    there = fd.convert(s, out, x_t, t, source=source, to=to)
    torch.testing.assert_close(there, fd.target(s, to, x0, noise, t), atol=2e-4, rtol=1e-4)
    back = fd.convert(s, there, x_t, t, source=to, to=source)
    torch.testing.assert_close(back, out, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(fd.predict_x0(s, source, out, x_t, t), x0, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [None, 7])
def test_ddim_eta_1_moments_equal_ddpm_at_every_step(params, steps):
    s = fd.gaussian_schedule(fd.linear_betas(T))
    s = s if steps is None else fd.spaced(s, steps)
    x = fmm.random.normal(fmm.random.key(3), (B, C, H, W))
    for i in range(s.steps):
        i = torch.tensor(i)
        m1, s1 = fd.ddpm_moments(linear_toy, params, x, i, schedule=s)
        m2, s2 = fd.ddim_moments(linear_toy, params, x, i, schedule=s, eta=1.0)
        torch.testing.assert_close(m1, m2, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s1, s2, atol=1e-6, rtol=1e-5)


def test_ddim_eta_1_samples_as_ddpm_in_distribution(params):
    # The same moments at every step, and the same noise per step: the same chains.
    s = fd.spaced(fd.gaussian_schedule(fd.linear_betas(T)), 10)
    x = fmm.random.normal(fmm.random.key(4), (256, C, 2, 2))
    key = fmm.random.key(5)
    ddpm = fd.sample(
        functools.partial(fd.ddpm_step, linear_toy, schedule=s), params, x, key, steps=10
    )
    step = functools.partial(fd.ddim_step, linear_toy, schedule=s, eta=1.0)
    ddim = fd.sample(step, params, x, key, steps=10)
    torch.testing.assert_close(ddim, ddpm, atol=1e-4, rtol=1e-4)
    eta0 = fd.sample(
        functools.partial(fd.ddim_step, linear_toy, schedule=s), params, x, key, steps=10
    )
    assert (eta0 - ddpm).abs().mean() > 1e-2  # eta = 0 is a different process


def test_ddim_eta_0_is_deterministic_and_ignores_the_key(params):
    s = fd.spaced(fd.gaussian_schedule(fd.cosine_betas(T)), 5)
    x = fmm.random.normal(fmm.random.key(6), (B, C, H, W))
    step = functools.partial(fd.ddim_step, linear_toy, schedule=s)
    a = fd.sample(step, params, x, fmm.random.key(0), steps=s.steps)
    torch.testing.assert_close(a, fd.sample(step, params, x, fmm.random.key(1), steps=s.steps))


def test_guidance_scale_1_is_the_conditional_model_and_0_the_unconditional(params):
    x = fmm.random.normal(fmm.random.key(7), (B, C, H, W))
    t = torch.tensor([0, 3, 9, T - 1])
    cond = {"text": fmm.random.normal(fmm.random.key(8), (B, 2))}
    null = {"text": torch.zeros(1, 2)}
    one = fd.classifier_free_guidance(linear_toy, 1.0, null=null)(params, x, t, cond)
    torch.testing.assert_close(one, linear_toy(params, x, t, cond), atol=1e-6, rtol=1e-6)
    zero = fd.classifier_free_guidance(linear_toy, torch.tensor(0.0), null=null)(params, x, t, cond)
    uncond = linear_toy(params, x, t, {"text": torch.zeros(B, 2)})
    torch.testing.assert_close(zero, uncond, atol=1e-6, rtol=1e-6)


def test_guidance_keeps_the_conditional_variance_channels():
    def doubled(params, x, t, cond):
        return torch.cat(
            [x + cond["text"][:, :1, None, None], x * 0 + cond["text"][:, :1, None, None]], 1
        )

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([1, 2])
    cond = {"text": torch.tensor([[1.0, 0.0], [2.0, 0.0]])}
    out = fd.classifier_free_guidance(
        doubled, 3.0, null={"text": torch.zeros(1, 2)}, learned_variance=True
    )(None, x, t, cond)
    torch.testing.assert_close(out[:, 0], 3.0 * cond["text"][:, :1, None].expand(2, 2, 2))
    torch.testing.assert_close(out[:, 1], cond["text"][:, :1, None].expand(2, 2, 2))


def test_drop_condition_at_0_and_1():
    cond = {"text": torch.ones(6, 2), "other": torch.ones(6, 1)}
    null = {"text": torch.zeros(1, 2)}
    k = fmm.random.key(9)
    torch.testing.assert_close(fd.drop_condition(k, cond, null, 0.0)["text"], cond["text"])
    dropped = fd.drop_condition(k, cond, null, 1.0)
    torch.testing.assert_close(dropped["text"], torch.zeros(6, 2))
    torch.testing.assert_close(dropped["other"], cond["other"])


def test_inpainting_returns_the_image_where_known(params):
    s = fd.spaced(fd.gaussian_schedule(fd.cosine_betas(T)), 6)
    k = fmm.random.split(fmm.random.key(10), 3)
    image = fmm.random.uniform(k[0], (B, C, H, W), low=-1.0, high=1.0)
    known = torch.zeros(B, 1, H, W, dtype=torch.bool)
    known[..., :, :3] = True
    step = fd.inpaint(functools.partial(fd.ddpm_step, linear_toy, schedule=s), s)
    noise = fmm.random.normal(k[1], image.shape)
    out = fd.sample(step, params, noise, k[2], {"image": image, "known": known}, steps=s.steps)
    torch.testing.assert_close(out[..., :3], image[..., :3], atol=0, rtol=0)
    assert not torch.allclose(out[..., 3:], image[..., 3:], atol=1e-2)


def test_super_resolution_feeds_the_upsampled_image_as_channels():
    seen = {}

    def spy(params, x, t, cond):
        seen["x"], seen["cond"] = x, cond
        return x[:, :1]

    x, t = torch.zeros(2, 1, 8, 8), torch.tensor([0, 1])
    low = torch.ones(2, 1, 4, 4)
    fd.super_resolution(spy)(None, x, t, {"low_res": low, "text": torch.ones(2, 2)})
    assert seen["x"].shape == (2, 2, 8, 8)
    torch.testing.assert_close(seen["x"][:, 1:], torch.ones(2, 1, 8, 8))
    assert list(seen["cond"]) == ["text"]
    assert fd.low_resolution(torch.zeros(2, 3, 8, 8), 4).shape == (2, 3, 4, 4)


def test_hybrid_loss_bound_trains_only_the_variance_channels():
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    k = fmm.random.split(fmm.random.key(11), 3)
    x0 = fmm.random.uniform(k[0], (B, C, H, W), low=-1.0, high=1.0)
    t = torch.tensor([0, 2, 10, T - 1])
    x_t, noise = fd.q_sample(s, x0, t, k[1])
    out = fmm.random.normal(k[2], (B, 2 * C, H, W)).requires_grad_()
    loss, _ = fd.hybrid_loss(s, out, x0, x_t, noise, t, vlb_weight=1.0)
    mse = fd.simple_loss(s, out, x0, noise, t, learned_variance=True)
    (grad,) = torch.autograd.grad(loss - mse, out)
    assert grad[:, :C].abs().max() == 0 and grad[:, C:].abs().max() > 0


def test_diffusion_loss_is_a_pure_function_of_the_key(params):
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    x0 = fmm.random.uniform(fmm.random.key(12), (B, C, H, W), low=-1.0, high=1.0)
    a, m = fd.diffusion_loss(linear_toy, params, x0, fmm.random.key(1), schedule=s, prediction="v")
    b, _ = fd.diffusion_loss(linear_toy, params, x0, fmm.random.key(1), schedule=s, prediction="v")
    assert float(a) == float(b) and set(m) == {"mse"}


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_compiled_step_compiles_once_and_equals_eager(params, kind):
    s = fd.spaced(fd.gaussian_schedule(fd.cosine_betas(T)), 6)
    eager = functools.partial(
        fd.ddpm_step if kind == "ddpm" else fd.ddim_step,
        linear_toy,
        schedule=s,
        **({} if kind == "ddpm" else {"eta": 0.5}),
    )
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    step = fd.compile_step(eager, backend=counter)
    x = fmm.random.normal(fmm.random.key(13), (B, C, H, W))
    key = fmm.random.key(14)
    compiled = fd.sample(step, params, x, key, steps=s.steps)
    assert counter.frame_count == 1
    torch.testing.assert_close(compiled, fd.sample(eager, params, x, key, steps=s.steps))


def test_bad_arguments_name_themselves():
    s = fd.gaussian_schedule(fd.linear_betas(T))
    x0 = torch.zeros(2, C, H, W)
    with pytest.raises(ValueError, match=r"^t must lie in"):
        fd.q_sample(s, x0, torch.tensor([0, T]), fmm.random.key(0))
    with pytest.raises(ValueError, match=r"^t must have"):
        fd.q_sample(s, x0, torch.tensor([0]), fmm.random.key(0))
    with pytest.raises(ValueError, match=r"^prediction must be one of"):
        fd.target(s, "eps", x0, x0, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"^steps must lie in"):
        fd.spaced(s, T + 1)
    with pytest.raises(ValueError, match=r"^variance_range must lie in"):
        fd.gaussian_schedule(fd.linear_betas(T), variance_range=2.0)
    with pytest.raises(ValueError, match=r"^betas must lie in"):
        fd.gaussian_schedule(torch.zeros(T))
    with pytest.raises(ValueError, match=r"^cond lacks"):
        fd.inpaint(lambda *a: a[1], s)(None, x0, torch.tensor(0), fmm.random.key(0), {"image": x0})


def test_spaced_schedules_keep_the_marginals_and_the_last_step():
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    for n in (1, 2, 7, T):
        fast = fd.spaced(s, n)
        assert fast.steps == n and int(fast.timesteps[-1]) == T - 1
        torch.testing.assert_close(fast.alphas_cumprod, s.alphas_cumprod[fast.timesteps])
    assert int(fd.spaced(s, 2).timesteps[0]) == 0


def test_compiled_hybrid_training_loss_equals_eager(params):
    def doubled(p, x, t, cond):  # a learned-variance output: [B, 2C, H, W]
        out = linear_toy(p, x, t, cond)
        return torch.cat([out, 0.1 * out], dim=1)

    s = fd.gaussian_schedule(fd.cosine_betas(T))
    loss = functools.partial(fd.diffusion_loss, doubled, schedule=s, learned_variance=True)
    x0 = fmm.random.uniform(fmm.random.key(15), (B, C, H, W), low=-1.0, high=1.0)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got, metrics = compiled(params, x0, fmm.random.key(16))
    want, _ = loss(params, x0, fmm.random.key(16))
    torch.testing.assert_close(got, want)
    assert set(metrics) == {"mse", "vlb"}


def test_results_keep_the_data_dtype(params):
    s = fd.spaced(fd.gaussian_schedule(fd.cosine_betas(T)), 4)
    x = fmm.random.normal(fmm.random.key(17), (B, C, H, W), dtype=torch.bfloat16)
    t = torch.tensor([0, 1, 2, 3])
    x_t, noise = fd.q_sample(s, x, t, fmm.random.key(18))
    assert x_t.dtype == noise.dtype == torch.bfloat16
    bf16 = {k: v.to(torch.bfloat16) for k, v in params.items()}
    for step in (fd.ddpm_step, fd.ddim_step):
        out = step(linear_toy, bf16, x, torch.tensor(2), fmm.random.key(19), schedule=s)
        assert out.dtype == torch.bfloat16
    for kind in fd.PREDICTIONS:
        assert fd.convert(s, x, x_t, t, source=kind, to="v").dtype == torch.bfloat16


def test_min_snr_weighting_is_one_weight_of_the_x0_error_whatever_the_prediction():
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    k = fmm.random.split(fmm.random.key(13), 3)
    x0 = fmm.random.uniform(k[0], (B, C, H, W), low=-1.0, high=1.0, dtype=torch.float64)
    t = torch.tensor([0, 3, 12, T - 1])
    x_t, noise = fd.q_sample(s, x0, t, k[1])
    guess = x0 + 0.3 * fmm.random.normal(k[2], x0.shape, dtype=torch.float64)  # one x0 estimate
    gamma = 5.0
    ratio = fd.snr(s, t)
    assert ratio[0] > gamma > ratio[-1]  # both sides of the clamp are exercised
    for row in range(B):
        i = slice(row, row + 1)
        x0_error = ((guess[i] - x0[i]) ** 2).mean()
        want = min(float(ratio[row]), gamma) * x0_error
        for prediction in fd.PREDICTIONS:
            out = fd.convert(s, guess[i], x_t[i], t[i], source="x0", to=prediction)
            got = fd.simple_loss(s, out, x0[i], noise[i], t[i], prediction=prediction,
                                 snr_gamma=gamma)  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    # A gamma above every step's SNR leaves a noise prediction's MSE unweighted.
    out = fmm.random.normal(k[2], x0.shape, dtype=torch.float64)
    torch.testing.assert_close(
        fd.simple_loss(s, out, x0, noise, t, snr_gamma=float(ratio.max()) * 2),
        fd.simple_loss(s, out, x0, noise, t),
    )
    with pytest.raises(ValueError, match=r"^snr_gamma must be > 0"):
        fd.min_snr_weights(s, "noise", t, 0.0)
