"""
Block swap: the frozen weights of the last N transformer blocks stay off the accelerator, and each block is streamed
in just before it runs, in the forward and again in the backward (musubi's block swap: SimpleTuner's
`musubi_blocks_to_swap`; its quickstarts' block-level group offload is the same with every block swapped, k at a time).

    swap = BlockSwap(dit, num_blocks=24, device=torch.device("cuda"))   # after LoRA / quantization, before training
    loss_fn(dit(...)).backward()                                         # the training code does not change
    swap.close()                                                         # the disk store's file is removed

What moves: a swapped block's frozen parameters and buffers (QuantLinear's int8 / fp8 weights and scales included);
trainable ones (LoRA) stay resident. Where they live, `store`:
  - "cpu": one host buffer per group of blocks, pinned when the device is CUDA. On a CPU-only run this is host to
    host: no memory gain, but the whole mechanism runs (the CPU tests use it);
  - "disk": one file written once at start-up and read back with plain reads (no mmap: the pages are the kernel's
    cache, not the process's memory) into pinned staging buffers (CUDA) or straight into the resident buffers (CPU).
    For runs whose host RAM is the limit; on CPU it is what makes block swap lower the process's peak memory.
On the device there are two resident buffers ("slots") the size of the largest group; group g always uses slot g % 2,
so the group that runs and the next one (prefetched on a side stream, ordered by CUDA events) never share one.

Why a fixed slot per group: autograd keeps what a block's forward saved for its backward by reference, and that
includes views of the weights (F.linear saves weight.t()), which point into the slot's memory, not at the parameter.
Pointing `param.data` back at the weights is not enough: the backward must find them at the same addresses as the
forward did. With slot g % 2 and the same layout every time, it does.

When: each swapped block's entry method is wrapped (forward; `joint` for LongCat-Image's single blocks, which the DiT
calls directly). Forward: the block's group is made resident (a copy only if its slot holds another group), the next
group is prefetched, and after the group's last block its tensors are pointed at empty placeholders (a use out of
turn fails loudly instead of reading another group's weights). Backward: two identity autograd functions frame the
group; the one on its outputs runs before any of its backward (make it resident, prefetch the previous group), the
one on its inputs runs once every input gradient is computed, i.e. after its whole backward (point it out). Gradient
checkpointing recomputes the forward between those two, so the weights stay resident for recompute and backward
alike. Under no_grad (validation sampling) only the forward part runs. The last two groups of a forward are the first
two of the backward and the backward ends where the next forward starts (groups 1, 0): 2G - 4 group copies per
step once running (G >= 2 groups).
"""
import os

import torch
import torch.nn as nn

STORES = ("cpu", "disk")
ALIGN = 64  # every tensor starts on a 64-byte boundary of its group's buffer, so any dtype can view it


def execution_order(dit: nn.Module) -> list:
    """[(block, name of the method the DiT's forward calls)] in the order the forward runs them."""
    if hasattr(dit, "single_transformer_blocks"):  # LongCat-Image: double blocks, then single blocks via .joint
        return [(b, "forward") for b in dit.transformer_blocks] + [(b, "joint") for b in dit.single_transformer_blocks]
    return [(b, "forward") for b in dit.blocks]


def frozen_tensors(block: nn.Module) -> list:
    """What moves: the block's parameters without requires_grad and its buffers, each once."""
    seen, out = set(), []
    for t in [*block.parameters(), *block.buffers()]:
        if not t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class _Hook(torch.autograd.Function):
    """Identity on xs; its backward calls fn once the gradients of all of xs are computed."""

    @staticmethod
    def forward(ctx, fn, *xs):
        ctx.fn = fn
        ctx.set_materialize_grads(False)  # an unused output gets None, not a zero-filled gradient
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *grads):
        ctx.fn()
        return (None, *grads)


def _hooked(tree, fn):
    """`tree` (tensors in nested tuples / lists / dicts) with its tensors that require grad passed through one _Hook."""
    found = []

    def collect(x):
        if isinstance(x, torch.Tensor):
            if x.requires_grad:
                found.append(x)
        elif isinstance(x, (tuple, list)):
            for y in x:
                collect(y)
        elif isinstance(x, dict):
            for y in x.values():
                collect(y)
    collect(tree)
    if not found:
        return tree
    new = dict(zip(map(id, found), _Hook.apply(fn, *found)))

    def rebuild(x):
        if isinstance(x, torch.Tensor):
            return new.get(id(x), x)
        if isinstance(x, (tuple, list)):
            return type(x)(rebuild(y) for y in x)
        if isinstance(x, dict):
            return {k: rebuild(y) for k, y in x.items()}
        return x
    return rebuild(tree)


class BlockSwap:
    """Swaps the last `num_blocks` blocks of a LongCat DiT, `blocks_per_group` at a time (module docstring)."""

    def __init__(self, dit: nn.Module, num_blocks: int, device, store: str = "cpu", path=None,
                 blocks_per_group: int = 1, use_stream: bool = True):
        order = execution_order(dit)
        K = len(order)
        if not 0 < num_blocks <= K:
            raise ValueError(f"blocks to swap must be in 1..{K} (this DiT has {K} blocks), got {num_blocks}")
        if store not in STORES:
            raise ValueError(f"block swap store {store!r}: expected one of {', '.join(STORES)}")
        if store == "disk" and not path:
            raise ValueError("the disk store needs a file path")
        if blocks_per_group < 1:
            raise ValueError(f"blocks per group must be >= 1, got {blocks_per_group}")
        for block, _ in order[K - num_blocks:]:
            if any(type(m).__module__.startswith("bitsandbytes") for m in block.modules()):
                raise ValueError("block swap moves plain tensors: it does not support bitsandbytes layers (int8-bnb / "
                                 "nf4-bnb); use int8-quanto / fp8-torchao (our QuantLinear) for a quantized base")
        self.device, self.store, self.path, self.fd = torch.device(device), store, path, None
        self.cuda = self.device.type == "cuda"
        first = K - num_blocks
        self.groups = [list(range(s, min(s + blocks_per_group, K))) for s in range(first, K, blocks_per_group)]
        self.tensors = [[t for i in g for t in frozen_tensors(order[i][0])] for g in self.groups]
        layouts, self.sizes = [], []  # per group: [(byte offset, shape, dtype)], bytes
        for ts in self.tensors:
            layout, n = [], 0
            for t in ts:
                layout.append((n, t.shape, t.dtype))
                n += _padded(t.nbytes)
            layouts.append(layout)
            self.sizes.append(n)
        G = len(self.groups)
        self.nslots = min(2, G)
        self.occupant = [None] * self.nslots  # the group whose weights a slot holds
        self.pointed = [True] * G  # whether a group's tensors point at its weights
        self.ready = [None] * self.nslots  # CUDA: the copy into the slot is done (copy stream)
        self.released = [None] * self.nslots  # CUDA: the compute stream is done with the slot's last group
        self.placeholders = {}
        self._write_store(layouts)
        slot_bytes = max(self.sizes)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.nslots)]
        self.staging = ([torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(self.nslots)]
                        if self.cuda and store == "disk" else None)
        self.views = [[self.slots[g % self.nslots][o:].view(dtype)[:shape.numel()].view(shape)
                       for o, shape, dtype in layout] for g, layout in enumerate(layouts)]
        self.stream = torch.cuda.Stream(self.device) if self.cuda and use_stream else None
        for g, blocks in enumerate(self.groups):
            for i in blocks:
                block, name = order[i]
                setattr(block, name, self._wrap(getattr(block, name), g, i == blocks[0], i == blocks[-1]))

    # ---- the store ----------------------------------------------------------------------------------------------
    def _write_store(self, layouts):
        """cpu: one (pinned) host buffer per group; disk: one file, group after group, written to a temporary name
        and renamed, then opened for reading. Each group's tensors are pointed out (their memory freed, as nothing
        else holds it) once stored, so the store never needs a second copy of all the swapped weights."""
        if self.store == "cpu":
            self.homes = []
            for g, (ts, layout, n) in enumerate(zip(self.tensors, layouts, self.sizes)):
                home = torch.empty(n, dtype=torch.uint8, pin_memory=self.cuda)
                for t, (o, _, _) in zip(ts, layout):
                    home[o:o + t.nbytes].copy_(_as_bytes(t))
                self.homes.append(home)
                self._point_out(g)
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.file_offsets, pos = [], 0
        with open(self.path + ".tmp", "wb") as f:
            for g, (ts, layout, n) in enumerate(zip(self.tensors, layouts, self.sizes)):
                self.file_offsets.append(pos)
                for t, (o, _, _) in zip(ts, layout):
                    f.seek(pos + o)
                    f.write(_as_bytes(t).cpu().numpy().data)
                self._point_out(g)
                pos += n
            f.truncate(pos)
        os.replace(self.path + ".tmp", self.path)
        self.fd = os.open(self.path, os.O_RDONLY)

    def _read(self, g: int, out: torch.Tensor):
        """Group g's bytes from the file into `out` (plain reads, looped: one read returns at most ~2 GiB)."""
        view, done = memoryview(out.numpy()).cast("B"), 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], self.file_offsets[g] + done)
            if n <= 0:
                raise OSError(f"{self.path}: short read (the block swap file changed on disk?)")
            done += n

    def close(self):
        """Remove the disk store's file (the swapped blocks cannot run after this)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            os.remove(self.path)

    # ---- moving groups ------------------------------------------------------------------------------------------
    def _copy_in(self, g: int):
        """Copy group g into its slot (asynchronously on CUDA), first pointing out the group that held it."""
        s, n = g % self.nslots, self.sizes[g]
        prev = self.occupant[s]
        if prev is not None and self.pointed[prev]:
            self._point_out(prev)
        if not self.cuda:
            if self.store == "disk":
                self._read(g, self.slots[s][:n])
            else:
                self.slots[s][:n].copy_(self.homes[g])
        else:
            if self.store == "disk":
                if self.ready[s] is not None:
                    self.ready[s].synchronize()  # the staging buffer's previous copy has left
                self._read(g, self.staging[s][:n])
            src = self.homes[g] if self.store == "cpu" else self.staging[s][:n]
            stream = self.stream or torch.cuda.current_stream(self.device)
            with torch.cuda.stream(stream):
                if self.released[s] is not None:
                    stream.wait_event(self.released[s])  # kernels still reading the slot's previous group
                self.slots[s][:n].copy_(src, non_blocking=True)
                self.ready[s] = torch.cuda.Event()
                self.ready[s].record(stream)
        self.occupant[s] = g

    def _point_out(self, g: int):
        for t in self.tensors[g]:
            if t.dtype not in self.placeholders:
                self.placeholders[t.dtype] = torch.empty(0, dtype=t.dtype, device=self.device)
            t.data = self.placeholders[t.dtype]
        self.pointed[g] = False
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.released[g % self.nslots] = ev

    def load(self, g: int):
        """Group g resident and its tensors pointing at it; on CUDA the compute stream waits for the copy."""
        s = g % self.nslots
        if self.occupant[s] != g:
            self._copy_in(g)
        if not self.pointed[g]:
            for t, v in zip(self.tensors[g], self.views[g]):
                t.data = v
            self.pointed[g] = True
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])

    def prefetch(self, g: int):
        if 0 <= g < len(self.groups) and self.occupant[g % self.nslots] != g:
            self._copy_in(g)

    def _wrap(self, fn, g: int, first: bool, last: bool):
        """fn with group g streamed around it; first / last: the block is the group's first / last."""
        def backward_begins():
            self.load(g)
            self.prefetch(g - 1)

        def run(*args, **kwargs):
            self.load(g)
            self.prefetch(g + 1)
            track = torch.is_grad_enabled()
            if track and first:
                args, kwargs = _hooked((args, kwargs), lambda: self._point_out(g))
            out = fn(*args, **kwargs)
            if track and last:
                out = _hooked(out, backward_begins)
            if last:
                self._point_out(g)
            return out
        return run
