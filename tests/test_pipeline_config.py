from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, parse_override
from pipeline.outputs import RunDirError, prepare_run_dir
from scans.io import confined


def test_override_order_highest_last(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("unet: {epochs: 7, patience: 2}\nseed: 5\n")
    cfg = load_config(user, "quick", ["unet.epochs=9", "maps=[dd]"])
    assert cfg["unet"]["epochs"] == 9  # --set beats the file
    assert cfg["unet"]["patience"] == 2  # the file beats the profile
    assert cfg["unet"]["profile"] == "tiny"  # the profile beats the defaults
    assert cfg["seed"] == 5 and cfg["maps"] == ["dd"]
    assert cfg["unet"]["lr"] == 0.0001  # untouched defaults survive the merge


def test_unknown_keys_and_profiles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'epochz'"):
        load_config(None, "default", ["unet.epochz=3"])
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config(None, "huge")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("unet.epochs")


def test_every_default_key_is_commented() -> None:
    text = (Path(__file__).resolve().parent.parent / "configs" / "default.yaml").read_text()
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line, f"configs/default.yaml: key without a comment: {line}"


def test_finished_run_is_never_overwritten(tmp_path: Path) -> None:
    cfg = load_config(None, "quick")
    out = prepare_run_dir(tmp_path / "run", cfg)
    assert (out / "config.yaml").is_file() and (out / "versions.json").is_file() and (out / "commit.txt").is_file()
    prepare_run_dir(out, cfg)  # unfinished, same config: resumes
    other = load_config(None, "quick", ["seed=1"])
    with pytest.raises(RunDirError, match="different config"):
        prepare_run_dir(out, other)
    (out / "summary.json").write_text("{}")
    with pytest.raises(RunDirError, match="finished run"):
        prepare_run_dir(out, cfg)


def test_foreign_folder_is_not_used(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(RunDirError, match="not a LoRIS run"):
        prepare_run_dir(tmp_path, load_config(None, "quick"))
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_confined_refuses_escapes(tmp_path: Path) -> None:
    assert confined(tmp_path, "masks/a.png") == (tmp_path / "masks" / "a.png").resolve()
    for bad in ("../evil.png", "/etc/passwd", "masks/../../x"):
        with pytest.raises(ValueError, match="outside the output directory"):
            confined(tmp_path, bad)
    (tmp_path / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="outside"):
        confined(tmp_path, "link/x.png")


# ----------------------------------------------------------------------------- fixed training budgets

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("profile", ["quick", "default", "paper"])
def test_no_profile_stops_on_wall_clock_time(profile: str) -> None:
    import ast

    import yaml

    from detectors.refine import RefinerConfig
    from pipeline import stages

    cfg = load_config(None, profile)
    for section in ("unet", "riad"):
        assert not cfg[section]["max_minutes"], f"{profile}: {section}.max_minutes must be off by default"
        assert stages.train_config(cfg, "single" if section == "unet" else "riad").max_train_seconds is None
    refiner = {**vars(RefinerConfig()), **cfg["detector"]["refiner"]}
    assert not refiner["max_seconds"] and refiner["steps"] > 0
    for name in ("yolov5", "codetr"):
        path = stages.detector_config_path({**cfg, "detector": {**cfg["detector"], "name": name}})
        if path.suffix == ".yaml":
            doc = yaml.safe_load(path.read_text())
            assert doc["epochs"] > 0 and "time" not in doc and "time" not in (doc.get("train_args") or {}), path
        else:  # python config: every `train` block (the file and its _base_) leaves max_minutes off
            for p in [path, *([CONFIGS / "detectors" / "codetr.py"] if path.name == "codetr_quick.py" else [])]:
                for node in ast.parse(p.read_text()).body:
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "train":
                        kw = {k.arg: k.value for k in node.value.keywords}
                        assert "max_minutes" not in kw or ast.literal_eval(kw["max_minutes"]) is None, p


def _fake_data(tmp_path: Path):  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    (tmp_path / "annotations.json").write_text("{}")
    return SimpleNamespace(root=tmp_path)


def test_unet_cache_key_holds_the_budget_and_the_time_cap(tmp_path: Path) -> None:
    from pipeline import stages

    data = _fake_data(tmp_path)
    key = lambda *sets: stages.unet_cache_dir(load_config(None, "default", list(sets)), data, (1, 2), (3,), "single")  # noqa: E731
    base = key()
    assert key() == base  # stable
    assert key("unet.epochs=11") != base
    assert key("unet.patience=3") != base
    assert key("unet.max_minutes=5") != base  # a capped model is another model
    assert key("unet.max_minutes=5") != key("unet.max_minutes=6")
    assert key("riad.epochs=3") == base  # RIAD's budget is not the LoRIS U-Net's
    assert stages.unet_cache_dir(
        load_config(None, "default", ["riad.epochs=3"]), data, (1, 2), (3,), "riad"
    ) != stages.unet_cache_dir(load_config(None, "default"), data, (1, 2), (3,), "riad")


def test_refiner_cache_key_holds_the_resolved_step_budget(tmp_path: Path) -> None:
    """Defaults are resolved into the key: leaving `steps` at its default and spelling it out are one
    model; another step budget or a time cap is another."""
    import numpy as np

    from detectors.refine import RefinerConfig
    from pipeline import stages
    from pipeline.data import Data
    from scans.dataset import load_dataset, to_arrays
    from scans.folds import make_folds
    from tests.helpers import make_dataset

    make_dataset(tmp_path / "d", n_patients=10, per_patient=4)
    scans = load_dataset(tmp_path / "d")
    data = Data(tmp_path / "d", scans, to_arrays(scans, 64), make_folds(scans, k=3), "test")
    tr, va = np.flatnonzero(data.arrays.labels == 0)[:8], np.flatnonzero(data.arrays.labels == 0)[8:10]

    def fit(refiner: dict) -> dict:
        cfg = load_config(None, "quick", [f"cache_dir={tmp_path / 'c'}"])
        cfg["detector"]["refiner"] = refiner
        return stages.fit_refiner(cfg, data, tr, va)[1]

    first = fit({"steps": 2, "batch_size": 4})
    assert first["cached"] is False and first["refiner_steps"] == 2
    assert fit({"steps": 2, "batch_size": 4})["cache"] == first["cache"]
    assert fit({"steps": 2, "batch_size": 4, "max_seconds": RefinerConfig().max_seconds})["cached"] is True
    assert fit({"steps": 3, "batch_size": 4})["cache"] != first["cache"]
    assert fit({"steps": 2, "batch_size": 4, "max_seconds": 60.0})["cache"] != first["cache"]
