"""The layer picture in the README is enforced here, by walking every import."""

from __future__ import annotations

import ast
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
    "api": 6,
    "cli": 6,
    "demo": 6,
    "benchmarks": 6,
    "network": 6,
    "netproc": 6,
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
