"""fmm's DDIM sampler and U-Net train step against TorchMultimodal's diffusion_labs, on the
same ADM U-Net weights.

Two races, each against the fastest TorchMultimodal row of the same run:

- **DDIM sampling** (eta 0 by default, x0 clipped to [-1, 1] as ADM samples): ``--steps``
  U-Net calls (50) on a batch of ``--batch-size`` (16) from the same starting noise.
  fmm: ``fmm.diffusion.ddim_step`` over ``models.adm.unet.apply``, eager and through
  ``compile_step`` (the whole step one graph). TorchMultimodal: its ``DDIModule`` eval path
  (the generator over ``eval_steps``) over its ``ADMUNet``, eager and with the U-Net
  ``torch.compile``-d (its sampler loop stays Python). Both walk the same ``steps + 1`` kept
  timesteps of the cosine schedule, 999 -> 0; TorchMultimodal's generator ends at step 0's
  ``x`` (it never takes the last step to ``x0``), so fmm's loop stops there too. The images
  are compared before any timing.
- **The train step**: the simple diffusion loss (a timestep and noise per image, MSE on the
  predicted noise), backward, global-norm clipping to 1.0, AdamW (lr 1e-3, weight decay
  0.1 on matrices). fmm: ``fmm.step.make_train_step`` over ``models.adm.unet.loss``.
  TorchMultimodal: ``DDPModule`` in training mode over ``ADMUNet``, its
  ``RandomDiffusionSteps`` transform drawing ``t`` and the noise, the MSE, with
  ``torch.optim.AdamW`` (the forward and loss compiled, or not). Dropout 0.1 on both.
  First, one loss on each from the same draws (TorchMultimodal handed fmm's ``t`` and
  noise, dropout off) as a check.

The default U-Net is CPU-sized: 32 px RGB, widths 32-64-128, attention at the two lower
resolutions, one residual block per level, fixed variance (so the simple loss is the whole
objective); TorchMultimodal's ``adm_unet`` is 64 px x 4 channels at widths 512-2048 with
three blocks per level, ~1000x the FLOPs. Every size is a flag. Ratios, never absolute
figures, compare: both sides run in this process, round-robin.

Run from the repo root (needs the parity extras)::

    python benchmarks/diffusion.py                     # the CPU U-Net, batch 16, 50 steps
    python benchmarks/diffusion.py --channels 64 128 256 --image-size 64
    python benchmarks/diffusion.py --quick             # a micro U-Net, 3 steps, eager only
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
from _common import interleaved_times, print_vs_fastest, pure_step, race_steps
from clip_vs_reference import module_step

import fmm
from fmm import diffusion as fd
from models.adm import convert, unet
from models.adm.config import ADMConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.models.test_adm import _tmm_unet  # test-only reference packages
from tests.reference import reference

LABS = "torchmultimodal.diffusion_labs"
WIDTH = 26


def bench_config(args: argparse.Namespace) -> ADMConfig:
    """The U-Net the flags describe (unconditional, fixed variance)."""
    levels = len(args.channels)
    return ADMConfig(
        image_size=args.image_size, in_channels=3, channels=tuple(args.channels),
        attention=(False,) + (True,) * (levels - 1), res_blocks=args.res_blocks,
        time_embed_dim=args.channels[0], cond_dim=4 * args.channels[0], embed_dim=None,
        dropout=0.1, learned_variance=False,
    )  # fmt: skip


def torchmultimodal_unet(cfg: ADMConfig, params) -> torch.nn.Module:
    """TorchMultimodal's ``ADMUNet`` holding ``params`` (exported with ``to_torchmultimodal``)."""
    model = _tmm_unet(cfg)
    model.load_state_dict(convert.to_torchmultimodal(params, cfg), strict=True)
    return model


def reference_schedule(cfg: ADMConfig):
    """TorchMultimodal's schedule with fmm's betas (``unet.schedule``: cosine, range 1)."""
    mod = reference(f"{LABS}.schedules.discrete_gaussian_schedule")
    return mod.DiscreteGaussianSchedule(fd.cosine_betas(cfg.timesteps), variance_range_value=1.0)


# --- DDIM sampling ---------------------------------------------------------------------


def fmm_sampler(cfg: ADMConfig, params, schedule, *, eta: float, compile: bool):
    """``run(x_T, key) -> x at step 0``: ``ddim_step`` from kept index ``steps`` down to 1."""
    denoise = functools.partial(unet.apply, cfg=cfg)
    step = functools.partial(fd.ddim_step, denoise, schedule=schedule, eta=eta, clip=True)
    step = fd.compile_step(step) if compile else step
    indices = [torch.tensor(i) for i in range(schedule.steps - 1, 0, -1)]

    def run(x, key):
        for i in indices:
            x = step(params, x, i, key)
        return x

    return run


def torchmultimodal_sampler(cfg: ADMConfig, params, schedule, *, eta: float, compile: bool):
    """``run(x_T, key) -> x at step 0``: ``DDIModule``'s eval path over ``ADMUNet``. ``key``
    is unused: it draws its own noise (for the image check it is handed fmm's, see
    :func:`hand_noise`)."""
    model = torchmultimodal_unet(cfg, params)
    model = torch.compile(model) if compile else model
    ref_s = reference_schedule(cfg)
    predictor = reference(f"{LABS}.predictors.noise_predictor").NoisePredictor(
        ref_s, lambda v: v.clamp(-1, 1)
    )
    ddim = reference(f"{LABS}.samplers.ddim").DDIModule(
        model, ref_s, predictor, eval_steps=schedule.timesteps, progress_bar=False, eta=eta
    )
    ddim.eval()
    return lambda x, key: ddim(x), ref_s


def hand_noise(ref_s, key: torch.Tensor, steps: int, shape) -> None:
    """Make the reference draw fmm's per-step noise (``fold_in(key, i)``) in loop order."""
    draws = iter(
        [fmm.random.normal(fmm.random.fold_in(key, torch.tensor(i)), shape)
         for i in range(steps - 1, 0, -1)]
    )  # fmt: skip
    ref_s.sample_noise = lambda like: next(draws)


def run_sampling(cfg, params, args, *, compile: bool) -> None:
    """Check the images agree, then time every sampler round robin."""
    schedule = fd.spaced(unet.schedule(cfg), args.steps + 1)
    shape = (args.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    x_T, key = fmm.random.normal(fmm.random.key(7), shape), fmm.random.key(8)
    print(f"\nDDIM sampling: {args.steps} U-Net calls (timesteps "
          f"{int(schedule.timesteps[-1])} -> 0), batch {args.batch_size}, eta {args.eta}")  # fmt: skip
    runs, ref_schedules = {}, {}
    for mode in ("eager", "compiled") if compile else ("eager",):
        c = mode == "compiled"
        runs[f"torchmultimodal {mode}"], ref_schedules[mode] = torchmultimodal_sampler(
            cfg, params, schedule, eta=args.eta, compile=c
        )
        runs[f"fmm {mode}"] = fmm_sampler(cfg, params, schedule, eta=args.eta, compile=c)
    images = {}
    with torch.no_grad():
        for name, run in runs.items():
            ref_s = ref_schedules.get(name.split()[-1]) if name.startswith("torch") else None
            if ref_s is not None and args.eta:
                hand_noise(ref_s, key, schedule.steps, shape)
            start = time.perf_counter()
            images[name] = run(x_T, key)
            print(f"{name:{WIDTH}s} first run {time.perf_counter() - start:6.1f} s")
            if ref_s is not None:
                ref_s.sample_noise = torch.randn_like  # its own draws from here on
        # Compiled kernels round differently, and DDIM's x0 = (x - sqrt(1 - a) eps) / sqrt(a)
        # magnifies that at the first steps: compare each fmm row with its own mode too.
        want = images["torchmultimodal eager"]
        print(f"max |x| {want.abs().max().item():.2f}; max |images - torchmultimodal eager|:")
        for name, got in images.items():
            same_mode = images[name.replace("fmm", "torchmultimodal")]
            print(f"  {name:{WIDTH}s} {(got - want).abs().max().item():.2e}"
                  f"   vs torchmultimodal {name.split()[-1]}: "
                  f"{(got - same_mode).abs().max().item():.2e}")  # fmt: skip
        calls = {name: functools.partial(run, x_T, key) for name, run in runs.items()}
        times = interleaved_times(calls, warmup=args.warmup, repeats=args.repeats)
    per_batch = {name: statistics.median(t) for name, t in times.items()}
    for name, ms in per_batch.items():
        print(f"{name:{WIDTH}s} {ms:9.1f} ms per batch of {args.batch_size}")
    per_step = {name: ms / args.steps for name, ms in per_batch.items()}
    print_vs_fastest(per_step, [n for n in per_step if n.startswith("torch")], width=WIDTH)


# --- the train step ----------------------------------------------------------------------


def torchmultimodal_trainer(cfg: ADMConfig, params):
    """``(DDPModule, forward(batch) -> loss)``: the module in training mode, the simple loss
    on ``RandomDiffusionSteps``' draws."""
    ref_s = reference_schedule(cfg)
    predictor = reference(f"{LABS}.predictors.noise_predictor").NoisePredictor(ref_s)
    ddpm = reference(f"{LABS}.samplers.ddpm").DDPModule(
        torchmultimodal_unet(cfg, params), ref_s, predictor, progress_bar=False
    )
    draw = reference(f"{LABS}.transforms.diffusion_transform").RandomDiffusionSteps(ref_s)
    ddpm.train()

    def forward(batch):
        d = draw({"x": batch["images"]})
        pred = ddpm(d["xt"], d["t"]).prediction
        return torch.nn.functional.mse_loss(pred, d["noise"])

    return ddpm, forward


def same_draw_losses(cfg, params, batch, key) -> tuple[float, float]:
    """fmm's loss and TorchMultimodal's timed forward on the same ``t`` and noise, dropout
    off: the draws ``fmm.diffusion.diffusion_loss`` makes (``split(key)``: the steps, then
    the noise), handed to TorchMultimodal's schedule."""
    ddpm, forward = torchmultimodal_trainer(cfg, params)
    for m in ddpm.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    k_t, k_noise = fmm.random.split(fmm.random.fold_in(key, "diffusion"))
    s, x0 = unet.schedule(cfg), batch["images"]
    t = fd.sample_timesteps(s, k_t, x0.shape[0])
    _, noise = fd.q_sample(s, x0, t, k_noise)
    ddpm.schedule.sample_steps = lambda like: t
    ddpm.schedule.sample_noise = lambda like: noise
    with torch.no_grad():
        theirs = forward(batch)
        ours, _ = unet.loss(params, batch, cfg=cfg, key=key, train=False)
    return float(ours), float(theirs)


def run_train(cfg, params, args, *, compile: bool) -> None:
    shape = (args.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)
    batch = {"images": fmm.random.uniform(fmm.random.key(9), shape, low=-1.0, high=1.0)}
    ours, theirs = same_draw_losses(cfg, params, batch, fmm.random.key(10))
    print(f"\ntrain step (simple loss, AdamW), batch {args.batch_size}")
    print(f"same t and noise: fmm loss {ours:.6f}, torchmultimodal {theirs:.6f}")
    loss = lambda p, b, k: unet.loss(p, b, cfg=cfg, key=k)
    builders = {
        "fmm eager": lambda: pure_step(loss, params, compile=False),
        "torchmultimodal eager": lambda: module_step(
            *torchmultimodal_trainer(cfg, params), compile=False
        ),
    }
    if compile:
        builders["fmm compiled"] = lambda: pure_step(loss, params, compile=True)
        builders["torchmultimodal compiled"] = lambda: module_step(
            *torchmultimodal_trainer(cfg, params), compile=True
        )
    ms = race_steps(builders, batch, warmup=args.warmup, repeats=args.repeats, width=WIDTH)
    print_vs_fastest(ms, [n for n in ms if n.startswith("torch")], width=WIDTH)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument(
        "--channels", type=int, nargs="+", default=[32, 64, 128], help="multiples of 32 (its norms)"
    )
    parser.add_argument("--res-blocks", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50, help="DDIM U-Net calls")
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--only", choices=("sample", "train"), help="run one race")
    parser.add_argument("--quick", action="store_true", help="8 px, widths 32-64, 3 steps, eager")
    args = parser.parse_args()
    if args.quick:
        args.image_size, args.channels, args.batch_size, args.steps = 8, [32, 64], 2, 3
        args.repeats, args.warmup = 1, 0
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} | threads {torch.get_num_threads()}")
    compile = not args.quick if args.compile is None else args.compile
    cfg = bench_config(args)
    params = unet.init(cfg, fmm.random.key(0))
    print(
        f"adm U-Net ({fmm.tree.count(params):,} params): {cfg.in_channels}x{cfg.image_size}"
        f"x{cfg.image_size}, channels {list(cfg.channels)}, attention {list(cfg.attention)}, "
        f"{cfg.res_blocks} res block(s) per level, fixed variance, unconditional"
    )
    if args.only in (None, "sample"):
        run_sampling(cfg, params, args, compile=compile)
    if args.only in (None, "train"):
        run_train(cfg, params, args, compile=compile)


if __name__ == "__main__":
    main()
