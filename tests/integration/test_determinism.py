"""Same command and seed, same numbers: two runs that each train from scratch must agree exactly.

Every model trains for a budget counted in epochs or steps (no wall-clock cap by default), so two
runs with separate, empty caches (each generates its phantom and trains every model) must write
identical metrics; only timings and paths may differ. Both runs use the same torch thread count:
results across different thread counts are not guaranteed to be bit-identical (parallel
reductions may sum in another order).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from pipeline.__main__ import main

pytestmark = pytest.mark.integration  # end to end across packages (issue 27: tests/integration/)

# keys whose values are wall-clock times, cache locations or paths, not results
VOLATILE = {
    "timing",
    "fit_s",
    "seconds",
    "refiner_seconds",
    "cache",
    "cached",
    "data",
    "trained_on",
    "out",
    "commit",
    "created",
    "versions",
}


def _strip(obj: Any, roots: tuple[str, ...]) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v, roots) for k, v in obj.items() if k not in VOLATILE and not k.endswith(("_s", "seconds"))}
    if isinstance(obj, list):
        return [_strip(v, roots) for v in obj]
    if isinstance(obj, str):
        for r in roots:
            obj = obj.replace(r, "<root>")
        return obj
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"  # nan != nan; two nans in the same place are the same result
    return obj


def _run(tmp_path: Path, name: str, detector: str, monkeypatch: pytest.MonkeyPatch, extra: list[str]) -> dict[str, Any]:
    root = tmp_path / name
    monkeypatch.setenv("LORIS_CACHE", str(root / "cache"))  # the phantom too is generated afresh
    sets = [f"cache_dir={root / 'models'}", "threads=2", "evaluation.figures=false", *extra]
    args = ["run", "--detector", detector, "--profile", "quick", "--out", str(root / "run"), "--no-progress"]
    assert main(args + [a for s in sets for a in ("--set", s)]) == 0
    summary = json.loads((root / "run" / "summary.json").read_text())
    info = summary.get("fold_info") or [{}]
    assert info[0].get("unet", {}).get("cached") is False, "the run must train its U-Net, not take it from a cache"
    return _strip(summary, (str(root),))


def _differences(a: Any, b: Any, where: str = "summary.json") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    diff = _differences(a, b)
    assert not diff, "two identical runs differ:\n" + "\n".join(diff[:20])


def test_quick_run_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = _run(tmp_path, "a", "gt", monkeypatch, [])
    b = _run(tmp_path, "b", "gt", monkeypatch, [])
    assert a["reconstruction"]["msgmsd"]["i_auroc"]["mean"] == b["reconstruction"]["msgmsd"]["i_auroc"]["mean"]
    _assert_same(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("detector", ["yolov5", "codetr"])
def test_quick_run_with_detector_is_deterministic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detector: str
) -> None:
    pytest.importorskip("ultralytics" if detector == "yolov5" else "mmdet")
    a = _run(tmp_path, "a", detector, monkeypatch, [])
    b = _run(tmp_path, "b", detector, monkeypatch, [])
    assert a["detection"] == b["detection"]
    _assert_same(a, b)
