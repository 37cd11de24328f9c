"""Data-parallel fine-tuning: every process of a launch trains on its share of each micro-batch.

The rest of a multi-process run never talks between processes (``vlcp/store/parallel.py``: the cache is
the channel), but fine-tuning is one model trained by everybody, so here the processes join a
``torch.distributed`` group (``env://``: the ``MASTER_ADDR``/``MASTER_PORT`` that torchrun and
``accelerate launch`` set; NCCL on CUDA, gloo on CPU) for the length of the training only. This is
the data parallelism accelerate's ``prepare`` gives (gradients all-reduced every step), done by hand
because the loop keeps its own AMP scaler, EMA and checkpoint.

What makes N processes train the *same* model as one: micro-batch m holds the same samples, flips,
noise and timesteps in every process (they depend on (seed, m) only); process r takes rows
``r::N`` of it, scales its loss by its share of the rows, and the gradients are *summed* across
processes, which is the gradient of the whole micro-batch's mean loss. Every process then takes the
same optimizer step, so the weights stay equal everywhere without broadcasting them.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np

JOIN_TIMEOUT_S = 1800.0  # how long a process waits for its peers to join the training group


@dataclass(frozen=True)
class Shard:
    """This process's place in data-parallel training: rank r of n (rank 0 of 1 = not parallel)."""
    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def rows(self, n: int) -> np.ndarray:
        """Which rows of an n-row micro-batch this process computes."""
        return np.arange(self.rank, n, self.size)


ALONE = Shard()


def join(rank: int, size: int, device: str) -> Shard:
    """Join the launch's process group (once per process); every process must call it. On CUDA the
    process's own GPU becomes the current device first: NCCL (and ``sum_value``'s tensor) use it."""
    import torch.distributed as dist

    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                from vlcp.store.parallel import ParallelError

                raise ParallelError(f"data-parallel fine-tuning needs {name} in the environment (torchrun and "
                                    f"accelerate launch set it)")
        cuda = device.startswith("cuda")
        if cuda:
            import torch

            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size,
                                timeout=datetime.timedelta(seconds=JOIN_TIMEOUT_S))
    return Shard(rank, size)


def same_start(params: list, shard: Shard) -> None:
    """Every process starts from rank 0's trainable weights (a LoRA adapter's random init included), so
    the promise "same steps, same weights" does not rest on every process's RNG history."""
    if not shard.parallel:
        return
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for q in params:
            dist.broadcast(q.data, src=0)


def sum_gradients(params: list, shard: Shard) -> None:
    """Sum every parameter's gradient across processes (a process whose share was empty adds zeros).
    Flattened into buckets so a 860 M-parameter UNet takes a few collective calls, not 700."""
    if not shard.parallel:
        return
    import torch
    import torch.distributed as dist

    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    bucket: list = []
    size = 0
    for q in params:
        bucket.append(q)
        size += q.numel()
        if size >= 2 ** 25:
            _reduce(bucket, dist)
            bucket, size = [], 0
    if bucket:
        _reduce(bucket, dist)


def _reduce(bucket: list, dist) -> None:
    import torch

    flat = torch.cat([q.grad.reshape(-1) for q in bucket])
    dist.all_reduce(flat)
    offset = 0
    for q in bucket:
        q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
        offset += q.numel()


def sum_value(value: float, shard: Shard) -> float:
    """A float summed across processes (the micro-batch loss from every share)."""
    if not shard.parallel:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def leave(shard: Shard, finished: bool = True) -> None:
    """Leave the group after training (the rest of the run needs no collective). After a failure the
    barrier is skipped: the peers are stuck in a collective anyway and fail on their timeout."""
    if shard.parallel:
        import torch.distributed as dist

        if dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()
