"""Where code runs: the device resolver and torch's CPU thread settings.

Every package (``detectors``, ``reconstruction``, ``evaluation``, ``pipeline``) resolves devices and
threads the same way.

>>> resolve_device("cpu")
'cpu'
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is usable, else ``"cpu"``; explicit names pass through.

    Returns a string (``"cpu"``, ``"cuda"``, ``"cuda:1"``): ``torch.device(resolve_device(x))``
    where a tensor device is needed.
    """
    name = str(device)
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+(,\d+)*)?", name):
        raise ValueError(
            f"device must be one of {', '.join(DEVICES)} (or cuda:N, or cuda:0,1 for YOLOv5u), not {name!r}"
        )
    return name


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``/0: leave as is), then restore the setting.

    Results depend on the thread count (float reductions), so training pins it and gives it back.
    """
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def set_threads(n: int | None) -> None:
    """Pin torch's CPU thread count for the rest of the process (``None``/0: torch's default)."""
    import torch

    if n:
        torch.set_num_threads(int(n))


def runtime_info() -> dict[str, Any]:
    """How this process computes: the torchrun world size, the distributed backend (None in one
    process) and torch's CPU thread count (float reductions, hence numbers, depend on it).

    >>> sorted(runtime_info())
    ['distributed_backend', 'torch_threads', 'world_size']
    """
    import torch
    import torch.distributed as dist

    joined = dist.is_available() and dist.is_initialized()
    return {
        "world_size": dist.get_world_size() if joined else 1,
        "distributed_backend": str(dist.get_backend()) if joined else None,
        "torch_threads": torch.get_num_threads(),
    }
