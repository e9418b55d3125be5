"""The ``medledger`` command line.

Every command reports a failure as one line on stderr (``error: …``) and a
non-zero exit status, never a traceback: 1 for errors, 2 for usage errors,
3 when verification finds tampering.
"""

from __future__ import annotations

import os
import sys

import click

from medledger import __version__
from medledger.cli.common import EXIT_TAMPERED, fail
from medledger.cli.lazy import LazyGroup
from medledger.core.errors import MedledgerError, VerificationError

__all__ = ["COMMANDS", "PRIVATE_UMASK", "cli", "main"]


#: Every command: where it is defined. A run imports only the module of its own
#: command (see :class:`~medledger.cli.lazy.LazyGroup`), so each start stays short.
COMMANDS = {
    "audit": "medledger.cli.sharing:audit",
    "backup": "medledger.cli.storage:backup",
    "bench": "medledger.cli.bench:bench",
    "chain": "medledger.cli.chain:chain",
    "consent": "medledger.cli.sharing:consent",
    "consortium": "medledger.cli.consortium:consortium",
    "demo": "medledger.cli.demo:demo",
    "keys": "medledger.cli.records:keys",
    "migrate": "medledger.cli.storage:migrate",
    "nats": "medledger.cli.nats:nats",
    "network": "medledger.cli.network:network",
    "node": "medledger.cli.chain:node",
    "patient": "medledger.cli.sharing:patient",
    "record": "medledger.cli.records:record",
    "restore": "medledger.cli.storage:restore",
    "share": "medledger.cli.sharing:share",
    "token": "medledger.cli.service:token",
    "verify": "medledger.cli.chain:verify",
}


@click.group(
    cls=LazyGroup,
    lazy_commands=COMMANDS,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# The version as a constant: looking it up in the installed package's metadata
# (importlib.metadata) would cost every `--version` a scan of site-packages.
@click.version_option(version=__version__, package_name="medledger")
def cli() -> None:
    """medledger: secure health-information storage on a hybrid blockchain."""


#: Files and directories medledger creates are its owner's alone (0600 / 0700):
#: databases and their WAL files, blobs, logs, tokens, PID records, exports.
PRIVATE_UMASK = 0o077


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning every expected failure into one line and an exit code."""
    # Before anything is opened: SQLite, nats-server and PostgreSQL create their
    # files with the process umask, and children inherit it.
    os.umask(PRIVATE_UMASK | os.umask(PRIVATE_UMASK))
    try:
        cli.main(args=argv, prog_name="medledger", standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VerificationError as exc:
        fail(f"verification FAILED: {exc}", EXIT_TAMPERED)
    except MedledgerError as exc:
        fail(str(exc))
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except OSError as exc:
        fail(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
    except KeyboardInterrupt:
        fail("interrupted", 130)
    sys.exit(0)


if __name__ == "__main__":
    main()
