"""Multi-process training helpers: thin wrappers over :mod:`torch.distributed` (see docs/design.md).

Under ``torchrun --nproc-per-node N ...`` each process calls :func:`init_from_env` once; the
training loops (:mod:`reconstruction.train`, :mod:`detectors.refine`, :mod:`detectors.codetr.detector`)
then wrap their model with :func:`wrap` (``DistributedDataParallel``), take their share of one
shared permutation with :func:`shard`, average validation metrics with :func:`all_reduce_mean`
and follow rank 0's stop decisions through :func:`broadcast_decision`. Only :func:`is_main`
(rank 0) writes files.

In one process (no process group, or a group of one) every helper is a no-op, so single-process
results are exactly what they were:

>>> is_distributed(), rank(), world_size(), is_main()
(False, 0, 1, True)
>>> shard([5, 2, 7]), all_reduce_mean(0.25, weight=3.0), broadcast_decision(True)
([5, 2, 7], 0.25, True)
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
_DECISION_TYPES = (bool, int, float)
# How long a rank may wait in a collective, e.g. while rank 0 evaluates a fold or trains YOLOv5u alone.
# A crashed rank does not leave the others waiting this long: torchrun then stops them all.
WAIT_MINUTES = 24 * 60.0


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of training processes (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0, the one process that writes checkpoints, logs and outputs."""
    return rank() == 0


def init_from_env(device: str = "auto", timeout_minutes: float = 30.0) -> torch.device:
    """Join the process group that ``torchrun`` describes in the environment; return this rank's device.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
    With CUDA (``device`` ``"auto"`` on a GPU machine, or ``"cuda"``) the backend is nccl and the
    device ``cuda:LOCAL_RANK`` (made the current device, so a plain ``"cuda"`` means it); otherwise
    gloo on the CPU. Without those variables, or with ``WORLD_SIZE=1``, nothing is initialised and
    the device is the single process's. Calling it again returns the same device.

    >>> init_from_env("cpu") if "WORLD_SIZE" not in os.environ else torch.device("cpu")
    device(type='cpu')
    """
    from runtime.device import resolve_device

    name = resolve_device(device)
    use_cuda = name.startswith("cuda")
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return torch.device(name)
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")))
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method="env://",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
        )
    return dev


def shutdown() -> None:
    """Leave the process group (a no-op when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard(indices: Sequence[T] | torch.Tensor | Any) -> Any:
    """This rank's share of ``indices``: every ``world_size``-th item from position ``rank``.

    Every rank draws the same permutation from the one seed and keeps its own strided share, as
    :class:`torch.utils.data.DistributedSampler` does: the shares are disjoint, cover the
    permutation, and differ in length by at most one. Sharding each global batch of ``B`` items
    gives every rank about ``B / world_size`` of them, and the union is that global batch. In one
    process ``indices`` comes back unchanged.

    >>> shard(torch.arange(4)).tolist()
    [0, 1, 2, 3]
    """
    if not is_distributed():
        return indices
    return indices[rank() :: world_size()]


def all_reduce_mean(value: float, weight: float = 1.0) -> float:
    """The mean of ``value`` over ranks, each weighted by ``weight`` (e.g. its sample count).

    Every rank gets the same number; a rank with ``weight`` 0 contributes nothing. In one process
    ``value`` comes back unchanged.
    """
    if not is_distributed():
        return float(value)
    t = torch.tensor([float(value) * float(weight), float(weight)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    total, count = t.tolist()
    return total / count if count else 0.0


def broadcast_decision(flag: T) -> T:
    """Rank 0's ``flag`` (a bool, an int code or a float) on every rank, so all ranks act alike.

    Decisions that read the clock (a wall-clock cap, the share of it used) or compare floats
    (early stopping) could differ between ranks; a rank that stops alone would leave the others
    waiting in a collective, and a learning rate that differs would split the model.
    """
    if not is_distributed():
        return flag
    if not isinstance(flag, _DECISION_TYPES):
        raise TypeError(f"a broadcast decision is a bool, an int or a float, not {type(flag).__name__}")
    t = torch.tensor([float(flag)], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=0)
    value = t.item()
    return type(flag)(value if isinstance(flag, float) else round(value))


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if is_distributed():
        dist.barrier()


def wrap(model: nn.Module, **ddp_options: Any) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when distributed, else ``model`` itself.

    DDP copies rank 0's parameters and buffers to every rank when it is built, and averages the
    gradients in ``backward``; the loops keep training through the wrapper and read weights from
    the unwrapped ``model``, whose tensors the wrapper shares.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = next(model.parameters()).device
    ids = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, **ddp_options)


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    Each rank's training forward updates its running statistics from its own share of the batch;
    syncing before validation or a checkpoint makes every rank evaluate and keep one model.
    """
    if not is_distributed():
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


def loss_scale(local: int, global_: int) -> float:
    """The factor that makes DDP's mean of per-rank mean losses the mean over the global batch.

    DDP averages gradients over ``world_size`` ranks; a rank holding ``local`` of the batch's
    ``global_`` samples scales its per-sample mean loss by ``local * world_size / global_``
    (1.0 for equal shares). In one process the factor is 1.0.

    >>> loss_scale(3, 3)
    1.0
    """
    if not is_distributed():
        return 1.0
    return local * world_size() / max(global_, 1)


def main_first(load: Callable[[], T]) -> T:
    """``load()`` on rank 0, then on the other ranks (e.g. the phantom is generated once); in one
    process just ``load()``."""
    if not is_main():
        barrier()
    value = load()
    if is_main():
        barrier()
    return value


@contextlib.contextmanager
def distributed_session(device: str) -> Iterator[None]:
    """Join torchrun's process group for the block (:func:`init_from_env`; nothing
    without torchrun) and leave it after, unless it was joined before the block."""
    joined = dist.is_available() and dist.is_initialized()
    init_from_env(device, timeout_minutes=WAIT_MINUTES)
    try:
        yield
    finally:
        if not joined:
            shutdown()
