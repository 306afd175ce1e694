"""The layout holds (docs/design.md, "Map"): no function over 50 lines, no file over 500, the import arrows
between the packages and no import cycle.

Today's offenders are listed with their current length. The lists only shrink: the test fails when an
offender grows, when a new one appears, and when one is fixed but still listed (then delete its line).
The import rules are read from the ``rules`` block of docs/design.md, so the map and the check cannot drift.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "scans", "detectors", "reconstruction", "evaluation", "pipeline")
MAX_FUNCTION = 50  # lines, ``end_lineno - lineno + 1`` (decorators excluded, docstring included)
MAX_FILE = 500  # lines

# "path:qualname" -> its length today. Shrink only.
LONG_FUNCTIONS: dict[str, int] = {
    "detectors/codetr/detector.py:CoDetrDetector._fit": 63,
    "detectors/codetr/native_ops.py:benchmark": 60,
    "detectors/yolov5.py:YoloV5Detector.fit": 56,
    "evaluation/metrics.py:pixel_auroc_streaming": 53,
    "reconstruction/deviation.py:image_score": 53,
    # the phantom's random-number call order fixes every image: split with tests/integration/test_identity.py at hand
    "scans/phantom.py:scan_geometry": 106,
    "scans/phantom.py:render_scan": 167,
    "scans/phantom.py:generate_dataset": 78,
}

# path -> its length today. Shrink only.
LONG_FILES: dict[str, int] = {
    "detectors/codetr/detector.py": 509,
    "scans/phantom.py": 1061,
}

# import cycles left, each with its reason (sorted modules -> reason). Shrink only.
KNOWN_CYCLES: dict[tuple[str, ...], str] = {
    ("detectors", "detectors.base", "detectors.prior"): "detectors.base's lookups (registered, detector_class) "
    "import the package inside the function so that its __init__ registers every built-in detector",
}


# ----------------------------------------------------------------------------- lengths


def sources() -> list[Path]:
    """Every Python file of the packages, sorted."""
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts)


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def function_lengths(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, int]]:
    """``(qualname, lines)`` of every function and method in ``tree``, nested ones as ``outer.inner``.

    >>> list(function_lengths(ast.parse("class A:\\n    def f(self):\\n        pass\\n")))
    [('A.f', 2)]
    """
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                yield name, node.end_lineno - node.lineno + 1
            yield from function_lengths(node, name + ".")
        else:
            yield from function_lengths(node, prefix)


def long_functions() -> dict[str, int]:
    out = {}
    for path in sources():
        for name, n in function_lengths(ast.parse(path.read_text(), str(path))):
            if n > MAX_FUNCTION:
                out[f"{_rel(path)}:{name}"] = n
    return out


def long_files() -> dict[str, int]:
    counts = {_rel(p): len(p.read_text().splitlines()) for p in sources()}
    return {p: n for p, n in counts.items() if n > MAX_FILE}


def allowlist_problems(found: Mapping[str, int], allowed: Mapping[str, int], limit: int, what: str) -> list[str]:
    """What differs between the offenders ``found`` and the ``allowed`` list, one line each.

    >>> allowlist_problems({"a.py:f": 60, "a.py:g": 55}, {"a.py:f": 58, "a.py:h": 70}, 50, "function")
    ['a.py:f: 60 lines, listed at 58: it grew; split it', 'a.py:g: function of 55 lines (limit 50): split it', \
'a.py:h: listed at 70 lines, now within the limit: delete its line from the list']
    """
    problems = []
    for key in sorted(set(found) | set(allowed)):
        n, listed = found.get(key), allowed.get(key)
        if listed is None:
            problems.append(f"{key}: {what} of {n} lines (limit {limit}): split it")
        elif n is None:
            problems.append(f"{key}: listed at {listed} lines, now within the limit: delete its line from the list")
        elif n > listed:
            problems.append(f"{key}: {n} lines, listed at {listed}: it grew; split it")
        elif n < listed:
            problems.append(f"{key}: {n} lines, listed at {listed}: update the list to {n}")
    return problems


def test_no_function_over_50_lines() -> None:
    assert not allowlist_problems(long_functions(), LONG_FUNCTIONS, MAX_FUNCTION, "function")


def test_no_file_over_500_lines() -> None:
    assert not allowlist_problems(long_files(), LONG_FILES, MAX_FILE, "file")


# ----------------------------------------------------------------------------- imports


@dataclass(frozen=True)
class Rules:
    """The import rules: each layer's allowed targets (``"*"``: any) and the listed exceptions."""

    allowed: dict[str, frozenset[str]]
    exceptions: dict[tuple[str, str], str]  # (module, layer or module imported) -> reason

    def layer(self, module: str) -> str:
        """The layer of ``module``: the longest layer name it starts with (``pipeline``: the shell)."""
        parts = module.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in self.allowed:
                return ".".join(parts[:n])
        raise KeyError(f"{module} is in no layer of the rules")

    def forbidden(self, src: str, dst: str) -> bool:
        a, b = self.layer(src), self.layer(dst)
        if a == b or "*" in self.allowed[a] or b in self.allowed[a]:
            return False
        return (src, b) not in self.exceptions and (src, dst) not in self.exceptions


def parse_rules(text: str) -> Rules:
    """The ``rules`` fenced block of ``text``: ``layer: targets...`` lines, then ``module -> target: reason``.

    >>> r = parse_rules("```rules\\nlow:\\nhigh: low\\n# a comment\\nlow.x -> high: why\\n```")
    >>> r.forbidden("high.a", "low.b"), r.forbidden("low.b", "high.a"), r.forbidden("low.x", "high.a")
    (False, True, False)
    """
    match = re.search(r"^```rules\n(.*?)^```", text, re.S | re.M)
    assert match, "docs/design.md has no ```rules block"
    allowed: dict[str, frozenset[str]] = {}
    exceptions: dict[tuple[str, str], str] = {}
    for line in match.group(1).splitlines():
        line = line.split("#", 1)[0].strip()
        if "->" in line:
            edge, _, reason = line.partition(":")
            src, _, dst = (s.strip() for s in edge.partition("->"))
            assert reason.strip(), f"an exception needs a reason: {line}"
            exceptions[(src, dst)] = reason.strip()
        elif line:
            layer, _, targets = line.partition(":")
            allowed[layer.strip()] = frozenset(targets.split())
    unknown = {t for ts in allowed.values() for t in ts if t != "*"} - set(allowed)
    assert not unknown, f"rules name unknown layers: {sorted(unknown)}"
    return Rules(allowed, exceptions)


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str, known: Iterable[str]) -> set[str]:
    """Our modules ``tree`` imports anywhere (top level, in functions, under ``TYPE_CHECKING``): for
    ``from pkg import name`` the submodule ``pkg.name`` when it is one, else ``pkg``.

    >>> tree = ast.parse("from a import b, c\\nimport os\\ndef f():\\n    import a.d")
    >>> sorted(imported(tree, "x", {"a", "a.b", "a.d", "x"}))
    ['a', 'a.b', 'a.d']
    """
    ours, out = set(known), set()
    tops = {k.split(".")[0] for k in ours}
    package = module if module in ours and any(k.startswith(module + ".") for k in ours) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] in tops)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, *([base] if base else [])])
            if base.split(".")[0] not in tops:
                continue
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in ours else base)
    return out


def import_graph(paths: Iterable[Path], root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: our modules it imports}`` of the files ``paths`` under ``root``."""
    paths = list(paths)
    names = {module_name(p, root): p for p in paths}
    return {m: imported(ast.parse(p.read_text(), str(p)), m, names) - {m} for m, p in names.items()}


def violations(graph: Mapping[str, set[str]], rules: Rules) -> list[str]:
    return sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if rules.forbidden(a, b))


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted.

    >>> cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}})
    [['a', 'b']]
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


@pytest.fixture(scope="module")
def rules() -> Rules:
    return parse_rules((ROOT / "docs" / "design.md").read_text())


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(sources())


def test_every_module_has_a_layer(rules: Rules, graph: dict[str, set[str]]) -> None:
    for module in graph:
        rules.layer(module)


def test_import_arrows(rules: Rules, graph: dict[str, set[str]]) -> None:
    assert violations(graph, rules) == []


def test_every_exception_is_still_needed(rules: Rules, graph: dict[str, set[str]]) -> None:
    """A listed exception that no import uses any more is deleted from the rules."""
    used = {(a, b) for a, ts in graph.items() for t in ts for b in (t, rules.layer(t))}
    assert sorted(set(rules.exceptions) - used) == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == [list(c) for c in sorted(KNOWN_CYCLES)]


def test_a_forbidden_arrow_fails(rules: Rules, tmp_path: Path) -> None:
    """The check catches a bad import wherever it hides: a lower package importing a higher one, serving
    importing the experiment side (in a function, under TYPE_CHECKING), and a cycle."""
    files = {
        "runtime/io.py": "import scans.records\n",
        "scans/records.py": "from runtime import io\n",
        "evaluation/metrics.py": "def f():\n    from detectors import gt\n",
        "detectors/gt.py": "",
        "pipeline/serve/bundle.py": "if TYPE_CHECKING:\n    import pipeline.experiment.run\n",
        "pipeline/experiment/run.py": "from pipeline.serve import bundle\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    g = import_graph(sorted(tmp_path.rglob("*.py")), tmp_path)
    assert violations(g, rules) == [
        "evaluation.metrics -> detectors.gt",
        "pipeline.experiment.run -> pipeline.serve.bundle",
        "pipeline.serve.bundle -> pipeline.experiment.run",
        "runtime.io -> scans.records",
    ]
    assert cycles(g) == [
        ["pipeline.experiment.run", "pipeline.serve.bundle"],
        ["runtime.io", "scans.records"],
    ]
