"""What every ``medledger`` command shares: options, passphrase, output, failure."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import simplejson

__all__ = [
    "EXIT_ERROR",
    "EXIT_TAMPERED",
    "PASSPHRASE_ENV",
    "dir_option",
    "emit",
    "fail",
    "progress",
    "read_passphrase",
]

EXIT_ERROR = 1
EXIT_TAMPERED = 3
PASSPHRASE_ENV = "MEDLEDGER_PASSPHRASE"  # noqa: S105 - the variable name, not a secret

dir_option = click.option(
    "--dir",
    "root",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The node directory.",
)


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one ``error:`` line on stderr and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def read_passphrase(
    *, confirm: bool, env: str = PASSPHRASE_ENV, label: str = "Keystore passphrase"
) -> bytes:
    """A passphrase from the environment variable ``env`` or an interactive prompt.

    ``confirm`` means a new passphrase is being set: it is asked twice and must
    pass the strength floor (:func:`~medledger.core.passphrase.check_new_passphrase`).
    """
    from medledger.core.errors import InvalidInput
    from medledger.core.passphrase import check_new_passphrase

    value = os.environ.get(env)
    if value is None:
        if not sys.stdin.isatty():
            fail(f"no passphrase: set {env} or run in a terminal")
        value = click.prompt(label, hide_input=True, confirmation_prompt=confirm)
    if not value:
        fail("the passphrase must not be empty")
    if confirm:
        try:
            check_new_passphrase(value.encode("utf-8"), what=label.lower())
        except InvalidInput as exc:
            fail(str(exc))
    return value.encode("utf-8")


def emit(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout (FHIR decimals keep their precision)."""
    click.echo(simplejson.dumps(obj, indent=2, ensure_ascii=False, use_decimal=True))


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on an interactive stderr; silent otherwise."""
    if not sys.stderr.isatty():
        yield lambda _done: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda done: bar.update(task, completed=done)
