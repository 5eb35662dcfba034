"""
BucketBatchSampler: an endless, resumable stream of batches in which every batch comes from ONE bucket of ONE dataset.
Buckets are the keys of `index.buckets`: (W, H) for images, (W, H, F) for video clips, so a video batch shares
its frame count as well as its size.

One epoch, planned up front from (seed, epoch) alone (shared/specs/vae_and_data.md §3.5, §5.2):
  1. per dataset, per bucket: every sample repeats + 1 times (SimpleTuner's `repeats`), shuffled, cut into GLOBAL
     batches of B x world_size (B = the dataset's `train_batch_size`, else the global one). A short last batch is
     filled with other samples of the same bucket (as SimpleTuner), so nothing is dropped; every sample is seen at
     least repeats + 1 times per epoch and exactly that when the bucket divides evenly;
  2. per dataset, the global batches of all its buckets are shuffled together (a bucket is drawn in proportion to
     what it has left, like the official LongCat sampler);
  3. the datasets are interleaved by weighted draws among those with batches left, weight = `probability` x number
     of samples x (repeats + 1) (SimpleTuner's default `auto-weighting`). The epoch ends when all are used up.
Rank r of W takes items [r*B, (r+1)*B) of each global batch: all ranks see the same bucket shape at every step, with
different samples, and their union is the single-process batch of size B x W.
Buckets with fewer than B x W sample occurrences are pruned with a printed note (SimpleTuner's bucket pruning); if
every bucket is pruned, DataError says to lower the batch size.
`state_dict()` = {"epoch", "position" (next global batch of that epoch), "digest"} is JSON-serialisable; loading it
continues with exactly the batch that would have come next. The digest names the sample set: a resume after the
data changed prints a warning (the plan is then a different one).
"""
import hashlib
import random
from typing import Callable

from data.buckets import bucket_label
from data.discovery import DataError


class BucketBatchSampler:
    """Iterate to get lists of `Sample` (this rank's share of one global batch), forever; `epoch` counts epochs."""

    def __init__(self, index, *, batch_size: int, seed: int = 0, world_size: int = 1, rank: int = 0,
                 log: Callable[[str], None] = print):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.epoch, self.position, self._plan = 0, 0, None
        self.groups = {}  # dataset id -> (per-rank batch size, repeats, weight, [(bucket, [Sample])])
        pruned = []
        for ds, per_bucket in index.buckets.items():
            spec = index.specs[ds]
            b, reps = spec.train_batch_size or batch_size, spec.repeats
            kept = []
            for bucket, samples in per_bucket.items():
                if len(samples) * (reps + 1) < b * world_size:
                    pruned.append(f"{ds} {bucket_label(bucket)} ({len(samples)} x {reps + 1})")
                else:
                    kept.append((bucket, samples))
            if kept:
                n = sum(len(s) for _, s in kept)
                self.groups[ds] = (b, reps, spec.probability * n * (reps + 1), kept)
        if pruned:
            log(f"note: {len(pruned)} bucket(s) hold fewer samples than one global batch (batch size x "
                f"{world_size} GPU(s)) and are not used: {', '.join(pruned)}")
        if not self.groups:
            raise DataError(f"every bucket is smaller than one global batch (train_batch_size x {world_size} "
                            "processes): lower train_batch_size, add images, or raise repeats")
        keys = sorted(f"{ds}/{s.rel}@{bucket}" for ds, g in self.groups.items() for bucket, ss in g[3] for s in ss)
        self.digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]

    def plan_epoch(self, epoch: int) -> list:
        """The epoch's global batches, in order: [(dataset id, bucket (W, H) or (W, H, F), [Sample] of B x W)]."""
        rng = random.Random(f"bucket-sampler:{self.seed}:{epoch}")
        queues, weights = {}, {}
        for ds, (b, reps, weight, kept) in self.groups.items():
            need, batches = b * self.world_size, []
            for bucket, samples in kept:
                order = [i for i in range(len(samples)) for _ in range(reps + 1)]
                rng.shuffle(order)
                short = -len(order) % need
                if short:  # fill the last batch with other samples of this bucket, distinct ones where possible
                    tail = set(order[len(order) - (need - short):])
                    others = [i for i in range(len(samples)) if i not in tail]
                    order += rng.sample(others, short) if len(others) >= short else rng.choices(range(len(samples)),
                                                                                                 k=short)
                batches += [(bucket, [samples[i] for i in order[k:k + need]]) for k in range(0, len(order), need)]
            rng.shuffle(batches)
            queues[ds], weights[ds] = batches, weight
        plan, heads = [], {ds: 0 for ds in queues}
        live = [ds for ds in queues if queues[ds]]
        while live:
            ds = rng.choices(live, weights=[weights[d] for d in live])[0]
            bucket, items = queues[ds][heads[ds]]
            plan.append((ds, bucket, items))
            heads[ds] += 1
            live = [d for d in live if heads[d] < len(queues[d])]
        return plan

    @property
    def batches_per_epoch(self) -> int:
        return len(self._epoch_plan())

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_plan(self) -> list:
        if self._plan is None or self._plan[0] != self.epoch:
            self._plan = (self.epoch, self.plan_epoch(self.epoch))
        return self._plan[1]

    def __iter__(self):
        while True:
            plan = self._epoch_plan()
            while self.position < len(plan):
                ds, _, items = plan[self.position]
                b = self.groups[ds][0]
                self.position += 1  # before the yield: a state_dict taken now resumes after this batch
                yield items[self.rank * b:(self.rank + 1) * b]
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "digest": self.digest}

    def load_state_dict(self, state: dict, log: Callable[[str], None] = print) -> None:
        if state.get("digest") not in (None, self.digest):
            log("warning: the dataset changed since this checkpoint (different samples or buckets); the batch "
                "order from here on is not the one the interrupted run would have used")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position > len(self._epoch_plan()):
            self.epoch, self.position = self.epoch + 1, 0
