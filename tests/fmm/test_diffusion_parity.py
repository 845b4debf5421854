"""fmm.diffusion against TorchMultimodal's diffusion_labs on the same tensors and noise.

Both sides run one tiny stand-in denoiser (a fixed 3x3 conv, a per-timestep bias and a
projection of the ``text`` conditioning), so any difference is the diffusion code's. The
reference draws its noise with ``torch.randn_like``; it is handed fmm's draw instead.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fmm
from fmm import diffusion as fd
from tests.reference import reference

LABS = "torchmultimodal.diffusion_labs"
C, H, W, B, T, D = 3, 5, 7, 4, 40, 6
TOL = dict(atol=1e-5, rtol=1e-5)


def labs(module: str):
    return reference(f"{LABS}.{module}")


def init_toy(
    key: torch.Tensor, in_channels: int = C, out_channels: int = C, *, near_identity=False
) -> dict:
    """Params of the stand-in denoiser (odd sizes, so a transposed weight shows).

    ``near_identity``: the first channels pass ``x_t`` through, a fair guess of the noise,
    so that a whole sampling loop stays bounded (a random conv's "noise" makes ``x0``
    explode to ~1e4, where float32's ulp alone exceeds 1e-5).
    """
    k = fmm.random.split(key, 3)
    w = fmm.random.normal(k[0], (out_channels, in_channels, 3, 3)) * 0.2
    if near_identity:
        w = w * 0.1
        w[:C, :C, 1, 1] += torch.eye(C)
    return {
        "w": w,
        "t": fmm.random.normal(k[1], (T, out_channels)) * 0.1,
        "text": fmm.random.normal(k[2], (D, out_channels)) * 0.3,
    }


def toy(params: dict, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The stand-in: ``conv(x) + bias[t] (+ text @ proj)``, ``[B, C', H, W]``."""
    out = F.conv2d(x, params["w"], padding=1) + params["t"][t][:, :, None, None]
    if cond and "text" in cond:
        out = out + (cond["text"] @ params["text"])[:, :, None, None]
    return out


class Reference(nn.Module):
    """The stand-in as TorchMultimodal's models are: a module returning DiffusionOutput."""

    def __init__(self, params: dict, learned_variance: bool = False):
        super().__init__()
        self.params = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in params.items()})
        self.learned_variance = learned_variance

    def forward(self, x, t, c=None):
        out = toy(dict(self.params), x, t, c)
        output = labs("utils.common").DiffusionOutput
        if not self.learned_variance:
            return output(prediction=out)
        pred, value = out.chunk(2, dim=1)
        return output(prediction=pred, variance_value=(value + 1) / 2)


def reference_schedule(betas: torch.Tensor, variance_range: float = 0.0):
    mod = labs("schedules.discrete_gaussian_schedule")
    return mod.DiscreteGaussianSchedule(betas, variance_range_value=variance_range)


def fixed_noise(sched, noise: torch.Tensor) -> None:
    # The reference schedule's sample_noise is randn_like; hand it fmm's draw.
    sched.sample_noise = lambda x_like: noise


@pytest.fixture(scope="module")
def data():
    k = fmm.random.split(fmm.random.key(3), 4)
    x0 = fmm.random.uniform(k[0], (B, C, H, W), low=-1.0, high=1.0)
    x_t = fmm.random.normal(k[1], (B, C, H, W))
    t = torch.tensor([0, 1, 17, T - 1])
    return x0, x_t, t, k[2], k[3]


FIELDS = {
    "betas": "betas",
    "alphas": "alphas",
    "alphas_cumprod": "alphas_cumprod",
    "alphas_cumprod_prev": "alphas_cumprod_prev",
    "sqrt_alphas_cumprod": "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod": "sqrt_compliment_alphas_cumprod",
    "sqrt_recip_alphas_cumprod": "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod": "sqrt_recip_alphas_cumprod_minus_one",
    "posterior_log_variance_lower": "lower_posterior_log_variance",
    "posterior_log_variance_upper": "upper_posterior_log_variance",
    "posterior_mean_x0_coef": "posterior_mean_x0_coef",
    "posterior_mean_xt_coef": "posterior_mean_xt_coef",
}


@pytest.mark.parametrize("kind", ["linear", "cosine", "quadratic", "sigmoid"])
def test_schedule_tensors_match_discrete_gaussian_schedule(kind):
    mod = labs("schedules.discrete_gaussian_schedule")
    ours = getattr(fd, f"{kind}_betas")(T)
    theirs = getattr(mod, f"{kind}_beta_schedule")(T)
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-12)
    s, ref = fd.gaussian_schedule(ours), reference_schedule(theirs)
    for name, ref_name in FIELDS.items():
        torch.testing.assert_close(getattr(s, name), getattr(ref, ref_name), **TOL, msg=name)


def test_spaced_schedule_matches_ddpm_eval_schedule():
    ref_s = reference_schedule(fd.cosine_betas(T))
    steps = torch.tensor([0, 3, 9, 20, 31, T - 1])
    ddpm = labs("samplers.ddpm").DDPModule(
        Reference(init_toy(fmm.random.key(0))),
        ref_s,
        labs("predictors.noise_predictor").NoisePredictor(ref_s),
        eval_steps=steps,
        progress_bar=False,
    )
    s = fd.spaced(fd.gaussian_schedule(fd.cosine_betas(T)), steps)
    torch.testing.assert_close(s.timesteps, steps)
    for name, ref_name in FIELDS.items():
        theirs = getattr(ddpm.eval_schedule, ref_name)
        torch.testing.assert_close(getattr(s, name), theirs, **TOL, msg=name)


def test_q_sample_matches_with_the_same_noise(data):
    x0, _, t, k, _ = data
    s = fd.gaussian_schedule(fd.linear_betas(T))
    x_t, noise = fd.q_sample(s, x0, t, k)
    torch.testing.assert_close(noise, fmm.random.normal(k, x0.shape))
    theirs = reference_schedule(fd.linear_betas(T)).q_sample(x0, noise, t)
    torch.testing.assert_close(x_t, theirs, **TOL)


@pytest.mark.parametrize("variance_range", [0.0, 0.3])
def test_q_posterior_matches(data, variance_range):
    x0, x_t, t, _, _ = data
    s = fd.gaussian_schedule(fd.cosine_betas(T), variance_range=variance_range)
    ref = reference_schedule(fd.cosine_betas(T), variance_range)
    for ours, theirs in zip(fd.q_posterior(s, x0, x_t, t), ref.q_posterior(x0, x_t, t)):
        torch.testing.assert_close(ours, theirs, **TOL)


PREDICTORS = {
    "noise": ("noise_predictor", "NoisePredictor"),
    "v": ("v_predictor", "VPredictor"),
    "x0": ("target_predictor", "TargetPredictor"),
}


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("prediction", list(PREDICTORS))
def test_predictor_conversions_match(data, prediction, clip):
    _, x_t, t, k, _ = data
    out = fmm.random.normal(k, x_t.shape) * 1.5
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    ref_s = reference_schedule(fd.cosine_betas(T))
    module, name = PREDICTORS[prediction]
    clamp = (lambda v: v.clamp(-1, 1)) if clip else None
    ref = getattr(labs(f"predictors.{module}"), name)(ref_s, clamp)
    ours_x0 = fd.predict_x0(s, prediction, out, x_t, t, clip=clip)
    torch.testing.assert_close(ours_x0, ref.predict_x0(out, x_t, t), **TOL)
    ours_noise = fd.predict_noise(s, prediction, out, x_t, t, clip=clip)
    torch.testing.assert_close(ours_noise, ref.predict_noise(out, x_t, t), **TOL)


def test_v_target_matches_compute_v(data):
    x0, _, t, k, _ = data
    noise = fmm.random.normal(k, x0.shape)
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    compute_v = labs("transforms.v_transform").ComputeV(reference_schedule(fd.cosine_betas(T)))
    theirs = compute_v({"x": x0, "t": t, "noise": noise})["v"]
    torch.testing.assert_close(fd.target(s, "v", x0, noise, t), theirs, **TOL)


def _reference_ddpm(params, learned_variance, steps=None, clip=False):
    ref_s = reference_schedule(fd.cosine_betas(T))
    clamp = (lambda v: v.clamp(-1, 1)) if clip else None
    predictor = labs("predictors.noise_predictor").NoisePredictor(ref_s, clamp)
    module = labs("samplers.ddpm").DDPModule(
        Reference(params, learned_variance), ref_s, predictor, eval_steps=steps, progress_bar=False
    )
    return module.eval()


@pytest.mark.parametrize(
    "learned_variance,steps,clip",
    [(False, None, False), (True, None, True), (True, [0, 5, 11, 26, T - 1], False)],
)
def test_ddpm_step_matches_with_the_same_noise(data, learned_variance, steps, clip):
    _, x, _, _, key = data
    params = init_toy(fmm.random.key(1), out_channels=2 * C if learned_variance else C)
    ref = _reference_ddpm(
        params, learned_variance, None if steps is None else torch.tensor(steps), clip
    )
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    s = s if steps is None else fd.spaced(s, steps)
    step = functools.partial(
        fd.ddpm_step, toy, schedule=s, learned_variance=learned_variance, clip=clip
    )
    for i in [s.steps - 1, s.steps // 2, 1, 0]:
        i = torch.tensor(i)
        ours = step(params, x, i, key)
        fixed_noise(ref.schedule, fmm.random.normal(fmm.random.fold_in(key, i), x.shape))
        with torch.no_grad():
            theirs = ref.remove_noise(x, s.timesteps[i].expand(B), None)
        torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("eta,clip", [(0.0, False), (0.5, True), (1.0, False)])
def test_ddim_step_matches_with_the_same_noise(data, eta, clip):
    _, x, _, _, key = data
    params = init_toy(fmm.random.key(2))
    steps = torch.tensor([0, 4, 13, 22, T - 1])
    ref_s = reference_schedule(fd.cosine_betas(T))
    clamp = (lambda v: v.clamp(-1, 1)) if clip else None
    ref = (
        labs("samplers.ddim")
        .DDIModule(
            Reference(params),
            ref_s,
            labs("predictors.noise_predictor").NoisePredictor(ref_s, clamp),
            eval_steps=steps,
            progress_bar=False,
            eta=eta,
        )
        .eval()
    )
    s = fd.spaced(fd.gaussian_schedule(fd.cosine_betas(T)), steps)
    step = functools.partial(fd.ddim_step, toy, schedule=s, eta=eta, clip=clip)
    # The reference walks kept step i to kept step i - 1 and stops at step 0.
    for i in range(s.steps - 1, 0, -1):
        i = torch.tensor(i)
        ours = step(params, x, i, key)
        fixed_noise(ref.schedule, fmm.random.normal(fmm.random.fold_in(key, i), x.shape))
        with torch.no_grad():
            theirs = ref.remove_noise(x, None, steps[i].expand(B), steps[i - 1].expand(B))
        torch.testing.assert_close(ours, theirs, **TOL)


def noise_per_step(sched, key: torch.Tensor, order: list[int], shape) -> None:
    # The reference draws once per step, in loop order; hand it fmm's draw for each index.
    draws = iter(
        [fmm.random.normal(fmm.random.fold_in(key, torch.tensor(i)), shape) for i in order]
    )
    sched.sample_noise = lambda x_like: next(draws)


@pytest.mark.parametrize("learned_variance", [False, True])
def test_ddpm_loop_matches_the_reference_sampler(data, learned_variance):
    _, x, _, _, key = data
    out = 2 * C if learned_variance else C
    params = init_toy(fmm.random.key(1), out_channels=out, near_identity=True)
    steps = [0, 6, 15, 27, T - 1]
    ref = _reference_ddpm(params, learned_variance, torch.tensor(steps))
    s = fd.spaced(fd.gaussian_schedule(fd.cosine_betas(T)), steps)
    step = functools.partial(fd.ddpm_step, toy, schedule=s, learned_variance=learned_variance)
    ours = fd.sample(step, params, x, key, steps=s.steps)
    noise_per_step(ref.schedule, key, list(range(s.steps - 1, -1, -1)), x.shape)
    with torch.no_grad():
        theirs = ref(x)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_loop_matches_the_reference_generator(data, eta):
    _, x, _, _, key = data
    params = init_toy(fmm.random.key(2), near_identity=True)
    steps = torch.tensor([0, 9, 19, 29, T - 1])
    ref_s = reference_schedule(fd.cosine_betas(T))
    ref = (
        labs("samplers.ddim")
        .DDIModule(
            Reference(params),
            ref_s,
            labs("predictors.noise_predictor").NoisePredictor(ref_s),
            eval_steps=steps,
            progress_bar=False,
            eta=eta,
        )
        .eval()
    )
    s = fd.spaced(fd.gaussian_schedule(fd.cosine_betas(T)), steps)
    step = functools.partial(fd.ddim_step, toy, schedule=s, eta=eta)
    ours = x
    for i in range(s.steps - 1, 0, -1):  # the reference's last x is at step 0, not x0
        ours = step(params, ours, torch.tensor(i), key)
    noise_per_step(ref_s, key, list(range(s.steps - 1, 0, -1)), x.shape)
    with torch.no_grad():
        theirs = ref(x)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_hybrid_loss_and_gradients_match(data):
    x0, _, t, k, _ = data
    params = init_toy(fmm.random.key(4), out_channels=2 * C)
    s = fd.gaussian_schedule(fd.cosine_betas(T))
    x_t, noise = fd.q_sample(s, x0, t, k)
    leaves = {n: v.clone().requires_grad_() for n, v in params.items()}
    ours, _ = fd.hybrid_loss(s, toy(leaves, x_t, t, None), x0, x_t, noise, t)
    used = ["w", "t"]  # no conditioning here: the text projection is unused
    ours_grads = torch.autograd.grad(ours, [leaves[n] for n in used])

    ref_s = reference_schedule(fd.cosine_betas(T))
    model = Reference(params, learned_variance=True)
    ddpm = (
        labs("samplers.ddpm")
        .DDPModule(
            model,
            ref_s,
            labs("predictors.noise_predictor").NoisePredictor(ref_s),
            progress_bar=False,
        )
        .train()
    )
    out = ddpm(x_t, t)
    loss = labs("modules.losses.diffusion_hybrid_loss").DiffusionHybridLoss(ref_s)
    theirs = loss(out.prediction, noise, out.mean, out.log_variance, x0, x_t, t)
    torch.testing.assert_close(ours, theirs, **TOL)
    theirs_grads = torch.autograd.grad(theirs, [model.params[n] for n in used])
    for name, a, b in zip(used, ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, **TOL, msg=name)


@pytest.mark.parametrize("learned_variance", [False, True])
def test_classifier_free_guidance_matches_cfguidance(data, learned_variance):
    _, x, t, k, _ = data
    params = init_toy(fmm.random.key(5), out_channels=2 * C if learned_variance else C)
    text = fmm.random.normal(k, (B, D))
    w = 2.5
    ref = (
        labs("modules.adapters.cfguidance")
        .CFGuidance(
            Reference(params, learned_variance), {"text": D}, guidance=w, learn_null_emb=False
        )
        .eval()
    )
    null = {"text": torch.zeros(1, D)}
    guided = fd.classifier_free_guidance(toy, 1 + w, null=null, learned_variance=learned_variance)
    ours = guided(params, x, t, {"text": text})
    with torch.no_grad():
        theirs = ref(x, t, {"text": text})
    pred, value = fd.split_output(ours, learned_variance=learned_variance)
    torch.testing.assert_close(pred, theirs.prediction, **TOL)
    if learned_variance:
        torch.testing.assert_close(value, theirs.variance_value, **TOL)


def test_super_resolution_matches_the_adapter(data):
    _, x, t, k, _ = data
    params = init_toy(fmm.random.key(6), in_channels=2 * C)
    low = fmm.random.normal(k, (B, C, 3, 4))
    ref = labs("modules.adapters.super_resolution").SuperResolution(
        Reference(params), min_val=-1.0, max_val=1.0
    )
    ours = fd.super_resolution(toy, clamp=(-1.0, 1.0))(params, x, t, {"low_res": low})
    with torch.no_grad():
        theirs = ref(x, t, {"low_res": low}).prediction
    torch.testing.assert_close(ours, theirs, **TOL)


def test_inpaint_conditioning_matches_the_adapter(data):
    x0, x, t, k, _ = data
    params = init_toy(fmm.random.key(7), in_channels=2 * C + 1)
    known = fmm.random.bernoulli(k, 0.5, (B, 1, H, W)).float()
    ref = labs("modules.adapters.inpainting").InPainting(Reference(params))
    ours = fd.inpaint_conditioning(toy)(params, x, t, {"image": x0, "known": known})
    with torch.no_grad():
        theirs = ref(x, t, {"target": x0, "mask": known}).prediction
    torch.testing.assert_close(ours, theirs, **TOL)
