"""Video data layer: video datasets in multidatabackend.json, clip discovery (probe, exclusions, I2V start frames,
(W, H, F) buckets), clip and start-frame pixels, the synthetic I2V dataset (CPU, fast).

Fixtures are written here with PyAV: "index" clips whose frame i is grey 8 * i + 4 (plus a red left half), so a
loaded frame tells which source frame it came from.
"""
import json
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from config import ConfigError
from data.buckets import Geometry, apply_geometry, format_bucket_table
from data.clips import available_frames, clip_frames, frame_through, load_clip, load_start_frame, start_frame_image
from data.datasets import VideoSpec, load_datasets, parse_datasets
from data.discovery import discover, reason_code
from data.images import load_image
from data.sampler import BucketBatchSampler
from data.synthetic import make_synthetic_video_dataset, write_i2v_backend


def _quiet(*_):
    pass


def index_clip(n, w=64, h=48):
    """uint8 [n, h, w, 3]: frame i is grey 8 * i + 4 with the red channel at 255 on the left half."""
    out = np.stack([np.full((h, w, 3), (8 * i + 4) % 256, np.uint8) for i in range(n)])
    out[:, :, : w // 2, 0] = 255
    return out


def indices(x):
    """Source frame index of each frame of a [3, F, H, W] clip in [-1, 1] (from the green channel's mean)."""
    g = (x[1].flatten(1).mean(1) + 1) * 127.5
    return torch.round((g - 4) / 8).int().tolist()


def encode(path, frames, fps=15, rotation=None, faststart=False):
    """H.264 yuv420p at crf 10; optional display rotation (phone clips) and moov-first layout."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w", options={"movflags": "faststart"} if faststart else {}) as out:
        s = out.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"crf": "10", "preset": "veryfast"}
        if rotation is not None:
            s.set_display_rotation(rotation)
        for a in frames:
            out.mux(s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")))
        out.mux(s.encode())
    return str(path)


def clip(d, name, n=13, caption="a clip", start_frame=None, **kw):
    """d/name.mp4 (+ name.txt caption) and, with start_frame=dir, its frame 0 as dir/name.png; returns the frames."""
    frames = index_clip(n, **{k: kw.pop(k) for k in ("w", "h") if k in kw})
    encode(os.path.join(d, name + ".mp4"), frames, **kw)
    if caption is not None:
        with open(os.path.join(d, name + ".txt"), "w") as f:
            f.write(caption)
    if start_frame is not None:
        first = np.rot90(frames[0], kw.get("rotation", 0) // 90 % 4)  # the frame as displayed
        os.makedirs(start_frame, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(first)).save(os.path.join(start_frame, name + ".png"))
    return frames


def video_entry(data_dir, **kw):
    return {"id": "clips", "type": "local", "dataset_type": "video", "instance_data_dir": str(data_dir),
            "caption_strategy": "textfile", "resolution": 64, "resolution_type": "pixel", **kw}


def start_entry(data_dir, **kw):
    return {"id": "starts", "type": "local", "dataset_type": "conditioning", "instance_data_dir": str(data_dir),
            "caption_strategy": None, "resolution": 64, "resolution_type": "pixel", **kw}


# ---------------------------------------------------------------- multidatabackend.json

QUICKSTART_I2V = """[
  {
    "id": "longcat-video-train",
    "type": "local",
    "dataset_type": "video",
    "is_i2v": true,
    "instance_data_dir": "/data/video-clips",
    "caption_strategy": "textfile",
    "resolution": 480,
    "cache_dir_vae": "/cache/vae/longcat/video",
    "conditioning_data": ["longcat-video-cond"]
  },
  {
    "id": "longcat-video-cond",
    "type": "local",
    "dataset_type": "conditioning",
    "instance_data_dir": "/data/video-start-frames",
    "caption_strategy": null,
    "resolution": 480,
    "cache_dir_vae": "/cache/vae/longcat/video-cond"
  }
]"""  # shared/quickstarts/003 (LongCat-Video I2V), verbatim


def test_quickstart_003_backend_parses(tmp_path):
    text = QUICKSTART_I2V.replace("/data/", str(tmp_path) + "/")
    (tmp_path / "video-clips").mkdir()
    (tmp_path / "video-start-frames").mkdir()
    path = tmp_path / "multidatabackend.json"
    path.write_text(text)
    train, cond = load_datasets(str(path), is_video=True, log=_quiet)
    assert (train.id, train.dataset_type, train.conditioning_data) == ("longcat-video-train", "video",
                                                                        ["longcat-video-cond"])
    assert train.video == VideoSpec(num_frames=93, min_frames=93, max_frames=None, is_i2v=True,
                                    bucket_strategy="aspect_ratio", frame_interval=None, fps=None)
    assert (train.resolution, train.resolution_type, train.cache_dir_vae) == (480, "pixel_area",
                                                                              "/cache/vae/longcat/video")
    assert (cond.dataset_type, cond.caption_strategy, cond.video) == ("conditioning", None, None)
    # the config's framerate reaches the clips; an image trainer's defaults (no framerate) still work
    train, _ = load_datasets(str(path), is_video=True, defaults={"framerate": 15, "crop": None}, log=_quiet)
    assert train.video.fps == 15
    with pytest.raises(ConfigError, match="'longcat-video-train'.*video.*not supported yet.*train_video.py"):
        load_datasets(str(path), is_edit=True, log=_quiet)


@pytest.mark.parametrize("video, extra, match", [
    ({"num_frames": 90}, {}, r"'clips'.*num_frames 90 is not 4k\+1.*nearest valid: 89 or 93"),
    ({"num_frames": 0}, {}, "video.num_frames must be > 0, got 0"),  # not silently the default 93
    ({"num_frames": 81}, {}, None),
    ({"num_frames": 17, "min_frames": 13}, {}, "min_frames 13 is below num_frames 17"),
    ({"num_frames": 17, "max_frames": 15}, {}, "max_frames 15 is below min_frames 17"),
    ({"num_frame": 17}, {}, "unknown video key 'num_frame'; did you mean 'num_frames'"),
    ({}, {"num_frames": 17}, "'num_frames' belongs in the \"video\" block"),
    ({"bucket_strategy": "resolution"}, {}, "did you mean 'resolution_frames'"),
    ({"is_i2v": False}, {"is_i2v": True}, "is_i2v is True at the top level but False in the video block"),
    ({"is_i2v": False}, {"conditioning_data": "starts"}, "is_i2v is false"),
])
def test_video_config_errors(tmp_path, video, extra, match):
    entries = [video_entry(tmp_path, video=video, **extra), start_entry(tmp_path)]
    if match is None:
        assert parse_datasets(entries, is_video=True, log=_quiet)[0].video.num_frames == video["num_frames"]
        return
    with pytest.raises(ConfigError, match=match):
        parse_datasets(entries, is_video=True, log=_quiet)


def test_run_kinds_keep_their_datasets_apart(tmp_path):
    image = {"id": "imgs", "type": "local", "instance_data_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="'imgs'.*cannot be used in it.*train_image.py"):
        parse_datasets([video_entry(tmp_path), image], is_video=True, log=_quiet)
    with pytest.raises(ConfigError, match="no enabled video dataset"):
        parse_datasets([start_entry(tmp_path)], is_video=True, log=_quiet)
    notes = []  # video keys on an image dataset of an image run: accepted, noted as unused
    (spec,) = parse_datasets([{**image, "is_i2v": True, "video": {"num_frames": 5}}], log=notes.append)
    assert spec.video is None and any("is_i2v, video" in n for n in notes)
    # a start-frame set without dataset_type is promoted, like an Edit reference set; is_i2v follows the link
    entries = [video_entry(tmp_path, conditioning_data="starts"), {**start_entry(tmp_path), "dataset_type": None}]
    train, cond = parse_datasets(entries, is_video=True, log=notes.append)
    assert train.video.is_i2v and cond.dataset_type == "conditioning" and any("start frames" in n for n in notes)
    (alone,) = parse_datasets([video_entry(tmp_path, video={"is_i2v": True})], is_video=True, log=_quiet)
    assert alone.video.is_i2v and alone.conditioning_data == []


def test_i2v_from_the_clips_own_first_frame(tmp_path):
    d = str(tmp_path / "clips")
    frames = clip(d, "a", n=9, w=80, h=48)
    (spec,) = parse_datasets([video_entry(d, video={"num_frames": 9, "is_i2v": True})], is_video=True, log=_quiet)
    (s,) = discover([spec], is_video=True, log=_quiet).all_samples()
    assert s.conditioning is None and spec.video.is_i2v
    img = start_frame_image(s)  # no start-frame file: the clip's frame 0 through its geometry
    assert img.size == s.geometry.bucket == (128, 64) and s.geometry.resize == (128, 77)  # resized, cropped
    want = apply_geometry(Image.fromarray(frames[0]), s.geometry)
    assert np.abs(np.asarray(img).astype(int) - np.asarray(want)).mean() < 3
    x = load_clip(s)[:, 0]
    assert torch.equal(x, torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5))


# ---------------------------------------------------------------- discovery

@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    """Clips of every kind of trouble, with their start frames, discovered once."""
    root = tmp_path_factory.mktemp("messy")
    d, s = str(root / "clips"), str(root / "starts")
    for name in ("a", "b"):
        clip(d, name, start_frame=s)
    clip(d, "rot", w=64, h=32, rotation=90, start_frame=s)  # stored 64x32, shown 32x64
    clip(d, "short", n=5, start_frame=s)  # under num_frames 9
    clip(d, "long", n=41, start_frame=s)  # over max_frames 30
    clip(d, "nocap", caption=None, start_frame=s)
    clip(d, "nostart")  # no start frame
    Image.new("RGB", (64, 48), "red").save(os.path.join(s, "orphan.png"))  # a start frame with no clip
    with open(os.path.join(d, "empty.mp4"), "wb"):
        pass
    with open(os.path.join(d, "junk.mp4"), "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    full = encode(os.path.join(root, "full.mp4"), index_clip(20, 32, 32), faststart=True)
    with open(full, "rb") as f:
        data = f.read()
    with open(os.path.join(d, "cut.mp4"), "wb") as f:
        f.write(data[: len(data) * 2 // 3])  # the index survives, the media is cut short
    with av.open(os.path.join(d, "audio.mp4"), "w") as out:
        a = out.add_stream("aac", rate=16000, layout="mono")
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            out.mux(a.encode(frame))
        out.mux(a.encode())
    for name in ("empty", "junk", "cut", "audio"):
        with open(os.path.join(d, name + ".txt"), "w") as f:
            f.write("x")
    entries = [video_entry(d, conditioning_data="starts", video={"num_frames": 9, "max_frames": 30}),
               start_entry(s)]
    specs = parse_datasets(entries, is_video=True, log=_quiet)
    out = root / "out"
    logs = []
    index = discover(specs, seed=0, output_dir=str(out), log=logs.append)
    return index, specs, out, logs


def test_discovery_exclusion_codes_and_report(messy):
    index, specs, out, logs = messy
    codes = {(e.dataset_id, os.path.basename(e.path)): reason_code(e.reason) for e in index.excluded}
    assert codes == {
        ("clips", "empty.mp4"): "unreadable", ("clips", "junk.mp4"): "unreadable", ("clips", "cut.mp4"): "unreadable",
        ("clips", "audio.mp4"): "unreadable", ("clips", "short.mp4"): "too_short", ("clips", "long.mp4"): "too_long",
        ("clips", "nocap.mp4"): "missing_caption", ("clips", "nostart.mp4"): "unpaired_target",
        ("starts", "orphan.png"): "orphan_reference", ("starts", "short.png"): "target_excluded",
        ("starts", "long.png"): "target_excluded", ("starts", "nocap.png"): "target_excluded",
    }
    why = {os.path.basename(e.path): e.reason for e in index.excluded}
    assert "empty file" in why["empty.mp4"] and "audio-only" in why["audio.mp4"]
    assert "corrupt packet" in why["cut.mp4"] and "5 frames, under min_frames 9" in why["short.mp4"]
    report = json.loads((out / "data_report.json").read_text())
    assert report["datasets"]["clips"]["found"] == 11 and report["datasets"]["clips"]["usable"] == 3
    assert report["datasets"]["clips"]["buckets"] == {"64x128@9": 1, "64x64@9": 2}
    assert report["datasets"]["clips"]["video"]["num_frames"] == 9 and report["settings"]["kind"] == "video"
    assert report["excluded_by_reason"]["unreadable"] == 4 and report["datasets"]["starts"]["usable"] == 3
    assert any("probing 11" in line for line in logs)
    # a re-run is served from the discovery cache (nothing probed) and gives the same index
    logs = []
    again = discover(specs, seed=0, output_dir=str(out), log=logs.append)
    assert not any("probing" in line for line in logs)
    assert [(s.rel, s.bucket) for s in again.all_samples()] == [(s.rel, s.bucket) for s in index.all_samples()]


def test_kept_clips_rotation_and_start_frames(messy):
    index = messy[0]
    samples = {s.rel: s for s in index.samples["clips"]}
    assert set(samples) == {"a.mp4", "b.mp4", "rot.mp4"}
    rot = samples["rot.mp4"]
    assert (rot.width, rot.height) == (32, 64) and rot.geometry.bucket == (64, 128)  # upright, portrait
    a = samples["a.mp4"]
    assert (a.frames, a.fps, a.start, a.source_fps, a.source_frames, a.bucket) == (9, None, 0.0, 15.0, 13, (64, 64, 9))
    for s in samples.values():
        start = s.conditioning
        assert start.dataset_id == "starts" and start.rel == s.rel[:-4] + ".png" and start.geometry == s.geometry
        x, y = load_clip(s), load_start_frame(start)
        w, h = s.geometry.bucket
        assert x.shape == (3, 9, h, w) and y.shape == (3, 1, h, w) and x.dtype == torch.float32
        assert -1 <= x.min() and x.max() <= 1 and indices(x) == list(range(9))
        assert (x[:, :1] - y).abs().mean() < 0.02  # the start frame is frame 0 through the same geometry (crf 10)
    x = load_clip(rot)  # red on the left of the stored frame: at the bottom once turned 90 degrees counter-clockwise
    assert x[0, 0, -8:].mean() > 0.9 and x[0, 0, :8].mean() < 0


def test_frame_through_is_apply_geometry():
    a = np.random.default_rng(0).integers(0, 256, (48, 80, 3), np.uint8)
    for g in (Geometry((64, 64), (107, 64), (21, 0, 85, 64)), Geometry((64, 48), (80, 48), (16, 0, 80, 48)),
              Geometry((80, 48), (80, 48), (0, 0, 80, 48))):
        assert np.array_equal(frame_through(a, g), np.asarray(apply_geometry(Image.fromarray(a), g)))


def test_sampling_rate_and_resolution_frames(tmp_path):
    d = str(tmp_path / "clips")
    for name, n in (("n13", 13), ("n15", 15), ("n22", 22), ("n30", 30)):
        clip(d, name, n=n, fps=30)
    samples = {}
    for strategy, interval, fps in (("resolution_frames", None, None), ("resolution_frames", 8, None),
                                    ("aspect_ratio", None, 15)):
        video = {"num_frames": 5, "max_frames": 25, "bucket_strategy": strategy, "frame_interval": interval}
        (spec,) = parse_datasets([video_entry(d, video=video)], is_video=True, defaults={"framerate": fps},
                                 log=_quiet)
        index = discover([spec], log=_quiet)
        samples[strategy, interval] = {s.rel: s for s in index.all_samples()}
        if strategy == "resolution_frames":
            assert all(len(b) == 3 and (b[2] - 1) % 4 == 0 for b in index.buckets["clips"])
            assert "64x64@" in format_bucket_table(index.buckets)
    frames = {k: {rel: s.frames for rel, s in v.items()} for k, v in samples.items()}
    assert frames["resolution_frames", None] == {"n13.mp4": 13, "n15.mp4": 13, "n22.mp4": 21, "n30.mp4": 25}
    assert frames["resolution_frames", 8] == {"n13.mp4": 9, "n15.mp4": 9, "n22.mp4": 17, "n30.mp4": 25}
    # 30 fps sources at framerate 15: every other frame, from the head; n13 (0.43 s) still gives 6 >= 5 frames
    at15 = samples["aspect_ratio", None]
    assert set(at15) == {"n13.mp4", "n15.mp4", "n22.mp4", "n30.mp4"} and at15["n22.mp4"].fps == 15
    assert indices(load_clip(at15["n22.mp4"])) == [0, 2, 4, 6, 8]
    assert available_frames({"frames": 13, "fps": 30.0, "duration": 13 / 30}, 15) == 6
    assert clip_frames(VideoSpec(num_frames=9, min_frames=9, fps=15), 6) == (None, "too_short: 6 frames at 15 fps, "
                                                                                    "under min_frames 9")


def test_synthetic_i2v_dataset_buckets_and_batches(tmp_path):
    clips, starts = make_synthetic_video_dataset(str(tmp_path / "syn"), n=8, num_frames=9, seed=1)
    assert sorted(os.listdir(starts)) == [f"{i:03d}.png" for i in range(8)]
    with open(os.path.join(clips, "000.txt")) as f:
        assert " moving " in f.read()
    backend = write_i2v_backend(str(tmp_path / "mdb.json"), clips, starts, str(tmp_path / "cache"), num_frames=9)
    specs = load_datasets(backend, is_video=True, log=_quiet)
    assert [s.id for s in specs] == ["longcat-video-train", "longcat-video-cond"] and specs[0].video.is_i2v
    index = discover(specs, log=_quiet)
    assert set(index.buckets["longcat-video-train"]) == {(64, 64, 9), (128, 64, 9)}
    assert "128x64@9" in index.bucket_table()
    sampler = BucketBatchSampler(index, batch_size=2, seed=0, log=_quiet)
    it = iter(sampler)
    for _ in range(len(sampler)):
        batch = next(it)
        assert len({s.bucket for s in batch}) == 1 and len(batch[0].bucket) == 3
    s = batch[0]
    x, y = load_clip(s), load_start_frame(s.conditioning)
    assert start_frame_image(s).size == s.geometry.bucket
    assert torch.equal(x[:, :1], y)  # lossless clips: the start frame is exactly frame 0
    assert torch.equal(y[:, 0], torch.from_numpy(np.array(load_image(s.conditioning.path))).permute(2, 0, 1)
                       .float().div(255).sub(0.5).div(0.5))
    assert not torch.equal(x[:, 0], x[:, -1])  # the shape moves

    from data.synthetic import main
    path = main([str(tmp_path / "cli"), "--video", "--n", "2", "--frames", "5"])
    entries = json.load(open(path))
    assert entries[0]["video"] == {"num_frames": 5} and entries[1]["dataset_type"] == "conditioning"
