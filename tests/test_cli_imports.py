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
        "import click, contextlib, io\n"
        "from medledger.cli import cli, main\n"
        "names = cli.list_commands(click.Context(cli))\n"
        "assert len(names) == 18, names\n"
        "for args in [[]] + [[name] for name in names] + [['node', 'start'], ['bench', 'all']]:\n"
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


#: What a command reading one store of a node needs none of: the other commands'
#: modules, the opened node (records service, FHIR models, consortium member),
#: the sequencer and asyncio, X.509 certificates.
NOT_FOR_ONE_STORE = (
    "medledger.cli.bench",
    "medledger.cli.consortium",
    "medledger.cli.network",
    "medledger.cli.records",
    "medledger.cli.sharing",
    "medledger.cli.storage",
    "medledger.node",
    "medledger.ledger.private",
    "medledger.services.records.service",
    "medledger.services.tls",
    "asyncio",
    "pydantic",
    "cryptography.x509",
)


def _modules_loaded_by(code: str, names: tuple[str, ...]) -> tuple[str, list[str]]:
    """What ``code`` printed, and which of the modules ``names`` it imported."""
    probe = (
        f"import json, sys\n{code}\nprint(json.dumps(sorted(set(sys.modules) & set({names!r}))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    printed, _, last = done.stdout.rstrip("\n").rpartition("\n")
    loaded: list[str] = json.loads(last)
    return printed, loaded


def test_the_probe_sees_a_module_of_medledger() -> None:
    _, loaded = _modules_loaded_by("import medledger.node", NOT_FOR_ONE_STORE)
    assert "medledger.node" in loaded and "asyncio" in loaded


def test_token_list_and_verify_load_their_command_and_one_store_only(
    make_node: MakeNode,
) -> None:
    root, config = make_node()
    printed, loaded = _modules_loaded_by(
        _run_cli(["token", "list", "--dir", str(root)]), NOT_FOR_ONE_STORE
    )
    assert loaded == []
    assert json.loads(printed) == []
    printed, loaded = _modules_loaded_by(
        _run_cli(["verify", "--dir", str(root)]), NOT_FOR_ONE_STORE
    )
    assert loaded == []
    assert printed.startswith(f"OK: {config.chain}: 1 blocks, 1 transactions")
