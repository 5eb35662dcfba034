"""
Context parallelism for the LongCat-Video DiT: the tokens of one clip are split over `size` ranks, Ulysses-style.

Layout. `world = cp x dp`: context-parallel groups are blocks of consecutive ranks (rank r is member r % cp of group
r // cp), data parallelism runs over the groups. The ranks of one group get the same batch; each keeps one 2D tile of
the latent H x W grid, in every frame (`cp_split_hw` = (sh, sw), the factor pair of cp closest to square with
sh <= sw, as the release picks it: 2 -> (1, 2), 4 -> (2, 2), 8 -> (2, 4)). Member r holds tile (r // sw, r % sw), its
tokens in raster (t, y, x) order within the tile.

What crosses ranks. Everything in a block is token-wise (modulation, cross-attention, FFN) except self-attention.
Around it, one all-to-all per q / k / v scatters heads and gathers the sequence: every member then holds heads/cp
heads of the WHOLE sequence, reassembled in global raster order, and the inverse all-to-all brings the attention
output back to the tiles. Because the gathered sequence is the 1-process sequence, RoPE (whole table), the cond-mode
split (first c frames), the KV cache and block-sparse attention (blocks and top-k over the global grid) are the
1-process code unchanged, and the result equals the 1-process result (the release instead splits the RoPE table and
runs BSA on its rank-tile-major order as a (T * cp, Hp / sh, Wp / sw) grid, which only matches when the tiles are
divisible by the chunk). The all-to-all is an autograd Function whose backward is the inverse all-to-all. The price
of this simplicity: every rank builds the whole RoPE table (2 x N x head_dim fp32, 173 MB for 168,960 tokens) and
the reassembly is one extra copy of q, k, v and the output per block.

Gradients. With each member's loss the mean over its own tile (equal tiles), the sum over a group of its members'
parameter gradients is cp x the gradient of the group's full loss, and DDP's mean over all cp x dp ranks is then
exactly the data-parallel mean of the full losses: plain DDP over the world, nothing to rescale.
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as tdist


def split_hw(size: int) -> tuple:
    """(sh, sw) with sh * sw = size, sh <= sw, closest to square: the release's H x W tiling for `size` ranks."""
    sh = max(d for d in range(1, math.isqrt(size) + 1) if size % d == 0)
    return sh, size // sh


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in the cp x dp layout (module docstring)."""
    size: int  # ranks per context-parallel group
    rank: int  # member index within the group
    split: tuple  # (sh, sw) tiles over the latent H x W
    group: object  # the torch.distributed group of this rank's cp members
    dp_size: int  # number of groups: data-parallel width
    dp_rank: int  # this rank's group

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This member's tile of [..., H, W] (latents, targets, a raster grid of tokens)."""
        (sh, sw), (H, W) = self.split, x.shape[-2:]
        if H % sh or W % sw:
            raise ValueError(f"a {H}x{W} grid does not split into {sh}x{sw} tiles")
        i, j = divmod(self.rank, sw)
        h, w = H // sh, W // sw
        return x[..., i * h:(i + 1) * h, j * w:(j + 1) * w]

    def tiling(self, Hp: int, Wp: int) -> "Tiling":
        """The token split of one forward over a (T, Hp, Wp) token grid (any T)."""
        sh, sw = self.split
        if Hp % sh or Wp % sw:
            raise ValueError(f"the {Hp}x{Wp} token grid (latent / 2) does not split into {sh}x{sw} tiles: video "
                             f"height and width must be multiples of {16 * sh} and {16 * sw} with context parallel "
                             f"size {self.size}")
        return Tiling(self, Hp // sh, Wp // sw)


def init_context_parallel(rank: int, world_size: int, size: int, split=None) -> ContextParallel:
    """Create the cp groups (every rank takes part in every new_group call, as torch.distributed requires) and return
    this rank's layout. split: (sh, sw), default `split_hw(size)`."""
    if size < 1 or world_size % size:
        raise ValueError(f"{world_size} process(es) cannot be split into context-parallel groups of {size} "
                         "(world size = context_parallel_size x data-parallel size)")
    split = tuple(split or split_hw(size))
    if len(split) != 2 or math.prod(split) != size:
        raise ValueError(f"cp_split_hw {list(split)} does not multiply to the context parallel size {size}")
    group = None
    for g in range(world_size // size):
        members = list(range(g * size, (g + 1) * size))
        pg = tdist.new_group(members)
        if rank in members:
            group = pg
    return ContextParallel(size, rank % size, split, group, world_size // size, rank // size)


# -----------------------------------------------------------------------------
# the all-to-all around self-attention


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x [size, ...]: slice j goes to member j; slice i of the result came from member i."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after .contiguous(): empty_like keeps strides, the collective writes row-major
    tdist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x, t: "Tiling"):
    """[B, h, T*hl*wl, D] this tile, all heads -> [B, h/cp, T*Hp*Wp, D] every token in global raster order."""
    (sh, sw), n = t.cp.split, t.cp.size
    B, h, N, D = x.shape
    T = N // (t.hl * t.wl)
    got = _all_to_all(x.reshape(B, n, h // n, N, D).transpose(0, 1), t.cp.group)  # [n, B, h/n, N, D]: tile i from i
    got = got.view(sh, sw, B, h // n, T, t.hl, t.wl, D).permute(2, 3, 4, 0, 5, 1, 6, 7)  # B, h', T, sh, hl, sw, wl
    return got.reshape(B, h // n, T * sh * t.hl * sw * t.wl, D)


def _heads_to_seq(x, t: "Tiling"):
    """Inverse of `_seq_to_heads`: [B, h/cp, T*Hp*Wp, D] raster -> [B, h, T*hl*wl, D] this tile."""
    (sh, sw), n = t.cp.split, t.cp.size
    B, h, N, D = x.shape
    T = N // (sh * t.hl * sw * t.wl)
    tiles = x.view(B, h, T, sh, t.hl, sw, t.wl, D).permute(3, 5, 0, 1, 2, 4, 6, 7).reshape(n, B, h, -1, D)
    got = _all_to_all(tiles, t.cp.group)  # [n, B, h, T*hl*wl, D]: the heads of member i for this tile
    return got.transpose(0, 1).reshape(B, n * h, -1, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tiling):
        ctx.tiling = tiling
        return _seq_to_heads(x, tiling)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.tiling), None  # a permutation of the distributed tensor: adjoint = inverse


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tiling):
        ctx.tiling = tiling
        return _heads_to_seq(x, tiling)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.tiling), None


@dataclass(frozen=True)
class Tiling:
    """One forward's split: the group and the token tile (hl, wl) each member holds, in every frame."""
    cp: ContextParallel
    hl: int
    wl: int

    @property
    def size(self) -> int:
        return self.cp.size

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h, T*hl*wl, D] this tile -> [B, h/cp, T*Hp*Wp, D] the whole sequence (raster); differentiable."""
        return _SeqToHeads.apply(x, self)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """[B, h/cp, T*Hp*Wp, D] -> [B, h, T*hl*wl, D] this tile; differentiable."""
        return _HeadsToSeq.apply(x, self)
