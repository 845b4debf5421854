"""Users' video files: decoded frames match the written ones (ffv1 exactly, lossless H.264
within the colour conversion's rounding), uniform and stride sampling pick the right frames
(each frame's index is written into its pixels), the limits refuse with the file named,
the video formats open and sniff, a corrupt clip is skipped and counted, the source resumes,
and video-vqvae trains a few steps on an exported video CSV."""

import json

import pytest
import torch

from train.__main__ import main
from train.data.formats import open_table, sniff
from train.data.images import BadSample
from train.data.pipeline import Labels, LoaderSource
from train.data.video_shapes import MOTIONS
from train.data.videos import Sampling, VideoSamples, decode_video, write_video
from train.recipes.export_shapes import export_clips

STEP = 10  # frame k is filled with k * STEP: its index reads back from any pixel


def _indexed(frames: int, size: int = 16) -> torch.Tensor:
    """uint8 [3, frames, size, size]: frame k is k * STEP, with a gradient so the codec
    has something to code."""
    value = (torch.arange(frames) * STEP).view(1, frames, 1, 1)
    ramp = torch.arange(size).view(1, 1, 1, size) % 4
    return (value + ramp).expand(3, frames, size, size).to(torch.uint8).contiguous()


def _indices(video: torch.Tensor) -> list[int]:
    return [round(v / STEP) for v in video[:, :, :, 0].float().mean((0, 2)).tolist()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "twenty.mkv", _indexed(20), codec="ffv1")
    write_video(root / "twenty.mp4", _indexed(20))
    write_video(root / "three.mkv", _indexed(3), codec="ffv1")
    return root


def test_decoded_frames_match_the_written_ones(clips):
    written = _indexed(20)
    exact = decode_video(clips / "twenty.mkv", where="m", frames=20, size=16)
    assert exact.dtype == torch.uint8 and exact.shape == (3, 20, 16, 16)
    assert torch.equal(exact, written)
    h264 = decode_video(clips / "twenty.mp4", where="m", frames=20, size=16)
    assert (h264.int() - written.int()).abs().max() <= 2
    # Resized and center-cropped like an image: the size asked, the same frames.
    assert _indices(decode_video(clips / "twenty.mp4", where="m", frames=20, size=8)) == list(
        range(20)
    )


def test_uniform_and_stride_pick_the_right_frames(clips):
    path = clips / "twenty.mkv"
    uniform = decode_video(path, where="m", frames=5, size=16)
    assert _indices(uniform) == Sampling().indices(20, 5) == [0, 5, 10, 14, 19]
    stride = Sampling.parse("stride=3")
    assert _indices(decode_video(path, where="m", frames=4, size=16, sampling=stride)) == [
        0,
        3,
        6,
        9,
    ]
    late = decode_video(path, where="m", frames=4, size=16, sampling=stride, start=0.999)
    assert _indices(late) == [10, 13, 16, 19]  # the last window that fits
    # Shorter than asked: uniform repeats frames in order, stride repeats the last one.
    short = clips / "three.mkv"
    assert _indices(decode_video(short, where="s", frames=6, size=16)) == [0, 0, 1, 1, 2, 2]
    assert _indices(decode_video(short, where="s", frames=4, size=16, sampling=stride)) == [
        0,
        2,
        2,
        2,
    ]


def test_sampling_parse_and_indices():
    assert str(Sampling.parse("uniform")) == "uniform" and Sampling.parse("stride=2").stride == 2
    for bad in ("stride=0", "stride=x", "every=2", ""):
        with pytest.raises(ValueError, match="--frame-sampling"):
            Sampling.parse(bad)
    for n in (1, 7, 100):
        for t in (1, 4, 9):
            picks = Sampling().indices(n, t)
            assert (
                len(picks) == t and picks == sorted(picks) and picks[-1] == (n - 1 if t > 1 else 0)
            )


def test_limits_refuse_with_the_file_named(clips):
    path = clips / "twenty.mp4"
    cases = {
        "max_bytes": (dict(max_bytes=100), "bytes is more than the limit of 100"),
        "max_side": (dict(max_side=8), "16x16 is more than the limit of 8 a side"),
        "max_frames": (dict(max_frames=10), "20 frames is more than the limit of 10"),
        "max_seconds": (dict(max_seconds=1.0), "s is more than the limit of 1.0 s"),
    }
    for limits, message in cases.values():
        with pytest.raises(BadSample, match=message) as e:
            decode_video(path, where="user/clip.mp4", frames=4, size=8, **limits)
        assert str(e.value).startswith("user/clip.mp4: ")
    # A header without a frame count (Matroska) is counted by its packets: limited too.
    with pytest.raises(BadSample, match="20 frames"):
        decode_video(clips / "twenty.mkv", where="m", frames=4, size=8, max_frames=19)


def test_only_the_suffix_demuxer_runs(tmp_path):
    playlist = tmp_path / "clip.mp4"  # an HLS playlist named .mp4: parsed as MP4, refused
    playlist.write_text("#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXTINF:1,\n/etc/passwd\n")
    with pytest.raises(BadSample, match=r"clip\.mp4: cannot decode the video"):
        decode_video(playlist, where="clip.mp4", frames=2, size=8)
    with pytest.raises(BadSample, match="not a video file name"):
        decode_video(tmp_path / "clip.m3u8", where="clip.m3u8", frames=2, size=8)


def _clip_csv(root, n: int = 8, corrupt: tuple = ()) -> None:
    rows = ["video,caption,label"]
    for i in range(n):
        name = f"c{i}.mkv"
        if i in corrupt:
            (root / name).write_bytes(b"\x1a\x45\xdf\xa3 not matroska at all")
        else:
            write_video(root / name, _indexed(6, size=8), codec="ffv1")
        rows.append(f"{name},clip {i},{'odd' if i % 2 else 'even'}")
    (root / "clips.csv").write_text("\n".join(rows) + "\n")


def test_video_formats_open_and_sniff(tmp_path, clips):
    _clip_csv(tmp_path)
    table = open_table(tmp_path / "clips.csv")
    assert sniff(str(tmp_path / "clips.csv")) == "video-csv" and table.kind == "video-classes"
    assert (table.classes, table.label(1), table.texts(1)) == (("even", "odd"), 1, ("clip 1",))
    assert table.clip_file(0) == tmp_path / "c0.mkv"
    with pytest.raises(ValueError, match="is a video clip"):
        table.image_bytes(0)
    (tmp_path / "quoted.tsv").write_text('"video"\t"caption"\nc0.mkv\tx\n')  # a quoted header
    assert sniff(str(tmp_path / "quoted.tsv")) == "video-csv"
    (tmp_path / "clips.jsonl").write_text(json.dumps({"video": "c0.mkv", "caption": "x"}) + "\n")
    jsonl = open_table(tmp_path / "clips.jsonl")
    assert (jsonl.format, jsonl.kind, jsonl.texts(0)) == ("video-jsonl", "video-pairs", ("x",))
    folder = tmp_path / "folder"
    (folder / "walk").mkdir(parents=True)
    write_video(folder / "walk" / "1.mkv", _indexed(3, size=8), codec="ffv1")
    (folder / "run").mkdir()
    write_video(folder / "run" / "2.mkv", _indexed(3, size=8), codec="ffv1")
    classes = open_table(folder)
    assert (classes.format, classes.classes, classes.label(1)) == (
        "video-classes",
        ("run", "walk"),
        1,
    )
    (folder / "walk" / "1.txt").write_text("a person walks\n")
    assert open_table(folder / "walk").texts(0) == ("a person walks",)
    assert open_table(folder / "walk").format == "video-folder"


def test_a_corrupt_clip_is_skipped_and_counted_and_the_source_resumes(tmp_path):
    _clip_csv(tmp_path, corrupt=(3,))
    table = open_table(tmp_path / "clips.csv")
    samples = VideoSamples(table, Labels("labels"), frames=4, size=8, sampling=Sampling(2), seed=0)
    source = LoaderSource(samples, batch_size=4, seed=0, workers=0, max_bad_fraction=0.5)
    batches = [next(source) for _ in range(2)]  # one epoch: every clip once
    assert (
        batches[0]["videos"].shape == (4, 3, 4, 8, 8) and batches[0]["labels"].dtype == torch.int64
    )
    report = source.report()
    assert report["skipped_samples"] == 1 and "c3.mkv" in report["first_bad"][0]
    state = source.state_dict()
    expected = next(source)
    again = LoaderSource(samples, batch_size=4, seed=0, workers=0, max_bad_fraction=0.5)
    again.load_state_dict(state)
    resumed = next(again)
    assert torch.equal(resumed["videos"], expected["videos"])
    assert torch.equal(resumed["labels"], expected["labels"])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("exported") / "clips"
    return export_clips(root, n=8, seed=0, image_size=16, frames=4, per_pair=1)


def test_video_vqvae_trains_on_an_exported_video_csv(exported, tmp_path):
    header = (exported.parent / "val.csv").read_text().splitlines()[0]
    assert header == "video,caption,label,heldout" and len(open_table(exported)) == 8
    out = tmp_path / "run"
    main([
        "video-vqvae", "--preset", "video_vqvae_tiny", "--data", str(exported), "--workers", "0",
        "--val-data", str(exported.parent / "val.csv"), "--eval-clips", "4",
        "--frame-sampling", "stride=1", "--steps", "2", "--batch-size", "4",
        "--eval-per-pair", "1", "--out", str(out),
    ])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["skipped_samples"] == 0
    assert metrics["data_eval_clips"] == 4 and metrics["data_psnr_db"] > 0
    assert json.loads((out / "run.json").read_text())["frame_sampling"] == "stride=1"


def test_omnivore_trains_its_video_task_on_labelled_clips(exported, tmp_path):
    out = tmp_path / "run"
    main([
        "omnivore", "--data", str(exported), "--workers", "0", "--eval-clips", "6",
        "--steps", "2", "--batch-size", "4", "--out", str(out),
    ])  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data_eval_clips"] == 6 and 0 <= metrics["data_video_class_acc"] <= 1
    config = json.loads((out / "config.json").read_text())
    classes = open_table(exported).classes  # the motions among the 8 clips
    assert config["classes"] == list(classes) and set(classes) <= set(MOTIONS)
    assert [h[:2] for h in config["omnivore"]["heads"]] == [["video_class", len(classes)]]
    (tmp_path / "captions.csv").write_text(
        "video,caption\n" + f"{exported.parent}/clips/000000.mp4,a\n"
    )
    with pytest.raises(ValueError, match="has no labels"):
        main(["omnivore", "--data", str(tmp_path / "captions.csv"), "--out", str(tmp_path / "r")])


def test_video_recipe_refuses_an_image_table(tmp_path):
    (tmp_path / "x.csv").write_text("filepath,title\na.png,a cat\n")
    with pytest.raises(ValueError, match=r"is image-caption pairs: .* trains on video clips"):
        main(["video-vqvae", "--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "r")])
