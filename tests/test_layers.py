"""The house rules of docs/architecture.md, checked on the import graph of src/presso (read with ``ast``).

Floors (imports only go down; modules on one floor may import each other, without cycles):
``cli`` -> ``pipeline``, ``report`` -> ``search`` -> ``compress``, ``convert`` -> ``train`` -> ``tasks`` ->
``bench``, ``data`` -> ``models`` -> ``errors``.

Run ``python tests/test_layers.py`` for the whole report.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "presso"

# top-level module or subpackage of presso -> its floor
FLOORS = {
    "errors": 0,
    "progress": 0,
    "results": 0,
    "_verbs": 0,
    "safeio": 0,  # reading untrusted files: regular files only, size and JSON-depth limits
    "outdir": 0,  # the one output-folder rule (temporary sibling, rename, --overwrite backup)
    "cpu": 0,  # what the CPU can do for INT8 (VNNI): asked by models.qat, bench and convert
    "models": 1,
    "data": 2,
    "bench": 2,
    "tasks": 3,
    "train": 4,
    "compress": 5,
    "convert": 5,
    "search": 6,
    "pipeline": 7,
    "report": 7,
    "api": 7,
    "testing": 8,  # fixtures for tests and users' tests: nothing in the library imports them
    "cli": 9,
    "demo": 9,
    "__main__": 9,
}
TOP = {"cli", "demo", "__main__"}  # may import the top-level package

# Imports that go up a floor, each with the reason (docs/architecture.md, "Where it departs").
ALLOWED_UP = {
    # predict.py is the bundle's self-contained predictor (it imports nothing from presso at module level, so it adds
    # no edge of its own); training decodes images with it so deployed inputs match training's pixel for pixel.
    ("presso.data.images", "presso.convert.predict"),
}
# A model directory *is* a model source (loading a source may find a directory; a directory rebuilds its source).
ALLOWED_CYCLES = [{"presso.models.directory", "presso.models.sources"}]
LONG_FILE_MARK = "Over 500 lines because"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every presso module named by an import in ``path`` (at any depth: lazy imports count too)."""
    name = module_name(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in out if m == "presso" or m.startswith("presso.")}


def graph() -> dict[str, set[str]]:
    files = {module_name(f): f for f in SRC.rglob("*.py")}
    return {n: {m for m in imports(f) if m in files and m != n} | ({"presso"} & imports(f)) for n, f in files.items()}


def floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None


def upward_imports(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for n, deps in g.items():
        f = floor(n)
        for d in deps:
            fd = floor(d)
            if f is None or fd is None or d.split(".")[1] == n.split(".")[1]:
                continue
            if fd > f and (n, d) not in ALLOWED_UP:
                bad.append(f"{n} (floor {f}) imports {d} (floor {fd})")
    return sorted(bad)


def top_level_imports(g: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{n} imports {d}"
        for n, deps in g.items()
        for d in deps
        if (d == "presso" or d.startswith("presso.cli")) and n != "presso" and n.split(".")[1] not in TOP
    )


def cycles(g: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan). A package importing its own modules (its
    ``__init__`` re-exporting them) is how packages expose their API, not a design cycle: those edges are left out."""
    g = {v: {w for w in deps if w in g and not w.startswith(v + ".")} for v, deps in g.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    sys.setrecursionlimit(10000)
    for v in g:
        if v not in index:
            visit(v)
    return out


def long_files() -> list[str]:
    return sorted(
        f"{f.relative_to(SRC.parent)}: {n} lines"
        for f in SRC.rglob("*.py")
        if (n := len(f.read_text().splitlines())) > 500
        and LONG_FILE_MARK not in "".join(f.read_text().splitlines()[:30])
    )


def test_imports_only_go_down_the_floors():
    assert upward_imports(graph()) == []


def test_no_library_module_imports_the_top_level_package_or_the_cli():
    assert top_level_imports(graph()) == []


def test_models_is_the_ground_floor():
    g = graph()
    above = {"compress", "train", "search", "bench", "convert", "pipeline", "tasks", "data", "report", "cli"}
    bad = [f"{n} -> {d}" for n, deps in g.items() if n.startswith("presso.models") for d in deps
           if d.split(".")[1:2] and d.split(".")[1] in above]  # fmt: skip
    assert bad == []


def test_no_import_cycle_except_the_justified_one():
    assert [sorted(c) for c in cycles(graph()) if c not in ALLOWED_CYCLES] == []


def test_no_source_file_over_500_lines_without_a_reason_at_its_top():
    assert long_files() == []


def test_the_checks_catch_what_they_promise():
    # a made-up graph with one of each fault: the checks above are only as good as these functions
    g = {
        "presso.models.card": {"presso.compress.prune"},
        "presso.bench.api": {"presso", "presso.bench.runner"},
        "presso.bench.runner": {"presso.bench.api"},
        "presso.compress.prune": {"presso.models.card"},
        "presso.cli.app": {"presso"},
        "presso.search": {"presso.search.nas"},  # a package re-exporting its module: no cycle by itself...
        "presso.search.nas": {"presso.search.study"},
        "presso.search.study": {"presso.search.nas"},  # ...but two of its modules importing each other are one
    }
    assert upward_imports(g) == ["presso.models.card (floor 1) imports presso.compress.prune (floor 5)"]
    assert top_level_imports(g) == ["presso.bench.api imports presso"]
    assert sorted(map(sorted, cycles(g))) == [
        ["presso.bench.api", "presso.bench.runner"],
        ["presso.compress.prune", "presso.models.card"],
        ["presso.search.nas", "presso.search.study"],
    ]


@pytest.mark.parametrize(
    "code, absent",
    [
        # loading a model directory replays its recipe without the compressor, the trainer or the searcher
        (
            "from presso.models import load_model_dir; load_model_dir(d)",
            ("presso.compress", "presso.train", "presso.search", "presso.bench", "presso.convert"),
        ),
    ],
)
def test_loading_a_pruned_model_directory_imports_nothing_above_models(tmp_path, code, absent):
    from presso.compress import PruneConfig, compress
    from presso.models import load_model, save_model_dir

    model = load_model("presso:resnet8", num_classes=3)
    save_model_dir(compress(model, "1,3,16,16", PruneConfig(ratio=0.5)).model, tmp_path / "m")
    script = (
        f"import json, sys; d = {str(tmp_path / 'm')!r}; {code}; "
        "print(json.dumps(sorted({'.'.join(m.split('.')[:2]) for m in sys.modules if m.startswith('presso.')})))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert not loaded & set(absent), loaded


if __name__ == "__main__":
    g = graph()
    problems = upward_imports(g) + top_level_imports(g)
    problems += [" <-> ".join(sorted(c)) for c in cycles(g) if c not in ALLOWED_CYCLES]
    problems += [f"{x} (no '{LONG_FILE_MARK}' at its top)" for x in long_files()]
    print("\n".join(problems) or f"{len(g)} modules: imports go down, no cycle but the justified one")
