"""Fault injection in ``predict`` (issue 18): a disk that fills up mid-batch (``OSError(ENOSPC)`` after a
partial write, in the CSV appender or a PNG) leaves no torn output, and a rerun completes every file."""

from __future__ import annotations

import builtins
import csv
import errno
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

import scans.io
from pipeline import predict
from tests.helpers import train_quick_bundle

N_IMAGES, BATCH = 6, 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A bundle trained once (quick profile, tiny phantom, YOLOv5u without the refiner) and a folder of scans."""
    bundle, cache = train_quick_bundle(tmp_path_factory)
    root = bundle.parent
    folder = root / "in"
    folder.mkdir()
    for i, png in enumerate(sorted((cache / "phantom").rglob("*.png"))[:N_IMAGES]):
        cv2.imwrite(str(folder / f"scan{i}.png"), cv2.imread(str(png), cv2.IMREAD_GRAYSCALE))
    return bundle, folder


class FullDisk:
    """Counts output writes; the ``fail_at``-th writes half its data, then raises ``ENOSPC``."""

    def __init__(self, fail_at: int) -> None:
        self.fail_at, self.calls = fail_at, 0
        self.failed: str | None = None

    def hit(self, what: str) -> bool:
        self.calls += 1
        if self.calls == self.fail_at:
            self.failed = what
            return True
        return False

    @staticmethod
    def error() -> OSError:
        return OSError(errno.ENOSPC, "No space left on device (injected)")


class _FillingFile:
    """A text file in append mode whose writes go through :class:`FullDisk`."""

    def __init__(self, fh: Any, disk: FullDisk) -> None:
        self._fh, self._disk = fh, disk

    def write(self, text: str) -> int:
        if self._disk.hit("csv"):
            self._fh.write(text[: len(text) // 2])
            self._fh.flush()
            raise self._disk.error()
        return int(self._fh.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def _inject(mp: pytest.MonkeyPatch, disk: FullDisk) -> None:
    real_open, real_atomic = builtins.open, scans.io.atomic_write

    def filling_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        fh = real_open(file, mode, *args, **kwargs)
        return _FillingFile(fh, disk) if "a" in mode else fh

    def filling_bytes(path: Path | str, data: bytes) -> None:
        def write(tmp: Path) -> None:
            if disk.hit("png"):
                tmp.write_bytes(data[: len(data) // 2])
                raise disk.error()
            tmp.write_bytes(data)

        real_atomic(path, write)

    mp.setattr(predict, "open", filling_open, raising=False)  # the CSV appenders' open
    mp.setattr(scans.io, "atomic_write_bytes", filling_bytes)  # write_png's writer


def _assert_not_torn(out: Path) -> list[dict[str, str]]:
    """Every CSV row complete, every row's PNGs whole, no PNG (or temporary) half-written; returns the rows."""
    data = (out / "predictions.csv").read_bytes()
    assert data.endswith(b"\n"), f"torn last row: {data[-80:]!r}"
    with open(out / "predictions.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == predict.PRED_FIELDS
        rows = list(reader)
    for row in rows:
        assert None not in row and all(v is not None for v in row.values()), row
        float(row["score"])
        for key in ("overlay",):
            assert (out / row[key]).is_file(), row[key]
    pngs = [p for d in ("overlays",) if (out / d).is_dir() for p in (out / d).iterdir()]
    assert not [p.name for p in pngs if p.name.startswith(".")], "temporary files left behind"
    for png in pngs:
        assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED) is not None, f"{png} is half-written"
    return rows


# write order per run: 2 CSV headers, then per batch of 2 images 2 overlay PNGs and one CSV append
@pytest.mark.parametrize(
    ("fail_at", "writer"),
    [(3, "png"), (5, "csv"), (7, "png"), (8, "csv")],
    ids=["b1-png", "b1-csv", "b2-png", "b2-csv"],
)
def test_disk_full_leaves_no_torn_output_and_the_rerun_completes(
    trained: tuple[Path, Path], tmp_path: Path, fail_at: int, writer: str
) -> None:
    model, folder = trained
    out = tmp_path / "out"
    disk = FullDisk(fail_at)
    with pytest.MonkeyPatch.context() as mp:
        _inject(mp, disk)
        with pytest.raises(OSError) as info:
            predict.predict_folder(model, folder, out, batch_size=BATCH, progress=False, review=False, overlays=True)
    assert info.value.errno == errno.ENOSPC and disk.failed == writer
    partial = _assert_not_torn(out)
    assert len(partial) < N_IMAGES

    stats = predict.predict_folder(model, folder, out, batch_size=BATCH, progress=False, review=False, overlays=True)
    rows = _assert_not_torn(out)
    assert sorted(r["file"] for r in rows) == [f"scan{i}.png" for i in range(N_IMAGES)]
    assert stats["errors"] == 0 and stats["processed"] + stats["skipped_already_done"] == N_IMAGES
    with open(out / "errors.csv", newline="") as fh:
        assert list(csv.DictReader(fh)) == []

    # the interrupted-then-resumed folder holds what one clean run writes
    clean = tmp_path / "clean"
    predict.predict_folder(model, folder, clean, batch_size=BATCH, progress=False, review=False, overlays=True)
    ref = {r["file"]: r for r in _assert_not_torn(clean)}
    for row in rows:
        assert row == ref[row["file"]]
        for key in ("overlay",):
            np.testing.assert_array_equal(
                cv2.imread(str(out / row[key]), cv2.IMREAD_UNCHANGED),
                cv2.imread(str(clean / ref[row["file"]][key]), cv2.IMREAD_UNCHANGED),
            )
