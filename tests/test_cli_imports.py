"""The command line stays light: heavy libraries load only for the command that needs them.

Each check runs in a fresh interpreter (a module already imported by this test
process would hide the import) and reads ``sys.modules`` afterwards: which
modules loaded, never how long it took.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from medledger.config import NodeConfig

MakeNode = Callable[..., tuple[Path, NodeConfig]]

#: Libraries that only the server, network, PostgreSQL, FHIR or plotting commands need.
HEAVY = ("aiohttp", "fastapi", "uvicorn", "nats", "psycopg", "matplotlib", "starlette", "httpx")


def _run_then_list_heavy(code: str) -> tuple[str, list[str]]:
    """What ``code`` printed, and the packages from HEAVY in ``sys.modules`` after it ran."""
    probe = (
        "import json, sys\n"
        f"{code}\n"
        f"heavy = {HEAVY!r}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & set(heavy))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    printed, _, last = done.stdout.rstrip("\n").rpartition("\n")
    loaded: list[str] = json.loads(last)
    return printed, loaded


def _loaded_after(code: str) -> list[str]:
    return _run_then_list_heavy(code)[1]


def _run_cli(args: list[str]) -> str:
    """Code that runs the CLI with ``args`` in-process and keeps going after it exits."""
    return (
        "from medledger.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as exc:\n"
        "    assert exc.code == 0, exc.code\n"
    )


def test_importing_the_cli_loads_no_heavy_library() -> None:
    assert _loaded_after("import medledger.cli") == []


def test_help_of_every_command_loads_no_heavy_library() -> None:
    code = (
        "import contextlib, io\n"
        "from medledger.cli import cli, main\n"
        "for args in [[]] + [[name] for name in cli.commands]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main([*args, '--help'])\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code == 0, (args, exc.code)\n"
    )
    assert _loaded_after(code) == []


def test_node_show_prints_the_identity_without_loading_a_heavy_library(
    make_node: MakeNode,
) -> None:
    root, config = make_node()
    printed, loaded = _run_then_list_heavy(_run_cli(["node", "show", "--dir", str(root), "--json"]))
    assert loaded == []
    shown = json.loads(printed)
    assert shown["institution"] == config.institution
    assert shown["keys"]["signing"]["fingerprint"] == config.signing_key.fingerprint


def test_the_probe_sees_a_heavy_import() -> None:
    # The checks above would pass vacuously if the probe could not see an import at all.
    assert _loaded_after("import aiohttp") == ["aiohttp"]


def test_reading_a_chain_loads_no_heavy_library(make_node: MakeNode) -> None:
    # `chain show` opens the chain through the node module, which must not pull
    # in the peer HTTP client (aiohttp) that only a consortium member uses.
    root, config = make_node()
    printed, loaded = _run_then_list_heavy(
        _run_cli(["chain", "show", "--dir", str(root), "--json"])
    )
    assert loaded == []
    head = json.loads(printed)
    assert head["chain"] == config.chain
    assert head["height"] == 0
