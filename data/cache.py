"""
On-disk caches for VAE latents and prompt embeddings: one safetensors file per entry, named by a hash of everything
that decides its content, so a changed source, crop, bucket, model or dtype gives a new file and a stale one is never
read (see ../shared/specs/vae_and_data.md §3.6-§3.7, §5.1, §6.4).

Latents: key = (format, dataset_id, rel path *with* extension, source fingerprint (size + content hash), geometry
(bucket, resize, crop), for clips the frame sampling (frames, fps, start), VAE identity, storage dtype) -> cache_dir/<dataset_id>/<rel without ext>-<sha256(key)[:12]>.safetensors,
mirroring the source sub-folders. The file holds the posterior `mean` and `logvar` [C, h, w], not a latent draw, so
sample (official trainer) or mode (inference references) stays a load-time choice (§1.3): see latents_from_cache.
Text: key = (format, template kind "t2i"|"edit"|"umt5", caption, text-model identity, dtype, and for Edit the reference
image's source key, since Qwen sees the reference) -> text_cache_dir/<sha256(key)[:32]>.safetensors holding
`prompt_embeds` [L, D]. Identical T2I captions share one file; txt ids are derived from L, so nothing else is stored.
LongCat-Video's umT5 embeddings are stored for the real tokens only ([n, 4096], n = the attention-mask length):
the DiT never reads pad positions (zeroed after its caption projection, or masked), so the reader pads them back
to 512 with zeros and rebuilds the mask (umt5_from_cache), at a fraction of the disk.

Every file carries its canonical key JSON in the safetensors header; readers compare it before use. A file that does
not parse (truncated, garbage) or has another key raises CacheError on load and counts as missing for build, which
rewrites it; NaN/Inf values (seen only when the tensors are read) raise on load, and load(sample, compute_fn)
re-encodes and rewrites any bad entry on the spot. Writes are atomic (temp file + fsync + os.replace), so a kill leaves either no file or a
complete one and a re-run of build resumes. Differs from SimpleTuner: its VAE key is the file stem only (no content,
size, crop or model), which silently reuses stale latents after an in-place edit or a resolution change.
"""
import atexit
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as safetensors_load, save as safetensors_bytes
from tqdm import tqdm

from checkpoint import TMP_MARK, atomic_write_bytes
from model.vae_image import latents_from_moments

FORMAT = 1  # bump when the payload or key layout changes: every old file becomes a miss
TMP_MIN_AGE_S = 300  # a dead process's temp file this old is garbage (a live write keeps touching its temp file)
TMP_MAX_AGE_S = 86400  # no atomic write lasts a day: older temp files go even if their PID is alive (reused)
RUN_MARK_MAX_AGE_S = 3 * 86400  # another host's run marker counts as live this long (its PID cannot be checked)
RUNS_DIR = ".runs"  # <cache root>/.runs/<host>-<pid>: the runs using the cache now (orphans are kept while others run)


class CacheError(RuntimeError):
    """A cache file is missing, unreadable, for another key, or holds non-finite values."""


def default_storage_dtype() -> torch.dtype:
    """bf16 on a CUDA box (half the disk), fp32 on CPU (bit-exact round trips). The dtype is part of every key."""
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _sha(obj) -> str:
    return hashlib.sha256(_canon(obj).encode()).hexdigest()


def files_fingerprint(path) -> str:
    """'relname:size:mtime_ns' of a file, or of every file under a folder (sorted). Cheap: stat only, no reads."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: no files to fingerprint")
    out = []
    for p in files:
        st = p.stat()
        out.append(f"{p.name if p == root else p.relative_to(root).as_posix()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(out)


_CONTENT_MEMO = {}  # (path, size, mtime_ns, ctime_ns, inode) -> digest, this process only: never trusted across runs


def content_fingerprint(path, st: os.stat_result | None = None) -> str:
    """'<size>-<blake2b-128 of the bytes>' of a source file: what the latent keys use, so a same-size replacement
    with its mtime put back is still a new key. Read once per file per process (memoised by path, size, mtime_ns,
    ctime_ns (which no utime can put back) and inode, within the run only)."""
    st = st or os.stat(path)
    memo = (os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if memo not in _CONTENT_MEMO:
        with open(path, "rb") as f:
            _CONTENT_MEMO[memo] = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
    return f"{st.st_size}-{_CONTENT_MEMO[memo]}"


def model_identity(config: dict, *weights: str) -> str:
    """Short hash of a model config (keys starting with '_' dropped: paths, class names) and weight fingerprints.
    E.g. model_identity(vae.config.to_dict(), files_fingerprint(root / "vae")). Add any other string that changes
    the numbers (the encode dtype, a template version) as an extra weights argument."""
    return _sha({"config": {k: v for k, v in config.items() if not k.startswith("_")}, "weights": list(weights)})[:16]


def geometry_key(g) -> dict:
    """The parts of a sample's geometry that decide its pixels: bucket (W, H), resize (W, H), crop (l, t, r, b)."""
    return {"bucket": list(g.bucket), "resize": list(g.resize), "crop": list(g.crop)}


def source_key(s) -> dict:
    """What identifies a prepared source image or clip: dataset, relative path with extension, content, geometry,
    and for a clip which frames of the file (count, sampling rate, start), so a changed num_frames or framerate
    re-encodes."""
    key = {"dataset_id": s.dataset_id, "rel": PurePosixPath(s.rel).as_posix(), "fingerprint": s.fingerprint,
           "geometry": geometry_key(s.geometry)}
    if getattr(s, "frames", None) is not None:
        key["clip"] = {"frames": s.frames, "fps": s.fps, "start": s.start}
    return key


def _safe_rel(rel) -> PurePosixPath:
    p = PurePosixPath(str(rel).replace(os.sep, "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"cache: relative path {rel!r} must stay inside its dataset folder")
    return p


def _write_atomic(path: Path, tensors: dict, metadata: dict):
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))  # hidden temp file, fsync, rename


@dataclass
class CaptionEntry:
    """What the text cache keys on: a caption (and, for Edit, the reference image Qwen sees with it)."""
    caption: str
    conditioning: Optional[object] = None


class _Cache:
    """Shared mechanics; subclasses define names, key(), _path(), group_of() and _scope()."""

    names: tuple = ()

    def __init__(self, root, identity: str, dtype: torch.dtype | None = None):
        self.root, self.identity = Path(root), identity
        self.dtype = dtype or default_storage_dtype()

    def _entry(self, sample) -> tuple[Path, dict]:
        key = self.key(sample)
        return self._path(sample, key), key

    def path_for(self, sample) -> Path:
        return self._entry(sample)[0]

    def _header_ok(self, path: Path, key: dict) -> bool:
        if not path.is_file():
            return False
        try:  # reads only the header; safetensors checks the header covers the whole file (truncation)
            with safe_open(str(path), "pt") as f:
                return (f.metadata() or {}).get("key") == _canon(key) and set(self.names) <= set(f.keys())
        except (SafetensorError, OSError, ValueError):
            return False

    def _entry_ok(self, path: Path, key: dict) -> bool:
        """Header check plus the values: an entry holding NaN/inf (a bad write, a bit flip) is rebuilt at start-up
        instead of stopping training when its sample is drawn. Reads every cached entry once per start."""
        if not self._header_ok(path, key):
            return False
        try:
            self._read(path, key)
            return True
        except CacheError as e:
            print(f"cache: rebuilding {path} ({str(e).split(': ', 1)[-1].split(';')[0]})")
            return False

    def has(self, sample) -> bool:
        """A complete file for exactly this key exists (header check only; load also checks the values)."""
        return self._header_ok(*self._entry(sample))

    def _read(self, path: Path, key: dict) -> dict:
        if not path.is_file():
            raise CacheError(f"{path}: missing; run build first")
        try:  # one read into memory: safe_open's tensors would stay mapped to a file that may be rewritten
            data = path.read_bytes()
            tensors = safetensors_load(data)  # validates the header against the file length
            meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__") or {}
            tensors = {n: tensors[n] for n in self.names}
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CacheError(f"{path}: unreadable ({e}); build() or load(..., compute_fn) rewrites it") from e
        if meta.get("key") != _canon(key):
            raise CacheError(f"{path}: header key is for another entry; build() rewrites it")
        bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
        if bad:
            raise CacheError(f"{path}: non-finite values in {bad}; load(..., compute_fn) rewrites it")
        return tensors

    def load(self, sample, compute_fn=None) -> dict:
        """name -> CPU tensor for one sample. A missing or corrupt entry raises CacheError, or is recomputed with
        compute_fn (same contract as build) and rewritten when one is given."""
        path, key = self._entry(sample)
        try:
            return self._read(path, key)
        except CacheError:
            if compute_fn is None:
                raise
        tensors = self._compute([sample], compute_fn)[0]
        self._write(path, key, tensors)
        return tensors

    def _compute(self, samples: list, compute_fn) -> list[dict]:
        out = compute_fn(samples)
        out = (out,) if len(self.names) == 1 else tuple(out)
        if len(out) != len(self.names) or any(len(o) != len(samples) for o in out):
            raise ValueError(f"compute_fn must return {self.names} with {len(samples)} items each")
        entries = [{n: o[i].detach().to("cpu", self.dtype).contiguous() for n, o in zip(self.names, out)}
                   for i in range(len(samples))]
        for sample, entry in zip(samples, entries):  # found now, at start-up, not when the sample is drawn
            bad = [n for n, t in entry.items() if not torch.isfinite(t).all()]
            if bad:
                raise CacheError(f"{getattr(sample, 'path', None) or getattr(sample, 'caption', '?')}: the encoder "
                                 f"produced non-finite {', '.join(bad)}; remove or fix that file (or lower precision)")
        return entries

    def _write(self, path: Path, key: dict, tensors: dict):
        shapes = {n: list(t.shape) for n, t in tensors.items()}
        _write_atomic(path, tensors, {"format": str(FORMAT), "key": _canon(key), "shape": _canon(shapes)})

    def build(self, samples, compute_fn, batch_size: int = 1, desc: str = "cache", rank: int = 0,
              world_size: int = 1, barrier=None) -> dict:
        """Compute and write the entries of `samples` that are missing or invalid; returns counts.

        Entries are deduplicated by path and sorted, and rank r owns every world_size-th of them (ownership does not
        depend on which files exist, so ranks never disagree, even when one starts late); it computes its missing ones
        in batches of up to batch_size samples of one group (equal latent shape), then calls barrier() so every rank
        sees all files. compute_fn(list of samples) returns one batched tensor (or list) per name in self.names.
        Interrupting (Ctrl-C) leaves only complete files; calling build again resumes."""
        entries = {}
        for s in samples:
            path, key = self._entry(s)
            entries.setdefault(str(path), (s, key))
        paths = sorted(entries)
        mine = paths[rank::world_size]
        todo = [p for p in mine if not self._entry_ok(Path(p), entries[p][1])]
        groups = {}
        for p in todo:
            groups.setdefault(self.group_of(entries[p][0]), []).append(p)
        batches = [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
        cached, new = len(mine) - len(todo), 0
        bar = tqdm(total=len(mine), initial=cached, desc=f"{desc} [rank {rank}/{world_size}]", unit="file",
                   disable=rank != 0, dynamic_ncols=True)
        bar.set_postfix(cached=cached, new=new)
        try:
            for batch in batches:
                items = self._compute([entries[p][0] for p in batch], compute_fn)
                for p, tensors in zip(batch, items):
                    self._write(Path(p), entries[p][1], tensors)
                new += len(batch)
                bar.update(len(batch))
                bar.set_postfix(cached=cached, new=new)
        finally:
            bar.close()
        if barrier is not None:
            barrier()
        return {"total": len(paths), "mine": len(mine), "cached": cached, "new": new}

    def prune(self, samples, dry_run: bool = False) -> list[Path]:
        """Delete cache files (and leftover temp files) in this cache's folders that no sample in `samples` maps to;
        returns them. Off unless called; run it on one rank, with no build in progress."""
        keep = {self.path_for(s) for s in samples}
        stale = [p for d in self._scope(samples) if d.is_dir() for p in sorted(d.rglob("*"))
                 if p.is_file() and p not in keep and (p.suffix == ".safetensors" or TMP_MARK in p.name)]
        if not dry_run:
            for p in stale:
                p.unlink(missing_ok=True)
        print(f"{self.root}: {'found' if dry_run else 'removed'} {len(stale)} stale cache file(s)")
        return stale


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def dead_temp_files(folder, now: float | None = None) -> list:
    """Temp files of atomic writes (`.<name>.tmp-<pid>`) under `folder` that no live writer can own: their PID is
    dead on this host and they are over TMP_MIN_AGE_S old (so another host's writer is done with them too), or
    they are over TMP_MAX_AGE_S old."""
    folder, now, out = Path(folder), time.time() if now is None else now, []
    for p in sorted(folder.rglob(f"*{TMP_MARK}*")) if folder.is_dir() else []:
        pid = p.name.rpartition(TMP_MARK)[2]
        try:
            age = now - p.lstat().st_mtime
        except OSError:
            continue
        dead = pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))
        if p.is_file() and (age > TMP_MAX_AGE_S or (dead and age > TMP_MIN_AGE_S)):
            out.append(p)
    return out


def _claim(root) -> list:
    """Mark `root` as used by this run (removed at exit); returns the markers of OTHER runs using it now (same
    host: a live PID; another host: younger than RUN_MARK_MAX_AGE_S). A dead same-host marker is removed."""
    runs, host = Path(root) / RUNS_DIR, socket.gethostname()
    runs.mkdir(parents=True, exist_ok=True)
    mine = runs / f"{host}-{os.getpid()}"
    if not mine.exists():
        mine.touch()
        atexit.register(lambda: mine.unlink(missing_ok=True))
    others = []
    for m in sorted(runs.iterdir()):
        m_host, _, pid = m.name.rpartition("-")
        if m == mine:
            continue
        if m_host != host:
            try:
                if time.time() - m.stat().st_mtime < RUN_MARK_MAX_AGE_S:
                    others.append(m.name)
            except OSError:
                pass
        elif pid.isdigit() and _pid_alive(int(pid)):
            others.append(m.name)
        else:
            m.unlink(missing_ok=True)
    return others


def prune_at_startup(latent_caches: dict, text_caches: list, samples: list, report: Optional[str] = None,
                     log=print) -> list:
    """Start-up clean-up (rank 0): temp files of dead processes in every cache folder, and latent entries whose
    source file is gone or has other content now (LatentCache.orphans; skipped while another run uses the same
    cache folder). Never touches an entry a current sample maps to. Prints the count, adds the list to
    data_report.json (`report`) under "cache_pruned", and returns it as [{"path", "reason"}]."""
    gone, skipped = [], []
    for ds, cache in sorted(latent_caches.items()):
        mine = [s for s in samples if s.dataset_id == ds]
        others = _claim(cache.root)
        if others and mine:
            skipped.append(f"{cache.root}: orphans kept while other runs use it ({', '.join(others)})")
        elif mine:
            gone += [(p, why) for p, why in cache.orphans(mine)]
    for root in sorted({c.root for c in [*latent_caches.values(), *text_caches]}):
        gone += [(p, "temp_file: left by a dead process") for p in dead_temp_files(root)]
    for p, _ in gone:
        p.unlink(missing_ok=True)
    listed = [{"path": str(p), "reason": why} for p, why in gone]
    log(f"cache: removed {len(gone)} orphaned or temp file(s)" + (f"; {'; '.join(skipped)}" if skipped else ""))
    if report:
        from data.discovery import add_to_report  # the report's owner
        add_to_report(report, "cache_pruned", {"removed": listed, "skipped": skipped})
    return listed


class LatentCache(_Cache):
    """VAE posterior moments per prepared image. compute_fn(samples) -> (mean, logvar), each [B, C, h, w]."""

    names = ("mean", "logvar")

    def key(self, sample) -> dict:
        return {"format": FORMAT, "kind": "vae", "source": source_key(sample), "vae": self.identity,
                "dtype": str(self.dtype)}

    def _path(self, sample, key) -> Path:
        stem = _safe_rel(sample.rel).with_suffix("")
        folder = self.root / _safe_rel(sample.dataset_id) / stem.parent
        return folder / f"{stem.name}-{_sha(key)[:12]}.safetensors"

    def group_of(self, sample):  # one encode batch = one shape: (W, H), or (W, H, F) for clips
        return tuple(getattr(sample, "bucket", None) or sample.geometry.bucket)

    def _scope(self, samples):  # only the folders of the datasets given: other datasets' caches are left alone
        return sorted({self.root / _safe_rel(s.dataset_id) for s in samples})

    def orphans(self, samples) -> list:
        """[(path, reason)] of the complete entries in the folders of `samples`' datasets whose source file (by the
        key in their header) is gone, or has other content than the current sample of that path. Entries of
        unchanged files are kept whatever their geometry or model (another config may use them), and so is any
        file a sample maps to, any file whose header does not parse (build rewrites it) and any temp file."""
        keep = {self.path_for(s) for s in samples}
        current = {(s.dataset_id, PurePosixPath(s.rel).as_posix()): s.fingerprint for s in samples}
        roots = {s.dataset_id: Path(s.path).parents[len(_safe_rel(s.rel).parts) - 1] for s in samples}
        out = []
        for p in (p for d in self._scope(samples) if d.is_dir() for p in sorted(d.rglob("*.safetensors"))):
            if p in keep or not p.is_file() or p.name.startswith("."):
                continue
            try:
                with safe_open(str(p), "pt") as f:
                    src = json.loads((f.metadata() or {}).get("key", "{}"))["source"]
                ds, rel, fp = src["dataset_id"], src["rel"], src["fingerprint"]
                source = roots[ds] / _safe_rel(rel) if ds in roots else None
            except (SafetensorError, OSError, ValueError, KeyError, TypeError):
                continue
            if (ds, rel) in current and current[(ds, rel)] != fp:
                out.append((p, f"stale_latent: {rel} has other content now"))
            elif (ds, rel) not in current and source is not None and not os.path.lexists(source):
                out.append((p, f"orphan_latent: {rel} is gone from dataset {ds}"))
        return out


class TextCache(_Cache):
    """Prompt embeddings per (caption[, reference]). compute_fn(samples) -> [B, L, D] or a list of B [L, D]."""

    names = ("prompt_embeds",)

    def __init__(self, root, identity: str, kind: str = "t2i", dtype: torch.dtype | None = None):
        if kind not in ("t2i", "edit", "umt5"):
            raise ValueError(f"text cache kind must be 't2i', 'edit' or 'umt5', got {kind!r}")
        super().__init__(root, identity, dtype)
        self.kind = kind

    def key(self, sample) -> dict:
        key = {"format": FORMAT, "kind": self.kind, "caption": sample.caption, "model": self.identity,
               "dtype": str(self.dtype)}
        if self.kind == "edit":  # Qwen2.5-VL sees the reference image: its content and geometry are part of the key
            if sample.conditioning is None:
                raise ValueError(f"{sample.rel}: an edit text embedding needs sample.conditioning (the reference)")
            key["reference"] = source_key(sample.conditioning)
        return key

    def _path(self, sample, key) -> Path:
        return self.root / f"{_sha(key)[:32]}.safetensors"

    def group_of(self, sample):  # T2I / umT5 pad every prompt to 512 tokens; Edit lengths follow the reference size
        return self.kind if self.kind != "edit" else tuple(sample.conditioning.geometry.bucket)

    def _scope(self, samples):  # the text folder is flat: pass every sample that shares it
        return [self.root]


# -----------------------------------------------------------------------------
# reading latents back, and compute_fns for the LongCat-Image models

def latents_from_cache(entry: dict, normalize, sample: bool = True, generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32):
    """Normalised diffusion-space latents from a cached (mean, logvar): one posterior draw mean + std * eps
    (sample=True, the official trainer's targets) or the mode (sample=False, inference edit references).
    normalize is vae.normalize. Moves nothing: put the entry on the training device first if wanted."""
    mean, logvar = entry["mean"].to(dtype), entry["logvar"].to(dtype)
    return normalize(latents_from_moments(mean, logvar, sample, generator))


def vae_compute_fn(vae, load_pixels):
    """compute_fn for LatentCache.build: load_pixels(sample) -> [3, H, W] in [-1, 1], already resized and cropped to
    sample.geometry; batches are encoded on the VAE's device and dtype."""
    p = next(vae.parameters())

    @torch.no_grad()
    def compute(samples):
        x = torch.stack([load_pixels(s) for s in samples]).to(p.device, p.dtype)
        return vae.encode_moments(x)
    return compute


def t2i_compute_fn(text_encoder, tokenizer):
    """compute_fn for TextCache(kind='t2i'): one batched Qwen pass over the samples' captions."""
    from model.text_qwen import encode_prompt_t2i  # transformers is only imported when text is encoded
    return lambda samples: encode_prompt_t2i(text_encoder, tokenizer, [s.caption for s in samples])


def umt5_compute_fn(text_encoder, tokenizer):
    """compute_fn for TextCache(kind='umt5') (LongCat-Video): one batched umT5 pass, each prompt's real tokens kept."""
    from model.text_umt5 import encode_prompt_umt5

    def compute(samples):
        embeds, mask = encode_prompt_umt5(text_encoder, tokenizer, [s.caption for s in samples])
        return [e[:int(n)] for e, n in zip(embeds, mask.sum(1).tolist())]  # umT5 pads on the right
    return compute


def umt5_from_cache(entries: list, max_length: int = 512):
    """Cached umT5 entries -> (embeds [B, max_length, D] zero-padded, mask [B, max_length] int64)."""
    embeds = [e["prompt_embeds"] for e in entries]
    out = embeds[0].new_zeros(len(embeds), max_length, embeds[0].shape[-1])
    mask = torch.zeros(len(embeds), max_length, dtype=torch.int64)
    for i, e in enumerate(embeds):
        out[i, :e.shape[0]], mask[i, :e.shape[0]] = e, 1
    return out, mask


def edit_compute_fn(text_encoder, tokenizer, image_processor, load_vl_image):
    """compute_fn for TextCache(kind='edit'): load_vl_image(reference sample) -> the PIL image Qwen sees (half the
    target size in the official trainer); one pass per sample, since lengths differ with the image."""
    from model.text_qwen import encode_prompt_edit
    return lambda samples: [encode_prompt_edit(text_encoder, tokenizer, image_processor, s.caption,
                                               load_vl_image(s.conditioning))[0] for s in samples]
