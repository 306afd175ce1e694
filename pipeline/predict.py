"""Kept for old imports (``pipeline.predict.decode_mask``, ``decode_name``): ``predict`` lives in
:mod:`pipeline.serve.predict` now, whose public names this module re-exports (and ``merge_outputs``, now
in :mod:`pipeline.serve.merge`)."""

from pipeline.serve.merge import merge_outputs
from pipeline.serve.predict import *  # noqa: F403  (the shim's whole point: every public name)
from pipeline.serve.predict import __all__ as _served

__all__ = [*_served, "merge_outputs"]
