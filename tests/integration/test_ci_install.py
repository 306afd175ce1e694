"""``.ci/uv_args.py``: pip's configuration handed to uv, so the fast install reads the same indexes as pip."""

from __future__ import annotations

import doctest
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _module() -> Any:
    spec = importlib.util.spec_from_file_location("uv_args", REPO / ".ci" / "uv_args.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _translate(listing: str) -> list[str]:
    return [line for line in _module().translate(listing).splitlines() if line]


def test_the_docstring_example_holds() -> None:
    assert doctest.testmod(_module()).failed == 0


def test_every_index_find_links_and_constraint_is_passed_on() -> None:
    listing = "\n".join(
        [
            "global.constraint='/etc/c.txt'",
            "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
            "global.find-links='/opt/wheels'",
            "global.index-url='https://mirror.example/simple'",
            "global.timeout='60'",  # nothing uv needs
        ]
    )
    args = _translate(listing)
    assert args == [
        "--constraint",
        "/etc/c.txt",
        "--extra-index-url",
        "file:///opt/a/simple",
        "--extra-index-url",
        "file:///opt/b/simple",
        "--find-links",
        "/opt/wheels",
        "--index-url",
        "https://mirror.example/simple",
    ]


def test_the_environment_beats_install_which_beats_global_as_in_pip_install() -> None:
    listing = "\n".join(
        [
            ":env:.index-url='https://env.example/simple'",
            "global.cert='/global.pem'",
            "global.index-url='https://global.example/simple'",
            "install.cert='/install.pem'",
            "install.index-url='https://install.example/simple'",
            "download.find-links='/download-only'",  # another command's section
        ]
    )
    args = _translate(listing)
    assert args[args.index("--index-url") + 1] == "https://env.example/simple"
    assert args.count("--index-url") == 1
    assert [a for a in args if a.startswith("SSL_CERT_FILE=")] == ["SSL_CERT_FILE=/install.pem"]
    assert "--find-links" not in args


def test_no_configuration_gives_no_arguments() -> None:
    assert _translate("") == []


def test_no_configuration_prints_nothing_not_an_empty_argument() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "uv_args.py")], input="", capture_output=True, text=True, check=True
    )
    assert proc.stdout == ""


def test_the_script_reads_pip_config_list_on_stdin() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / ".ci" / "uv_args.py")],
        input="global.find-links='/w1 /w2'\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.split() == ["--find-links", "/w1", "--find-links", "/w2"]
