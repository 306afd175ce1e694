"""bench's memory numbers: the peak-RSS meter sees a block's own allocations (also freed ones) and not an
earlier block's; every stage and every requested Table 1 peer gets its peak RSS beside its speed."""

from __future__ import annotations

import platform
import sys
import time
from typing import Any

import numpy as np
import pytest

import pipeline.bench.suite as bench
from runtime.timing import PeakRSS

MB200 = 200 * 1000 * 1000
MIB200 = MB200 / 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-block peaks need /proc")


def _touch(nbytes: int) -> np.ndarray:
    """A freshly allocated array whose every page is written (so it is resident)."""
    a = np.empty(nbytes // 8, np.float64)
    a.fill(1.0)
    return a


@linux_only
def test_meter_sees_an_allocation_kept_to_the_end() -> None:
    with PeakRSS() as m:
        block = _touch(MB200)
    assert m.method == "sampled"
    assert m.rise_mib >= 0.8 * MIB200, (m.start_mib, m.peak_mib)
    assert m.peak_mib >= m.start_mib + m.rise_mib - 0.01
    del block


@linux_only
def test_meter_sees_an_allocation_freed_inside_the_block() -> None:
    with PeakRSS() as m:
        block = _touch(MB200)
        time.sleep(0.1)  # resident a while (a stage's working set), then
        del block  # gone before the block ends: only the sampling (or ru_maxrss) can have seen it
    assert m.rise_mib >= 0.8 * MIB200, (m.start_mib, m.peak_mib)


@linux_only
def test_meter_is_per_block_not_the_process_maximum() -> None:
    with PeakRSS() as big:
        block = _touch(MB200)
        del block
    with PeakRSS() as empty:
        pass
    assert empty.rise_mib < 10.0, empty.to_dict()
    # ru_maxrss alone would repeat the first block's peak here
    assert empty.peak_mib < big.peak_mib - 0.5 * MIB200, (empty.to_dict(), big.to_dict())
    assert set(empty.to_dict()) == {"peak_rss_mib", "rss_rise_mib"}


def test_peers_get_fit_and_inference_memory() -> None:
    rows = bench.peer_speeds(["patchcore", "padim"], n=6, size=64, reps=1)
    assert list(rows) == ["patchcore", "padim"]
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["fit_seconds"] > 0 and row["images_per_s"] > 0, row
        for key in ("fit_peak_rss_mib", "predict_peak_rss_mib"):
            assert row[key] > 0, (name, key, row)
        for key in ("fit_rss_rise_mib", "predict_rss_rise_mib"):
            assert row[key] >= 0, (name, key, row)
        assert row["size"] == 64 and row["images"] == 6 and row["budget"]["epochs"] == 1
    lines = bench._peer_rows(rows)
    assert len(lines) == 4 and f"{rows['padim']['fit_peak_rss_mib']:9.1f}" in lines[2]


def test_peer_names_come_from_the_registry() -> None:
    from pipeline.__main__ import build_parser
    from reconstruction.peers import PEERS

    assert bench.parse_peers("none") == []
    assert bench.parse_peers(None) == bench.default_peers()
    assert set(bench.default_peers()) <= set(PEERS) and bench.default_peers()
    assert bench.parse_peers("all") == sorted(PEERS)
    assert not any(n.endswith("_box") for n in bench.parse_peers("table1"))
    assert bench.parse_peers(" PaDiM,patchcore,padim") == ["padim", "patchcore"]
    with pytest.raises(ValueError, match="unknown peer"):
        bench.parse_peers("patchcore,nosuchpeer")
    assert build_parser().parse_args(["bench", "--peers", "none"]).peers == "none"


def test_every_stage_reports_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_bench with the measurements stubbed: each stage's entry carries its peak RSS beside its speed."""
    import pipeline.bench.unet
    from pipeline import registry

    monkeypatch.setattr(bench, "phantom_speed", lambda **_: 10.0)
    monkeypatch.setattr(pipeline.bench.unet, "run_benchmark", lambda **_: {"matmul_gflops": 5.0})
    monkeypatch.setattr(registry, "trainable", lambda: ["fake"])
    monkeypatch.setattr(bench, "detector_speed", lambda name, **_: 20.0)
    monkeypatch.setattr(bench, "refiner_speed", lambda **_: 30.0)
    fake_peer = {"fit_seconds": 1.0, "fit_steps": None, "images_per_s": 4.0}
    fake_peer |= {"fit_peak_rss_mib": 9.0, "fit_rss_rise_mib": 1.0, "predict_peak_rss_mib": 8.0}
    fake_peer |= {"predict_rss_rise_mib": 0.5}
    monkeypatch.setattr(bench, "peer_speeds", lambda names, **_: {n: fake_peer for n in names})
    res: dict[str, Any] = bench.run_bench(quick=True, peers=["patchcore"])
    for stage in (res["phantom_memory"], res["unet"], res["detectors"]["fake"], res["detectors"]["refiner"]):
        assert stage["peak_rss_mib"] > 0 and stage["rss_rise_mib"] >= 0, stage
    assert list(res["peers"]) == ["patchcore"]
    table = "\n".join(bench.table_lines(res))
    for label in (
        "phantom",
        "U-Net",
        "detector fake",
        "detector refiner",
        "peer patchcore fit",
        "peer patchcore predict",
    ):
        assert label in table
    assert bench.run_bench(quick=True, peers=[])["peers"] == {}


def test_machine_names_the_cpu_model(tmp_path: Any) -> None:
    from pipeline.provenance import cpu_model, machine

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU @ 2.0GHz\n\nprocessor\t: 1\n")
    assert cpu_model(info) == "Some CPU @ 2.0GHz"
    assert cpu_model(tmp_path / "missing") == (platform.processor() or "unknown")
    assert machine()["cpu_model"] == cpu_model()  # in every run's machine.json and in bench's output


def test_unet_benchmark_measures_inference_and_a_training_step() -> None:
    from pipeline.bench.unet import run_benchmark

    r = run_benchmark(profiles=("tiny",), size=64, batch=2, reps=2, train_steps=2, matmul_n=256, spawn=False)
    assert sorted(r["inference"]["tiny"])[:3] == ["channels_last", "contiguous", "fused_channels_last"]
