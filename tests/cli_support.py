"""How the tests run the ``medledger`` command: as a real subprocess, or in this process.

A subprocess is what a user runs, and each costs a Python start (imports
included). Where a test checks only what a command prints and its exit status,
:func:`run_in_process` runs the same entry point (``medledger.cli.main``) in
this process: same output, same exit status, the same ``Traceback`` a crash
would print, and none of the process-wide state the command touches (standard
streams, environment, umask, working directory, logging, signal handlers,
the asyncio policy) left behind for the next test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

__all__ = ["CliOutcome", "medledger_command", "run_in_process", "start_node_process"]


def medledger_command() -> list[str]:
    """The installed ``medledger`` script beside this interpreter, else the CLI entry point."""
    script = Path(sys.executable).parent / "medledger"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from medledger.cli import main; main()"]


def start_node_process(
    root: Path,
    port: int,
    log: Path,
    env: Mapping[str, str],
    *options: str,
    append: bool = False,
) -> subprocess.Popen[bytes]:
    """``medledger node start --dir ROOT --port PORT OPTIONS`` as its own process, with
    ``env``; its output (stdout and stderr) goes to ``log`` (``append``: after what is
    there, else replacing it). The caller waits for it to be ready and stops it."""
    with log.open("ab" if append else "wb") as sink:
        return subprocess.Popen(
            [
                *medledger_command(),
                "node",
                "start",
                "--dir",
                str(root),
                "--port",
                str(port),
                *options,
            ],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=dict(env),
        )


@dataclass(frozen=True, slots=True)
class CliOutcome:
    """What a finished command left: its exit status and the bytes of its stdout and stderr."""

    code: int
    stdout: bytes
    stderr: bytes

    @property
    def out(self) -> str:
        return self.stdout.decode("utf-8")

    @property
    def err(self) -> str:
        return self.stderr.decode("utf-8")


#: Signals a command (or a library it calls) may install a handler for.
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE, signal.SIGUSR1)


def run_in_process(
    args: Sequence[str | Path], *, env: Mapping[str, str] | None = None, stdin: bytes = b""
) -> CliOutcome:
    """Run ``medledger ARGS`` through ``medledger.cli.main`` here, as the console script would.

    The environment the command sees is this process's without any
    ``MEDLEDGER_*`` variable, plus ``env`` (as the subprocess helpers build it);
    stdin holds ``stdin`` and is not a terminal. The exit status is the one the
    process would have: ``sys.exit``'s code, 1 with the traceback on stderr for
    an exception that escaped ``main``. Afterwards the environment, umask,
    working directory, logging configuration, signal handlers and asyncio
    policy are what they were before, whatever the command changed.
    Not for commands that start processes which inherit the standard streams,
    read a passphrase from a file descriptor, or serve until signalled.
    """
    from medledger.cli import main

    argv = [str(a) for a in args]
    with _restored_process_state():
        for name in [k for k in os.environ if k.startswith("MEDLEDGER_")]:
            del os.environ[name]
        os.environ.update(env or {})
        with CliRunner().isolation(input=stdin) as (out, err, _mixed):
            try:
                main(argv)
                code = 0  # main always exits; this is the status if it ever returns
            except SystemExit as exc:
                code = _exit_status(exc)
            except BaseException:
                # What the interpreter prints for an uncaught exception.
                sys.stderr.write(traceback.format_exc())
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
            return CliOutcome(code, out.getvalue(), err.getvalue())


def _exit_status(exc: SystemExit) -> int:
    """The status a process exiting with ``exc`` has: None is 0, other non-ints print and 1."""
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    sys.stderr.write(f"{exc.code}\n")
    return 1


@contextlib.contextmanager
def _restored_process_state() -> Iterator[None]:
    environ = dict(os.environ)
    umask = os.umask(0o077)
    os.umask(umask)
    cwd = Path.cwd()
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    policy = asyncio.get_event_loop_policy()
    loggers = _logging_state()
    try:
        yield
    finally:
        for name in [k for k in os.environ if k not in environ]:
            del os.environ[name]
        for name, value in environ.items():
            if os.environ.get(name) != value:
                os.environ[name] = value
        os.umask(umask)
        os.chdir(cwd)
        for sig, handler in handlers.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        asyncio.set_event_loop_policy(policy)
        _restore_logging(loggers)


_LoggerState = tuple[list[logging.Handler], int, bool, bool]


def _logging_state() -> dict[str, _LoggerState]:
    """Handlers, level, propagation and disabled flag of the root and every named logger."""
    loggers: dict[str, logging.Logger] = {"": logging.getLogger()}
    for name, logger in logging.Logger.manager.loggerDict.items():
        if isinstance(logger, logging.Logger):
            loggers[name] = logger
    return {
        name: (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
        for name, lg in loggers.items()
    }


def _restore_logging(before: dict[str, _LoggerState]) -> None:
    """Put every logger back as ``before`` saw it; one created since gets the defaults."""
    for name in _logging_state():
        handlers, level, propagate, disabled = before.get(name, ([], logging.NOTSET, True, False))
        logger = logging.getLogger(name)  # "" is the root logger
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled
