"""
Block-sparse attention (BSA) for video DiT self-attention, the way LongCat-Video selects blocks.

Algorithm (see ../shared/specs/longcat_video.md §7 and ../shared/specs/kernels.md):
  1. The tokens of a (T, Hp, Wp) latent grid arrive in raster (t, y, x) order. They are reordered so that every 3D
     chunk (ct, ch, cw) is contiguous: view (Nt, ct, Nh, ch, Nw, cw) -> permute to (Nt, Nh, Nw, ct, ch, cw). Chunk i
     of the reordered sequence is block i; block-local order is (t, y, x).
  2. q and k are mean-pooled per block (per batch and per head, in fp32 here), and the block score is the plain dot
     product s_ij = mean(q_i) . mean(k_j): no 1/sqrt(D), no softmax (top-k mode).
  3. Every query block keeps the top n_sel = max(1, int((1 - sparsity) * n_k_blocks)) key blocks (Python float floor,
     so (1 - 0.9) * 100 -> 9). There is no forced diagonal block and no sink block. Selection gets no gradient.
  4. Each query token attends with exact softmax (scale 1/sqrt(D)) over the union of its block's selected key blocks;
     tokens of unselected blocks get probability 0. The output is permuted back to raster order.

Three ways to compute step 4, all fed the same block index [B, H, n_q_blocks, n_sel]:
  - `block_sparse_attention_ref`: dense attention with a token-level boolean mask, softmax in fp64 (or fp32). It does
    all S^2 work and is only a test oracle.
  - `block_sparse_attention_torch`: gathers the selected K/V blocks of every query block and runs the fused SDPA op
    over [query blocks, 1, block, n_sel*block], in chunks of query blocks small enough to stay in cache; its
    backward (`_GatheredBSA`) gathers them again per chunk, calls the fused SDPA backward op and adds the gathered
    dK/dV back into their key blocks. It really skips unselected blocks and keeps no gathered copy of K or V between
    calls, so it is the CPU / fallback path (on GPU the Triton kernels below).
  - `block_sparse_attention_triton`: a Triton forward kernel (one program per query block, online softmax over the
    selected key blocks, fp32 accumulation, logit scaling in fp32 after the dot, ragged last blocks masked, natural-log
    LSE saved) and a deterministic Triton backward (no atomics): a Delta = rowsum(dO * O) preprocess, a dK/dV kernel
    with one program per key block walking the transposed (key -> query blocks, CSR) index, and a dQ kernel with one
    program per query block over its selected key blocks. P is recomputed from the saved LSE in fp32.

Why not the released kernel: LongCat's `block_sparse_attention/` uses `tl.make_block_ptr` (removed in triton 3.9),
pre-scales K by sm_scale*log2(e) in bf16 (wrong gradients at large activation scales, kernels.md §0.3), requires
S divisible by the chunk and head_dim in {16..256}, and `torch.compile`s its gating functions. Here plain pointer
arithmetic with masks is used, so the kernel also runs under TRITON_INTERPRET=1 on CPU (kernels.md §5).

References: FlashAttention-2 (arXiv 2307.08691) for the online softmax; the Triton fused-attention tutorial
(python/tutorials/06-fused-attention.py) for the kernel shape; LongCat-Video `longcat_video/block_sparse_attention`
and FastVideo VSA (arXiv 2505.13389) for the block selection and the sparse layout.
"""
import math
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

# -----------------------------------------------------------------------------
# 3D chunk reorder and block selection (plain torch)


def _grid_blocks(grid_thw, chunk_thw):
    """(Nt, Nh, Nw) = number of chunks along each axis; asserts divisibility."""
    (T, Hp, Wp), (ct, ch, cw) = grid_thw, chunk_thw
    assert T % ct == 0 and Hp % ch == 0 and Wp % cw == 0, f"grid {grid_thw} not divisible by chunk {chunk_thw}"
    return T // ct, Hp // ch, Wp // cw


def _chunk_perm(grid_thw, chunk_thw, device):
    """perm[p] = raster position of the token at chunk-order position p (a LongTensor [S])."""
    Nt, Nh, Nw = _grid_blocks(grid_thw, chunk_thw)
    ct, ch, cw = chunk_thw
    pos = torch.arange(math.prod(grid_thw), device=device).view(Nt, ct, Nh, ch, Nw, cw)
    return pos.permute(0, 2, 4, 1, 3, 5).reshape(-1)


class _TokenGather(torch.autograd.Function):
    """y[..., p, :] = x[..., perm[p], :] for a permutation perm; backward gathers with the inverse permutation. A flat
    [-1, S, D] `index_select` is ~9x faster on CPU than the strided copy of a 9-D permute (measured, S = 16k)."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        S, D = x.shape[-2:]
        return x.reshape(-1, S, D).index_select(1, perm).view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        S, D = g.shape[-2:]
        return g.reshape(-1, S, D).index_select(1, inv).view(g.shape), None, None


def reorder_to_chunks(x, grid_thw, chunk_thw):
    """[..., S, D] in raster (t, y, x) order -> [..., S, D] with every 3D chunk contiguous: the (Nt, ct, Nh, ch, Nw,
    cw) token grid permuted to (Nt, Nh, Nw, ct, ch, cw)."""
    perm = _chunk_perm(grid_thw, chunk_thw, x.device)
    return _TokenGather.apply(x, perm, torch.argsort(perm))


def reorder_from_chunks(x, grid_thw, chunk_thw):
    """Inverse of `reorder_to_chunks`: chunk order -> raster (t, y, x) order."""
    perm = _chunk_perm(grid_thw, chunk_thw, x.device)
    return _TokenGather.apply(x, torch.argsort(perm), perm)


def num_selected_blocks(n_blocks, sparsity):
    """Top-k count of the release: int((1 - sparsity) * n) with Python float floor, at least 1."""
    return max(1, int((1.0 - sparsity) * n_blocks))


@torch.no_grad()
def select_blocks(q, k, grid_thw, chunk_thw, sparsity):
    """
    q, k: [B, H, S, D] in RASTER order over grid_thw = (T, Hp, Wp). Returns a LongTensor [B, H, n_q_blocks, n_sel]
    of selected key-block indices per query block (indices in chunk order, sorted ascending per row). Pooling and the
    block score q_bar . k_bar are computed in fp32; no gradient flows through the selection.
    """
    qc, kc = (reorder_to_chunks(t, grid_thw, chunk_thw) for t in (q, k))
    return _select_chunked(qc, kc, math.prod(chunk_thw), sparsity)


@torch.no_grad()
def _select_chunked(qc, kc, block, sparsity):
    """`select_blocks` on q, k already in chunk order (the entry reorders them once for both uses)."""
    B, H, S, D = qc.shape
    q_bar = qc.float().view(B, H, S // block, block, D).mean(dim=3)  # (B, H, n_q, D)
    k_bar = kc.float().view(B, H, kc.shape[2] // block, block, D).mean(dim=3)  # (B, H, n_k, D)
    scores = q_bar @ k_bar.transpose(-1, -2)  # (B, H, n_q, n_k)
    n_sel = num_selected_blocks(scores.shape[-1], sparsity)
    idx = scores.topk(n_sel, dim=-1).indices
    return idx.sort(dim=-1).values  # ascending: neighbouring programs read K/V in memory order


# -----------------------------------------------------------------------------
# Reference and PyTorch path (both take chunk-ordered q, k, v and a block index)


def _check_index(q, k, block_index, block):
    B, H, S, _ = q.shape
    n_q = triton.cdiv(S, block)
    assert block_index.dim() == 4 and block_index.shape[:3] == (B, H, n_q), (
        f"block_index {tuple(block_index.shape)} does not match (B, H, n_q) = {(B, H, n_q)}")


def block_sparse_attention_ref(q, k, v, block_index, block, sm_scale=None, compute_dtype=torch.float64):
    """
    Dense masked oracle. q: [B, H, Sq, D], k/v: [B, H, Sk, D] in chunk order; block_index: [B, H, n_q, n_sel] key-block
    ids per query block of `block` tokens (the last block of a sequence may be ragged). Softmax in `compute_dtype`
    over the keys of the selected blocks only; output in q's dtype. Differentiable in q, k, v.
    """
    _check_index(q, k, block_index, block)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    n_k = triton.cdiv(Sk, block)
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    allow = torch.zeros(B, H, block_index.shape[2], n_k, dtype=torch.bool, device=q.device)
    allow.scatter_(-1, block_index.long(), True)  # block mask (B, H, n_q, n_k)
    allow = allow.repeat_interleave(block, dim=2)[:, :, :Sq].repeat_interleave(block, dim=3)[..., :Sk]
    s = (q.to(compute_dtype) @ k.to(compute_dtype).transpose(-1, -2)) * sm_scale
    p = s.masked_fill(~allow, float("-inf")).softmax(dim=-1)
    return (p @ v.to(compute_dtype)).to(q.dtype)


def _pad_blocks(x, n_blocks, block):
    pad = n_blocks * block - x.shape[2]
    return F.pad(x, (0, 0, 0, pad)) if pad else x


CPU_CHUNK_BYTES = 2 << 20  # gathered K (and V) per fused-op call on CPU: a chunk stays in the L2/L3 caches
_WORKSPACE = {}  # (thread, device, dtype, slot) -> a flat buffer, grown when needed, reused by every chunk and call


def _workspace(slot, shape, like):
    """A [shape] view of a buffer kept for the next chunk: the gathered K/V are written into memory that is already
    mapped and cached instead of a fresh allocation whose pages fault in on first touch."""
    key = (threading.get_ident(), like.device, like.dtype, slot)
    n = math.prod(shape)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < n:
        buf = _WORKSPACE[key] = torch.empty(n, dtype=like.dtype, device=like.device)
    return buf[:n].view(shape)


def _gather_kv(kf, vf, rows, n_sel, D):
    """The key blocks `rows` of K and V ([n_rows, block*D] each) as [n_rows / n_sel, 1, n_sel*block, D]."""
    if kf.is_cuda:
        return (t.index_select(0, rows).view(-1, 1, n_sel * t.shape[1] // D, D) for t in (kf, vf))
    return (torch.index_select(t, 0, rows, out=_workspace(i, (rows.numel(), t.shape[1]), t))
            .view(-1, 1, n_sel * t.shape[1] // D, D) for i, t in enumerate((kf, vf)))


def _query_chunks(n_batch, n_sel, per):
    """(query blocks, their slots in the flat block index) for consecutive chunks of `per` query blocks."""
    return [(slice(a, min(a + per, n_batch)), slice(a * n_sel, min(a + per, n_batch) * n_sel))
            for a in range(0, n_batch, per)]


_POOL = [None, 0]  # the worker threads of `_on_threads` and their number, kept (and so their workspaces)


def _on_threads(fn, chunks):
    """[fn(chunks[0::n]), ..., fn(chunks[n-1::n])] on n <= torch.get_num_threads() Python threads (this one and n - 1
    pool workers), every op inside single-threaded. The fused ops release the GIL, so the chunks run in parallel
    without an OpenMP region (and its barrier) per chunk: measured at 16k tokens, D = 128, 2 cores, the backward took
    344 instead of 407 ms, and 623 instead of 1620 ms with another busy process on the machine. The split is static,
    so results are deterministic for a given thread count. Fewer than 8 chunks per thread run here, on the intra-op
    pool: after a change of the thread count the next OpenMP region re-forms its team (~5 ms, measured), which
    costs more than it saves on small inputs (4k tokens)."""
    n = min(torch.get_num_threads(), len(chunks) // 8)
    if n <= 1:
        return [fn(chunks)]
    if _POOL[1] < n - 1:  # first call, or more intra-op threads than before
        if _POOL[0] is not None:
            _POOL[0].shutdown(wait=False)
        _POOL[:] = ThreadPoolExecutor(n - 1, thread_name_prefix="bsa"), n - 1
    grad_mode = torch.is_grad_enabled()  # thread-local: the workers start with grad on

    def worker(part):
        with torch.set_grad_enabled(grad_mode):
            return fn(part)
    threads, futures = torch.get_num_threads(), []
    torch.set_num_threads(1)  # read by every thread (ATen's intra-op pool size); the workers inherit it
    try:
        futures = [_POOL[0].submit(worker, chunks[i::n]) for i in range(1, n)]
        first = fn(chunks[0::n])
    finally:
        wait(futures)
        torch.set_num_threads(threads)
    return [first] + [f.result() for f in futures]


class _GatheredBSA(torch.autograd.Function):
    """
    The torch path's attention with a hand-written backward, over chunks of query blocks. Forward, per chunk: gather
    the n_sel K/V blocks of each of its query blocks (`index_select` of [B*H*n_k, block*D] rows into a small reused
    workspace) and run the fused SDPA op on (chunk, 1, block, n_sel*block), keeping its log-sum-exp. Only q, k, v, O
    and the LSE are saved: n_sel gathered copies of K and V per layer would dominate the activation memory. Backward,
    per chunk: gather again, run the fused SDPA backward op and add the chunk's gathered dK/dV into their key blocks
    (`index_add_`, deterministic on CPU). On CPU a chunk is ~2 MB of gathered K (CPU_CHUNK_BYTES): measured at 16k
    tokens, one call over all query blocks spent half of the backward zero-filling 2 x 270 MB of fresh pages and
    streaming them through memory (D = 128); chunks that stay in cache are ~1.3x faster end to end. The chunks run
    on one Python thread per intra-op thread (`_on_threads`), not one OpenMP region each. On CUDA, where the Triton
    kernels are the real path, it is one chunk, the efficient-attention op, and autograd in the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, block_index, block, sm_scale):
        B, H, Sq, D = q.shape
        Sk = k.shape[2]
        n_q, n_k, n_sel = block_index.shape[2], triton.cdiv(Sk, block), block_index.shape[3]
        BH, n_batch = B * H, B * H * n_q
        qb = _pad_blocks(q, n_q, block).reshape(n_batch, 1, block, D)
        rows = (block_index.reshape(BH, n_q * n_sel).long()
                + n_k * torch.arange(BH, device=q.device)[:, None]).reshape(-1)  # flat key-block row per slot
        kf, vf = (_pad_blocks(t, n_k, block).reshape(BH * n_k, block * D) for t in (k, v))
        mask = None
        if Sk % block:  # ragged last key block: additive -inf on the zero padding
            valid = (torch.arange(n_k * block, device=q.device) < Sk).view(n_k, block)
            mask = torch.zeros(n_batch * n_sel, block, dtype=q.dtype, device=q.device)
            mask.masked_fill_(~valid[rows % n_k], float("-inf"))
            mask = mask.view(n_batch, 1, 1, n_sel * block)
        per = n_batch if q.is_cuda else max(1, CPU_CHUNK_BYTES // (n_sel * block * D * q.element_size()))
        o = torch.empty_like(qb)
        lse = None if q.is_cuda else q.new_empty(n_batch, 1, block, dtype=torch.promote_types(q.dtype, torch.float32))

        def attend(chunks):
            for c, r in chunks:
                k_sel, v_sel = _gather_kv(kf, vf, rows[r], n_sel, D)
                m = None if mask is None else mask[c]
                if q.is_cuda:
                    o[c] = F.scaled_dot_product_attention(qb[c], k_sel, v_sel, attn_mask=m, scale=sm_scale)
                else:
                    o[c], lse[c] = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        qb[c], k_sel, v_sel, attn_mask=m, scale=sm_scale)
        _on_threads(attend, _query_chunks(n_batch, n_sel, per))
        ctx.save_for_backward(qb, kf, vf, o, lse, rows, mask)
        ctx.shape = (B, H, Sq, Sk, D, n_q, n_k, n_sel, block, per)
        ctx.sm_scale = sm_scale
        return o.reshape(B, H, n_q * block, D)[:, :, :Sq]

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        qb, kf, vf, o, lse, rows, mask = ctx.saved_tensors
        B, H, Sq, Sk, D, n_q, n_k, n_sel, block, per = ctx.shape
        dob = _pad_blocks(do.to(qb.dtype), n_q, block).reshape(qb.shape).contiguous()
        dq = torch.empty_like(qb)

        def attend_backward(chunks):  # dq rows are disjoint per chunk; dK/dV are summed per thread
            dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
            for c, r in chunks:
                k_sel, v_sel = _gather_kv(kf, vf, rows[r], n_sel, D)
                m = None if mask is None else mask[c]
                if lse is None:  # CUDA: autograd of SDPA on the gathered tensors
                    with torch.enable_grad():
                        leaves = [t.detach().requires_grad_() for t in (qb[c], k_sel, v_sel)]
                        out = F.scaled_dot_product_attention(*leaves, attn_mask=m, scale=ctx.sm_scale)
                        dq[c], dkc, dvc = torch.autograd.grad(out, leaves, dob[c])
                else:
                    dq[c], dkc, dvc = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        dob[c], qb[c], k_sel, v_sel, o[c], lse[c], 0.0, False, attn_mask=m, scale=ctx.sm_scale)
                dk.index_add_(0, rows[r], dkc.reshape(-1, block * D))
                dv.index_add_(0, rows[r], dvc.reshape(-1, block * D))
            return dk, dv
        partial = _on_threads(attend_backward, _query_chunks(qb.shape[0], n_sel, per))
        dk, dv = (sum(t[1:], t[0]) for t in zip(*partial))
        dq = dq.reshape(B, H, n_q * block, D)[:, :, :Sq]
        dk, dv = (t.view(B, H, n_k * block, D)[:, :, :Sk] for t in (dk, dv))
        return dq, dk, dv, None, None, None


def block_sparse_attention_torch(q, k, v, block_index, block, sm_scale=None):
    """
    Same contract as `block_sparse_attention_ref`, but only the selected blocks are touched: the n_sel K/V blocks of
    every query block are gathered and the fused SDPA op runs over (query blocks, 1, block, n_sel*block), chunk by
    chunk. Autograd-capable through `_GatheredBSA` (the fused SDPA backward op per chunk, the gathered dK/dV added
    back into their key blocks). Ragged last blocks are zero-padded and masked out as keys.
    """
    _check_index(q, k, block_index, block)
    return _GatheredBSA.apply(q, k, v, block_index, block, sm_scale)


# -----------------------------------------------------------------------------
# Triton forward kernel


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, O, LSE, IDX,  #
    stride_qb, stride_qh, stride_qs, stride_qd,  #
    stride_kb, stride_kh, stride_ks, stride_kd,  #
    stride_vb, stride_vh, stride_vs, stride_vd,  #
    stride_ob, stride_oh, stride_os, stride_od,  #
    H, SQ, SK, D, N_Q, N_SEL, BLOCK, sm_scale,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,  #
):
    # one program = one query block of one (batch, head); BLOCK_M = BLOCK_N = next_pow2(BLOCK) >= 16
    qblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)  # int64 offsets: B*H*S*D can pass 2**31 at video lengths
    h = (bh % H).to(tl.int64)
    offs_m = qblk * BLOCK + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = (tl.arange(0, BLOCK_M) < BLOCK) & (offs_m < SQ)
    d_valid = offs_d < D
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp2 below; applied to fp32 logits, never to K
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    idx_row = IDX + (bh * N_Q + qblk) * N_SEL
    for j in range(0, N_SEL):
        kblk = tl.load(idx_row + j)
        offs_n = kblk * BLOCK + offs_r
        n_valid = (offs_r < BLOCK) & (offs_n < SK)
        k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd
        kT = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        if IEEE:
            s = tl.dot(q, kT, input_precision="ieee")
        else:
            s = tl.dot(q, kT)
        s = s * qk_scale  # fp32 scaling after the dot
        s = tl.where(n_valid[None, :], s, float("-inf"))
        # -- online softmax: update running max, rescale the accumulator and the row sum
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        acc = acc * alpha[:, None]
        if IEEE:
            acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new
    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # natural-log LSE of the scaled logits
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + bh * SQ + offs_m, lse, mask=m_valid)


def bsa_forward_triton(q, k, v, block_index, block, sm_scale=None, num_warps=4, num_stages=2):
    """Launch the forward kernel. Returns (o [B, H, Sq, D] in q.dtype, lse [B, H, Sq] fp32, natural log)."""
    _check_index(q, k, block_index, block)
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
    B, H, Sq, D = q.shape
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    idx = block_index.to(torch.int32).contiguous()
    n_q, n_sel = idx.shape[2], idx.shape[3]
    o = torch.empty_like(q)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    BLOCK_M = max(16, triton.next_power_of_2(block))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    grid = (n_q, B * H)
    _bsa_fwd_kernel[grid](
        q, k, v, o, lse, idx,  #
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),  #
        H, Sq, k.shape[2], D, n_q, n_sel, block, sm_scale,  #
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_M, BLOCK_D=BLOCK_D, IEEE=q.dtype == torch.float32,  #
        num_warps=num_warps, num_stages=num_stages,
    )
    return o, lse


# -----------------------------------------------------------------------------
# Triton backward kernels (deterministic: every dQ / dK / dV row is written by exactly one program, no atomics)


def transpose_block_index(block_index, n_k):
    """
    q->k block index [B, H, n_q, n_sel] -> the transposed k->q index in CSR form: (offsets [B*H, n_k + 1] int32,
    q_ids [B*H, n_q * n_sel] int32). For key block j of head bh, the query blocks that selected it are
    q_ids[bh, offsets[bh, j]:offsets[bh, j + 1]], ascending. O(B*H*n_q*n_sel) memory, no dense [n_q, n_k] mask.
    """
    B, H, n_q, n_sel = block_index.shape
    keys = block_index.reshape(B * H, n_q * n_sel).long()
    q_of = torch.arange(n_q, device=keys.device).repeat_interleave(n_sel).expand_as(keys)
    # stable sort by key id: within a key the query blocks keep their ascending (flattened) order
    keys_sorted, perm = keys.sort(dim=1, stable=True)
    q_ids = q_of.gather(1, perm)
    counts = torch.zeros(B * H, n_k, dtype=torch.long, device=keys.device)
    counts.scatter_add_(1, keys, torch.ones_like(keys))
    offsets = F.pad(counts.cumsum(1), (1, 0))
    return offsets.to(torch.int32).contiguous(), q_ids.to(torch.int32).contiguous()


@triton.jit
def _bsa_bwd_preprocess_kernel(
    O, DO, DELTA,  #
    stride_ob, stride_oh, stride_os, stride_od,  #
    stride_dob, stride_doh, stride_dos, stride_dod,  #
    H, SQ, D,  #
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,  #
):
    # Delta_i = rowsum(dO_i * O_i) in fp32, one program per BLOCK_M rows of one (batch, head)
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < SQ) & (offs_d[None, :] < D)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * SQ + offs_m, tl.sum(o * do, 1), mask=offs_m < SQ)


@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, KQ_OFF, KQ_IDX,  #
    stride_qb, stride_qh, stride_qs, stride_qd,  #
    stride_kb, stride_kh, stride_ks, stride_kd,  #
    stride_vb, stride_vh, stride_vs, stride_vd,  #
    stride_dob, stride_doh, stride_dos, stride_dod,  #
    stride_dkb, stride_dkh, stride_dks, stride_dkd,  #
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,  #
    H, SQ, SK, D, N_K, N_IDX, BLOCK, sm_scale,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,  #
):
    # one program = one key block of one (batch, head); it walks the query blocks that selected this key block
    # (transposed CSR index) and owns dK/dV of its rows, so the accumulation order is fixed: deterministic
    kblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = kblk * BLOCK + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_valid = (tl.arange(0, BLOCK_N) < BLOCK) & (offs_n < SK)
    d_valid = offs_d < D
    kv_mask = n_valid[:, None] & d_valid[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634  # applied to the fp32 logits after the dot, never to K
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    start = tl.load(KQ_OFF + bh * (N_K + 1) + kblk)
    end = tl.load(KQ_OFF + bh * (N_K + 1) + kblk + 1)
    idx_row = KQ_IDX + bh.to(tl.int64) * N_IDX
    for i in range(start, end):
        qblk = tl.load(idx_row + i)
        offs_m = qblk * BLOCK + offs_r
        m_valid = (offs_r < BLOCK) & (offs_m < SQ)
        # q^T and dO^T tiles (BLOCK_D, BLOCK_M) by pointer arithmetic
        qT = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[None, :] * stride_qs + offs_d[:, None] * stride_qd,
                     mask=m_valid[None, :] & d_valid[:, None], other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos
                     + offs_d[None, :] * stride_dod, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * SQ + offs_m, mask=m_valid, other=0.0)
        delta = tl.load(DELTA + bh.to(tl.int64) * SQ + offs_m, mask=m_valid, other=0.0)
        if IEEE:
            sT = tl.dot(k, qT, input_precision="ieee")  # (BLOCK_N, BLOCK_M) = (q k^T)^T
        else:
            sT = tl.dot(k, qT)
        pT = tl.exp2(sT * qk_scale - (lse * 1.4426950408889634)[None, :])  # P^T = exp(s * scale - lse), fp32
        pT = tl.where(n_valid[:, None] & m_valid[None, :], pT, 0.0)
        if IEEE:
            dv += tl.dot(pT.to(do.dtype), do, input_precision="ieee")
            dpT = tl.dot(v, tl.trans(do), input_precision="ieee")  # (dO v^T)^T
        else:
            dv += tl.dot(pT.to(do.dtype), do)
            dpT = tl.dot(v, tl.trans(do))
        dsT = pT * (dpT - delta[None, :])
        if IEEE:
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision="ieee")
        else:
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT))
    dk = dk * sm_scale  # fp32, after the accumulation
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bsa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, IDX,  #
    stride_qb, stride_qh, stride_qs, stride_qd,  #
    stride_kb, stride_kh, stride_ks, stride_kd,  #
    stride_vb, stride_vh, stride_vs, stride_vd,  #
    stride_dob, stride_doh, stride_dos, stride_dod,  #
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,  #
    H, SQ, SK, D, N_Q, N_SEL, BLOCK, sm_scale,  #
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,  #
):
    # one program = one query block of one (batch, head), over its selected key blocks (the forward's index)
    qblk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = qblk * BLOCK + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_valid = (tl.arange(0, BLOCK_M) < BLOCK) & (offs_m < SQ)
    d_valid = offs_d < D
    q_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
                 mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * SQ + offs_m, mask=m_valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * SQ + offs_m, mask=m_valid, other=0.0)
    qk_scale = sm_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    idx_row = IDX + (bh * N_Q + qblk) * N_SEL
    for j in range(0, N_SEL):
        kblk = tl.load(idx_row + j)
        offs_n = kblk * BLOCK + offs_r
        n_valid = (offs_r < BLOCK) & (offs_n < SK)
        kT = tl.load(K + b * stride_kb + h * stride_kh + offs_n[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        vT = tl.load(V + b * stride_vb + h * stride_vh + offs_n[None, :] * stride_vs + offs_d[:, None] * stride_vd,
                     mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, kT, input_precision="ieee")
            dp = tl.dot(do, vT, input_precision="ieee")
        else:
            s = tl.dot(q, kT)
            dp = tl.dot(do, vT)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(m_valid[:, None] & n_valid[None, :], p, 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE:
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision="ieee")
        else:
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT))
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=q_mask)


def bsa_backward_triton(do, q, k, v, o, lse, block_index, block, sm_scale=None, num_warps=4, num_stages=2):
    """
    Launch the backward kernels for `bsa_forward_triton`'s (o, lse). Returns (dq, dk, dv) in the inputs' dtype.
    Deterministic: Delta preprocess, then dK/dV per key block over the transposed index, then dQ per query block.
    """
    _check_index(q, k, block_index, block)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    sm_scale = D ** -0.5 if sm_scale is None else sm_scale
    idx = block_index.to(torch.int32).contiguous()
    n_q, n_sel, n_k = idx.shape[2], idx.shape[3], triton.cdiv(Sk, block)
    kq_off, kq_idx = transpose_block_index(idx, n_k)
    BLOCK_M = max(16, triton.next_power_of_2(block))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    IEEE = q.dtype == torch.float32
    do = do.to(q.dtype)
    lse = lse.contiguous()
    delta = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    PRE_M = 64
    _bsa_bwd_preprocess_kernel[(triton.cdiv(Sq, PRE_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, Sq, D, BLOCK_M=PRE_M, BLOCK_D=BLOCK_D)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _bsa_bwd_dkdv_kernel[(n_k, B * H)](
        q, k, v, do, lse, delta, dk, dv, kq_off, kq_idx,  #
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),  #
        H, Sq, Sk, D, n_k, kq_idx.shape[1], block, sm_scale,  #
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_M, BLOCK_D=BLOCK_D, IEEE=IEEE,  #
        num_warps=num_warps, num_stages=num_stages,
    )
    _bsa_bwd_dq_kernel[(n_q, B * H)](
        q, k, v, do, lse, delta, dq, idx,  #
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),  #
        H, Sq, Sk, D, n_q, n_sel, block, sm_scale,  #
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_M, BLOCK_D=BLOCK_D, IEEE=IEEE,  #
        num_warps=num_warps, num_stages=num_stages,
    )
    return dq, dk, dv


class _BlockSparseAttentionTriton(torch.autograd.Function):
    """Triton forward (saves O and the natural-log LSE) and Triton backward (Delta, dK/dV, dQ kernels)."""

    @staticmethod
    def forward(ctx, q, k, v, block_index, block, sm_scale):
        o, lse = bsa_forward_triton(q, k, v, block_index, block, sm_scale)
        ctx.save_for_backward(q, k, v, o, lse, block_index)
        ctx.block, ctx.sm_scale = block, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, block_index = ctx.saved_tensors
        dq, dk, dv = bsa_backward_triton(do, q, k, v, o, lse, block_index, ctx.block, ctx.sm_scale)
        return dq, dk, dv, None, None, None


def block_sparse_attention_triton(q, k, v, block_index, block, sm_scale=None):
    """Same contract as `block_sparse_attention_torch`, forward through the Triton kernel."""
    return _BlockSparseAttentionTriton.apply(q, k, v, block_index, block, sm_scale)


# -----------------------------------------------------------------------------
# Public entry


def bsa_fallback_reason(grid_thw, chunk_thw):
    """None when block-sparse attention applies to this grid, otherwise why the dense path is taken."""
    (T, Hp, Wp), (ct, ch, cw) = grid_thw, chunk_thw
    if T == 1:
        return "T == 1 (image / single latent frame): dense attention, as in the release"
    if T % ct or Hp % ch or Wp % cw:
        return f"grid (T, Hp, Wp) = {tuple(grid_thw)} is not divisible by chunk {tuple(chunk_thw)}: dense attention"
    return None


def block_sparse_attention(q, k, v, grid_thw, chunk_thw=(4, 4, 4), sparsity=0.9375, sm_scale=None, backend="auto"):
    """
    q, k, v: [B, heads, S, D] in raster (t, y, x) order over grid_thw = (T, Hp, Wp), S = T*Hp*Wp. Returns the
    block-sparse attention output in raster order, differentiable in q, k, v. backend: "auto" (Triton on CUDA, torch
    otherwise), "torch" or "triton". Falls back to dense SDPA when `bsa_fallback_reason` is not None.
    """
    T, Hp, Wp = grid_thw
    assert q.shape[2] == k.shape[2] == T * Hp * Wp, f"S = {q.shape[2]} does not match grid {tuple(grid_thw)}"
    if bsa_fallback_reason(grid_thw, chunk_thw) is not None:
        return F.scaled_dot_product_attention(q, k, v, scale=sm_scale)
    if backend == "auto":
        backend = "triton" if q.is_cuda else "torch"
    attend = {"torch": block_sparse_attention_torch, "triton": block_sparse_attention_triton}[backend]
    block = math.prod(chunk_thw)
    perm = _chunk_perm(grid_thw, chunk_thw, q.device)
    inv = torch.argsort(perm)
    qc, kc, vc = (_TokenGather.apply(t, perm, inv) for t in (q, k, v))
    oc = attend(qc, kc, vc, _select_chunked(qc, kc, block, sparsity), block, sm_scale)
    return _TokenGather.apply(oc, inv, perm)


# -----------------------------------------------------------------------------
# Benchmark (GPU): python kernels/block_sparse_attention.py

if __name__ == "__main__":
    import triton.testing

    assert torch.cuda.is_available(), "the benchmark needs a CUDA device"
    B, H, D, grid, chunk = 1, 8, 128, (16, 32, 48), (4, 4, 4)
    S = math.prod(grid)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ms_dense = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v))
    print(f"S={S} dense SDPA: {ms_dense:.3f} ms")
    for sparsity in (0.75, 0.875, 0.9375):
        ms = triton.testing.do_bench(lambda: block_sparse_attention(q, k, v, grid, chunk, sparsity, backend="triton"))
        print(f"sparsity {sparsity}: {ms:.3f} ms ({ms_dense / ms:.2f}x dense, selection included)")
