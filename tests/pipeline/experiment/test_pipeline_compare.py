"""``compare`` end to end on a tiny phantom with the quick profile: Table 1 in full, LoRIS equal to ``run``,
resume without retraining, cached peers, and a refused method name."""

from __future__ import annotations

import argparse
import csv
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Config, load_config
from pipeline.experiment.compare import add_arguments, cli, execute_compare, method_choices, parse_methods
from pipeline.experiment.compare_report import peer_label
from pipeline.experiment.run import execute
from reconstruction.peers import Peer
from tests.helpers import TINY_PHANTOM

METHODS = "loris,riad,patchcore,uae,multitask"
LORIS_IB = "LoRIS-IB (MSGMSD, GMSD's c)"  # the verdict's map: every difference is taken against it
LORIS_ROWS = [LORIS_IB, "LoRIS+MSGMSD", "LoRIS+DD", "LoRIS+GMSD", "LoRIS+SSIM"]


pytestmark = pytest.mark.usefixtures("module_cache_env")


def tiny(cache: Path) -> Config:
    sets = [
        f"evaluation.external={held_out(cache)}",
        *TINY_PHANTOM,
        "run_folds=[0]",
        "unet.epochs=1",
        "riad.epochs=1",
        "riad.ks=[2,8]",
        f"cache_dir={cache / 'models'}",
        "threads=2",
    ]
    return replace(load_config(profile="quick", overrides=sets), progress=False)


def held_out(cache: Path) -> Path:
    """A small held-out phantom (another seed) that every fold's models also score."""
    from scans.phantom import generate_dataset

    path = cache / "held-out"
    if not (path / "annotations.json").is_file():
        generate_dataset(path, n_images=20, n_distended=8, n_patients=8, size=64, seed=11, progress=False)
    return path


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in json.loads((out / "table1.json").read_text())["rows"] if r["source"] != "paper"}


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("retrained")

    monkeypatch.setattr(Peer, "fit", boom)
    monkeypatch.setattr("reconstruction.train.train_unet", boom)


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "compare"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORIS_CACHE", str(cache))
        execute_compare(tiny(cache), out, METHODS)
    return out


def test_tables_rows_and_intervals(compared: Path) -> None:
    for name in ("table1.md", "table1.csv", "table1.json", "differences.md", "summary.json", "comparison.png"):
        assert (compared / name).is_file(), name
    html = (compared / "report.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#:]+)"', html):
        assert (compared / ref).exists(), ref
    summary = json.loads((compared / "summary.json").read_text())
    labels = {n: summary["peers"][n]["label"] for n in ("patchcore", "uae", "multitask")}
    assert labels["uae"] == peer_label("uae", False) == "UAE (own implementation, random init)"
    assert labels["multitask"].startswith("Multi-task (own implementation")
    rows = _rows(compared)
    expected = LORIS_ROWS + ["RIAD (ours, multi-mask baseline)", *labels.values()]
    assert [r for r in rows if r in expected] == expected
    for name in [labels["patchcore"], labels["uae"], "RIAD (ours, multi-mask baseline)"]:
        m = rows[name]["metrics"]
        for key in ("i_auroc", "p_auroc", "dice_val"):
            assert m[key]["ci_low"] <= m[key]["mean"] <= m[key]["ci_high"], (name, key)
        assert m["gap_i_auroc"] is not None and "ci_low" in m["gap_i_auroc"]  # paired vs LoRIS-IB
    mt = rows[labels["multitask"]]
    assert not mt["maps"] and mt["metrics"].get("p_auroc") is None and mt["metrics"]["gap_i_auroc"] is not None
    assert rows[LORIS_IB]["metrics"]["gap_i_auroc"] is None  # the reference itself
    assert rows["LoRIS+MSGMSD"]["metrics"]["gap_i_auroc"] is not None  # the paper's map, against LoRIS-IB
    assert all(rows[c]["metrics"]["gap_i_auroc"] for c in ("Prior only: box height", "Prior only: box area"))
    table = list(csv.DictReader(open(compared / "table1.csv")))
    by_name = {r["name"]: r for r in table}
    assert by_name[labels["uae"]]["p_auroc_ci_low"] and not by_name[labels["multitask"]]["p_auroc_ci_low"]
    assert "own implementation" in (compared / "table1.md").read_text()
    ext = {r["name"]: r for r in json.loads((compared / "external" / "table1.json").read_text())["rows"]}
    assert ext[labels["uae"]]["metrics"]["p_auroc"]["mean"] >= 0 and ext[labels["multitask"]]["metrics"]["i_auroc"]
    assert (compared / "external" / "report.html").is_file() and summary["external"][0]["images"] == 20
    assert set(summary["timing"]["methods"]) == {"loris", "riad", "patchcore", "uae", "multitask"}
    assert summary["commit"] and summary["versions"]["anomalib"] and summary["config"]["profile"] == "quick"
    every = [(r["name"], r["source"]) for r in json.loads((compared / "table1.json").read_text())["rows"]]
    for ours, paper in [(labels["patchcore"], "PatchCore"), (labels["multitask"], "Multi-task (supervised)")]:
        assert every[every.index((ours, "ours")) + 1] == (paper, "paper")  # the published row beside ours
    assert not any(r["source"] == "paper" for r in ext.values())  # other data: no published rows


def test_published_rows_name_known_methods() -> None:
    from evaluation.tables import PAPER_TABLE1
    from pipeline.experiment.compare import method_choices
    from reconstruction.deviation import MAP_NAMES

    assert set(PAPER_TABLE1) <= set(method_choices()) | set(MAP_NAMES)


def test_loris_row_equals_run(compared: Path, tmp_path: Path, cache: Path) -> None:
    execute(tiny(cache), tmp_path / "run", ["gt"])
    ran = _rows(tmp_path / "run")
    ours = _rows(compared)
    for name in LORIS_ROWS + ["RIAD (ours, multi-mask baseline)"]:
        for key in ("i_auroc", "p_auroc", "dice_oracle", "dice_oracle_post", "dice_val"):
            a, b = ours[name]["metrics"][key], ran[name]["metrics"][key]
            assert (a["mean"], a["ci_low"], a["ci_high"]) == (b["mean"], b["ci_low"], b["ci_high"]), (name, key)


def test_rerun_resumes_and_peers_are_cached(
    compared: Path, tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _rows(compared)
    saved = compared / "folds" / "0" / "compare" / "patchcore.json"
    stamp = saved.stat().st_mtime_ns
    (compared / "summary.json").unlink()  # a killed comparison: its folds are kept
    _no_training(monkeypatch)
    execute_compare(tiny(cache), compared, METHODS)
    assert _rows(compared) == before and saved.stat().st_mtime_ns == stamp  # resumed from disk
    # a new folder takes the trained peers and U-Nets from the cache
    summary = execute_compare(tiny(cache), tmp_path / "again", "uae,patchcore")
    assert summary["timing"]["methods"]["uae"]["trained_now"] == [False]
    label = summary["peers"]["patchcore"]["label"]
    assert _rows(tmp_path / "again")[label]["metrics"] == before[label]["metrics"]


def test_unknown_method_is_refused_with_the_choices(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown method.*nope.*choose from loris, riad, .*patchcore"):
        parse_methods("loris,nope")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--methods", "patchcore,simplenet", "--out", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="simplenet"):
        cli(args, tiny(cache))
    assert not (tmp_path / "x").exists()
    assert parse_methods("UAE") == ["loris", "uae"] and set(method_choices()) >= {"loris", "riad", "draem"}


@pytest.mark.slow
def test_whole_comparison_on_the_quick_profile(tmp_path: Path, cache: Path) -> None:
    """Every method ``compare`` knows, on the quick profile: a row each, finite metrics, paired differences."""
    # 64 px scans: SuperSimpleNet needs earlier backbone layers for a feature map of 32 px or more
    options = {"supersimplenet": {"layers": ["blocks.1", "blocks.2"]}}
    summary = execute_compare(tiny(cache), tmp_path / "all", ",".join(method_choices()), options=options)
    rows = _rows(tmp_path / "all")
    assert set(summary["timing"]["methods"]) == set(method_choices())
    for name in method_choices():
        if name in ("loris", "riad"):
            continue
        label = summary["peers"][name]["label"]
        m = rows[label]["metrics"]
        assert 0.0 <= m["i_auroc"]["mean"] <= 1.0 and m["gap_i_auroc"] is not None, name
        if rows[label]["maps"]:
            assert 0.0 <= m["p_auroc"]["mean"] <= 1.0 and m["dice_val"]["ci_low"] <= m["dice_val"]["mean"], name
        else:
            assert m.get("p_auroc") is None, name
