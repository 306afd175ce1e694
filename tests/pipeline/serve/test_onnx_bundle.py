"""``predict --engine onnxruntime``: an OnnxBundle gives Bundle.process's results; its export is cached once."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from pipeline.serve import onnx_bundle  # noqa: E402
from pipeline.serve.bundle import Bundle  # noqa: E402
from pipeline.serve.onnx_bundle import OnnxBundle, OrtModule, export_graphs, load_onnx_bundle, onnx_detector  # noqa: E402
from tests.helpers import train_quick_bundle  # noqa: E402


class Trained:
    """The module's bundle, its PyTorch twin, some scans, and a count of the exports made."""

    def __init__(self, bundle: Path, cache: Path, images: np.ndarray) -> None:
        self.bundle, self.cache, self.images = bundle, cache, images
        self.torch = Bundle.load(bundle, device="cpu")
        self.exports = 0

    def listing(self) -> list[tuple[str, int]]:
        return sorted((str(p.relative_to(self.bundle)), p.stat().st_mtime_ns) for p in self.bundle.rglob("*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    bundle, cache = train_quick_bundle(tmp_path_factory)
    pngs = sorted((cache / "phantom").rglob("*.png"))[:6]
    size = json.loads((bundle / "bundle.json").read_text())["image_size"]
    scans = [np.asarray(Image.open(p).convert("L").resize((size, size)), np.float32) / 255 for p in pngs]
    noise = np.random.default_rng(0).random((2, size, size), dtype=np.float32)
    t = Trained(bundle, cache, np.concatenate([np.stack(scans), noise]))
    export = onnx_bundle.export_bundle

    def counted(*args: Any, **kwargs: Any) -> Any:
        t.exports += 1
        return export(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORIS_CACHE", str(tmp_path_factory.mktemp("onnx-cache")))
        mp.setattr(onnx_bundle, "export_bundle", counted)
        yield t


def _assert_same(got: Any, want: Any) -> None:
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.heat, want.heat, atol=1e-3, rtol=0)
    assert np.mean(got.masks == want.masks) >= 0.999
    assert got.sources == want.sources
    np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3, rtol=0)
    np.testing.assert_allclose(got.confidences, want.confidences, atol=1e-4, rtol=0)


def test_matches_bundle_and_reuses_the_export(trained: Trained) -> None:
    before = trained.listing()
    ob = load_onnx_bundle(trained.bundle, threads=2)
    assert isinstance(ob, OnnxBundle) and isinstance(ob, Bundle) and trained.exports == 1
    tb = trained.torch
    assert ob.graphs.detector is not None  # YOLOv5u runs in onnxruntime too
    assert (ob.image_size, ob.frame, ob.score_threshold, ob.policy, ob.expansion) == (
        tb.image_size,
        tb.frame,
        tb.score_threshold,
        tb.policy,
        tb.expansion,
    )
    assert ob.model_version == tb.model_version and ob.model_name == tb.model_name + "-onnx"
    got, want = ob.process(trained.images), tb.process(trained.images)
    _assert_same(got, want)
    assert got.heat.shape == want.heat.shape and got.masks.dtype == bool and got.scores.dtype == np.float64

    loris = ob.graphs.directory / "loris.onnx"
    stamp = loris.stat().st_mtime_ns
    again = OnnxBundle(tb, export_graphs(trained.bundle, tb.doc, threads=2))  # load_onnx_bundle without Bundle.load
    assert trained.exports == 1 and again.graphs.directory == ob.graphs.directory
    assert loris.stat().st_mtime_ns == stamp
    _assert_same(again.process(trained.images[:3]), tb.process(trained.images[:3]))
    assert trained.listing() == before  # nothing written into the bundle


def test_refined_detector_keeps_its_refiner(trained: Trained) -> None:
    from detectors.refine import BoxRefiner, RefinedDetector

    refined = RefinedDetector(trained.torch.detector, BoxRefiner(), top_k=1)
    graphs = export_graphs(trained.bundle, trained.torch.doc, threads=2)
    onnx = onnx_detector(refined, graphs.detector, "output0")
    assert isinstance(onnx, RefinedDetector) and onnx.refiner is refined.refiner
    assert onnx.base is not refined.base and not isinstance(refined.base._model, OrtModule)  # type: ignore[attr-defined]
    imgs = trained.images[:3]
    for got, want in zip(onnx.predict(imgs), refined.predict(imgs)):
        np.testing.assert_allclose(got.scores, want.scores, atol=1e-4, rtol=0)
        np.testing.assert_allclose(got.boxes, want.boxes, atol=1e-3, rtol=0)


def test_damaged_cache_entry_is_exported_again(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    doc = trained.torch.doc
    entry = export_graphs(trained.bundle, doc).directory  # made by the test above, or now
    made = trained.exports
    loris = entry / "loris.onnx"
    loris.write_bytes(loris.read_bytes()[:1000])
    graphs = export_graphs(trained.bundle, doc, threads=2)
    assert trained.exports == made + 1 and graphs.directory == entry
    assert "moved to" in capsys.readouterr().err
    assert any(p.name.startswith(entry.name + ".broken-") for p in entry.parent.iterdir())
    imgs = trained.images[:2]
    scores, _ = graphs.loris.run(
        ["scores", "maps"], {"images": imgs[:, None], "boxes": np.full((2, 4), np.nan, np.float32)}
    )
    assert np.isfinite(scores).all()


def test_user_export_is_used_and_checked(trained: Trained, tmp_path: Path) -> None:
    doc = trained.torch.doc
    cached = export_graphs(trained.bundle, doc).directory
    bundle = tmp_path / "b"
    shutil.copytree(trained.bundle, bundle)
    shutil.copytree(cached, bundle / "onnx")  # as `export --out b/onnx` writes it
    made = trained.exports
    assert export_graphs(bundle, doc).directory == bundle / "onnx" and trained.exports == made

    loris = bundle / "onnx" / "loris.onnx"
    good = loris.read_bytes()
    loris.write_bytes(good[:1000])
    with pytest.raises(ValueError, match="cannot be used.*pipeline export"):
        export_graphs(bundle, doc)
    loris.write_bytes(good)

    stale = {**doc, "score": {**doc["score"], "threshold": 0.5}}
    (bundle / "bundle.json").write_text(json.dumps(stale))
    with pytest.raises(ValueError, match="another version of the bundle"):
        export_graphs(bundle, stale)
    assert trained.exports == made


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = onnx_bundle.importlib.util.find_spec
    monkeypatch.setattr(onnx_bundle.importlib.util, "find_spec", lambda n: None if n == "onnxruntime" else real(n))
    with pytest.raises(RuntimeError, match=r"onnxruntime: pip install 'loris\[export\]'"):
        load_onnx_bundle(tmp_path)


def test_predict_engine_onnxruntime_gives_the_torch_rows(trained: Trained, tmp_path: Path) -> None:
    import csv

    from pipeline.__main__ import main

    folder = tmp_path / "scans"
    folder.mkdir()
    for p in sorted((trained.cache / "phantom").rglob("*.png"))[:5]:
        shutil.copy(p, folder / p.name)
    rows = {}
    for engine in ("local", "onnxruntime"):
        out = tmp_path / engine
        args = ["predict", "--model", str(trained.bundle), "--input", str(folder), "--out", str(out)]
        assert main([*args, "--engine", engine, "--device", "cpu", "--no-progress", "--no-review"]) == 0
        rows[engine] = {r["file"]: r for r in csv.DictReader(open(out / "predictions.csv"))}
    assert rows["local"].keys() == rows["onnxruntime"].keys() and len(rows["local"]) == 5
    for name, want in rows["local"].items():
        got = rows["onnxruntime"][name]
        assert abs(float(got["score"]) - float(want["score"])) <= 1e-4, name
        assert got["verdict"] == want["verdict"] and got["box_source"] == want["box_source"], name
        assert got["mask_rle"] == want["mask_rle"], name
