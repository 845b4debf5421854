"""Fine-tuning a converted CLIP (``--init-from``, ``--lock-text``) and exporting it back
(``--export hf|open_clip``), checked with the libraries themselves: a tiny Hugging Face
CLIP saved with ``save_pretrained`` is fine-tuned on the shapes world, the export loads in
``transformers.CLIPModel`` and in ``open_clip`` with embeddings equal to fmm's; an open_clip
checkpoint with its ``open_clip_config.json`` loads as open_clip runs it; wrong inputs are
one line naming the flag, file and keys."""

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fmm
from models import clip
from tests.reference import reference
from train.__main__ import main
from train.data.tokenizers import CLIPRunTokenizer, tokenizer_from_json
from train.finetune import load_for_eval
from train.loop import load_run

TINY = ["--batch-size", "4", "--eval-per-class", "1"]
SIZES = dict(
    text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=16, vocab_size=49408),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8),
    projection_dim=16,
)  # fmt: skip
TEXTS = ["an image of a small blue bar", "a red circle", "Two CATS on a sofa!"]


@pytest.fixture(scope="module")
def vocab():
    return Path(reference("open_clip").__file__).parent / "bpe_simple_vocab_16e6.txt.gz"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = reference("transformers")
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**SIZES))
    folder = tmp_path_factory.mktemp("hf") / "tiny-clip"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tuned(hf_dir, vocab, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned") / "run"
    main(["clip", "--init-from", str(hf_dir / "model.safetensors"), "--format", "hf",
          "--vocab", str(vocab), "--lock-text", "--steps", "3", "--export", "hf",
          "--export", "open_clip", "--out", str(out), *TINY])  # fmt: skip
    return out


def _images(n=3, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def _features(out):
    """HF returns a tensor, or (newer versions) an output whose pooler_output is it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _unit(x):
    return torch.nn.functional.normalize(x, dim=-1)


def test_fine_tuning_locks_the_text_tower_and_trains_the_rest(tuned, hf_dir, vocab):
    start = fmm.tree.flatten(load_for_eval(hf_dir, "hf", vocab).params)
    run = load_run(tuned, family="clip")
    got = fmm.tree.flatten(run.params)
    assert got.keys() == start.keys()
    text = [k for k in got if k.startswith("text.")]
    rest = [k for k in got if not k.startswith("text.")]
    assert text and all(torch.equal(got[k], start[k]) for k in text)
    assert all(not torch.equal(got[k], start[k]) for k in rest)
    # the run's tokenizer is CLIP's BPE, read back from tokenizer.json without --vocab
    assert isinstance(run.tokenizer, CLIPRunTokenizer)
    want = reference("open_clip").tokenize(TEXTS, context_length=16)
    assert torch.equal(run.tokenizer.encode(TEXTS, 16), want)
    config = json.loads((tuned / "config.json").read_text())
    assert config["init_from"]["format"] == "hf"
    assert config["image_mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_the_hf_export_loads_in_transformers_with_equal_embeddings(tuned):
    transformers = reference("transformers")
    run = load_run(tuned, family="clip")
    model = transformers.CLIPModel.from_pretrained(tuned / "export" / "hf").eval()
    images, tokens = _images(), run.tokenizer.encode(TEXTS, run.cfg.context_length)
    with torch.no_grad():
        img = _unit(_features(model.get_image_features(pixel_values=images)))
        txt = _unit(_features(model.get_text_features(input_ids=tokens)))
    torch.testing.assert_close(img, clip.encode_image(run.params, images, cfg=run.cfg),
                               atol=1e-5, rtol=0)  # fmt: skip
    torch.testing.assert_close(txt, clip.encode_text(run.params, tokens, cfg=run.cfg),
                               atol=1e-5, rtol=0)  # fmt: skip
    pre = json.loads((tuned / "export" / "hf" / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 32, "width": 32}


def test_the_open_clip_export_loads_strictly_with_equal_embeddings(tuned):
    open_clip = reference("open_clip")
    run = load_run(tuned, family="clip")
    export = tuned / "export"
    spec = json.loads((export / "open_clip_config.json").read_text())
    model = open_clip.CLIP(**spec["model_cfg"]).eval()
    model.load_state_dict(load_file(export / "open_clip_model.safetensors"), strict=True)
    by_name = open_clip.create_model(f"local-dir:{export}").eval()
    images, tokens = _images(), run.tokenizer.encode(TEXTS, run.cfg.context_length)
    want_img = clip.encode_image(run.params, images, cfg=run.cfg)
    want_txt = clip.encode_text(run.params, tokens, cfg=run.cfg)
    for m in (model, by_name):
        with torch.no_grad():
            torch.testing.assert_close(_unit(m.encode_image(images)), want_img, atol=1e-5, rtol=0)
            torch.testing.assert_close(_unit(m.encode_text(tokens)), want_txt, atol=1e-5, rtol=0)


def test_an_open_clip_checkpoint_with_its_config_loads_as_open_clip_runs_it(tmp_path, vocab):
    open_clip = reference("open_clip")
    model_cfg = dict(
        embed_dim=16, quick_gelu=False,
        vision_cfg=dict(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
    )  # fmt: skip
    torch.manual_seed(1)
    model = open_clip.CLIP(**model_cfg).eval()
    with torch.no_grad():  # open_clip starts the projections at zero-ish scale: stir them
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    spec = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": mean, "std": std}}
    (tmp_path / "open_clip_config.json").write_text(json.dumps(spec))
    family, cfg, params, tok, transform = load_for_eval(weights, "open_clip", vocab)
    assert cfg.act == "gelu" and transform == {"size": 32, "mean": tuple(mean), "std": tuple(std)}
    images, tokens = _images(), tok.encode(TEXTS, 16)
    with torch.no_grad():
        want_img, want_txt = _unit(model.encode_image(images)), _unit(model.encode_text(tokens))
    got_img = family.serving.embed_image(params, images, cfg=cfg)
    torch.testing.assert_close(got_img, want_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(clip.encode_text(params, tokens, cfg=cfg), want_txt, atol=1e-5,
                               rtol=0)  # fmt: skip


def test_wrong_inputs_are_one_line_naming_the_flag_file_and_keys(hf_dir, vocab, tmp_path):
    weights = hf_dir / "model.safetensors"
    with pytest.raises(ValueError, match=rf"--weights {weights} \(--format open_clip\).*'hf'"):
        load_for_eval(weights, "open_clip", vocab)
    partial = tmp_path / "partial" / "model.safetensors"
    partial.parent.mkdir()
    sd = load_file(weights)
    dropped = sorted(k for k in sd if k.startswith("text_model.encoder.layers.1."))
    save_file({k: v for k, v in sd.items() if k not in dropped}, partial)
    (partial.parent / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        load_for_eval(partial, "hf", vocab, flag="--init-from")
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"--init-from {partial}")
    assert f"missing: {dropped[0]}" in message and f"and {len(dropped) - 6} more" in message
    with pytest.raises(ValueError, match="needs --vocab: CLIP's BPE merges file bpe_simple"):
        load_for_eval(weights, "hf", None)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lock-image"], "--lock-image goes with --init-from"),
        (["--init-from", "{w}"], "needs --format"),
        (
            [
                "--init-from",
                "{w}",
                "--format",
                "hf",
                "--vocab",
                "{v}",
                "--lock-image",
                "--lock-text",
            ],
            "leaves only the temperature",
        ),
    ],
)
def test_fine_tuning_flags_are_refused_before_a_run_directory(
    flags, message, hf_dir, vocab, tmp_path
):
    out = tmp_path / "never"
    flags = [f.format(w=hf_dir / "model.safetensors", v=vocab) for f in flags]
    with pytest.raises((ValueError, SystemExit), match=message):
        main(["clip", "--out", str(out), "--steps", "1", *flags, *TINY])
    assert not out.exists()


def test_the_clip_run_tokenizer_round_trips_and_pickles(vocab):
    tok = CLIPRunTokenizer.from_vocab(vocab)
    want = reference("open_clip").tokenize(TEXTS)
    for again in (tokenizer_from_json(tok.to_json()), pickle.loads(pickle.dumps(tok))):
        assert torch.equal(again.encode(TEXTS, 77), want)
    assert tok.decode(tok.encode(["A photo of a CAT!"], 12)) == ["a photo of a cat !"]
    with pytest.raises(ValueError, match="merges of two symbols"):
        CLIPRunTokenizer.from_json(json.dumps({"kind": "fmm.CLIPTokenizer", "version": 1}))


def test_fine_tuning_on_a_data_table_locks_the_image_tower(hf_dir, vocab, tmp_path):
    from tests.train.data.test_pipeline import write_csv

    table = write_csv(tmp_path / "pairs", 10)
    out = tmp_path / "run"
    main(["clip", "--init-from", str(hf_dir), "--format", "hf", "--vocab", str(vocab),
          "--data", str(table), "--lock-image", "--workers", "0", "--steps", "2",
          "--out", str(out), *TINY])  # fmt: skip
    start = fmm.tree.flatten(load_for_eval(hf_dir, "hf", vocab).params)
    run = load_run(out, family="clip")
    got = fmm.tree.flatten(run.params)
    assert all(torch.equal(got[k], start[k]) == k.startswith("image.") for k in got)
    assert run.config["data"] == str(table) and run.config["init_from"]["format"] == "hf"


def test_a_crashed_locked_run_resumes_bit_for_bit(hf_dir, vocab, tmp_path, monkeypatch):
    from train import finetune

    argv = ["clip", "--init-from", str(hf_dir), "--format", "hf", "--vocab", str(vocab),
            "--lock-text", "--steps", "4", *TINY]  # fmt: skip
    main([*argv, "--out", str(tmp_path / "straight")])
    draw, drawn = finetune._scenes, []

    def crash_at_the_fourth_batch(*args):
        drawn.append(1)
        if len(drawn) == 1 + 4:  # the first batch is drawn once to check it
            raise KeyboardInterrupt("the machine went away")
        return draw(*args)

    monkeypatch.setattr(finetune, "_scenes", crash_at_the_fourth_batch)
    crashed = [*argv, "--out", str(tmp_path / "crashed"), "--checkpoint-every", "2"]
    with pytest.raises(KeyboardInterrupt):
        main(crashed)
    monkeypatch.setattr(finetune, "_scenes", draw)
    main([*crashed, "--resume"])
    want, got = (load_file(tmp_path / r / "params.safetensors") for r in ("straight", "crashed"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert json.loads((tmp_path / "crashed" / "metrics.json").read_text())["resumed_from"] == 2


def test_torchmultimodal_weights_load_with_the_config_read_off_their_shapes(tmp_path, vocab):
    cfg = clip.CLIPConfig(
        embed_dim=16, image_size=32, patch_size=8, image_width=64, image_layers=2,
        image_heads=1, context_length=16, vocab_size=49408, text_width=64, text_layers=1,
        text_heads=1,
    )  # fmt: skip
    params = clip.init(cfg, fmm.random.key(2))
    weights = tmp_path / "tmm.safetensors"
    save_file({k: v.contiguous() for k, v in clip.to_torchmultimodal(params, cfg).items()}, weights)
    _, got_cfg, got, _, _ = load_for_eval(weights, "torchmultimodal", vocab)
    assert got_cfg == cfg  # heads are width / 64, the activation OpenAI's quick GELU
    want, got = fmm.tree.flatten(params), fmm.tree.flatten(got)
    assert all(torch.equal(got[k], want[k]) for k in want if k != "logit_scale")
