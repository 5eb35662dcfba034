"""Data pipeline: multidatabackend parsing, image decoding, bucketing, discovery/pairing, batching (CPU, fast)."""
import json
import os
import random
import types

import numpy as np
import pytest
import torch
from PIL import Image

from config import ConfigError
from data.buckets import (BucketPlanner, Geometry, apply_geometry, aspect_key, check_alignment, cover_size,
                          format_bucket_table, round_to_grid, target_size)
from data.datasets import DatasetSpec, load_datasets, parse_datasets
from data.discovery import DataError, discover, reason_code
from data.images import BadSample, image_size, load_image, to_tensor
from data.sampler import BucketBatchSampler
from data.synthetic import make_synthetic_dataset, make_synthetic_edit_dataset, write_edit_backend, write_t2i_backend


def _img(path, size=(64, 64), colour=(200, 30, 30), caption="a red thing", mode="RGB", **save):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    if caption is not None:
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write(caption)
    return path


def _entry(data_dir, **kw):
    return {"id": "ds", "type": "local", "instance_data_dir": str(data_dir), "caption_strategy": "textfile",
            "resolution": 64, "resolution_type": "pixel", **kw}


def _quiet(*_):
    pass


# ---------------------------------------------------------------- multidatabackend.json parsing

QUICKSTART_EDIT = """[
  // the LongCat-Image Edit quickstart layout (000-002): jsonc, the reference set has no dataset_type
  {
    "id": "edit-images",
    "type": "local",
    "instance_data_dir": "EDITS",
    "caption_strategy": "textfile",
    "resolution": 768,
    "cache_dir_vae": "/cache/vae/longcat/edit",
    "conditioning_data": ["ref-images"],
  },
  {
    "id": "ref-images",
    "type": "local",
    "instance_data_dir": "REFS",
    "caption_strategy": null,
    "resolution": 768,
    "cache_dir_vae": "/cache/vae/longcat/ref"
  }
]"""


def test_quickstart_edit_config_parses_with_defaults(tmp_path):
    (tmp_path / "e").mkdir()
    (tmp_path / "r").mkdir()
    path = tmp_path / "multidatabackend.json"
    path.write_text(QUICKSTART_EDIT.replace("EDITS", str(tmp_path / "e")).replace("REFS", str(tmp_path / "r")))
    notes = []
    edit, ref = load_datasets(str(path), is_edit=True, log=notes.append)
    assert (edit.id, edit.dataset_type, edit.conditioning_data) == ("edit-images", "image", ["ref-images"])
    assert (ref.dataset_type, ref.caption_strategy) == ("conditioning", None)
    assert any("ref-images" in n and "conditioning" in n for n in notes)  # promoted, and said so
    assert (edit.resolution, edit.resolution_type, edit.crop, edit.crop_style, edit.crop_aspect) == \
        (768, "pixel_area", False, "random", "square")
    assert (edit.repeats, edit.probability) == (0, 1.0)
    # the same file in a T2I run: the link and the reference set are dropped with a note
    notes.clear()
    (only,) = load_datasets(str(path), is_edit=False, log=notes.append)
    assert only.id == "edit-images" and only.conditioning_data == [] and any("not used" in n for n in notes)


def test_unknown_key_names_dataset_and_nearest_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'ds'.*'resolutoin'.*did you mean 'resolution'"):
        parse_datasets([_entry(tmp_path, resolutoin=512)], log=_quiet)
    with pytest.raises(ConfigError, match=r"caption_strategy 'textfiles'.*did you mean 'textfile'"):
        parse_datasets([_entry(tmp_path, caption_strategy="textfiles")], log=_quiet)


def test_ignored_simpletuner_keys_and_entries_are_noted(tmp_path):
    notes = []
    entries = [_entry(tmp_path, hash_filenames=True, vae_cache_clear_each_epoch=False, metadata_backend="discovery"),
               {"id": "text-cache", "dataset_type": "text_embeds", "default": True, "cache_dir": "x"},
               _entry(tmp_path, id="off", disabled=True, dataset_type="video")]
    (spec,) = parse_datasets(entries, log=notes.append)
    assert spec.id == "ds"
    assert any("hash_filenames, metadata_backend, vae_cache_clear_each_epoch" in n for n in notes)
    assert any("text-cache" in n and "caches" in n for n in notes) and any("'off' is disabled" in n for n in notes)


@pytest.mark.parametrize("entries, is_edit, match", [
    ([{"id": "a", "type": "local", "instance_data_dir": "D"}] * 2, False, "used twice"),
    ([{"id": "a", "type": "local"}], False, "instance_data_dir is missing"),
    ([{"id": "a", "type": "local", "instance_data_dir": "D/nope"}], False, "is not a folder"),
    ([{"id": "a", "type": "aws", "instance_data_dir": "D"}], False, "type 'aws' is not supported"),
    ([{"id": "a", "dataset_type": "video", "instance_data_dir": "D"}], False, "'a'.*video.*not supported yet"),
    ([{"id": "a", "instance_data_dir": "D", "conditioning_data": "ghost"}], True, "'ghost', which does not exist"),
    ([{"id": "a", "instance_data_dir": "D", "conditioning_data": "b"},
      {"id": "b", "instance_data_dir": "D", "dataset_type": "image"}], True, "set \"dataset_type\": \"conditioning\""),
    ([{"id": "a", "instance_data_dir": "D"}], True, "Edit run needs reference images.*'a'"),
    ([{"id": "a", "instance_data_dir": "D", "maximum_image_size": 2048}], False, "must be set together"),
    ([{"id": "a", "instance_data_dir": "D", "probability": 0}], False, "disabled"),
    ([{"id": "a", "instance_data_dir": "D", "resolution": 1.0}], False, "did you mean resolution_type 'area'"),
    ([{"id": "a", "instance_data_dir": "D", "caption_strategy": "instanceprompt"}], False, "instance_prompt is empty"),
])
def test_bad_dataset_configs_fail_clearly(tmp_path, entries, is_edit, match):
    entries = json.loads(json.dumps(entries).replace('"D', json.dumps(str(tmp_path))[:-1]))
    with pytest.raises(ConfigError, match=match):
        parse_datasets(entries, is_edit=is_edit, log=_quiet)


def test_parquet_metadata_needs_pyarrow_for_parquet_files(tmp_path):
    try:
        import pyarrow  # noqa: F401
        pytest.skip("pyarrow is installed")
    except ImportError:
        pass
    (tmp_path / "meta.parquet").write_bytes(b"PAR1")
    with pytest.raises(ConfigError, match="needs pyarrow"):
        parse_datasets([_entry(tmp_path, caption_strategy="parquet", parquet={"path": str(tmp_path / "meta.parquet")})],
                       log=_quiet)


# ---------------------------------------------------------------- bucketing (vae_and_data.md §3.4)

WORKED = [  # original, then targets for: pixel R=1024, area 1.0 MP, pixel R=480, area 0.4 MP
    ((1024, 1024), (1024, 1024), (1024, 1024), (512, 512), (640, 640)),
    ((1200, 900), (1344, 1024), (1152, 896), (640, 512), (768, 576)),
    ((1500, 1000), (1536, 1024), (1280, 832), (704, 512), (768, 512)),
    ((1920, 1080), (1792, 1024), (1344, 768), (832, 512), (832, 448)),
    ((1080, 1920), (1024, 1856), (768, 1344), (512, 832), (448, 832)),
    ((2000, 1000), (2048, 1024), (1472, 704), (960, 512), (896, 448)),
]


@pytest.mark.parametrize("row", WORKED, ids=lambda r: f"{r[0][0]}x{r[0][1]}")
def test_worked_examples_table(row):
    size, *expected = row
    modes = [("pixel", 1024), ("area", 1.0), ("pixel", 480), ("area", 0.4)]
    assert [target_size(aspect_key(size), r, t, 64) for t, r in modes] == expected
    for (rtype, r), want in zip(modes, expected):  # the planner (memo + intermediary) agrees
        spec = DatasetSpec(id="x", instance_data_dir=".", resolution=r, resolution_type=rtype)
        assert BucketPlanner(spec, alignment=64).plan(size, "a.png").bucket == want


def test_rounding_and_pixel_area_snap():
    assert round_to_grid(480, 64) == 512 and round_to_grid(416, 64) == 384  # banker's .5, as SimpleTuner
    assert round_to_grid(10, 64) == 64
    spec = DatasetSpec(id="x", instance_data_dir=".", resolution=1024, resolution_type="pixel_area")
    assert BucketPlanner(spec).plan((1000, 1000), "a").bucket == (1024, 1024)
    spec = DatasetSpec(id="x", instance_data_dir=".", resolution=0.5, resolution_type="area")  # snaps to 768²
    assert BucketPlanner(spec).plan((900, 900), "a").bucket == (768, 768)


def test_alignment_must_keep_multiples_of_16():
    for bad in (8, 24, 48):
        with pytest.raises(ValueError):
            check_alignment(bad)
    assert [check_alignment(a) for a in (16, 32, 64)] == [16, 32, 64]


@pytest.mark.parametrize("alignment", [16, 32, 64])
@pytest.mark.parametrize("mode", ["pixel", "pixel_area", "area", "crop-square", "crop-preserve", "crop-random"])
def test_bucket_properties(alignment, mode):
    rng = random.Random(alignment)
    kw = {"pixel": dict(resolution=256, resolution_type="pixel"), "area": dict(resolution=0.3, resolution_type="area"),
          "pixel_area": dict(resolution=384, resolution_type="pixel_area")}.get(mode, dict(resolution=192,
                                                                                             resolution_type="pixel"))
    if mode.startswith("crop"):
        kw.update(crop=True, crop_aspect=mode[5:], crop_aspect_buckets=[{"aspect": a, "weight": 1.0}
                                                                          for a in (0.75, 1.0, 1.5)])
    spec = DatasetSpec(id="x", instance_data_dir=".", crop_style="random", **kw)
    planner, again = BucketPlanner(spec, seed=3, alignment=alignment), BucketPlanner(spec, seed=3, alignment=alignment)
    shapes = {}
    for i in range(300):
        size = (rng.randint(64, 3000), rng.randint(64, 3000))
        g = planner.plan(size, f"img{i}.png")
        (bw, bh), (rw, rh), (l, t, r, b) = g.bucket, g.resize, g.crop
        assert bw % alignment == 0 and bh % alignment == 0 and bw % 16 == 0 and bh % 16 == 0
        assert rw >= bw and rh >= bh  # the intermediary covers the target
        assert 0 <= l and 0 <= t and r <= rw and b <= rh and (r - l, b - t) == (bw, bh)  # crop inside it
        if not spec.crop:  # the resize keeps the original aspect, up to one pixel of rounding
            assert abs(np.log(rw / rh) - np.log(size[0] / size[1])) <= 1.0 / min(rw, rh)
        assert again.plan(size, f"img{i}.png") == g  # same input, same geometry, on a re-run
        assert shapes.setdefault(aspect_key(g.bucket), g.bucket) == g.bucket  # one shape per bucket key
        if mode == "pixel":
            assert min(g.bucket) == round_to_grid(256, alignment)  # short edge = R on the grid


def test_crop_true_cuts_from_the_original_and_downsamples_big_images():
    spec = DatasetSpec(id="x", instance_data_dir=".", resolution=128, resolution_type="pixel", crop=True,
                       crop_style="center")
    g = BucketPlanner(spec).plan((300, 200), "a")
    assert g == Geometry((128, 128), (300, 200), (86, 36, 214, 164))  # no resize, centre window
    small = BucketPlanner(spec).plan((100, 90), "a")  # smaller than the bucket: upscaled to cover it
    assert small.bucket == (128, 128) and min(small.resize) >= 128
    spec.maximum_image_size, spec.target_downsample_size = 256, 160
    g = BucketPlanner(spec).plan((3000, 2000), "a")
    assert g.bucket == (128, 128) and g.resize[0] < 400 and abs(g.resize[0] / g.resize[1] - 1.5) < 0.02


def test_apply_geometry_cover_and_table():
    img = Image.new("RGB", (150, 100), (10, 20, 30))
    g = Geometry((128, 64), cover_size((150, 100), (128, 64)), (0, 0, 128, 64))
    assert g.resize == (128, 86) and apply_geometry(img, g).size == (128, 64)
    table = format_bucket_table({"ds": {(128, 64): [1, 2, 3], (64, 64): 5}})
    lines = table.splitlines()
    assert lines[0].split() == ["dataset", "bucket", "aspect", "samples"]
    assert lines[1].split() == ["ds", "64x64", "1.00", "5"] and lines[2].split() == ["128x64", "2.00", "3"]


# ---------------------------------------------------------------- image decoding

def test_image_modes_decode_to_rgb(tmp_path):
    p = _img(str(tmp_path / "cmyk.jpg"), colour=(0, 255, 255, 0), mode="CMYK", caption=None, quality=95)
    assert load_image(p).mode == "RGB" and np.abs(np.array(load_image(p))[10, 10].astype(int) - [255, 0, 0]).max() < 8

    pal = Image.new("P", (4, 2), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=0)
    arr = np.array(load_image(tmp_path / "pal.png"))
    assert arr[0, 0].tolist() == [255, 0, 0] and arr[1, 1].tolist() == [255, 255, 255]  # transparent -> white

    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    assert np.array(load_image(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 100, 255]

    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "rgba.png")
    assert np.array(load_image(tmp_path / "rgba.png"))[0].tolist() == [[255, 255, 255], [0, 0, 255]]

    _img(str(tmp_path / "gray.png"), colour=100, mode="L", caption=None)
    _img(str(tmp_path / "bw.png"), colour=1, mode="1", caption=None)
    _img(str(tmp_path / "la.png"), colour=(50, 255), mode="LA", caption=None)
    assert np.array(load_image(tmp_path / "gray.png"))[0, 0].tolist() == [100, 100, 100]
    assert np.array(load_image(tmp_path / "bw.png"))[0, 0].tolist() == [255, 255, 255]
    assert np.array(load_image(tmp_path / "la.png"))[0, 0].tolist() == [50, 50, 50]

    from data.images import to_rgb  # 32-bit int and float grayscale
    assert np.array(to_rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.int32))))[0, :, 0].tolist() == [0, 255]
    assert np.array(to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))))[0, :, 0].tolist() == \
        [0, 128, 255]


def test_exif_rotation_and_bad_files(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 96x64, shown 64x96
    _img(str(tmp_path / "rot.jpg"), size=(96, 64), caption=None, exif=exif.tobytes())
    assert image_size(tmp_path / "rot.jpg") == (64, 96) and load_image(tmp_path / "rot.jpg").size == (64, 96)

    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(random.Random(0).randbytes(3000))
    for name in ("trunc.png", "junk.jpg"):
        with pytest.raises(BadSample) as e:
            load_image(tmp_path / name)
        assert e.value.reason == "unreadable"
    t = to_tensor(Image.new("RGB", (3, 2), (255, 0, 128)))
    assert t.shape == (3, 2, 3) and t.dtype == torch.float32
    assert t[0].eq(1).all() and t[1].eq(-1).all() and abs(t[2, 0, 0].item() - (128 / 255 - 0.5) / 0.5) < 1e-7


# ---------------------------------------------------------------- discovery, captions, bad inputs

def test_discovery_excludes_bad_inputs_and_reports(tmp_path):
    d, out = tmp_path / "data", tmp_path / "out"
    _img(str(d / "ok.png"))
    _img(str(d / "sub" / "deep.png"), size=(128, 64))
    _img(str(d / "cmyk.jpg"), colour=(0, 255, 255, 0), mode="CMYK")
    _img(str(d / "gray.png"), colour=90, mode="L")
    exif = Image.Exif()
    exif[0x0112] = 6
    _img(str(d / "rot.jpg"), size=(128, 64), exif=exif.tobytes())
    _img(str(d / "nocap.png"), caption=None)
    _img(str(d / "empty.png"), caption="  \n ")
    _img(str(d / "tiny.png"), size=(20, 20))
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "trunc.png")
    (d / "trunc.png").write_bytes((d / "trunc.png").read_bytes()[:400])
    (d / "trunc.txt").write_text("x")
    (d / "junk.jpg").write_bytes(random.Random(1).randbytes(2000))
    (d / "junk.txt").write_text("x")
    for skipped in (".hidden/h.png", "__MACOSX/m.png", ".dot.png"):  # hidden and OS-junk: never listed
        _img(str(d / skipped))
    os.symlink(d / "ok.png", d / "link.png")  # the same real file twice: kept once
    before = sorted(os.listdir(d))

    (spec,) = parse_datasets([_entry(d, minimum_image_size=32)], log=_quiet)
    index = discover([spec], seed=0, alignment=64, output_dir=str(out), log=_quiet)
    assert sorted(os.listdir(d)) == before  # nothing written into the dataset folder
    rels = {s.rel: s for s in index.samples["ds"]}
    assert set(rels) == {"cmyk.jpg", "gray.png", "ok.png", "rot.jpg", "sub/deep.png"}
    assert (rels["rot.jpg"].width, rels["rot.jpg"].height) == (64, 128) and rels["rot.jpg"].geometry.bucket == (64, 128)
    assert all(s.fingerprint.count("-") == 1 and os.path.isabs(s.path) for s in rels.values())
    codes = {os.path.basename(e.path): reason_code(e.reason) for e in index.excluded}
    assert codes == {"nocap.png": "missing_caption", "empty.png": "empty_caption", "tiny.png": "too_small",
                     "trunc.png": "unreadable", "junk.jpg": "unreadable"}

    report = json.loads((out / "data_report.json").read_text())
    assert report["datasets"]["ds"]["found"] == 10 and report["datasets"]["ds"]["usable"] == 5
    assert report["excluded_by_reason"] == {"empty_caption": 1, "missing_caption": 1, "too_small": 1, "unreadable": 2}
    assert {os.path.basename(e["path"]) for e in report["excluded"]} == set(codes)
    assert "5 usable" in index.summary() and "unreadable 2" in index.summary()
    # a re-run is served from the discovery cache and gives the same index
    again = discover([spec], seed=0, alignment=64, output_dir=str(out), log=_quiet)
    assert [(s.rel, s.geometry) for s in again.all_samples()] == [(s.rel, s.geometry) for s in index.all_samples()]


def test_empty_dataset_raises_with_counts_and_report(tmp_path):
    d = tmp_path / "data"
    for name in ("a.png", "b.png"):
        _img(str(d / name), caption=None)
    (d / "c.jpg").write_bytes(b"not a jpeg")
    (spec,) = parse_datasets([_entry(d)], log=_quiet)
    with pytest.raises(DataError, match=r"'ds'.*3 found.*missing_caption 2.*unreadable 1.*data_report.json"):
        discover([spec], output_dir=str(tmp_path / "out"), log=_quiet)
    assert (tmp_path / "out" / "data_report.json").exists()
    (tmp_path / "empty").mkdir()
    (spec,) = parse_datasets([_entry(tmp_path / "empty")], log=_quiet)
    with pytest.raises(DataError, match="no image files"):
        discover([spec], log=_quiet)


def test_caption_strategies(tmp_path):
    d = tmp_path / "d"
    _img(str(d / "multi.png"), caption="first caption\n\n  second caption  \n")
    _img(str(d / "a_photo_of_x.png"), caption="single")
    (tmp_path / "meta.jsonl").write_text('{"file": "multi", "text": "from jsonl"}\n'
                                         '{"file": "a_photo_of_x", "text": "", "alt": "fallback text"}\n')
    (tmp_path / "meta.csv").write_text('filename,caption\nmulti.png,from csv\n')

    def captions(**kw):
        (spec,) = parse_datasets([_entry(d, **kw)], log=_quiet)
        return {s.rel: s.caption for s in discover([spec], log=_quiet).all_samples()}

    assert captions() == {"multi.png": ["first caption", "second caption"], "a_photo_of_x.png": "single"}
    assert captions(disable_multiline_split=True)["multi.png"] == "first caption\n\n  second caption"
    assert captions(caption_strategy="filename") == {"multi.png": "multi", "a_photo_of_x.png": "a photo of x"}
    assert set(captions(caption_strategy="instanceprompt", instance_prompt="sks dog").values()) == {"sks dog"}
    assert captions(prepend_instance_prompt=True, instance_prompt="sks")["multi.png"] == \
        ["sks first caption", "sks second caption"]
    assert set(captions(only_instance_prompt=True, instance_prompt="sks").values()) == {"sks"}
    meta = {"path": str(tmp_path / "meta.jsonl"), "filename_column": "file", "caption_column": "text",
            "fallback_caption_column": "alt"}
    assert captions(caption_strategy="parquet", parquet=meta) == {"multi.png": "from jsonl",
                                                                  "a_photo_of_x.png": "fallback text"}
    (spec,) = parse_datasets([_entry(d, caption_strategy="parquet", parquet={
        "path": str(tmp_path / "meta.csv"), "identifier_includes_extension": True})], log=_quiet)
    index = discover([spec], log=_quiet, output_dir=str(tmp_path / "o"))
    assert {s.rel: s.caption for s in index.all_samples()} == {"multi.png": "from csv"}
    assert [reason_code(e.reason) for e in index.excluded] == ["missing_caption"]


# ---------------------------------------------------------------- edit pairing

def test_edit_pairing_by_name(tmp_path):
    edits, refs = make_synthetic_edit_dataset(str(tmp_path), n=6, seed=1)
    os.rename(os.path.join(refs, "003.png"), os.path.join(refs, "003.jpg"))  # another extension: paired by stem
    _img(os.path.join(edits, "extra.png"))  # a target with no reference
    _img(os.path.join(refs, "orphan.png"), caption=None)  # a reference with no target
    os.remove(os.path.join(edits, "004.txt"))  # target excluded -> its reference is unused
    _img(os.path.join(edits, "sub", "n.png"), size=(128, 64))  # sub-folders pair by relative path
    _img(os.path.join(refs, "sub", "n.png"), size=(124, 64))  # 3% wider: stretched without a warning
    Image.new("RGB", (96, 64)).save(os.path.join(refs, "005.png"))  # other aspect than its target: warned
    backend = write_edit_backend(str(tmp_path / "mdb.json"), edits, refs, str(tmp_path / "cache"))
    specs = load_datasets(backend, is_edit=True, log=_quiet)
    index = discover(specs, seed=0, is_edit=True, output_dir=str(tmp_path / "out"), log=_quiet)

    samples = {s.rel: s for s in index.samples["edit-images"]}
    assert set(samples) == {"000.png", "001.png", "002.png", "003.png", "005.png", "sub/n.png"}
    assert "ref-images" not in index.samples
    for s in samples.values():
        ref = s.conditioning
        assert ref.dataset_id == "ref-images" and ref.caption is None and ref.geometry == s.geometry
        assert os.path.splitext(ref.rel)[0] == os.path.splitext(s.rel)[0]
        img, ref_img = load_image(s.path), load_image(ref.path)
        assert apply_geometry(img, s.geometry).size == apply_geometry(ref_img, ref.geometry).size == s.geometry.bucket
    assert samples["003.png"].conditioning.rel == "003.jpg"
    assert (samples["sub/n.png"].conditioning.width, samples["sub/n.png"].conditioning.height) == (124, 64)
    codes = {(e.dataset_id, os.path.basename(e.path)): reason_code(e.reason) for e in index.excluded}
    assert codes == {("edit-images", "extra.png"): "unpaired_target", ("edit-images", "004.png"): "missing_caption",
                     ("ref-images", "orphan.png"): "orphan_reference", ("ref-images", "004.png"): "target_excluded"}
    assert len(index.warnings) == 1 and "005.png" in index.warnings[0]
    report = json.loads((tmp_path / "out" / "data_report.json").read_text())
    assert report["datasets"]["ref-images"]["excluded"] == {"orphan_reference": 1, "target_excluded": 1}
    assert report["datasets"]["ref-images"]["found"] == report["datasets"]["ref-images"]["usable"] + 2


# ---------------------------------------------------------------- batching

def _fake_index(layout, repeats=None, batch_sizes=None):
    """layout: {dataset: {(W, H): n}} -> an object with .buckets / .specs, as BucketBatchSampler reads them."""
    buckets, specs = {}, {}
    for ds, per in layout.items():
        buckets[ds] = {b: [types.SimpleNamespace(dataset_id=ds, rel=f"{b[0]}x{b[1]}/{i}.png", geometry=Geometry(
            b, b, (0, 0, *b))) for i in range(n)] for b, n in per.items()}
        specs[ds] = types.SimpleNamespace(repeats=(repeats or {}).get(ds, 0), probability=1.0,
                                          train_batch_size=(batch_sizes or {}).get(ds))
    return types.SimpleNamespace(buckets=buckets, specs=specs)


def test_sampler_one_bucket_per_batch_covers_every_sample_with_repeats():
    index = _fake_index({"a": {(64, 64): 7, (128, 64): 4}, "b": {(64, 128): 5, (64, 64): 1}}, repeats={"a": 1})
    notes = []
    sampler = BucketBatchSampler(index, batch_size=2, seed=5, log=notes.append)
    assert any("b 64x64" in n for n in notes)  # 1 sample < one batch of 2: pruned, with a note
    it, seen = iter(sampler), {}
    n = len(sampler)
    assert n == 7 + 4 + 3  # a: ceil(14/2) + ceil(8/2); b: ceil(5/2)
    for _ in range(n):
        batch = next(it)
        assert len(batch) == 2 and len({(s.dataset_id, s.geometry.bucket) for s in batch}) == 1
        for s in batch:
            seen[(s.dataset_id, s.rel)] = seen.get((s.dataset_id, s.rel), 0) + 1
    assert sampler.epoch == 0 and sampler.position == n
    for b, per in index.buckets.items():
        for bucket, samples in per.items():
            if (b, bucket) != ("b", (64, 64)):
                want = index.specs[b].repeats + 1
                assert all(seen[(b, s.rel)] >= want for s in samples)
    assert sum(seen.values()) == 2 * n and sum(seen.values()) - (14 + 8 + 5) == 1  # one pad item (b's odd bucket)
    next(it)
    assert sampler.epoch == 1 and sampler.plan_epoch(0) != sampler.plan_epoch(1)


def test_sampler_ranks_split_one_global_batch():
    index = _fake_index({"a": {(64, 64): 9, (128, 64): 6}, "b": {(64, 128): 8}})
    single = iter(BucketBatchSampler(index, batch_size=4, seed=1))
    ranks = [iter(BucketBatchSampler(index, batch_size=2, seed=1, world_size=2, rank=r)) for r in range(2)]
    for _ in range(20):  # crosses epoch boundaries
        whole, r0, r1 = next(single), next(ranks[0]), next(ranks[1])
        assert len(r0) == len(r1) == 2 and r0[0].geometry.bucket == r1[0].geometry.bucket
        assert [s.rel for s in r0 + r1] == [s.rel for s in whole] and not {s.rel for s in r0} & {s.rel for s in r1}


def test_sampler_resume_continues_exactly():
    index = _fake_index({"a": {(64, 64): 5, (128, 64): 3}, "b": {(64, 64): 4}}, repeats={"b": 2},
                        batch_sizes={"b": 3})
    ref = iter(BucketBatchSampler(index, batch_size=2, seed=7))
    first = [next(ref) for _ in range(11)]
    rest = [[s.rel for s in next(ref)] for _ in range(15)]
    run = BucketBatchSampler(index, batch_size=2, seed=7)
    it = iter(run)
    assert [[s.rel for s in next(it)] for _ in range(11)] == [[s.rel for s in b] for b in first]
    state = json.loads(json.dumps(run.state_dict()))
    resumed = BucketBatchSampler(index, batch_size=2, seed=7)
    resumed.load_state_dict(state)
    it = iter(resumed)
    assert [[s.rel for s in next(it)] for _ in range(15)] == rest


def test_sampler_everything_pruned_raises():
    with pytest.raises(DataError, match="lower train_batch_size"):
        BucketBatchSampler(_fake_index({"a": {(64, 64): 3}}), batch_size=2, world_size=2, log=_quiet)


def test_sampler_on_real_discovery(tmp_path):
    root = make_synthetic_dataset(str(tmp_path / "img"), n=24, seed=2)
    (spec,) = load_datasets(write_t2i_backend(str(tmp_path / "mdb.json"), root, str(tmp_path / "c")), log=_quiet)
    index = discover([spec], seed=0, log=_quiet)
    assert len(index.buckets["synthetic"]) == 3
    batch = next(iter(BucketBatchSampler(index, batch_size=3, seed=0)))
    assert len({s.geometry.bucket for s in batch}) == 1
    x = torch.stack([to_tensor(apply_geometry(load_image(s.path), s.geometry)) for s in batch])
    assert x.shape[2:] == batch[0].geometry.bucket[::-1] and -1 <= x.min() and x.max() <= 1


def test_synthetic_is_deterministic_and_fast(tmp_path):
    import time
    t = time.perf_counter()
    make_synthetic_dataset(str(tmp_path / "a"), n=64, seed=3)
    assert time.perf_counter() - t < 1.0
    make_synthetic_dataset(str(tmp_path / "b"), n=4, seed=3)
    for name in ("000.png", "003.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    from data.synthetic import main
    path = main([str(tmp_path / "cli"), "--edit", "--n", "3"])
    assert [e["id"] for e in json.load(open(path))] == ["edit-images", "ref-images"]
    assert sorted(os.listdir(tmp_path / "cli" / "references")) == ["000.png", "001.png", "002.png"]


def test_extreme_aspect_is_excluded_not_a_giant_bucket(tmp_path):
    """Issue 15 item 5: 20000x20 at `pixel` 1024 was a 1024000x1024 bucket (MemoryError at cache build), and
    20x20000 (aspect key 0.0) a ZeroDivisionError; both are now excluded with a reason in data_report.json."""
    d, out = tmp_path / "data", tmp_path / "out"
    _img(str(d / "wide.png"), size=(20000, 20))
    _img(str(d / "tall.png"), size=(20, 20000))
    _img(str(d / "pano.png"), size=(192, 64))  # 3:1 is fine
    (spec,) = parse_datasets([_entry(d, resolution=1024)], log=_quiet)
    index = discover([spec], output_dir=str(out), log=_quiet)
    (kept,) = index.all_samples()
    assert kept.rel == "pano.png" and kept.geometry.bucket == (3072, 1024)
    report = json.loads((out / "data_report.json").read_text())
    assert report["excluded_by_reason"] == {"bucket_too_large": 2}
    assert all("20000" in e["detail"] and "aspect" in e["detail"] for e in report["excluded"])
    # crop: true + square keeps a 1024x1024 bucket, but the cover resize would be 1024000x1024: excluded too
    crop = DatasetSpec(id="x", instance_data_dir=".", resolution=1024, resolution_type="pixel", crop=True)
    planner = BucketPlanner(crop)
    g = planner.plan((20000, 20), "a")
    assert g.bucket == (1024, 1024) and "MP limit" in planner.too_large((20000, 20), g)
    assert planner.too_large((3000, 2000), planner.plan((3000, 2000), "b")) is None
    # the user's own aspect limits replace the 8:1 default; the pixel cap stays
    wide = DatasetSpec(id="x", instance_data_dir=".", resolution=256, resolution_type="pixel", maximum_aspect_ratio=20)
    planner = BucketPlanner(wide)
    assert planner.too_large((2560, 256), planner.plan((2560, 256), "c")) is None
    assert "aspect" in planner.too_large((8000, 256), planner.plan((8000, 256), "d"))
    wide.resolution, wide.maximum_aspect_ratio = 1024, 1000.0
    planner = BucketPlanner(wide)
    assert "MP limit" in planner.too_large((20000, 20), planner.plan((20000, 20), "e"))


def test_cache_key_follows_content_not_mtime(tmp_path):
    """Issue 15 item 8: a same-size replacement with its mtime put back used to keep the (size, mtime) fingerprint,
    so the stale latent was reused; the fingerprint is now a hash of the bytes, and so is the cache key."""
    from data.cache import LatentCache, content_fingerprint
    d, out = tmp_path / "data", tmp_path / "out"
    _img(str(d / "a.bmp"), colour=(200, 30, 30))  # BMP: the file size depends on the pixel count only
    (spec,) = parse_datasets([_entry(d)], log=_quiet)
    before = discover([spec], output_dir=str(out), log=_quiet).all_samples()[0]
    st = os.stat(d / "a.bmp")
    _img(str(d / "a.bmp"), colour=(30, 200, 30))
    os.utime(d / "a.bmp", ns=(st.st_atime_ns, st.st_mtime_ns))
    now = os.stat(d / "a.bmp")
    assert (now.st_size, now.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    after = discover([spec], output_dir=str(out), log=_quiet).all_samples()[0]  # through the discovery cache too
    cache = LatentCache(tmp_path / "cache", "vae", dtype=torch.float32)
    assert after.fingerprint != before.fingerprint and cache.path_for(after) != cache.path_for(before)
    assert after.fingerprint == content_fingerprint(d / "a.bmp") and after.fingerprint.startswith(f"{st.st_size}-")
