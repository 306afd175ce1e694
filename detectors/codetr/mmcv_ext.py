"""Lets mmdet import on ``mmcv-lite``, the pure-Python mmcv with no compiled ``mmcv._ext``.

``mmcv.ops`` loads ``mmcv._ext`` when it is imported, although Co-DETR routes every op it calls to
torch-native code (:mod:`detectors.codetr.native_ops`). :func:`install` puts a last-resort import
finder on ``sys.meta_path``: when no real ``mmcv._ext`` exists, the import gets a stand-in module
whose every kernel raises :class:`CompiledOpMissing`, naming the op. A full mmcv (compiled
kernels, e.g. from OpenMMLab's wheels for a GPU) is found first and used; :func:`compiled_cuda_ops`
tells whether its kernels run on CUDA.

>>> install(); install()  # idempotent, and imports nothing until mmcv._ext is asked for
>>> CompiledOpMissing.__mro__[1].__name__
'RuntimeError'
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

NAME = "mmcv._ext"


class CompiledOpMissing(RuntimeError):
    """A compiled mmcv kernel was called, but the installed mmcv has none."""


def _missing(op: str) -> Callable[..., Any]:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        raise CompiledOpMissing(
            f"mmcv's compiled op {op!r} was called, but this mmcv (mmcv-lite) has no compiled kernels and LoRIS "
            f"has no torch-native route for {op!r}. Install a full mmcv 2.1.0 built for your torch "
            "(docs/design.md, 'mmcv-lite and compiled kernels')."
        )

    kernel.__name__ = op
    return kernel


class _StandInExt(types.ModuleType):
    """``mmcv._ext`` without kernels: any attribute is a function that raises :class:`CompiledOpMissing`."""

    stand_in = True

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("__"):
            raise AttributeError(op)
        return _missing(op)


class _Loader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandInExt(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _Finder(importlib.abc.MetaPathFinder):
    """Consulted after every other finder, so a real compiled ``mmcv._ext`` always wins."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != NAME:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Loader(), origin="loris stand-in (mmcv-lite)")


def install() -> None:
    """Append the stand-in finder to ``sys.meta_path`` once; call before mmcv.ops or mmdet is imported."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())


@functools.cache
def compiled_ops() -> bool:
    """Whether the installed mmcv has its real compiled ``_ext`` (a full mmcv, not mmcv-lite)."""
    install()
    try:
        ext = importlib.import_module(NAME)
    except ImportError:
        return False
    return not getattr(ext, "stand_in", False)


@functools.cache
def compiled_cuda_ops() -> bool:
    """Whether the installed mmcv's compiled kernels were built with CUDA and a GPU is present."""
    import torch

    if not (compiled_ops() and torch.cuda.is_available()):
        return False
    ext = importlib.import_module(NAME)
    try:
        return str(ext.get_compiling_cuda_version()) not in ("", "not available")
    except Exception:  # an old or partial build without the query: treat as CPU-only
        return False
