"""data/video_io.py: MP4 writing, timestamp-based reading and resampling, probing, bad files (vae_and_data.md §4, §6.5).

Every fixture is synthesised here with PyAV: "index" clips whose frame i is a flat grey 8 * i + 4, so a decoded frame
tells which source frame it was (x264 at crf 10 is far more accurate than the 4-level margin).
"""

from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from data import video_io
from data.video_io import BadVideo, count_frames, probe_video, read_video, to_uint8_frames, write_frames_png, write_mp4


def index_clip(n, h=32, w=32):
    return np.stack([np.full((h, w, 3), 8 * i + 4, np.uint8) for i in range(n)])


def indices(frames):
    return np.round((frames.reshape(len(frames), -1).mean(1) - 4) / 8).astype(int).tolist()


def encode(path, frames, fps=30, codec="libx264", options=None, pts_ms=None, rotation=None, container_options=None):
    """Low-level writer for fixtures: custom GOP, timestamps (VFR) and display rotation."""
    with av.open(str(path), "w", options=container_options or {}) as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = options or {"crf": "10", "preset": "veryfast"}
        if pts_ms is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            s.set_display_rotation(rotation)
        for i, a in enumerate(frames):
            f = av.VideoFrame.from_ndarray(a, format="rgb24")
            if pts_ms is not None:
                f.pts, f.time_base = pts_ms[i], Fraction(1, 1000)
            out.mux(s.encode(f))
        out.mux(s.encode())
    return path


@pytest.fixture(scope="module")
def clip30(tmp_path_factory):
    return encode(tmp_path_factory.mktemp("v") / "idx30.mp4", index_clip(20), fps=30)


def smooth_clip(F=17, H=64, W=64):
    y, x = np.mgrid[0:H, 0:W]
    out = [np.stack([(x * 4 + 8 * f) % 256, (y * 4) % 256, ((x + y) * 2 + 16 * f) % 256], -1) for f in range(F)]
    return np.stack(out).astype(np.uint8)


def test_mp4_roundtrip(tmp_path):
    src = smooth_clip()
    path = write_mp4(tmp_path / "out" / "a.mp4", src, fps=15)
    got = read_video(path)
    assert got.shape == (17, 64, 64, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - src).mean() < 8
    info = probe_video(path)
    assert (info["frames"], info["fps"], info["width"], info["height"], info["rotation"]) == (17, 15.0, 64, 64, 0)
    assert info["frames_source"] == "metadata" and abs(info["duration"] - 17 / 15) < 1e-3
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a.mp4"]  # no temporary left behind


def test_float_input_and_lossless(tmp_path):
    x = torch.rand(3, 17, 48, 64) * 2.2 - 1.1  # [3, F, H, W], slightly outside [-1, 1]: clamped
    ref = to_uint8_frames(x)
    assert ref.shape == (17, 48, 64, 3)
    assert to_uint8_frames(torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1)).ravel().tolist() == [0, 128, 255]
    for name in ["l.mp4", "l.mkv"]:
        got = read_video(write_mp4(tmp_path / name, x, lossless=True))
        assert np.array_equal(got, ref)  # libx264rgb qp 0: bit-exact
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        write_mp4(tmp_path / "bad.mp4", torch.rand(17, 48, 64, 3))


def test_odd_sizes(tmp_path):
    got = read_video(write_mp4(tmp_path / "odd.mp4", index_clip(3, 33, 65)))
    assert got.shape == (3, 34, 66, 3)  # edge-padded to even
    with pytest.raises(ValueError, match="even"):
        write_mp4(tmp_path / "odd2.mp4", index_clip(3, 33, 65), pad_odd=False)
    assert not (tmp_path / "odd2.mp4").exists()


def test_atomic_write(tmp_path, monkeypatch):
    path = write_mp4(tmp_path / "v.mp4", index_clip(3))
    before = path.read_bytes()
    calls = []

    def failing(a, format):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return orig(a, format=format)

    orig = av.VideoFrame.from_ndarray
    monkeypatch.setattr(video_io.av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError):
        write_mp4(path, index_clip(5))
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_write_frames_png(tmp_path):
    src = smooth_clip(F=3, H=16, W=24)
    paths = write_frames_png(tmp_path / "png", src)
    assert [p.name for p in paths] == ["00000.png", "00001.png", "00002.png"]
    assert np.array_equal(np.asarray(Image.open(paths[2])), src[2])


def test_native_rate_and_start(clip30):
    assert indices(read_video(clip30)) == list(range(20))
    assert indices(read_video(clip30, num_frames=5)) == [0, 1, 2, 3, 4]
    assert indices(read_video(clip30, start=0.34)) == list(range(10, 20))  # nearest to 10.2 frames is frame 10


@pytest.mark.parametrize("fps, expect", [
    (15, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]),  # half rate: every other frame
    (12, [0, 2, 5, 7, 10, 12, 15, 17]),  # 30 -> 12: nearest frame to k * 2.5 (ties -> earlier)
    (60, [0, 0, 1, 1, 2, 2, 3]),  # upsampling repeats frames
])
def test_fps_resampling(clip30, fps, expect):
    got = read_video(clip30, fps=fps, num_frames=7 if fps == 60 else None)
    assert indices(got) == expect


def test_seek_window(tmp_path):
    path = encode(tmp_path / "gop.mp4", index_clip(30), fps=15,
                  options={"crf": "10", "g": "4", "preset": "veryfast"})  # keyframe every 4 frames
    assert indices(read_video(path, start=1.2, num_frames=5)) == [18, 19, 20, 21, 22]  # seeks (>= SEEK_MIN_S)
    assert indices(read_video(path, start=1.0, fps=5)) == [15, 18, 21, 24, 27]
    with pytest.raises(BadVideo, match="too short"):
        read_video(path, start=1.2, num_frames=13)
    with pytest.raises(BadVideo, match="no frames at or after"):
        read_video(path, start=5.0)


def test_vfr_by_timestamps(tmp_path):
    pts = [0, 40, 70, 150, 160, 300, 310, 320, 500]
    path = encode(tmp_path / "vfr.mkv", index_clip(len(pts)), fps=25, pts_ms=pts)
    assert indices(read_video(path)) == list(range(9))
    # targets 0, .1, .2, .3, .4, .5 s -> nearest frames at 0, 70, 160, 300, 320, 500 ms
    assert indices(read_video(path, fps=10)) == [0, 2, 4, 5, 7, 8]


def test_frame_count_without_metadata(tmp_path):
    path = encode(tmp_path / "a.mkv", index_clip(12), fps=24)  # Matroska stores no frame count
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0
    info = probe_video(path)
    assert info["frames"] == 12 and info["frames_source"] == "demux"
    assert probe_video(path, exact=True)["frames"] == count_frames(path, decode=True) == 12
    assert len(read_video(path)) == 12


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_applied(tmp_path, rotation):
    src = np.zeros((1, 32, 64, 3), np.uint8)
    src[:, :, :32, 0] = 255  # left half red, right half blue
    src[:, :, 32:, 2] = 255
    path = encode(tmp_path / "rot.mp4", np.repeat(src, 3, 0), rotation=rotation)
    got = read_video(path)
    want = np.rot90(src[0], rotation // 90 % 4)  # the display matrix's counter-clockwise turn
    assert got.shape[1:] == want.shape
    assert np.abs(got[0].astype(int) - want).mean() < 8
    info = probe_video(path)
    assert info["rotation"] == rotation and (info["height"], info["width"]) == want.shape[:2]


def test_bad_files(tmp_path, clip30):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, np.uint8).tobytes())
    data = clip30.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: lost
    fast = encode(tmp_path / "fast.mp4", index_clip(20), container_options={"movflags": "faststart"})
    data = fast.read_bytes()
    (tmp_path / "fastcut.mp4").write_bytes(data[: len(data) * 2 // 3])  # index first, media cut short
    with av.open(str(tmp_path / "audio.m4a"), "w") as out:
        s = out.add_stream("aac", rate=16000, layout="mono")
        for i in range(8):
            f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            f.sample_rate, f.pts = 16000, i * 1024
            out.mux(s.encode(f))
        out.mux(s.encode())
    expect = {"empty.mp4": "empty file", "junk.mp4": "not a readable media file", "cut.mp4": "not a readable",
              "fastcut.mp4": "corrupt packet", "audio.m4a": "audio-only"}
    for name, reason in expect.items():
        with pytest.raises(BadVideo, match=reason) as e:
            read_video(tmp_path / name)
        assert reason in e.value.reason and e.value.path == str(tmp_path / name)
        if name != "fastcut.mp4":  # probe reads one frame only; the cut is past it
            with pytest.raises(BadVideo, match=reason):
                probe_video(tmp_path / name)
    with pytest.raises(BadVideo, match="corrupt packet"):
        count_frames(tmp_path / "fastcut.mp4")
    with pytest.raises(BadVideo, match="too short: 20 of 21"):
        read_video(clip30, num_frames=21)
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")
