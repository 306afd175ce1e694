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
