"""checkpoint.py and distributed.py: exact resume, RNG, atomicity, rotation, resume values, metrics, torchrun smoke."""
import ast
import json
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from checkpoint import (CorruptCheckpoint, MetricsLogger, find_checkpoints, latest_valid_checkpoint, load_checkpoint,
                        peak_memory_bytes, resolve_resume, rotate_checkpoints, rng_state, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def make_run(opt_name, seed):
    torch.manual_seed(seed), np.random.seed(seed), random.seed(seed)
    model = nn.Linear(128, 64)  # 8192 weights: over bitsandbytes' 4096 threshold, so AdamW8bit really quantises
    if opt_name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        bnb = pytest.importorskip("bitsandbytes")
        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    return model, opt, sched


def train(model, opt, sched, steps):
    for _ in range(steps):  # all three RNGs feed the loss, so resume must restore all three
        x = torch.randn(8, 128) + float(np.random.randn()) + random.random()
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def assert_same_tree(a, b, where="sd"):
    assert type(a) is type(b), f"{where}: {type(a)} vs {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}.{i}")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.mark.parametrize("opt_name", ["adamw", "adamw8bit"])
def test_resume_is_bit_exact(tmp_path, opt_name):
    # uninterrupted: 6 steps
    model, opt, sched = make_run(opt_name, seed=0)
    train(model, opt, sched, 6)
    reference = [p.detach().clone() for p in model.parameters()]

    # interrupted: 3 steps, save, a fresh process (other init, other RNG), load, 3 more steps
    model, opt, sched = make_run(opt_name, seed=0)
    train(model, opt, sched, 3)
    path = save_checkpoint(tmp_path, 3, model_tensors=model.state_dict(), optimizer=opt, lr_scheduler=sched,
                           state={"epoch": 0, "sampler": [1, 2]}, config={"lr": 1e-2})
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    model, opt, sched = make_run(opt_name, seed=123)
    ckpt = load_checkpoint(path, optimizer=opt, lr_scheduler=sched)
    model.load_state_dict(ckpt.model_tensors)
    assert (ckpt.step, ckpt.state, ckpt.config) == (3, {"epoch": 0, "sampler": [1, 2]}, {"lr": 1e-2})
    assert_same_tree(saved_opt, opt.state_dict())  # int keys, tuples, 0-dim / int steps, uint8 states: all exact
    assert_same_tree(saved_sched, sched.state_dict())
    train(model, opt, sched, 3)
    for p, ref in zip(model.parameters(), reference):
        assert torch.equal(p, ref)


def test_rng_restore(tmp_path):
    torch.randn(3), np.random.randn(), random.gauss(0, 1)  # leave numpy/python gauss caches in a non-trivial state
    path = save_checkpoint(tmp_path, 1, model_tensors={"w": torch.zeros(2)})
    draws = lambda: (torch.rand(5), np.random.randn(5), [random.random() for _ in range(5)], random.gauss(0, 1))  # noqa
    first = draws()
    load_checkpoint(path)
    again = draws()
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2:] == again[2:]


def test_rng_per_rank(tmp_path, monkeypatch):
    torch.manual_seed(1)
    s0 = rng_state()
    torch.manual_seed(2)
    s1 = rng_state()
    expected = torch.rand(4)
    path = save_checkpoint(tmp_path, 1, model_tensors={"w": torch.zeros(2)}, rng=[s0, s1])
    monkeypatch.setenv("RANK", "1")  # this process plays rank 1: it gets rank 1's stream back
    load_checkpoint(path)
    assert torch.equal(torch.rand(4), expected)
    monkeypatch.setenv("RANK", "2")  # a rank the checkpoint has no state for keeps its own stream, and says so
    msgs = []
    load_checkpoint(path, log=msgs.append)
    assert "rank 2 keeps its seeded stream" in msgs[0]


def test_scheduler_with_unstorable_field(tmp_path):
    class Warmup:  # a callable object: LambdaLR stores its __dict__, here with a function in it
        def __init__(self, n):
            self.n, self.curve = n, lambda s: s

        def __call__(self, step):
            return min(1.0, (step + 1) / self.n)

    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, Warmup(3))
    opt.step(), sched.step()
    path = save_checkpoint(tmp_path, 1, model_tensors={"w": torch.zeros(1)}, lr_scheduler=sched)
    opt2 = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, Warmup(99))
    load_checkpoint(path, lr_scheduler=sched2)
    assert sched2.lr_lambdas[0].n == 3 and callable(sched2.lr_lambdas[0].curve)
    assert sched2.last_epoch == 1 and sched2.get_last_lr() == sched.get_last_lr()


def save_steps(out, steps):
    opt = torch.optim.AdamW(nn.Linear(4, 4).parameters())
    return [save_checkpoint(out, s, model_tensors={"w": torch.full((64,), float(s))}, optimizer=opt,
                            state={"epoch": s}, config={}) for s in steps]


def test_corrupt_and_partial_checkpoints_are_skipped(tmp_path):
    paths = save_steps(tmp_path, range(1, 6))
    with open(paths[4] / "model.safetensors", "r+b") as f:  # step 5: truncated (full disk)
        f.truncate(100)
    data = bytearray((paths[3] / "model.safetensors").read_bytes())  # step 4: one flipped bit
    data[-1] ^= 1
    (paths[3] / "model.safetensors").write_bytes(bytes(data))
    (paths[2] / "training_state.json").unlink()  # step 3: a missing file
    (tmp_path / "checkpoint-6.tmp-999").mkdir()  # step 6: a crash mid-save
    (tmp_path / "checkpoint-7").mkdir()  # step 7: no manifest at all
    (tmp_path / "checkpoint-7" / "model.safetensors").write_bytes(b"x")

    msgs = []
    assert latest_valid_checkpoint(tmp_path, log=msgs.append) == paths[1]
    text = "\n".join(msgs)
    print(text)
    for name, why in [("checkpoint-6.tmp-999", "never finished"), ("checkpoint-7", "no manifest"),
                      ("checkpoint-5", "truncated"), ("checkpoint-4", "sha256"), ("checkpoint-3", "missing")]:
        assert any(name in m and why in m for m in msgs), (name, text)
    with pytest.raises(CorruptCheckpoint, match="truncated"):
        load_checkpoint(paths[4])
    assert load_checkpoint(paths[1]).state == {"epoch": 2}


def test_resave_same_step_replaces(tmp_path):
    save_checkpoint(tmp_path, 1, model_tensors={"w": torch.zeros(3)})
    save_checkpoint(tmp_path, 1, model_tensors={"w": torch.ones(3)})
    assert torch.equal(load_checkpoint(tmp_path / "checkpoint-1").model_tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-1"]


def test_rotation(tmp_path):
    paths = save_steps(tmp_path, range(1, 6))
    (tmp_path / "checkpoint-9.tmp-1").mkdir()
    rotate_checkpoints(tmp_path, 2)
    assert [s for s, _ in find_checkpoints(tmp_path)] == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-5"]
    # the checkpoint just written survives even when it is not the newest (resumed from an older step)
    save_steps(tmp_path, [2])
    rotate_checkpoints(tmp_path, 1, keep=paths[1])
    assert [s for s, _ in find_checkpoints(tmp_path)] == [2, 5]
    rotate_checkpoints(tmp_path, None)  # no limit: keep everything
    assert len(find_checkpoints(tmp_path)) == 2


def test_resolve_resume(tmp_path):
    msgs = []
    assert resolve_resume(tmp_path, None) is None and resolve_resume(tmp_path, "") is None
    assert resolve_resume(tmp_path, "latest", log=msgs.append) is None
    assert msgs == ["no checkpoint found, starting fresh"]
    paths = save_steps(tmp_path, [10, 20])
    assert resolve_resume(tmp_path, "latest") == paths[1]
    assert resolve_resume(tmp_path, "checkpoint-10") == paths[0]
    assert resolve_resume(tmp_path / "elsewhere", str(paths[0])) == paths[0]
    with pytest.raises(FileNotFoundError):
        resolve_resume(tmp_path, "checkpoint-30")
    (paths[1] / "manifest.json").write_text("{not json")
    with pytest.raises(CorruptCheckpoint, match="manifest"):
        resolve_resume(tmp_path, "checkpoint-20")
    assert resolve_resume(tmp_path, "latest", log=msgs.append) == paths[0]


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    path = save_checkpoint(tmp_path, 1, model_tensors={"w": torch.zeros(1)})
    MetricsLogger(tmp_path / "metrics.jsonl").log(1, loss=1.0)
    assert path == tmp_path / "checkpoint-1" and list(tmp_path.iterdir()) == []


def test_no_pickle_in_checkpoint_code():
    tree = ast.parse((REPO / "checkpoint.py").read_text())
    banned = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not {a.name.split(".")[0] for a in node.names} & banned
        if isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in banned
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert (node.value.id, node.attr) not in {("torch", "load"), ("np", "load"), ("numpy", "load")}
        if isinstance(node, ast.Name):
            assert node.id not in banned | {"load"}, node.id


def test_metrics_truncated_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    m = MetricsLogger(path)
    for step in range(1, 6):
        m.log(step, loss=torch.tensor(0.5), lr=1e-4, step_time=0.1, peak_mem_bytes=peak_memory_bytes("cpu"))
    m.close()
    with open(path, "a") as f:
        f.write('{"step": 6, "lo')  # torn last line from a crash
    m = MetricsLogger(path, resume_step=3)
    m.log(4, loss=0.25, grad_norm=np.float32(2.0))
    m.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["loss"] == 0.5 and rows[0]["peak_mem_bytes"] > 10**6 and rows[-1]["grad_norm"] == 2.0
    MetricsLogger(path).close()  # a fresh run starts an empty file
    assert path.read_text() == ""


SMOKE = """
import sys
import torch
sys.path.insert(0, {repo!r})
from checkpoint import load_checkpoint, rng_state, save_checkpoint
from distributed import (all_gather_object, all_reduce_mean, barrier, broadcast_object, cleanup, init_distributed,
                         print0, seed_everything, shared_seed)

d = init_distributed()
assert (d.world_size, d.backend, d.device.type, d.is_main) == (2, "gloo", "cpu", d.rank == 0), d
assert all_reduce_mean(torch.tensor([float(d.rank)])).item() == 0.5
assert broadcast_object({{"from": d.rank}}) == {{"from": 0}}
seed_everything(0, d.rank)
with shared_seed(0):
    w = torch.randn(4)  # model init: identical on both ranks
ws, ns = all_gather_object(w), all_gather_object(torch.randn(4))  # noise: different per rank
assert torch.equal(ws[0], ws[1]) and not torch.equal(ns[0], ns[1])
states = all_gather_object(rng_state())  # collective; then rank 0 alone writes
path = save_checkpoint(sys.argv[1], 1, model_tensors={{"w": w}}, rng=states)
barrier()
before = torch.randn(3)
load_checkpoint(path)  # each rank gets its own stream back
assert torch.equal(before, torch.randn(3))
print0("PRINT0 LINE")
print("RANK DONE " + str(d.rank), flush=True)  # one string: the ranks share a pipe, print writes args apart
cleanup()
"""


@pytest.mark.slow
def test_torchrun_two_process_gloo(tmp_path, torchrun):
    script = tmp_path / "smoke.py"
    script.write_text(textwrap.dedent(SMOKE.format(repo=str(REPO))))
    out = torchrun(2, script, tmp_path / "out", timeout=120)
    assert out.count("PRINT0 LINE") == 1 and "RANK DONE 0" in out and "RANK DONE 1" in out, out[-4000:]


def test_output_dir_lock_refuses_a_live_run_and_is_released_at_exit(tmp_path):
    import checkpoint
    import subprocess
    import sys
    from config import ConfigError
    repo = str(REPO)
    hold = ("import sys, time, checkpoint; checkpoint.lock_output_dir(sys.argv[1]); print('locked', flush=True); "
            "time.sleep(float(sys.argv[2])); raise KeyboardInterrupt")
    p = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path), "60"], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {p.pid} on "):
            checkpoint.lock_output_dir(tmp_path)
    finally:
        p.kill()
        p.wait()
    notes = []
    checkpoint.lock_output_dir(tmp_path, log=notes.append)  # killed: its lock is stale, taken over with a note
    assert notes and "stale lock" in notes[0]
    checkpoint.release_output_dir(tmp_path)
    assert not (tmp_path / ".lock").exists()
    r = subprocess.run([sys.executable, "-c", hold, str(tmp_path), "0"], cwd=repo, capture_output=True, text=True)
    assert r.returncode != 0 and "KeyboardInterrupt" in r.stderr and not (tmp_path / ".lock").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        checkpoint.lock_output_dir(tmp_path / "file")
