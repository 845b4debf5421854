"""VideoGPT generation of one clip's codes: fmm's preallocated cache against TorchMultimodal's
own generation utility, on identical weights.

The reference is a MUGEN-style text -> video ``MultimodalGPT`` (TorchMultimodal's
transformer decoder, broadcast video positions, right shift; a small ``video_vqvae`` as its
out-tokenizer) with random weights, converted with ``models.videogpt.gpt_from_torchmultimodal``.
Both sides continue the same caption greedily for the whole code grid (``--latent``, default
4 x 16 x 16 = 1024 codes) and decode the codes to pixels with the same VQ-VAE, in one process
with the same threads. Rows:

- ``torchmultimodal GenerationUtil``: ``sample(..., use_cache=True, causal=True, top_k=1)``
  (``top_k=1`` makes its multinomial draw the argmax). Its cache grows by ``torch.cat``
  every step, so a step costs more the further it is into the clip;
- ``fmm eager`` / ``fmm compiled``: ``models.videogpt.generate_codes(temperature=0)`` over
  ``fmm.decoding``'s preallocated cache, ``compile=False`` / ``True`` (inductor; the one-off
  compile is excluded).

``speedup`` is the reference's time over the row's; ``same codes`` checks the greedy codes
are identical. The Omnivore train-step comparison lives in ``benchmarks/omnivore.py``.

Run from the repo root (the default takes a few minutes on a 2-core CPU)::

    python benchmarks/video.py
    python benchmarks/video.py --latent 8 32 32 --repeats 1     # VideoGPT's full 8192 codes
    python benchmarks/video.py --quick                          # seconds; for tests
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from _common import interleaved_ms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import videogpt as vg
from tests.models.videogpt_reference import reference_gpt
from tests.reference import reference

tmm_generate = reference("torchmultimodal.utils.generate")


def _configs(args) -> tuple[vg.VideoGPTConfig, vg.VideoVQVAEConfig]:
    t, h, w = args.latent
    # A small VQ-VAE whose code grid is --latent: only its codebook and final decode run.
    vq = vg.VideoVQVAEConfig(
        frames=2 * t, image_size=4 * h, down_kernels=((4, 4, 4), (3, 4, 4)),
        down_strides=((2, 2, 2), (1, 2, 2)), encoder_hidden=8, attn_hidden=8,
        decoder_hidden=8, res_layers=1, codebook_size=args.codes, code_dim=16,
    )  # fmt: skip
    if tuple(vq.latent_shape) != (t, h, w):
        raise SystemExit(f"--latent {args.latent}: h and w must be equal")
    gpt = vg.VideoGPTConfig(
        text_vocab=64, text_len=args.text_len, video_vocab=vq.codebook_size,
        code_dim=vq.code_dim, latent_shape=vq.latent_shape, text_dim=64, width=args.width,
        layers=args.layers, heads=args.heads,
    )  # fmt: skip
    return gpt, vq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent", type=int, nargs=3, default=(4, 16, 16), metavar=("T", "H", "W"))
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--text-len", type=int, default=16)
    p.add_argument("--codes", type=int, default=1024, help="codebook size")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled fmm row")
    p.add_argument("--quick", action="store_true", help="a tiny model and grid (seconds)")
    args = p.parse_args()
    if args.quick:
        args.latent, args.width, args.layers, args.codes = (2, 4, 4), 48, 1, 32
        args.text_len, args.repeats, args.no_compile = 4, 1, True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gpt_cfg, vq_cfg = _configs(args)
    ref = reference_gpt(gpt_cfg, vq_cfg)
    params = vg.gpt_from_torchmultimodal(ref.state_dict(), gpt_cfg)
    vq_params = vg.vqvae_from_torchmultimodal(ref.out_tokenizer.state_dict(), vq_cfg)
    text = torch.randint(0, gpt_cfg.text_vocab, (args.batch, gpt_cfg.text_len))
    util = tmm_generate.GenerationUtil(ref)
    n = gpt_cfg.latent_len

    attention_layers = [m for m in ref.modules() if hasattr(m, "cache")]

    def run_reference():
        # GenerationUtil never clears the layers' caches: a second call would extend them.
        for m in attention_layers:
            m.cache = None
        out = util.sample(text, max_seq_len=n, use_cache=True, causal=True, top_k=1)
        return out.tokens

    def run_fmm(compile: bool):
        codes = vg.generate_codes(params, text, cfg=gpt_cfg, temperature=0, compile=compile)
        with torch.no_grad():
            vg.decode(vq_params, codes, cfg=vq_cfg)  # the reference decodes its codes too
        return codes

    calls = {"torchmultimodal GenerationUtil": run_reference, "fmm eager": lambda: run_fmm(False)}
    if not args.no_compile:
        start = time.perf_counter()
        run_fmm(True)
        print(f"fmm compile (once, excluded): {time.perf_counter() - start:.1f} s")
        calls["fmm compiled"] = lambda: run_fmm(True)
    codes = {name: call() for name, call in calls.items()}
    ms = interleaved_ms(calls, warmup=0, repeats=args.repeats)
    base = ms["torchmultimodal GenerationUtil"]
    print(
        f"VideoGPT greedy generation, {n} codes ({'x'.join(map(str, gpt_cfg.latent_shape))}), "
        f"batch {args.batch}, width {gpt_cfg.width} x {gpt_cfg.layers} layers, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"{'method':34s} {'ms/clip':>10s} {'ms/code':>8s} {'speedup':>8s} same codes")
    ref_codes = codes["torchmultimodal GenerationUtil"]
    for name, t in ms.items():
        same = torch.equal(codes[name], ref_codes)
        print(f"{name:34s} {t:10.1f} {t / n:8.3f} {base / t:7.2f}x {same}")


if __name__ == "__main__":
    main()
