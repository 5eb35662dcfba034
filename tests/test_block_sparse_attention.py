"""Block-sparse attention: reorder, selection, dense-masked reference, torch path, Triton forward and backward
(interpreter)."""
import math

import pytest
import torch
import torch.nn.functional as F

import kernels.block_sparse_attention as bsa
from kernels.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_ref,
    block_sparse_attention_torch,
    block_sparse_attention_triton,
    bsa_backward_triton,
    bsa_fallback_reason,
    bsa_forward_triton,
    num_selected_blocks,
    reorder_from_chunks,
    reorder_to_chunks,
    select_blocks,
    transpose_block_index,
)


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def fp32_attention_tol(q, k):
    """A bound on the fp32 rel-L2 error of attention's output and gradients, from the inputs alone (not from how
    accurate this machine's SDPA happens to be). A logit s = q.k / sqrt(D) is rounded to ~eps32 * sum_i |q_i k_i| /
    sqrt(D) (the standard dot-product error factor), softmax turns that absolute logit error into the same relative
    error of P, and o, dq, dk, dv all inherit it; x2 for the backward's second pass over P. Measured on AVX2 and
    AVX-512 CPUs: every error <= 0.4 x eps32 x that factor, so the bound has >= 5x headroom. It still fails a kernel
    that rounds an operand to bf16 (2^-9 relative: >= 1e-2 here) or drops a block (O(1)). Floor 1e-5 for O(1) logits,
    where accumulation over the keys dominates (observed <= 4e-7)."""
    logit_abs = (q.double().abs() @ k.double().abs().transpose(-1, -2)).amax().item() / math.sqrt(q.shape[-1])
    return max(1e-5, 2 * torch.finfo(torch.float32).eps * logit_abs)


def raster_block_ids(grid_thw, chunk_thw):
    """beta(t, y, x) = ((t//ct) * Nh + y//ch) * Nw + x//cw for every raster token (spec longcat_video.md §7.2)."""
    (T, Hp, Wp), (ct, ch, cw) = grid_thw, chunk_thw
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(Hp), torch.arange(Wp), indexing="ij")
    return (((t // ct) * (Hp // ch) + y // ch) * (Wp // cw) + x // cw).flatten()


def random_index(B, H, n_q, n_k, n_sel, gen):
    rows = [torch.randperm(n_k, generator=gen)[:n_sel] for _ in range(B * H * n_q)]
    return torch.stack(rows).view(B, H, n_q, n_sel)


def qkv(B, H, S, D, scale=1.0, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, S, D, generator=gen) * scale).to(dtype) for _ in range(3)]


# -----------------------------------------------------------------------------
# reorder and selection


@pytest.mark.parametrize("grid,chunk", [((4, 4, 8), (2, 2, 4)), ((8, 4, 4), (4, 4, 4)), ((2, 6, 4), (2, 3, 2))])
def test_reorder_groups_chunks_and_roundtrips(grid, chunk):
    S, block = math.prod(grid), math.prod(chunk)
    x = torch.randn(2, 3, S, 5)
    xc = reorder_to_chunks(x, grid, chunk)
    assert torch.equal(reorder_from_chunks(xc, grid, chunk), x)
    # the token at chunk-order position p lies in block p // block, per the raster block-id formula
    ids = raster_block_ids(grid, chunk).float()[None, None, :, None]
    idc = reorder_to_chunks(ids.expand(1, 1, S, 1), grid, chunk).flatten()
    assert torch.equal(idc, (torch.arange(S) // block).float())


def test_num_selected_blocks_follows_release_floor():
    assert num_selected_blocks(100, 0.9) == 9  # (1 - 0.9) * 100 = 9.999... -> 9
    assert num_selected_blocks(64, 0.9375) == 4
    assert num_selected_blocks(64, 0.875) == 8
    assert num_selected_blocks(10, 0.99) == 1  # at least one block
    assert num_selected_blocks(7, 0.0) == 7


@pytest.mark.parametrize("B,H,grid,chunk,sparsity", [
    (1, 2, (4, 4, 8), (2, 2, 4), 0.75),
    (2, 3, (8, 4, 4), (2, 2, 2), 0.9),
    (1, 1, (4, 8, 8), (4, 4, 4), 0.99),
])
def test_select_blocks_equals_topk_on_pooled_scores(B, H, grid, chunk, sparsity):
    S = math.prod(grid)
    q, k, _ = qkv(B, H, S, 16, seed=1)
    idx = select_blocks(q, k, grid, chunk, sparsity)
    # independent pooling in raster order with the block-id formula
    beta = raster_block_ids(grid, chunk)
    n = int(beta.max()) + 1
    count = torch.bincount(beta, minlength=n).double()[:, None]
    q_bar = torch.zeros(B, H, n, 16, dtype=torch.float64).index_add_(2, beta, q.double()) / count
    k_bar = torch.zeros(B, H, n, 16, dtype=torch.float64).index_add_(2, beta, k.double()) / count
    scores = q_bar @ k_bar.transpose(-1, -2)
    n_sel = max(1, int((1 - sparsity) * n))
    expect = scores.topk(n_sel, dim=-1).indices.sort(dim=-1).values
    assert idx.dtype == torch.long and idx.shape == (B, H, n, n_sel)
    # exact top-k sets: the fp32 pooled scores are within ~16 eps32 x max|score| (< 1e-5 x) of these fp64 ones and
    # the smallest gap at the top-k cut here is >= 8e-5 x max|score|, so no near-tie can flip an index on another CPU
    # (checked, so a new case cannot bring one in)
    top = scores.topk(min(n_sel + 1, n), dim=-1).values
    if n_sel < n:
        assert (top[..., n_sel - 1] - top[..., n_sel]).min() > 1e-5 * scores.abs().max()
    assert torch.equal(idx, expect)


# -----------------------------------------------------------------------------
# reference and torch path


@pytest.mark.parametrize("S,block", [(128, 16), (100, 16)])
def test_ref_with_all_blocks_equals_dense_sdpa(S, block):
    B, H, D = 2, 2, 32
    q, k, v = qkv(B, H, S, D)
    n = math.ceil(S / block)
    idx = torch.arange(n).expand(B, H, n, n)
    out = block_sparse_attention_ref(q, k, v, idx, block)
    assert rel_l2(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double())) <= 1e-6


@pytest.mark.parametrize("B,H,S,D,block,n_sel,scale", [
    (1, 2, 128, 32, 16, 3, 1.0),
    (2, 3, 128, 16, 16, 2, 4.0),
    (1, 2, 256, 64, 32, 4, 16.0),
    (2, 1, 128, 32, 16, 1, 1.0),  # top-k = 1
    (1, 2, 120, 32, 16, 3, 4.0),  # ragged last block
    (1, 2, 120, 32, 16, 8, 1.0),  # ragged, top-k = all blocks
])
@pytest.mark.parametrize("chunk_bytes", [None, 1, 20000],
                         ids=["default-chunks", "one-query-block-per-chunk", "uneven-chunks"])
def test_torch_path_matches_ref_forward_and_grads(B, H, S, D, block, n_sel, scale, chunk_bytes, monkeypatch):
    if chunk_bytes is not None:  # the CPU path runs the fused ops per chunk of query blocks (CPU_CHUNK_BYTES)
        monkeypatch.setattr(bsa, "CPU_CHUNK_BYTES", chunk_bytes)
    q, k, v = qkv(B, H, S, D, scale=scale, seed=2)
    n = math.ceil(S / block)
    idx = random_index(B, H, n, n, n_sel, torch.Generator().manual_seed(3))
    do = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(4))

    def run(fn, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        o = fn(*leaves)
        o.backward(do.to(dtype))
        return [o] + [t.grad for t in leaves]

    ref = run(lambda *t: block_sparse_attention_ref(*t, idx, block), torch.float64)
    fp64 = run(lambda *t: block_sparse_attention_torch(*t, idx, block), torch.float64)
    fp32 = run(lambda *t: block_sparse_attention_torch(*t, idx, block), torch.float32)
    tol = fp32_attention_tol(q, k)
    for name, a64, a32, r in zip(["o", "dq", "dk", "dv"], fp64, fp32, ref):
        assert rel_l2(a64, r) <= 1e-12, f"{name} fp64"  # same algorithm: exact up to fp64 rounding
        assert rel_l2(a32, r) <= tol, f"{name} fp32: {rel_l2(a32, r):.2e} > {tol:.2e}"


def test_torch_path_threads_are_deterministic(monkeypatch):
    """The CPU chunks run on torch.get_num_threads() Python threads with a static split: two runs are bit-identical,
    and one thread gives the same result up to the order of the dK/dV sums."""
    monkeypatch.setattr(bsa, "CPU_CHUNK_BYTES", 1)  # one query block per chunk: many chunks per thread
    q, k, v = qkv(2, 2, 128, 32, seed=5)
    idx = random_index(2, 2, 8, 8, 3, torch.Generator().manual_seed(6))
    do = torch.randn(2, 2, 128, 32, generator=torch.Generator().manual_seed(7))

    def run(threads):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = block_sparse_attention_torch(*leaves, idx, 16)
        o.backward(do)
        return [o] + [t.grad for t in leaves]

    threads = torch.get_num_threads()
    try:
        a, b, one = run(3), run(3), run(1)
    finally:
        monkeypatch.undo()
        torch.set_num_threads(threads)  # _on_threads restores the count it read: the patched 3
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(rel_l2(x, y) < 1e-6 for x, y in zip(a, one))


def test_index_shape_is_checked():
    q, k, v = qkv(1, 2, 64, 16)
    with pytest.raises(AssertionError):
        block_sparse_attention_torch(q, k, v, torch.zeros(1, 2, 3, 1, dtype=torch.long), 16)


# -----------------------------------------------------------------------------
# public entry


def test_entry_sparsity_zero_equals_dense_sdpa():
    grid, chunk = (4, 4, 8), (2, 2, 4)
    q, k, v = qkv(2, 2, math.prod(grid), 32, seed=5)
    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    out = block_sparse_attention(*leaves[0], grid, chunk, sparsity=0.0)
    ref = F.scaled_dot_product_attention(*leaves[1])
    assert rel_l2(out, ref) <= 1e-5
    do = torch.randn_like(out)
    out.backward(do)
    ref.backward(do)
    for a, b in zip(leaves[0], leaves[1]):
        assert rel_l2(a.grad, b.grad) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_entry_matches_raster_order_mask_reference(backend):
    # spec §7.2: allow[a, b] = M[beta(a), beta(b)], masked softmax in the original raster order, no reordering
    grid, chunk, sparsity = (4, 4, 8), (2, 2, 4), 0.7
    B, H, D = 1, 2, 32
    q, k, v = qkv(B, H, math.prod(grid), D, seed=6)
    out = block_sparse_attention(q, k, v, grid, chunk, sparsity, backend=backend)
    idx = select_blocks(q, k, grid, chunk, sparsity)
    beta = raster_block_ids(grid, chunk)
    M = torch.zeros(B, H, idx.shape[2], idx.shape[2], dtype=torch.bool).scatter_(-1, idx, True)
    allow = M[:, :, beta][:, :, :, beta]
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    ref = s.masked_fill(~allow, float("-inf")).softmax(-1) @ v.double()
    assert rel_l2(out, ref) <= 1e-5


@pytest.mark.parametrize("grid,chunk", [((1, 8, 8), (4, 4, 4)), ((6, 8, 8), (4, 4, 4)), ((4, 6, 8), (4, 4, 4))])
def test_entry_dense_fallback(grid, chunk):
    assert bsa_fallback_reason(grid, chunk) is not None
    q, k, v = qkv(1, 2, math.prod(grid), 16)
    out = block_sparse_attention(q, k, v, grid, chunk, sparsity=0.9)
    # the fallback is this very SDPA call on the same tensors (same op, same shapes): exact on any CPU
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v))
    assert bsa_fallback_reason((4, 8, 8), (4, 4, 4)) is None


# -----------------------------------------------------------------------------
# Triton forward (TRITON_INTERPRET=1 on CPU, see tests/conftest.py)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("B,H,S,D,block,n_sel,scale", [
    (1, 2, 128, 32, 16, 3, 1.0),
    (2, 1, 256, 64, 32, 2, 4.0),
    (1, 2, 120, 16, 16, 1, 16.0),  # ragged last block, top-k = 1
    (1, 1, 144, 24, 48, 2, 1.0),  # non-power-of-2 block (4x4x3) and head dim
])
def test_triton_forward_matches_ref(B, H, S, D, block, n_sel, scale, dtype, tol):
    q, k, v = qkv(B, H, S, D, scale=scale, dtype=dtype, seed=7)
    n = math.ceil(S / block)
    idx = random_index(B, H, n, n, n_sel, torch.Generator().manual_seed(8))
    o, lse = bsa_forward_triton(q, k, v, idx, block)
    ref = block_sparse_attention_ref(q.double(), k.double(), v.double(), idx, block)
    assert o.dtype == dtype and rel_l2(o, ref) <= tol
    # log-sum-exp over the selected keys of the scaled logits
    allow = torch.zeros(B, H, n, n, dtype=torch.bool).scatter_(-1, idx, True)
    allow = allow.repeat_interleave(block, 2)[:, :, :S].repeat_interleave(block, 3)[..., :S]
    s = (q.double() @ k.double().transpose(-1, -2)) * D ** -0.5
    lse_ref = s.masked_fill(~allow, float("-inf")).logsumexp(-1)
    assert rel_l2(lse, lse_ref) <= tol


def test_triton_autograd_matches_torch_path():
    B, H, S, D, block = 1, 2, 128, 32, 16
    q, k, v = qkv(B, H, S, D, scale=4.0, seed=9)
    idx = random_index(B, H, 8, 8, 3, torch.Generator().manual_seed(10))
    do = torch.randn(B, H, S, D)
    grads = []
    for fn in (block_sparse_attention_triton, block_sparse_attention_torch):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*leaves, idx, block).backward(do)
        grads.append([t.grad for t in leaves])
    for a, b in zip(*grads):
        assert rel_l2(a, b) <= 2 * fp32_attention_tol(q, k)  # two fp32 implementations, each within the bound of fp64


def test_triton_forward_never_reads_padding():
    # NaN-poisoned storage around strided views: a missing mask on the ragged sequence tail or on the padded head dim
    # would put NaN into the output (the interpreter does not catch out-of-bounds reads itself)
    B, H, S, D, block = 1, 2, 120, 24, 16
    q, k, v = qkv(B, H, S, D, seed=11)
    views = []
    for t in (q, k, v):
        big = torch.full((B, H, S + 40, D + 8), float("nan"))
        big[:, :, :S, :D] = t
        views.append(big[:, :, :S, :D])  # non-contiguous, NaN right after every row and after the last token
    idx = random_index(B, H, 8, 8, 3, torch.Generator().manual_seed(12))
    o, lse = bsa_forward_triton(*views, idx, block)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert rel_l2(o, block_sparse_attention_ref(q, k, v, idx, block)) <= 1e-5


# -----------------------------------------------------------------------------
# Triton backward (Delta preprocess, dK/dV over the transposed index, dQ), interpreter


def test_transpose_block_index_lists_selecting_query_blocks():
    B, H, n_q, n_k, n_sel = 2, 3, 5, 7, 3
    idx = random_index(B, H, n_q, n_k, n_sel, torch.Generator().manual_seed(20))
    off, q_ids = transpose_block_index(idx, n_k)
    assert off.shape == (B * H, n_k + 1) and q_ids.shape == (B * H, n_q * n_sel)
    allow = torch.zeros(B * H, n_q, n_k, dtype=torch.bool).scatter_(-1, idx.view(B * H, n_q, n_sel), True)
    for bh in range(B * H):
        for j in range(n_k):
            got = q_ids[bh, off[bh, j]:off[bh, j + 1]].tolist()
            assert got == allow[bh, :, j].nonzero().flatten().tolist()  # ascending query-block ids


def _grads(fn, q, k, v, do, dtype):
    leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
    o = fn(*leaves)
    o.backward(do.to(dtype))
    return [o] + [t.grad for t in leaves]


@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("B,H,Sq,Sk,D,block,n_sel", [
    (1, 2, 48, 48, 16, 16, 1),  # top-k = 1, 3 blocks per axis
    (2, 3, 40, 40, 32, 16, 2),  # several batches and heads, ragged last block (8 of 16 tokens)
    (1, 2, 160, 160, 32, 64, 2),  # 64-token blocks, ragged last block (32 of 64)
    (1, 2, 48, 80, 16, 16, 3),  # Sq != Sk (the cond-mode noise call), ragged key tail
])
def test_triton_backward_matches_ref(B, H, Sq, Sk, D, block, n_sel, scale):
    gen = torch.Generator().manual_seed(21)
    q = torch.randn(B, H, Sq, D, generator=gen) * scale
    k = torch.randn(B, H, Sk, D, generator=gen) * scale
    v = torch.randn(B, H, Sk, D, generator=gen)
    do = torch.randn(B, H, Sq, D, generator=gen)
    idx = random_index(B, H, math.ceil(Sq / block), math.ceil(Sk / block), n_sel, gen)
    got = _grads(lambda *t: block_sparse_attention_triton(*t, idx, block), q, k, v, do, torch.float32)
    ref = _grads(lambda *t: block_sparse_attention_ref(*t, idx, block), q, k, v, do, torch.float64)
    tol = fp32_attention_tol(q, k)  # 1e-5 at x1, up to ~4e-4 at x16 where the softmax saturates
    for name, a, r in zip(["o", "dq", "dk", "dv"], got, ref):
        assert torch.isfinite(a).all(), name
        assert rel_l2(a, r) <= tol, f"{name}: {rel_l2(a, r):.2e} > {tol:.2e}"


@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_triton_backward_all_blocks_equals_dense_sdpa(scale):
    B, H, S, D, block = 2, 2, 40, 32, 16  # 3 blocks, the last one ragged
    q, k, v = qkv(B, H, S, D, scale=scale, seed=22)
    do = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(23))
    n = math.ceil(S / block)
    idx = torch.arange(n).expand(B, H, n, n)
    got = _grads(lambda *t: block_sparse_attention_triton(*t, idx, block), q, k, v, do, torch.float32)
    ref = _grads(F.scaled_dot_product_attention, q, k, v, do, torch.float64)
    tol = fp32_attention_tol(q, k)
    for name, a, r in zip(["o", "dq", "dk", "dv"], got, ref):
        assert rel_l2(a, r) <= tol, f"{name}: {rel_l2(a, r):.2e} > {tol:.2e}"


def test_triton_backward_fp16_and_deterministic():
    B, H, S, D, block = 1, 2, 48, 32, 16
    q, k, v = qkv(B, H, S, D, seed=24)  # x1: at x4 fp16 dS / P operands alone cost ~4e-3 on dq
    do = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(25))
    idx = random_index(B, H, 3, 3, 2, torch.Generator().manual_seed(26))
    ref = _grads(lambda *t: block_sparse_attention_ref(*t, idx, block), q, k, v, do, torch.float64)
    runs = [_grads(lambda *t: block_sparse_attention_triton(*t, idx, block), q, k, v, do, torch.float16)
            for _ in range(2)]
    for name, a, b, r in zip(["o", "dq", "dk", "dv"], *runs, ref):
        assert a.dtype == torch.float16 and rel_l2(a, r) <= 2e-3, name
        assert torch.equal(a, b), f"{name} not bitwise reproducible"  # no atomics: fixed accumulation order


def test_triton_backward_never_reads_padding():
    # NaN right after every row and after the last token of q, k, v, o, dO (non-contiguous views): a missing mask in
    # any of the three backward kernels would put NaN into dq / dk / dv
    B, H, S, D, block = 1, 2, 40, 24, 16
    q, k, v = qkv(B, H, S, D, seed=27)
    do = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(28))
    idx = random_index(B, H, 3, 3, 2, torch.Generator().manual_seed(29))
    o, lse = bsa_forward_triton(q, k, v, idx, block)

    def poisoned(t):
        big = torch.full((B, H, S + 40, D + 8), float("nan"))
        big[:, :, :S, :D] = t
        return big[:, :, :S, :D]

    dq, dk, dv = bsa_backward_triton(*(poisoned(t) for t in (do, q, k, v, o)), lse, idx, block)
    ref = _grads(lambda *t: block_sparse_attention_ref(*t, idx, block), q, k, v, do, torch.float64)
    for name, a, r in zip(["dq", "dk", "dv"], (dq, dk, dv), ref[1:]):
        assert torch.isfinite(a).all() and rel_l2(a, r) <= 1e-5, name
