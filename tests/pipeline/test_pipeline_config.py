from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config, parse_override
from pipeline.run_dirs import RunDirError, prepare_run_dir
from pipeline.shared.cache import CacheScope
from pipeline.shared.models import Mode
from runtime.io import confined
from scans.fingerprint import dataset_fingerprint


def test_override_order_highest_last(tmp_path: Path) -> None:
    user = tmp_path / "user.yaml"
    user.write_text("unet: {epochs: 7, patience: 2}\nseed: 5\n")
    cfg = load_config(user, "quick", ["unet.epochs=9", "maps=[dd]"])
    assert cfg.unet.epochs == 9  # --set beats the file
    assert cfg.unet.patience == 2  # the file beats the profile
    assert cfg.unet.profile == "tiny"  # the profile beats the defaults
    assert cfg.seed == 5 and cfg.maps == ("dd",)
    assert cfg.unet.lr == 0.0001  # untouched defaults survive the merge
    flags = load_config(user, "quick", ["data=x"], {"data": "y"})
    assert flags.data == "y"  # the command's own options (--data) beat --set


def test_unknown_keys_and_profiles_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'unet.epochz'"):
        load_config(None, "default", ["unet.epochz=3"])
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config(None, "huge")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("unet.epochs")


def test_every_default_key_is_commented() -> None:
    text = (Path(__file__).resolve().parents[2] / "configs" / "default.yaml").read_text()
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


def test_a_run_saved_before_a_setting_existed_resumes_at_its_reproducing_value(tmp_path: Path) -> None:
    import yaml

    cfg = load_config(None, "quick")
    out = prepare_run_dir(tmp_path / "run", cfg)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    del saved["unet"]["box_weight"]  # as a run made before the option wrote it
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    prepare_run_dir(out, cfg)  # the paper's weight: the same run, resumes
    with pytest.raises(RunDirError, match="different config"):
        prepare_run_dir(out, load_config(None, "quick", ["unet.box_weight=4"]))


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

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("profile", ["quick", "default", "paper"])
def test_no_profile_stops_on_wall_clock_time(profile: str) -> None:
    import ast

    import yaml

    from detectors.refine import RefinerConfig
    from pipeline.config import detector_config_path
    from pipeline.shared.models import train_config

    cfg = load_config(None, profile)
    for section in ("unet", "riad"):
        assert not getattr(cfg, section).max_minutes, f"{profile}: {section}.max_minutes must be off by default"
        tc = train_config(cfg.unet, cfg.riad, "single" if section == "unet" else "riad", cfg.seed, "cpu", False)
        assert tc.max_minutes is None
    refiner = {**vars(RefinerConfig()), **cfg.detector.refiner}
    assert not refiner["max_minutes"] and refiner["steps"] > 0
    for name in ("yolov5", "codetr"):
        path = detector_config_path(name, cfg.detector.config, cfg.profile)
        assert path is not None
        if path.suffix == ".yaml":
            doc = yaml.safe_load(path.read_text())
            assert doc["epochs"] > 0 and "time" not in doc and "time" not in (doc.get("train_args") or {}), path
        else:  # python config: every `train` block (the file and its _base_) leaves max_minutes off
            for p in [path, *([CONFIGS / "detectors" / "codetr.py"] if path.name == "codetr_quick.py" else [])]:
                for node in ast.parse(p.read_text()).body:
                    if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "train":
                        kw = {k.arg: k.value for k in node.value.keywords}
                        assert "max_minutes" not in kw or ast.literal_eval(kw["max_minutes"]) is None, p


def _scope(tmp_path: Path, cfg: Config) -> CacheScope:
    (tmp_path / "annotations.json").write_text("{}")
    return CacheScope(dataset_fingerprint(tmp_path, [], use_memo=False), cfg.image_size, cfg.frame, (1, 2), (3,))


def test_unet_cache_key_holds_the_budget_and_the_time_cap(tmp_path: Path) -> None:
    from pipeline.shared.models import unet_cache_dir

    def key(*sets: str, mode: Mode = "single") -> Path:
        cfg = load_config(None, "default", list(sets))
        return unet_cache_dir(cfg, _scope(tmp_path, cfg), mode)

    base = key()
    assert key() == base  # stable
    assert key("unet.epochs=11") != base
    assert key("unet.patience=3") != base
    assert key("unet.max_minutes=5") != base  # a capped model is another model
    assert key("unet.max_minutes=5") != key("unet.max_minutes=6")
    assert key("riad.epochs=3") == base  # RIAD's budget is not the LoRIS U-Net's
    assert key("riad.epochs=3", mode="riad") != key(mode="riad")


def test_refiner_cache_key_holds_the_resolved_step_budget(tmp_path: Path) -> None:
    """Defaults are resolved into the key: leaving `steps` at its default and spelling it out are one
    model; another step budget or a time cap is another."""
    import numpy as np

    from detectors.refine import RefinerConfig
    from pipeline.shared.data import Data
    from pipeline.shared.models import fit_refiner, scope
    from scans.dataset import load_dataset, to_arrays
    from scans.folds import make_folds
    from tests.helpers import make_dataset

    make_dataset(tmp_path / "d", n_patients=10, per_patient=4)
    scans = load_dataset(tmp_path / "d")
    data = Data(tmp_path / "d", scans, to_arrays(scans, 64), make_folds(scans, k=3), "test")
    tr, va = np.flatnonzero(data.arrays.labels == 0)[:8], np.flatnonzero(data.arrays.labels == 0)[8:10]

    def fit(refiner: dict) -> dict:
        where = scope(data, 64, 0, tr, va)
        return fit_refiner(refiner, 0, where, tmp_path / "c", "cpu", data.arrays, tr, va)[1]

    first = fit({"steps": 2, "batch_size": 4})
    assert first["cached"] is False and first["refiner_steps"] == 2
    assert fit({"steps": 2, "batch_size": 4})["cache"] == first["cache"]
    assert fit({"steps": 2, "batch_size": 4, "max_minutes": RefinerConfig().max_minutes})["cached"] is True
    assert fit({"steps": 3, "batch_size": 4})["cache"] != first["cache"]
    assert fit({"steps": 2, "batch_size": 4, "max_minutes": 1.0})["cache"] != first["cache"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("unet.epochs=-3", "unet.epochs: expected an int >= 1, got -3"),
        ("score.pooling=median", "score.pooling: must be one of mean|max|topk, got 'median'"),
        ("detector.threshold=1.5", r"detector.threshold: expected a number in \[0, 1\], got 1.5"),
        ("threads=true", "threads: expected an int >= 0, got True"),
        ("unet.loss_weights=[1, 2]", "unet.loss_weights: expected a list of 3 values"),
        ("run_folds=[0, x]", r"run_folds\[1\]: expected an int, got 'x'"),
        ("detector.name=nope", "detector.name: must be one of .*gt.*, got 'nope'"),
        ("device=gpu", "device: must be one of auto|cpu|cuda"),
        ("detector.options=3", "detector.options: expected a mapping"),
    ],
)
def test_types_and_ranges_are_checked_at_load(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, "quick", [override])


def test_config_is_typed_and_saved_as_plain_yaml() -> None:
    import yaml

    from pipeline.config import dump

    cfg = load_config(None, "quick", ["unet.mask_margin=2", "evaluation.external=[a, b]"])
    assert isinstance(cfg.unet.mask_margin, float) and cfg.riad.ks == (2, 4, 8, 16)
    assert cfg.evaluation.external_paths == ["a", "b"]
    doc = yaml.safe_load(dump(cfg.to_dict()))
    assert doc["riad"]["ks"] == [2, 4, 8, 16] and doc["profile"] == "quick"
    assert list(doc)[:3] == ["data", "image_size", "frame"]  # configs/default.yaml's order
    from pipeline.config import parse_config

    assert parse_config(doc) == cfg  # the saved config reads back to the same settings


def test_default_is_loris_ib_and_faithful_keeps_the_papers_scoring() -> None:
    from pipeline.config import load_config

    ib = load_config(profile="default")
    assert (ib.score.region, ib.score.inset, ib.bundle.score_map) == ("box", 0.0625, "msgmsd_c170")
    assert "msgmsd_c170" in ib.maps and "msgmsd" in ib.maps
    for profile in ("faithful", "paper"):
        cfg = load_config(profile=profile)
        assert (cfg.score.region, cfg.score.inset, cfg.bundle.score_map) == ("image", 0.0, "msgmsd")
    faithful = load_config(profile="faithful")
    assert (faithful.unet, faithful.image_size) == (ib.unet, ib.image_size)  # same U-Nets, other scoring
