"""How the tests start the real ``medledger`` command (a subprocess, as a user would)."""

from __future__ import annotations

import sys
from pathlib import Path


def medledger_command() -> list[str]:
    """The installed ``medledger`` script beside this interpreter, else the CLI entry point."""
    script = Path(sys.executable).parent / "medledger"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from medledger.cli import main; main()"]
