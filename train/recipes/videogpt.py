"""Text -> video on the moving-shapes world: a video VQ-VAE, then a GPT over its codes.

``python -m train video-vqvae --out runs/video_vqvae`` trains the tokenizer and reports
held-out reconstruction PSNR and code perplexity (``reconstructions.png``: frame strips of
clips and their reconstructions). ``--data PATH`` trains it on a user's video clips instead
(:mod:`train.data.video_flags`; ``python -m train export-shapes DIR --format video-csv``
writes the moving shapes so), and adds ``data_*`` figures on ``--val-data`` (or --data's
first clips) to the moving shapes' held-out ones. ``python -m train videogpt --vqvae runs/video_vqvae --out
runs/videogpt`` trains the GPT caption -> codes and reports held-out code NLL on seen and
unseen motion x shape pairs and the perplexity of the codes it draws; ``samples.png`` (one
frame strip per caption) and ``samples.gif`` show its clips.

``--judge RUN`` (a ``python -m train clip --modality video`` run at the tokenizer's clip
size) judges the drawn clips, one per held-out caption: ``consistency`` is the share whose
own caption the video CLIP ranks first among every caption of the world, on seen motion x
shape pairs, ``consistency_unseen_combos`` on the held-out ones (as ``mmgpt --clip``), with
the judge's score on the real clips and on their VQ-VAE reconstructions beside them (the
ceilings a drawing can reach); the frame strips' title and the GIF's comment carry it.
"""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import fmm
from fmm.nn.codebook import code_usage
from models import videogpt as vg
from train.data import WordTokenizer
from train.data.video_flags import (
    add_video_data_arguments,
    eval_clips,
    open_video_data,
    video_source,
)
from train.data.video_shapes import (
    VideoWorldConfig,
    clip_eval_set,
    is_holdout_motion,
    sample_clips,
    vocabulary,
)
from train.loop import Defaults, Evaluation, Job, Recipe, SeededSource, load_run
from train.plots_generation import save_image_grid
from train.recipes import number
from train.recipes.clip_video import world_captions
from train.recipes.generate import clip_judge, consistency
from train.recipes.vqvae import reconstruction_figures

TEXT_LEN = 10  # <sot> + the longest caption (7 words) + <eot>, with room
_SHIFT = 0.5  # the VQ-VAE sees pixels centred on 0


def _world(cfg: vg.VideoVQVAEConfig) -> VideoWorldConfig:
    return VideoWorldConfig(image_size=cfg.image_size, frames=cfg.frames)


def clip_videos(world: VideoWorldConfig, generator, batch_size: int) -> dict:
    """A batch of training clips, centred: ``videos [B, 3, T, H, W]``."""
    return {"videos": sample_clips(world, batch_size, generator=generator).videos - _SHIFT}


def _centred(batch: dict) -> dict:
    """A batch of a user's clips, ``[0, 1]`` pixels centred as the VQ-VAE sees them."""
    return {**batch, "videos": batch["videos"] - _SHIFT}


def _no_decay(path: str) -> bool:
    # The codebook and batch-norm statistics move by update_state alone; no decay on biases.
    return "codebook" not in path and "running_" not in path and not path.endswith("bias")


def _vqvae_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset", default="video_vqvae_shapes", choices=sorted(vg.VQVAE_PRESETS),
        help="model size (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--eval-per-pair", type=number(at_least=1), default=4,
        help="held-out clips per motion x shape pair (default: %(default)s)",
    )  # fmt: skip
    add_video_data_arguments(parser)


def prepare_vqvae(args: argparse.Namespace, device: torch.device) -> Job:
    cfg = vg.VQVAE_PRESETS[args.preset]()
    world = _world(cfg)
    table = open_video_data(args, recipe="video-vqvae")
    if table is None:
        source = SeededSource(
            partial(clip_videos, world), batch_size=args.batch_size, seed=args.seed
        )
    else:
        source = video_source(args, table, frames=cfg.frames, size=cfg.image_size, finish=_centred)
    return Job(
        cfg=cfg,
        source=source,
        config={"preset": args.preset, "world": dataclasses.asdict(world), "data": args.data},
        curves=("recon_mse",),
        decay_mask=_no_decay,
        describe=f"{args.preset} ({'x'.join(map(str, cfg.latent_shape))} codes of {cfg.codebook_size})",
        context=world,
    )  # fmt: skip


def reconstruct(params, cfg: vg.VideoVQVAEConfig, videos: torch.Tensor, device) -> dict:
    """PSNR (pixels in [0, 1]) and code usage of ``videos [N, 3, T, H, W]``'s reconstructions."""

    def run(x: torch.Tensor) -> dict:
        out = vg.apply_vqvae(params, x.to(device) - _SHIFT, cfg=cfg)
        return {"reconstruction": out["reconstruction"] + _SHIFT, "codes": out["codes"]}

    figures = reconstruction_figures(run, videos, codebook_size=cfg.codebook_size, chunk=64)
    figures["code_perplexity"] = figures.pop("perplexity")
    return figures


def frames(videos: torch.Tensor) -> torch.Tensor:
    """``[N, 3, T, H, W] -> [N * T, 3, H, W]``: each clip's frames in a row of a grid."""
    return videos.transpose(1, 2).reshape(-1, *videos.shape[1:2], *videos.shape[3:])


def save_gif(
    videos: torch.Tensor, path: Path, *, scale: int = 3, ms: int = 150, comment: str = ""
) -> None:
    """Clips ``[N, 3, T, H, W]`` in [0, 1] side by side as one looping animated GIF;
    ``comment`` goes in the file's comment block (a GIF has no title)."""
    from PIL import Image

    strip = torch.cat(list(videos), dim=-1)  # [3, T, H, N * W]
    strip = F.interpolate(strip.transpose(0, 1), scale_factor=scale, mode="nearest")
    pics = [Image.fromarray((f.permute(1, 2, 0) * 255).byte().numpy()) for f in strip]
    pics[0].save(path, save_all=True, append_images=pics[1:], duration=ms, loop=0, comment=comment)


def evaluate_vqvae(job: Job, params, model_state, args, device) -> Evaluation:
    cfg, world = job.cfg, job.context
    clips = clip_eval_set(world, args.eval_per_pair, seed=args.seed + 1)
    result = reconstruct(params, cfg, clips.videos, device)
    recon = result.pop("reconstructions")
    # One clip per motion, each of another shape (clips are in motion-major pair order).
    n_shapes = len(world.shapes)
    motions = torch.arange(len(world.motions))
    picks = (motions * n_shapes + motions % n_shapes) * args.eval_per_pair
    pairs = torch.stack([clips.videos[picks], recon[picks]], 1).flatten(0, 1)
    grid = partial(
        save_image_grid, frames(pairs), columns=cfg.frames,
        row_labels=[f"{w}: {clips.captions[i]}"[:40] for i in picks.tolist() for w in ("clip", "recon")],
        title=f"held-out clips and reconstructions (PSNR {result['psnr_db']} dB)",
    )  # fmt: skip
    metrics = {f"heldout_{k}": v for k, v in result.items()} | {"eval_clips": len(clips.videos)}
    if args.data is not None:  # the user's clips: --val-data, or --data's first ones
        table = open_video_data(args, recipe="video-vqvae")
        data_clips = eval_clips(
            args, table, recipe="video-vqvae", frames=cfg.frames, size=cfg.image_size
        )
        videos = data_clips["videos"]
        data = reconstruct(params, cfg, videos, device)
        data.pop("reconstructions")
        metrics |= {f"data_{k}": v for k, v in data.items()} | {"data_eval_clips": len(videos)}
    return Evaluation(
        metrics=metrics, headline=tuple(k for k in metrics if k.startswith(("heldout_", "data_"))),
        title="video VQ-VAE reconstruction MSE (train batches)",
        plots={"reconstructions.png": grid},
    )  # fmt: skip


VQVAE_RECIPE = Recipe(
    name="video-vqvae",
    help="train a video VQ-VAE (3-d convs, axial attention) on moving-shapes clips",
    family=vg.VQVAE_FAMILY,
    defaults=Defaults(steps=600, batch_size=16, lr=2e-3, weight_decay=1e-4, warmup=30),
    prepare=prepare_vqvae,
    evaluate=evaluate_vqvae,
    extra_arguments=_vqvae_arguments,
)


def _gpt_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--vqvae", type=Path, required=True, help="run directory of `python -m train video-vqvae`")
    add("--width", type=number(at_least=3), default=96, help="transformer width, a multiple of 3 (default: %(default)s)")  # fmt: skip
    add("--layers", type=number(at_least=1), default=4, help="transformer blocks (default: %(default)s)")  # fmt: skip
    add("--eval-per-pair", type=number(at_least=1), default=2,
        help="held-out clips per motion x shape pair for the code NLL (default: %(default)s)")  # fmt: skip
    add("--temperature", type=number(float, at_least=0), default=1.0,
        help="sampling temperature of the drawn clips (default: %(default)s)")  # fmt: skip
    add("--top-k", type=number(at_least=1), default=None,
        help="draw among the k likeliest codes (default: all)")  # fmt: skip
    add("--judge", type=Path, default=None,
        help="a `python -m train clip --modality video` run to judge the drawn clips")  # fmt: skip


def _check_judge(run_dir: Path | None, vq_cfg: vg.VideoVQVAEConfig) -> None:
    """A wrong ``--judge`` stops the run before training, not after."""
    if run_dir is None:
        return
    cfg = load_run(run_dir, family="clip").cfg
    if (cfg.frames, cfg.image_size) != (vq_cfg.frames, vq_cfg.image_size):
        raise SystemExit(
            f"--judge {run_dir}: its CLIP takes clips of {cfg.frames} frames at "
            f"{cfg.image_size} px, the VQ-VAE's are {vq_cfg.frames} at {vq_cfg.image_size} px "
            "(train it with clip --modality video --frames/--video-size to match)"
        )


def captions_and_codes(world, tokenizer, vq, generator, batch_size: int) -> dict:
    """``text [B, TEXT_LEN]`` caption ids and ``codes [B, latent_len]`` of training clips."""
    vq_params, vq_cfg = vq
    clips = sample_clips(world, batch_size, generator=generator)
    with torch.no_grad():
        codes = vg.encode(vq_params, clips.videos - _SHIFT, cfg=vq_cfg)
    return {"text": tokenizer.encode(clips.captions, TEXT_LEN), "codes": codes.flatten(1)}


def prepare_gpt(args: argparse.Namespace, device: torch.device) -> Job:
    tokeniser = load_run(args.vqvae, family="video_vqvae")
    vq_cfg = tokeniser.cfg
    _check_judge(args.judge, vq_cfg)
    world = _world(vq_cfg)
    tokenizer = WordTokenizer(vocabulary(world))
    cfg = vg.VideoGPTConfig(
        text_vocab=tokenizer.vocab_size, text_len=TEXT_LEN, video_vocab=vq_cfg.codebook_size,
        code_dim=vq_cfg.code_dim, latent_shape=vq_cfg.latent_shape, width=args.width,
        layers=args.layers,
    )  # fmt: skip
    # The GPT embeds codes with the tokenizer's own codebook, as VideoGPT does.
    params = vg.init_gpt(cfg, fmm.random.key(args.seed))
    params["video"]["token"] = {"weight": tokeniser.params["codebook"]["weight"].clone()}
    vq = (tokeniser.params, vq_cfg)
    return Job(
        cfg=cfg,
        source=SeededSource(
            partial(captions_and_codes, world, tokenizer, vq), batch_size=args.batch_size,
            seed=args.seed,
        ),
        config={"vqvae": vq_cfg.to_dict(), "vqvae_run": str(args.vqvae), "world": dataclasses.asdict(world)},
        files={"tokenizer.json": tokenizer.to_json(), "vqvae.safetensors": tokeniser.params},
        curves=("video_nll",),
        init_params=params,
        trainable=lambda path: not path.startswith("video.token"),
        describe=f"videogpt ({cfg.text_len} text + {cfg.latent_len} video tokens)",
        context=(world, tokenizer, vq),
    )  # fmt: skip


def judged(judge_dir: Path, world: VideoWorldConfig, clips, drawn, recon, device) -> dict:
    """``consistency`` of ``drawn [N, 3, T, H, W]`` clips, one per caption of ``clips``
    (:func:`train.recipes.generate.consistency`, judged among :func:`world_captions`), and of
    their motion alone ("moves left then stops": the colour and shape may be wrong); the
    same seen-pair scores of the real clips and of their VQ-VAE reconstructions ``recon``
    (what a drawing can reach through this tokenizer)."""
    captions, attrs = world_captions(world)
    judge = clip_judge(judge_dir, captions, device=device)
    index = {c: i for i, c in enumerate(captions)}
    own = torch.tensor([index[c] for c in clips.captions])
    unseen = is_holdout_motion(world, clips.motions, clips.shapes)

    def score(videos: torch.Tensor) -> tuple[dict, float]:
        picked = judge(videos)
        motion = (attrs["motion"][picked] == clips.motions) & (attrs["stop"][picked] == clips.stops)
        return consistency(picked == own, unseen), consistency(motion, unseen)["consistency"]

    (whole, motion), (real, real_motion), (rec, rec_motion) = map(
        score, (drawn, clips.videos, recon)
    )
    return {
        **whole,
        "consistency_motion": motion,
        "judge_on_clips": real["consistency"],
        "judge_motion_on_clips": real_motion,
        "judge_on_vqvae_reconstructions": rec["consistency"],
        "judge_motion_on_vqvae_reconstructions": rec_motion,
        "judged_clips": len(own),
    }


def evaluate_gpt(job: Job, params, model_state, args, device) -> Evaluation:
    cfg = job.cfg
    world, tokenizer, (vq_params, vq_cfg) = job.context
    vq_params = fmm.tree.map(lambda x: x.to(device), vq_params)
    clips = clip_eval_set(world, args.eval_per_pair, seed=args.seed + 1)
    unseen = is_holdout_motion(world, clips.motions, clips.shapes)
    nll, recon = [], []
    with torch.no_grad():
        for i in range(0, len(clips.videos), 64):
            videos = clips.videos[i : i + 64].to(device) - _SHIFT
            codes = vg.encode(vq_params, videos, cfg=vq_cfg)
            recon.append((vg.decode(vq_params, codes, cfg=vq_cfg) + _SHIFT).clamp(0, 1).cpu())
            codes = codes.flatten(1)
            text = tokenizer.encode(clips.captions[i : i + 64], TEXT_LEN).to(device)
            logits = vg.apply(params, text, codes, cfg=cfg)[:, cfg.text_len :, cfg.text_vocab :]
            nll.append(
                F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").mean(1).cpu()
            )
    nll = torch.cat(nll)
    # One drawn clip per held-out caption: every motion x shape pair --eval-per-pair times.
    text = tokenizer.encode(clips.captions, TEXT_LEN).to(device)
    drawn = vg.generate_codes(
        params, text, cfg=cfg, key=fmm.random.key(args.seed), temperature=args.temperature,
        top_k=args.top_k,
    )  # fmt: skip
    with torch.no_grad():
        grid = drawn.reshape(-1, *vq_cfg.latent_shape)
        videos = (vg.decode(vq_params, grid, cfg=vq_cfg) + _SHIFT).clamp(0, 1).cpu()
    usage = code_usage(drawn.cpu(), cfg.video_vocab)
    metrics = {
        "heldout_code_nll_seen_pairs": round(nll[~unseen].mean().item(), 4),
        "heldout_code_nll_unseen_pairs": round(nll[unseen].mean().item(), 4),
        "drawn_code_perplexity": round(usage["perplexity"].item(), 2),
        "drawn_clips": len(clips.captions),
    }
    title = "drawn clips, one per caption"
    if args.judge is not None:
        metrics |= judged(args.judge, world, clips, videos, torch.cat(recon), device)
        title += (
            f" (the video CLIP ranks its caption first for {metrics['consistency']:.0%} seen, "
            f"{metrics['consistency_unseen_combos']:.0%} unseen)"
        )
    # The first clip of each motion x shape pair, twelve of them in the frame strips.
    shown = torch.arange(0, len(clips.captions), args.eval_per_pair)[:12]
    strips = partial(
        save_image_grid, frames(videos[shown]), columns=vq_cfg.frames,
        row_labels=[clips.captions[i][:40] for i in shown.tolist()], title=title,
    )  # fmt: skip
    return Evaluation(
        metrics=metrics, headline=(*metrics, "final_loss", "train_seconds"),
        title="VideoGPT: video-code NLL (caption -> clip)",
        plots={
            "samples.png": strips,
            "samples.gif": partial(save_gif, videos[shown[:8]], comment=title),
        },
    )  # fmt: skip


RECIPE = Recipe(
    name="videogpt",
    help="train a GPT caption -> video codes of a trained video VQ-VAE (moving shapes)",
    family=vg.FAMILY,
    defaults=Defaults(steps=600, batch_size=32, lr=2e-3, weight_decay=0.01, warmup=30),
    prepare=prepare_gpt,
    evaluate=evaluate_gpt,
    extra_arguments=_gpt_arguments,
)
