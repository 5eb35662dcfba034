"""data/cache.py: keys invalidate exactly what changed, files round-trip bitwise, corrupt files are rebuilt,
interrupted builds resume, and ranks split the work (shared/specs/vae_and_data.md §6.4)."""
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.cache import (CacheError, LatentCache, TextCache, edit_compute_fn, files_fingerprint, latents_from_cache,
                        model_identity, t2i_compute_fn, vae_compute_fn)
from model.tiny_checkpoint import TINY_VAE
from model.vae_image import ImageVAE


@dataclass(frozen=True)
class Geo:
    bucket: tuple
    resize: tuple
    crop: tuple


@dataclass(frozen=True)
class Sample:  # the duck-typed record data/discovery.py produces
    dataset_id: str
    path: str
    rel: str
    fingerprint: str
    geometry: Geo
    caption: str = ""
    conditioning: object = None


GEO = Geo((32, 32), (40, 32), (4, 0, 36, 32))
GEO_WIDE = Geo((48, 32), (48, 32), (0, 0, 48, 32))


def write_image(path: Path, seed: int, size=(48, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def make_sample(root: Path, rel: str, geo=GEO, caption="", conditioning=None, dataset_id="ds") -> Sample:
    path = root / rel
    st = path.stat()
    return Sample(dataset_id, str(path), rel, f"{st.st_size}-{st.st_mtime_ns}", geo, caption, conditioning)


def load_pixels(s) -> torch.Tensor:
    g = s.geometry
    img = Image.open(s.path).convert("RGB").resize(g.resize, Image.BICUBIC).crop(g.crop)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return ImageVAE(TINY_VAE).eval()


@pytest.fixture
def src(tmp_path):
    for i in range(5):
        write_image(tmp_path / "src" / ("sub" if i % 2 else "") / f"img{i}.png", seed=i)
    return tmp_path / "src"


def samples_of(src: Path) -> list[Sample]:
    rels = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    return [make_sample(src, r, GEO_WIDE if i == 4 else GEO, caption=f"c{i % 2}") for i, r in enumerate(rels)]


def cache_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.safetensors"))


def counting(fn, log: list):
    def compute(samples):
        log.append([s.rel for s in samples])
        return fn(samples)
    return compute


def test_mode_and_sample_match_direct_encode(vae, src, tmp_path):
    cache = LatentCache(tmp_path / "cache", model_identity(vae.config.to_dict(), "w"), dtype=torch.float32)
    samples = samples_of(src)
    log = []
    stats = cache.build(samples, counting(vae_compute_fn(vae, load_pixels), log), batch_size=1)
    assert stats["new"] == 5 and len(cache_files(tmp_path / "cache")) == 5
    s = next(s for s in samples if s.rel == "sub/img1.png")
    assert cache.path_for(s).parent == tmp_path / "cache" / "ds" / "sub"  # mirrors the source folders
    assert cache.path_for(s).name.startswith("img1-") and len(cache.path_for(s).name) == len("img1-") + 12 + 12
    x = load_pixels(s)[None]
    entry = cache.load(s)
    with torch.no_grad():
        assert torch.equal(latents_from_cache(entry, vae.normalize, sample=False), vae.encode(x, sample=False)[0])
        g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        z_cache = latents_from_cache(entry, vae.normalize, sample=True, generator=g1)
        assert torch.equal(z_cache, vae.encode(x, sample=True, generator=g2)[0])
    # a second build finds everything cached
    assert cache.build(samples, counting(vae_compute_fn(vae, load_pixels), log))["new"] == 0 and len(log) == 5


def test_batches_share_one_shape(vae, src, tmp_path):
    cache = LatentCache(tmp_path / "cache", "vae-a")
    log = []
    cache.build(samples_of(src), counting(vae_compute_fn(vae, load_pixels), log), batch_size=3)
    assert sorted(len(b) for b in log) == [1, 1, 3]  # 4 samples in the 32x32 bucket -> 3 + 1, one 48x32 sample


def test_keys_change_with_source_geometry_model_dtype(vae, src, tmp_path):
    root = tmp_path / "cache"
    cache = LatentCache(root, "vae-a", dtype=torch.float32)
    samples = samples_of(src)
    compute = vae_compute_fn(vae, load_pixels)
    cache.build(samples, compute)
    s = samples[0]
    old_path, old_entry = cache.path_for(s), cache.load(s)
    # edit the source in place: new content, new size/mtime -> new key; the stale file is not read
    write_image(Path(s.path), seed=99, size=(56, 40))
    os.utime(s.path, ns=(1, 10**18))
    s2 = make_sample(src, s.rel)
    assert s2.fingerprint != s.fingerprint and cache.path_for(s2) != old_path and not cache.has(s2)
    with pytest.raises(CacheError):
        cache.load(s2)
    log = []
    assert cache.build([s2] + samples[1:], counting(compute, log))["new"] == 1 and log == [[s.rel]]
    with torch.no_grad():
        assert not torch.equal(cache.load(s2)["mean"], old_entry["mean"])
        assert torch.equal(cache.load(s2)["mean"], vae.encode_moments(load_pixels(s2)[None])[0][0])
    assert old_path.exists()  # kept until pruned, never read
    assert cache.prune([s2] + samples[1:]) == [old_path] and not old_path.exists()
    # geometry, VAE identity, storage dtype, extension: each gives a new file name
    paths = {cache.path_for(s2), cache.path_for(replace(s2, geometry=Geo((32, 32), (48, 32), (8, 0, 40, 32)))),
             LatentCache(root, "vae-b", dtype=torch.float32).path_for(s2),
             LatentCache(root, "vae-a", dtype=torch.bfloat16).path_for(s2),
             cache.path_for(replace(s2, rel=s2.rel.replace(".png", ".jpg")))}
    assert len(paths) == 5


def test_model_identity_tracks_config_and_weights(tmp_path):
    w = tmp_path / "vae"
    w.mkdir()
    (w / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 10)
    a = model_identity(TINY_VAE.to_dict(), files_fingerprint(w))
    assert a == model_identity(TINY_VAE.to_dict(), files_fingerprint(w))
    assert a != model_identity(replace(TINY_VAE, scaling_factor=0.5).to_dict(), files_fingerprint(w))
    (w / "diffusion_pytorch_model.safetensors").write_bytes(b"y" * 11)
    assert a != model_identity(TINY_VAE.to_dict(), files_fingerprint(w))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key", "nan"])
def test_corrupt_file_detected_and_rebuilt(vae, src, tmp_path, damage):
    cache = LatentCache(tmp_path / "cache", "vae-a", dtype=torch.float32)
    samples = samples_of(src)
    compute = vae_compute_fn(vae, load_pixels)
    cache.build(samples, compute)
    good = cache.load(samples[0])
    path = cache.path_for(samples[0])
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(os.urandom(2000))
    elif damage == "other_key":
        path.write_bytes(cache.path_for(samples[2]).read_bytes())
    else:  # right key, NaN values: the header is fine, the values are not
        bad = {k: v.clone() for k, v in good.items()}
        bad["mean"][0, 0, 0] = float("nan")
        cache._write(path, cache.key(samples[0]), bad)
    assert cache.has(samples[0]) == (damage == "nan")
    with pytest.raises(CacheError):
        cache.load(samples[0])
    if damage == "nan":  # load with a compute_fn rebuilds the entry on the spot
        assert torch.equal(cache.load(samples[0], compute_fn=compute)["mean"], good["mean"])
    else:  # build rebuilds exactly the damaged entry
        log = []
        assert cache.build(samples, counting(compute, log))["new"] == 1 and log == [[samples[0].rel]]
    assert torch.equal(cache.load(samples[0])["mean"], good["mean"])


def test_interrupted_build_resumes(vae, src, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    cache = LatentCache(root, "vae-a")
    samples = samples_of(src)
    compute = vae_compute_fn(vae, load_pixels)
    calls = []

    def flaky(batch, k=2):
        if len(calls) == k:
            raise KeyboardInterrupt
        calls.append(batch)
        return compute(batch)

    with pytest.raises(KeyboardInterrupt):
        cache.build(samples, flaky, batch_size=1)
    assert len(cache_files(root)) == 2 and all(cache.load(s) for s in samples if cache.has(s))
    # a kill during the write itself leaves no partial or temp file
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        cache.build(samples, compute)
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(cache_files(root)) == 2 and not [p for p in root.rglob("*") if p.name.endswith(".tmp")]
    log = []
    assert cache.build(samples, counting(compute, log))["new"] == 3 and sum(map(len, log)) == 3
    assert len(cache_files(root)) == 5


def test_two_ranks_cover_everything_once(vae, src, tmp_path):
    cache = LatentCache(tmp_path / "cache", "vae-a")
    samples = samples_of(src)
    compute = vae_compute_fn(vae, load_pixels)
    done, barriers = [], []
    for rank in (0, 1):  # ranks simulated one after the other; a late rank must not change the split
        cache.build(samples, counting(compute, done), batch_size=2, rank=rank, world_size=2,
                    barrier=lambda: barriers.append(1))
    flat = [r for b in done for r in b]
    assert sorted(flat) == sorted(s.rel for s in samples) and len(barriers) == 2
    assert all(cache.has(s) for s in samples)
    assert cache.build(samples, counting(compute, done))["new"] == 0


# -----------------------------------------------------------------------------
# text cache, with the tiny LongCat-Image checkpoint's Qwen2.5-VL

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from model.loading import load_longcat_image
    from model.tiny_checkpoint import write_tiny_longcat_image
    root = write_tiny_longcat_image(tmp_path_factory.mktemp("tiny") / "ckpt", edit=True)
    return load_longcat_image(str(root), device="cpu", dtype=torch.float32)


def test_t2i_text_cache_shares_captions_and_round_trips(tiny, src, tmp_path):
    samples = samples_of(src)  # captions alternate c0 / c1 over five different images
    cache = TextCache(tmp_path / "text", "qwen-a", kind="t2i", dtype=torch.float32)
    assert cache.path_for(samples[0]) == cache.path_for(samples[2]) != cache.path_for(samples[1])
    assert cache.path_for(samples[0]) != TextCache(tmp_path / "text", "qwen-b").path_for(samples[0])
    outs = []

    def compute(batch):
        outs.append(t2i_compute_fn(tiny.text_encoder, tiny.tokenizer)(batch))
        return outs[-1]

    assert cache.build(samples, compute, batch_size=8)["new"] == 2 and len(cache_files(tmp_path / "text")) == 2
    assert len(outs) == 1 and outs[0].shape[:2] == (2, 512)
    rels = sorted(str(cache.path_for(s)) for s in samples[:2])  # build's order: sorted paths
    for s in samples[:2]:
        emb = cache.load(s)["prompt_embeds"]
        assert torch.equal(emb, outs[0][rels.index(str(cache.path_for(s)))])
    bf16 = TextCache(tmp_path / "text16", "qwen-a", dtype=torch.bfloat16)
    bf16.build(samples[:1], compute)
    assert torch.equal(bf16.load(samples[0])["prompt_embeds"], outs[-1][0].to(torch.bfloat16))


def test_edit_text_cache_keys_on_reference(tiny, src, tmp_path):
    refs = [make_sample(src, f"img{i}.png", dataset_id="refs") for i in (0, 2)]
    s_a = make_sample(src, "img4.png", caption="make it red", conditioning=refs[0])
    s_b = replace(s_a, rel="sub/img1.png", conditioning=refs[1])
    s_c = replace(s_a, rel="sub/img3.png")  # another target, same caption and same reference as s_a
    cache = TextCache(tmp_path / "text", "qwen-a", kind="edit", dtype=torch.float32)
    assert cache.path_for(s_a) != cache.path_for(s_b) and cache.path_for(s_a) == cache.path_for(s_c)
    assert cache.path_for(s_a) != cache.path_for(replace(s_a, conditioning=replace(refs[0], geometry=GEO_WIDE)))
    assert cache.path_for(s_a) != TextCache(tmp_path / "text", "qwen-a", kind="t2i").path_for(s_a)
    with pytest.raises(ValueError):
        cache.path_for(replace(s_a, conditioning=None))

    def vl_image(ref):
        g = ref.geometry
        return Image.open(ref.path).convert("RGB").resize(g.resize).crop(g.crop).resize((g.bucket[0] // 2,
                                                                                         g.bucket[1] // 2))

    outs = []
    compute_fn = edit_compute_fn(tiny.text_encoder, tiny.tokenizer, tiny.image_processor, vl_image)
    assert cache.build([s_a, s_b, s_c], lambda b: outs.append(compute_fn(b)) or outs[-1])["new"] == 2
    from model.text_qwen import encode_prompt_edit
    direct = encode_prompt_edit(tiny.text_encoder, tiny.tokenizer, tiny.image_processor, s_a.caption,
                                vl_image(refs[0]))[0]
    emb = cache.load(s_c)["prompt_embeds"]
    assert emb.ndim == 2 and torch.equal(emb, direct)


def test_non_finite_encoder_output_fails_at_build(tmp_path):
    """A NaN latent is reported when the cache is built (start-up), naming the file, not when it is drawn."""
    from types import SimpleNamespace

    from data.cache import CacheError, LatentCache
    geom = SimpleNamespace(bucket=(16, 16), resize=(16, 16), crop=(0, 0, 16, 16))
    s = SimpleNamespace(dataset_id="d", path=str(tmp_path / "bad.png"), rel="bad.png", fingerprint="1-2",
                        geometry=geom, caption="x", conditioning=None)
    cache = LatentCache(tmp_path / "c", "id")
    nan = lambda samples: (torch.full((1, 4, 2, 2), float("nan")), torch.zeros(1, 4, 2, 2))  # noqa: E731
    with pytest.raises(CacheError, match="bad.png.*non-finite mean"):
        cache.build([s], nan)
    assert not cache.has(s)


def test_startup_prune_removes_dead_temps_and_orphans_only(tmp_path, capsys):
    """Issue 15 item 9: temp files of dead processes and latents of deleted or changed sources used to pile up.
    prune_at_startup removes exactly those (listed in data_report.json), and never an entry a current sample maps
    to, a temp file a live (or possibly live) writer owns, or anything while another run uses the cache."""
    import json
    import socket
    import subprocess
    import sys
    import time

    from data.cache import TMP_MARK, prune_at_startup
    from data.datasets import parse_datasets
    from data.discovery import discover

    d, out = tmp_path / "data", tmp_path / "out"
    for i, rel in enumerate(("a.png", "b.png", "sub/c.png")):
        write_image(d / rel, seed=i)
        (d / rel).with_suffix(".txt").write_text("x")
    (spec,) = parse_datasets([{"id": "ds", "type": "local", "instance_data_dir": str(d), "resolution": 32,
                               "resolution_type": "pixel", "caption_strategy": "textfile"}], log=lambda *_: None)
    samples = discover([spec], output_dir=str(out), log=lambda *_: None).all_samples()
    cache = LatentCache(tmp_path / "cache", "vae-a", dtype=torch.float32)
    text = TextCache(tmp_path / "text", "qwen", dtype=torch.float32)
    zeros = lambda ss: (torch.zeros(len(ss), 4, 2, 2), torch.zeros(len(ss), 4, 2, 2))  # noqa: E731
    cache.build(samples, zeros)
    a = next(s for s in samples if s.rel == "a.png")
    other_geometry = replace(a, geometry=Geo((64, 32), (64, 32), (0, 0, 64, 32)))  # another config's entry
    cache.build([other_geometry], zeros)
    old = {s.rel: cache.path_for(s) for s in samples}

    (d / "sub" / "c.png").unlink()  # deleted source
    write_image(d / "b.png", seed=7)  # changed content
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder = tmp_path / "cache" / "ds"
        temps = {name: folder / f".{name}.safetensors{TMP_MARK}{pid}" for name, pid in
                 (("dead_old", dead.pid), ("dead_fresh", dead.pid), ("live_old", live.pid), ("live_ancient", live.pid))}
        temps["text_dead_old"] = tmp_path / "text" / f".t.safetensors{TMP_MARK}{dead.pid}"
        for name, p in temps.items():
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"partial")
            age = {"dead_fresh": 10, "live_ancient": 2 * 86400}.get(name, 600)
            os.utime(p, (time.time() - age, time.time() - age))

        now = discover([spec], output_dir=str(out), log=lambda *_: None)
        listed = prune_at_startup({"ds": cache}, [text], now.all_samples(), report=now.report_path)
        gone = {Path(e["path"]): e["reason"].split(":")[0] for e in listed}
        assert gone == {old["b.png"]: "stale_latent", old["sub/c.png"]: "orphan_latent",
                        temps["dead_old"]: "temp_file", temps["live_ancient"]: "temp_file",
                        temps["text_dead_old"]: "temp_file"}
        assert not any(p.exists() for p in gone)
        assert old["a.png"].exists() and cache.path_for(other_geometry).exists()  # current, and another config's
        assert temps["dead_fresh"].exists() and temps["live_old"].exists()  # a writer may still own these
        report = json.loads((out / "data_report.json").read_text())
        assert {e["path"] for e in report["cache_pruned"]["removed"]} == {str(p) for p in gone}
        assert "removed 5 orphaned or temp file(s)" in capsys.readouterr().out

        # another live run on this host uses the cache: its entries may be "orphans" to us, so none are removed
        (tmp_path / "cache" / ".runs" / f"{socket.gethostname()}-{live.pid}").touch()
        write_image(d / "a.png", seed=8)
        again = discover([spec], output_dir=str(out), log=lambda *_: None)
        assert prune_at_startup({"ds": cache}, [text], again.all_samples()) == []
        assert old["a.png"].exists() and "orphans kept while other runs use it" in capsys.readouterr().out
    finally:
        live.kill()
        live.wait()
    # that run is gone: its marker no longer blocks; a.png's two entries are stale now, its temp file orphaned
    listed = prune_at_startup({"ds": cache}, [text], again.all_samples())
    assert sorted(e["reason"].split(":")[0] for e in listed) == ["stale_latent", "stale_latent", "temp_file"]
    assert not old["a.png"].exists() and not cache.path_for(other_geometry).exists() and not temps["live_old"].exists()
