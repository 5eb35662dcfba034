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
  - `block_sparse_attention_torch`: gathers the selected K/V blocks of every query block and runs one batched SDPA
    over [B*H, n_q, block, n_sel*block]. It really skips unselected blocks and is autograd-capable. Its memory is
    n_q * n_sel * block * D per head for the gathered K and V (n_q copies of a (1 - sparsity) slice of K), so it is a
    CPU / fallback path, not the training path at 75k tokens.
  - `block_sparse_attention_triton`: a Triton forward kernel (one program per query block, online softmax over the
    selected key blocks, fp32 accumulation, logit scaling in fp32 after the dot, ragged last blocks masked, natural-log
    LSE saved). Its backward currently RECOMPUTES through the torch path (autograd of `block_sparse_attention_torch`),
    so training memory/speed is that of the torch path; dedicated dK/dV (transposed index) and dQ kernels are TODO.

Why not the released kernel: LongCat's `block_sparse_attention/` uses `tl.make_block_ptr` (removed in triton 3.9),
pre-scales K by sm_scale*log2(e) in bf16 (wrong gradients at large activation scales, kernels.md §0.3), requires
S divisible by the chunk and head_dim in {16..256}, and `torch.compile`s its gating functions. Here plain pointer
arithmetic with masks is used, so the kernel also runs under TRITON_INTERPRET=1 on CPU (kernels.md §5).

References: FlashAttention-2 (arXiv 2307.08691) for the online softmax; the Triton fused-attention tutorial
(python/tutorials/06-fused-attention.py) for the kernel shape; LongCat-Video `longcat_video/block_sparse_attention`
and FastVideo VSA (arXiv 2505.13389) for the block selection and the sparse layout.
"""
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# -----------------------------------------------------------------------------
# 3D chunk reorder and block selection (plain torch)


def _grid_blocks(grid_thw, chunk_thw):
    """(Nt, Nh, Nw) = number of chunks along each axis; asserts divisibility."""
    (T, Hp, Wp), (ct, ch, cw) = grid_thw, chunk_thw
    assert T % ct == 0 and Hp % ch == 0 and Wp % cw == 0, f"grid {grid_thw} not divisible by chunk {chunk_thw}"
    return T // ct, Hp // ch, Wp // cw


def reorder_to_chunks(x, grid_thw, chunk_thw):
    """[..., S, D] in raster (t, y, x) order -> [..., S, D] with every 3D chunk contiguous (chunk order)."""
    Nt, Nh, Nw = _grid_blocks(grid_thw, chunk_thw)
    ct, ch, cw = chunk_thw
    lead, D = x.shape[:-2], x.shape[-1]
    x = x.reshape(*lead, Nt, ct, Nh, ch, Nw, cw, D)
    n = len(lead)
    perm = list(range(n)) + [n + i for i in (0, 2, 4, 1, 3, 5)] + [n + 6]  # (Nt, Nh, Nw, ct, ch, cw)
    return x.permute(perm).reshape(*lead, -1, D)


def reorder_from_chunks(x, grid_thw, chunk_thw):
    """Inverse of `reorder_to_chunks`: chunk order -> raster (t, y, x) order."""
    Nt, Nh, Nw = _grid_blocks(grid_thw, chunk_thw)
    ct, ch, cw = chunk_thw
    lead, D = x.shape[:-2], x.shape[-1]
    x = x.reshape(*lead, Nt, Nh, Nw, ct, ch, cw, D)
    n = len(lead)
    perm = list(range(n)) + [n + i for i in (0, 3, 1, 4, 2, 5)] + [n + 6]  # back to (Nt, ct, Nh, ch, Nw, cw)
    return x.permute(perm).reshape(*lead, -1, D)


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
    block = math.prod(chunk_thw)
    qc = reorder_to_chunks(q.float(), grid_thw, chunk_thw)
    kc = reorder_to_chunks(k.float(), grid_thw, chunk_thw)
    B, H, S, D = qc.shape
    q_bar = qc.view(B, H, S // block, block, D).mean(dim=3)  # (B, H, n_q, D)
    k_bar = kc.view(B, H, kc.shape[2] // block, block, D).mean(dim=3)  # (B, H, n_k, D)
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


def block_sparse_attention_torch(q, k, v, block_index, block, sm_scale=None):
    """
    Same contract as `block_sparse_attention_ref`, but only the selected blocks are touched: the n_sel K/V blocks of
    every query block are gathered and one batched SDPA runs over (B*H, n_q, block, n_sel*block). Autograd-capable
    (gather and SDPA both have backward). Ragged last blocks are zero-padded and masked out as keys.
    """
    _check_index(q, k, block_index, block)
    B, H, Sq, D = q.shape
    Sk = k.shape[2]
    n_q, n_k, n_sel = block_index.shape[2], triton.cdiv(Sk, block), block_index.shape[3]
    qb = _pad_blocks(q, n_q, block).reshape(B * H, n_q, block, D)
    kb = _pad_blocks(k, n_k, block).reshape(B * H, n_k, block, D)
    vb = _pad_blocks(v, n_k, block).reshape(B * H, n_k, block, D)
    bh = torch.arange(B * H, device=q.device)[:, None, None]
    idx = block_index.reshape(B * H, n_q, n_sel).long()
    k_sel = kb[bh, idx].reshape(B * H, n_q, n_sel * block, D)  # (BH, n_q, n_sel*block, D)
    v_sel = vb[bh, idx].reshape(B * H, n_q, n_sel * block, D)
    mask = None
    if Sk % block:  # ragged last key block: mask the zero padding
        valid = (torch.arange(n_k * block, device=q.device) < Sk).view(n_k, block)
        mask = valid[idx].reshape(B * H, n_q, 1, n_sel * block)
    o = F.scaled_dot_product_attention(qb, k_sel, v_sel, attn_mask=mask, scale=sm_scale)
    return o.reshape(B, H, n_q * block, D)[:, :, :Sq]


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


class _BlockSparseAttentionTriton(torch.autograd.Function):
    """Triton forward; backward recomputes through `block_sparse_attention_torch` (dedicated kernels are TODO)."""

    @staticmethod
    def forward(ctx, q, k, v, block_index, block, sm_scale):
        o, lse = bsa_forward_triton(q, k, v, block_index, block, sm_scale)
        ctx.save_for_backward(q, k, v, block_index)
        ctx.block, ctx.sm_scale = block, sm_scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, block_index = ctx.saved_tensors
        with torch.enable_grad():
            q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
            o = block_sparse_attention_torch(q_, k_, v_, block_index, ctx.block, ctx.sm_scale)
            dq, dk, dv = torch.autograd.grad(o, (q_, k_, v_), do)
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
    block_index = select_blocks(q, k, grid_thw, chunk_thw, sparsity)
    qc, kc, vc = (reorder_to_chunks(t, grid_thw, chunk_thw) for t in (q, k, v))
    oc = attend(qc, kc, vc, block_index, block, sm_scale)
    return reorder_from_chunks(oc, grid_thw, chunk_thw)


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
