"""The diagnosis tool's paired differences and seed-ensemble members (issue 25's candidates)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.experiment.diagnose import against, paired


def _set(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    labels = np.r_[np.zeros(40), np.ones(20)].astype(int)
    patients = [f"p{i % 12}" for i in range(60)]
    return labels + rng.normal(0, 0.8, 60), labels, patients


def test_paired_difference_is_zero_against_itself_and_positive_for_a_better_score() -> None:
    s, y, p = _set()
    same = paired(s, s, y, p, 0)
    assert same == {"estimate": 0.0, "low": 0.0, "high": 0.0}
    better = paired(s + 2.0 * y, s, y, p, 0)
    assert better["estimate"] > 0.1 and better["low"] > 0


def test_against_pairs_rows_by_name_and_refuses_other_images(tmp_path: Path) -> None:
    s, y, p = _set()
    base = {"labels": y, "patients": np.asarray(p, dtype=str), "row a": s, "row b": s}
    with open(tmp_path / "scores.npz", "wb") as fh:
        np.savez(fh, **base)
    result = {"seed": 0, "rows": {"row a": {}, "row c": {}}}
    now = {**base, "row a": s + y}
    out = against(result, now, tmp_path)
    assert list(out) == ["row a"] and out["row a"]["estimate"] > 0
    with pytest.raises(SystemExit, match="other folds"):
        against(result, {**now, "labels": y[::-1]}, tmp_path)


def test_ensemble_members_train_from_their_own_seed() -> None:
    from pipeline.config import load_config
    from pipeline.shared.models import MEMBER_SEED_STRIDE, _train_config

    cfg = load_config(profile="quick", overrides=["seed=7"])
    assert _train_config(cfg, "single").seed == 7
    assert _train_config(cfg, "single", member=2).seed == 7 + 2 * MEMBER_SEED_STRIDE
