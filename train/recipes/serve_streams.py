"""Generation as a stream of events for ``python -m train serve``: one event per token.

- :func:`stream_image_codes`: an mmgpt run's image codes, then the decoded image (PNG);
- :func:`stream_text`: a GPT's tokens with the text each adds, then the whole text.

Each draws what the batch generators draw for the same seed, a token leaving before the next
is computed, and stops once its ``stop`` event is set (a client that went away). With a
``"scheduler"`` in the run (``python -m train serve`` without ``--no-batching``) the tokens
come from its shared pool (:mod:`train.serve.scheduler`); otherwise from a loop over
``fmm.decoding.prefill``/``decode_step`` in a cache of the request's own.
"""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import Iterator

import torch

import fmm
from fmm import decoding
from models import gpt, mmgpt, vqvae

STOP_POLL_S = 0.5  # how often a generation waiting for its next token checks its stop event
TEXT_NEW_TOKENS = 64  # a text model's default max_new_tokens (fewer if the context is full)


def _png_base64(image: torch.Tensor) -> str:
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def stream_image_codes(
    run: dict,
    prompt: str,
    *,
    stop: threading.Event,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> Iterator[dict]:
    """Image codes for ``prompt`` one at a time (``{"index", "token"}``), then
    ``{"done": True, "tokens": [image_len], "image_png": base64}``; stops once ``stop`` is set.
    ``max_new_tokens``, if given, must be the image's code count.

    Draws what ``models.mmgpt.generate_images`` draws for the same ``seed`` (greedy at
    ``temperature=0``), as a loop over ``fmm.decoding.prefill``/``decode_step`` so that each
    code can leave before the next is computed. ``guidance != 1`` runs the empty caption
    beside the prompt in the same cache (classifier-free guidance).
    """
    cfg, params, tok = run["cfg"], run["params"], run["tokenizer"]
    if max_new_tokens not in (None, cfg.image_len):
        raise ValueError(
            f"max_new_tokens: an image of this model is always {cfg.image_len} codes, "
            f"got {max_new_tokens}"
        )
    tv, device = cfg.text_vocab, params["pos"].device
    rows = tok.encode([prompt], cfg.text_len)
    if guidance != 1.0:
        rows = torch.cat([rows, tok.encode([""], cfg.text_len)])
    sampling = decoding.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if "scheduler" in run:  # the server's pool: the same codes, drawn beside other requests
        drawn = _scheduled(
            run, rows[0].tolist(), stop, max_new_tokens=cfg.image_len, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, guidance=guidance,
            null_ids=rows[1].tolist() if guidance != 1.0 else None,
        )  # fmt: skip
        drawn = (token - tv for token in drawn)
    else:
        drawn = _codes_alone(run, rows.to(device), sampling, guidance, seed)
    codes: list[int] = []
    for i, code in enumerate(drawn):
        codes.append(code)
        yield {"index": i, "token": code}
        if stop.is_set():
            return
    grid = torch.tensor(codes, device=device).reshape(1, run["vqvae_cfg"].grid, -1)
    image = vqvae.decode(run["vqvae_params"], grid, cfg=run["vqvae_cfg"])[0]
    yield {"done": True, "tokens": codes, "image_png": _png_base64(image)}


def stream_text(
    run: dict,
    prompt: str | list[int],
    *,
    stop: threading.Event,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> Iterator[dict]:
    """A GPT's continuation of ``prompt`` (a text, or its token ids), one token at a time
    (``{"index", "token", "text"}``: ``text`` is what the token adds to the decoded string,
    empty while a multi-byte character is incomplete), then ``{"done": True, "tokens", "text",
    "stop_reason": "eos" | "length"}``; stops once ``stop`` is set.

    Draws what ``fmm.decoding.generate`` draws for the same key (``fmm.random.key(seed)``),
    greedy at ``temperature=0``. ``max_new_tokens`` defaults to 64 or as many as fit.
    """
    if guidance != 1.0:
        raise ValueError(f"guidance: a text model takes no guidance (1.0), got {guidance}")
    cfg, tok = run["cfg"], run["tokenizer"]
    ids = tok.encode(prompt).ids if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("prompt: encodes to no tokens")
    if not all(0 <= i < cfg.vocab_size for i in ids):
        raise ValueError(f"prompt: token ids must lie in [0, {cfg.vocab_size})")
    room = cfg.context_length - len(ids) + 1  # the last token drawn is never fed back
    new = min(TEXT_NEW_TOKENS, room) if max_new_tokens is None else max_new_tokens
    if new < 1 or len(ids) + new - 1 > cfg.context_length:
        raise ValueError(
            f"prompt of {len(ids)} tokens plus max_new_tokens={new} is past this model's "
            f"context of {cfg.context_length} tokens"
        )
    sampling = decoding.Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    if "scheduler" in run:  # the server's pool: the same tokens, drawn beside other requests
        drawn = _scheduled(run, ids, stop, max_new_tokens=new, temperature=temperature,
                           top_k=top_k, top_p=top_p, seed=seed)  # fmt: skip
    else:
        drawn = _text_alone(run, ids, new, sampling, seed)
    out: list[int] = []
    text = ""
    for i, token in enumerate(drawn):
        out.append(token)
        decoded = tok.decode(out)
        piece = "" if decoded.endswith("\ufffd") else decoded[len(text) :]
        text += piece
        yield {"index": i, "token": out[-1], "text": piece}
        if stop.is_set():
            return
    reason = "length" if len(out) == new else "eos"
    yield {"done": True, "tokens": out, "text": tok.decode(out), "stop_reason": reason}


def _scheduled(run: dict, ids: list[int], stop: threading.Event, **options) -> Iterator[int]:
    # A request to the server's train.serve.scheduler.Scheduler; a consumer that stops
    # early (a client that went away) cancels it, which frees its slot at once. The stop
    # event is also polled while no token comes (a request still waiting for a slot).
    handle = run["scheduler"].submit(ids, **options)
    try:
        while not stop.is_set():
            try:
                for token in handle.stream(timeout=STOP_POLL_S):
                    yield token
                    if stop.is_set():
                        return
                return
            except TimeoutError:
                continue
    finally:
        handle.cancel()


def _codes_alone(run: dict, rows: torch.Tensor, sampling, guidance: float, seed: int):
    """Image codes of one request in a cache of its own (``rows``: the caption, and the
    empty one when guided), as a loop over ``prefill``/``decode_step``."""
    cfg, params = run["cfg"], run["params"]
    spec, tv, device = mmgpt.image_decoder_spec(cfg), cfg.text_vocab, rows.device
    cache = decoding.init_cache(
        spec, len(rows), cfg.seq_len - 1, dtype=params["pos"].dtype, device=device
    )
    # The cache is this call's own: donate it, so each step writes one slot in place.
    logits, cache = decoding.prefill(params, rows, cache, cfg=spec, last_only=True, donate=True)
    logits = logits[:, -1]
    keys = fmm.random.split(fmm.random.key(seed), cfg.image_len)
    for i in range(cfg.image_len):
        if guidance == 1.0:  # as decoding.generate: sample the full, text-masked vocab
            code = sampling(logits, keys[i].to(device)) - tv
        else:  # as mmgpt's guided loop: combine and sample the image slice only
            cond, uncond = logits[:1, tv:], logits[1:, tv:]
            code = sampling(uncond + guidance * (cond - uncond), keys[i].to(device))
        yield int(code[0])
        if i + 1 < cfg.image_len:
            logits, cache = decoding.decode_step(
                params, (code + tv).repeat(len(rows)), cache, cfg=spec, donate=True
            )


def _text_alone(run: dict, ids: list[int], new: int, sampling, seed: int) -> Iterator[int]:
    """A GPT's tokens for one request in a cache of its own, up to (not with) its EOS."""
    cfg, params, eos = run["cfg"], run["params"], run["eos_id"]
    spec, device = gpt.decoder_spec(cfg), params["pos"].device
    cache = decoding.init_cache(
        spec, 1, len(ids) + new - 1, dtype=params["pos"].dtype, device=device
    )
    logits, cache = decoding.prefill(
        params, torch.tensor([ids], device=device), cache, cfg=spec, last_only=True, donate=True
    )
    logits = logits[:, -1]
    keys = fmm.random.split(fmm.random.key(seed), new)
    for i in range(new):
        token = sampling(logits, keys[i].to(device))
        if eos is not None and int(token[0]) == eos:
            return
        yield int(token[0])
        if i + 1 < new:
            logits, cache = decoding.decode_step(params, token, cache, cfg=spec, donate=True)
