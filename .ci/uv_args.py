"""pip's configuration as uv arguments, one per line (``SSL_CERT_FILE=...`` for the CA file).

uv reads no pip configuration; this passes on what the install needs from it: index, extra indexes,
find-links, constraints and the CA file. ``pip config list`` has merged pip's files already and names each
value by its section; as for ``pip install``, ``PIP_*`` variables (``:env:``) beat ``[install]``, which beats
``[global]``; other commands' sections do not apply. Reads ``pip config list`` from stdin.

>>> print(translate("global.extra-index-url='file:///a file:///b'\\n:env:.cert='/c.pem'\\nglobal.cert='/d.pem'"))
--extra-index-url
file:///a
--extra-index-url
file:///b
SSL_CERT_FILE=/c.pem
"""

from __future__ import annotations

import ast
import sys

RANK = {":env:": 3, "install": 2, "global": 1}
FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def translate(listing: str) -> str:
    """The uv arguments for a ``pip config list`` output."""
    best: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        key, sep, value = line.partition("=")
        where, _, name = key.rpartition(".")
        if not sep or not name:
            continue
        rank = RANK.get(where, 0)
        if rank and rank >= best.get(name, (0, ""))[0]:
            best[name] = (rank, ast.literal_eval(value))
    out: list[str] = []
    for name, (_, value) in best.items():
        if name in FLAGS:
            for item in value.split():
                out += [FLAGS[name], item]
        elif name == "cert":
            out.append(f"SSL_CERT_FILE={value}")
    return "\n".join(out)


if __name__ == "__main__":
    out = translate(sys.stdin.read())
    if out:  # no configuration: no line at all, not an empty argument
        print(out)
