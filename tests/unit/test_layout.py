"""The layout's rules, read from the source without importing it: imports run one way
(``sim`` -> ``serving`` -> ``learner`` -> ``stream``), no product module imports ``bench`` or the
tests, and no product module is over 600 lines.

Every import counts: at module level, inside functions, under ``TYPE_CHECKING``, relative ones
(resolved against the module's package) and ``importlib.import_module("...")`` with a literal name.
The console script ``stream/cli.py`` dispatches to every package, so only the direction rule
spares it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lowest first: a package may import itself and the packages before it in this tuple.
PRODUCT = ("stream", "learner", "serving", "sim")
NEVER_IMPORTED = ("bench", "tests")  # benchmarks and tests use the product, never the reverse
CONSOLE_SCRIPT = "stream/cli.py"
MAX_LINES = 600


def product_modules() -> list[Path]:
    return sorted(p for package in PRODUCT for p in (ROOT / package).rglob("*.py"))


def imported_modules(source: str, path: str) -> list[tuple[int, str, str]]:
    """(line, statement, absolute module name) for every import in ``source``, the module at
    ``path`` (relative to the repository root, for resolving relative imports)."""
    package = Path(path).parent.parts
    found = []
    for node in ast.walk(ast.parse(source, path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, ast.unparse(node), alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, ast.unparse(node), node.module))
                continue
            up = node.level - 1
            if up >= len(package):  # Python refuses it at run time; report it, do not guess
                found.append((node.lineno, ast.unparse(node), "<beyond the top-level package>"))
                continue
            base = ".".join(package[:len(package) - up])
            found.append((node.lineno, ast.unparse(node), f"{base}.{node.module}" if node.module else base))
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            name = node.args[0]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                found.append((node.lineno, ast.unparse(node), name.value))
    return sorted(found)


def _is_import_call(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id in ("__import__", "import_module")
            or isinstance(func, ast.Attribute) and func.attr == "import_module")


def violations(source: str, path: str) -> list[str]:
    """Each import of the module at ``path`` that breaks the layout, as "path:line: statement (why)"."""
    own = Path(path).parts[0]
    allowed = PRODUCT[:PRODUCT.index(own) + 1]
    out = []
    for line, statement, module in imported_modules(source, path):
        top = module.split(".")[0]
        if top in NEVER_IMPORTED:
            why = f"product code never imports {top}"
        elif module.startswith("<"):
            why = "relative import " + module.strip("<>")
        elif top in PRODUCT and top not in allowed and path != CONSOLE_SCRIPT:
            why = f"{own} may import only {', '.join(allowed)}"
        else:
            continue
        out.append(f"{path}:{line}: {statement}  ({why})")
    return out


# -- the checker itself, on small sources ----------------------------------------------------------


@pytest.mark.parametrize("path, source, expected", [
    ("stream/worker/app.py", "import bench.ingest", "never imports bench"),
    ("sim/demo.py", "def f():\n    from bench import bias\n", "sim/demo.py:2:"),
    ("serving/api.py", "from tests.traffic import TASTE_A", "never imports tests"),
    ("stream/events.py", "import learner", "stream may import only stream"),
    ("learner/service.py", "if TYPE_CHECKING:\n    from serving.model import Model\n",
     "learner may import only stream, learner"),
    ("serving/app.py", "import importlib\nimportlib.import_module('sim.demo')", "serving may import only"),
    ("stream/cli.py", "from bench.bias import main", "never imports bench"),
    ("stream/topics.py", "from ... import x", "beyond the top-level package"),
])
def test_checker_finds_a_wrong_import(path, source, expected):
    (found,) = violations(source, path)
    assert expected in found


@pytest.mark.parametrize("path, source", [
    ("sim/demo.py", "import serving.api, learner.service, stream.events, numpy"),
    ("learner/service.py", "from stream.topics import Topics\nfrom .online_mf import OnlineMF"),
    ("stream/worker/app.py", "from ..log import buffer\nfrom . import pipeline"),
    ("stream/cli.py", "from sim.cli import add_parsers\nfrom serving.cli import add_parser"),
    ("serving/api.py", "import benchmark_tools\nimport testsuite"),  # other names that merely start alike
])
def test_checker_allows_imports_along_the_direction(path, source):
    assert violations(source, path) == []


def test_relative_imports_resolve_against_the_package():
    found = imported_modules("from ..log.table import EVENTS\nfrom . import metrics\nfrom .join import x",
                             "stream/worker/pipeline.py")
    assert [module for _, _, module in found] == ["stream.log.table", "stream.worker", "stream.worker.join"]


# -- the tree -----------------------------------------------------------------------------------------


def test_every_product_package_is_read():
    modules = {p.relative_to(ROOT).as_posix() for p in product_modules()}
    assert CONSOLE_SCRIPT in modules
    assert {m.split("/")[0] for m in modules} == set(PRODUCT)


def test_imports_run_one_way():
    """sim -> serving -> learner -> stream; nothing imports bench or the tests."""
    found = []
    for path in product_modules():
        found += violations(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())
    assert not found, "imports against the layout:\n" + "\n".join(found)


def test_no_product_module_is_over_600_lines():
    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in product_modules()}
    over = [f"{path}: {n} lines" for path, n in sorted(sizes.items()) if n > MAX_LINES]
    assert not over, f"modules over {MAX_LINES} lines (split them along their seams):\n" + "\n".join(over)
