"""`serve --quantize int8`: the served embeddings stay within cosine 0.99 of fp32, and the
quantized model has its own fingerprint (its vectors never mix with fp32 ones in a store)."""

import torch
import torch.nn.functional as F

from tests.serve._runs import tiny_clip_run
from train.recipes import serve


def test_int8_embeddings_stay_close_to_fp32_under_their_own_fingerprint(tmp_path):
    run_dir = tiny_clip_run(tmp_path / "clip", width=64)  # MLPs large enough to quantize
    fp32 = serve.load_model(run_dir)
    int8 = serve.load_model(run_dir, quantize="int8")
    assert int8.fingerprint != fp32.fingerprint and int8.info["quantize"] == "int8"
    texts = ["a red circle", "a large blue square below a green bar", "a small white cross"]
    images = list(torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    with torch.inference_mode():
        pairs = [
            (fp32.embed_text(texts), int8.embed_text(texts)),
            (fp32.embed_image(images), int8.embed_image(images)),
        ]
    for a, b in pairs:
        assert not torch.equal(a, b)  # the int8 weights were really used
        assert F.cosine_similarity(a, b, dim=-1).min() >= 0.99
