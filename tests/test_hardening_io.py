"""Safe checkpoint loading: bad files raise one CheckpointError naming the file, the problem and the fix."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from reconstruction.checkpoint import load_model, save_model
from reconstruction.unet import UNet, UNetConfig
from scans.io import CheckpointError, load_meta, load_state, load_weights


class _Payload:
    """Unpickling this would create ``marker`` (what a tampered checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, ...]]:
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "good.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    return path


def test_good_file_loads(good: Path) -> None:
    state = load_state(good)
    assert set(state) == {"weight", "bias"} and state["weight"].shape == (2, 3)
    load_weights(torch.nn.Linear(3, 2), good)


def test_truncated_file(good: Path) -> None:
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"good\.pt: is truncated or corrupt.*delete .*good\.pt"):
        load_state(good)
    good.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"good\.pt: is empty or truncated"):
        load_state(good)


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=r"garbage\.pt: is not a PyTorch checkpoint"):
        load_state(path)


@pytest.mark.parametrize("form", ["torch.save", "raw pickle"])
def test_code_running_pickle_does_not_run(tmp_path: Path, form: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    payload = {"weight": _Payload(marker)}
    if form == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused file raises the error alone, no torch warning
        with pytest.raises(CheckpointError, match=r"model\.pt: ") as err:
            load_state(path, hint="delete the cache entry X to retrain")
    assert not marker.exists()  # the payload never ran
    assert str(err.value).endswith("; delete the cache entry X to retrain")
    if form == "torch.save":
        assert "holds code or objects other than tensors" in str(err.value) and "mkdir" in str(err.value)
    # The same file through pickle itself would have run the payload: the test can fail.
    pickle.loads(pickle.dumps(payload))
    assert marker.exists()


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: not found"):
        load_state(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state(tmp_path)


def test_not_a_dict_and_wrong_shapes(tmp_path: Path, good: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match=r"list\.pt: holds a list, not a dict"):
        load_state(path)
    with pytest.raises(CheckpointError, match=r"good\.pt: does not fit the model"):
        load_weights(torch.nn.Linear(4, 2), good)


def test_meta_errors(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    with pytest.raises(CheckpointError, match=r"model\.json: not found"):
        load_meta(path)
    path.write_text('{"unet": ')
    with pytest.raises(CheckpointError, match=r"model\.json: is not valid JSON"):
        load_meta(path)
    path.write_text("[1]")
    with pytest.raises(CheckpointError, match=r"model\.json: holds a JSON list"):
        load_meta(path)


def test_unet_checkpoint_errors_name_the_file(tmp_path: Path) -> None:
    save_model(UNet(UNetConfig.profile("tiny")), tmp_path / "m")
    load_model(tmp_path / "m")
    weights = tmp_path / "m" / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"m/model\.pt: is truncated or corrupt .*; delete the entry m$"):
        load_model(tmp_path / "m", hint="delete the entry m")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.pt: not found"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"model\.json: is not a U-Net config"):
        load_model(tmp_path / "m")


def test_message_has_no_traceback(tmp_path: Path) -> None:
    """What a user sees: one line naming the file, not torch's traceback."""
    path = tmp_path / "weights.pt"
    path.write_bytes(b"PK\x03\x04 truncated")
    code = f"from scans.io import load_state\nload_state({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("scans.io.CheckpointError: ") and str(path) in last
    assert "PytorchStreamReader" not in done.stderr and "During handling" not in done.stderr
