"""Importers: annotations made in other tools -> a LoRIS dataset folder.

``python -m scans import --from FORMAT SRC --out DIR [--meta FILE] [--patient-pattern REGEX]
[--label NAME] [--masks DIR]``. Each format is one converter module with a ``read(src) -> Source``
function, registered by name in :data:`FORMATS`; everything else (sizes, the one-box rule, patient
ids, labels, masks, splits, the atomic write and the final ``scans check``) is the shared core,
:mod:`scans.importers.core`. A new format is one module plus one line here.

>>> sorted(FORMATS)
['csv', 'cvat', 'labelme', 'voc', 'yolo']
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from scans.check import Problem
from scans.importers.core import ImportRefused, Options, Source, build, write

# format name -> converter module (each defines read(src: Path) -> Source and a docstring on its layout)
FORMATS: dict[str, str] = {
    "yolo": "scans.importers.yolo",
    "voc": "scans.importers.voc",
    "labelme": "scans.importers.labelme",
    "cvat": "scans.importers.cvat",
    "csv": "scans.importers.table",
}


def converter(name: str) -> Callable[[Path], Source]:
    """The ``read`` function of the converter registered as ``name``."""
    if name not in FORMATS:
        raise ValueError(f"unknown import format {name!r}; known: {', '.join(sorted(FORMATS))}")
    read: Callable[[Path], Source] = importlib.import_module(FORMATS[name]).read
    return read


def import_dataset(fmt: str, src: Path | str, out: Path | str, options: Options | None = None) -> Path:
    """Convert ``src`` (in format ``fmt``) into the LoRIS dataset folder ``out``.

    Raises:
        ImportRefused: listing every missing or ambiguous item per file; nothing is written.
        ValueError: for an unknown format or an invalid ``--patient-pattern``.
    """
    src = Path(src)
    if not src.exists():
        raise ImportRefused([Problem(str(src), "source not found")])
    source = converter(fmt)(src)
    return write(build(source, options or Options()), out)


__all__ = ["FORMATS", "ImportRefused", "Options", "Source", "converter", "import_dataset"]
