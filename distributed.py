"""distributed.py — several processes under torchrun for graft_t2i.py: the sampler's batches shared out and
gathered back, the fine-tuning batch split under DistributedDataParallel, rank 0 the only writer.

    torchrun --nproc_per_node 8 graft_t2i.py --preset sd2 --n_i 0.25 --device cuda --amp

A run on W processes is the one-process run computed in parts (tests/test_t2i.py checks it with 2 gloo
processes): every image gets the noise it gets in one process, the acceptance sees every image, and the
averaged gradient is the whole batch's.
"""
import functools
import os

import torch
import torch.distributed as dist


def world():
    """(rank, world size) once init has run under torchrun; (0, 1) in one process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def is_main():
    return world()[0] == 0


def init(device):
    """torchrun (WORLD_SIZE > 1): the process group, NCCL on GPUs (one per rank) and gloo on CPUs; the device
    this rank uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def mine(j, shape, n_draws, gen):
    """Whether sampler batch j is this rank's (rank r takes batches r, r + W, ...). Another rank's batch has its
    noise, n_draws tensors of `shape`, drawn from gen and dropped here, so every batch sees the generator's
    state it sees in one process."""
    rank, w = world()
    if j % w != rank:
        for _ in range(n_draws):
            torch.randn(shape, generator=gen)
    return j % w == rank


def gather(out):
    """{key: [this rank's batches]} -> {key: all ranks' batches in batch order, concatenated}, on every rank."""
    w = world()[1]
    if w > 1:
        parts = [None] * w
        dist.all_gather_object(parts, out)
        out = {k: [parts[j % w][k][j // w] for j in range(sum(len(p[k]) for p in parts))] for k in out}
    return {k: torch.cat(v) for k, v in out.items()}


@functools.lru_cache(maxsize=None)
def ddp(module):
    """module wrapped once in DistributedDataParallel under torchrun (gradients averaged over the ranks)."""
    return torch.nn.parallel.DistributedDataParallel(module) if world()[1] > 1 else module


def sum_grads(params):
    """Gradients summed over the ranks in place (a rank without one contributes zeros): for an update that
    accumulates several backward passes before its step, as DDPO's does."""
    if world()[1] > 1:
        for q in params:
            q.grad = torch.zeros_like(q) if q.grad is None else q.grad
            dist.all_reduce(q.grad)


def broadcast(obj):
    """Rank 0's value of obj on every rank."""
    box = [obj]
    if world()[1] > 1:
        dist.broadcast_object_list(box)
    return box[0]
