"""What every ``medledger`` command shares: options, passphrase, output, failure."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

__all__ = [
    "EXIT_ERROR",
    "EXIT_TAMPERED",
    "PASSPHRASE_ENV",
    "dir_option",
    "emit",
    "fail",
    "forget_env",
    "number_option",
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


def number_option(
    *decls: str,
    low: float,
    default: float | tuple[float, ...],
    high: float | None = None,
    multiple: bool = False,
    help: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An option taking a number from ``low`` (to ``high``), its default shown in ``--help``:
    the shape of every size, count, rate and timeout option. Whole numbers throughout
    (``default``, ``low``, ``high``) make it an integer option (``click.IntRange``), any
    fraction a float option."""
    values = (*(default if isinstance(default, tuple) else (default,)), low, high)
    kind: click.IntRange | click.FloatRange = (
        click.IntRange(min=int(low), max=None if high is None else int(high))
        if all(v is None or isinstance(v, int) for v in values)
        else click.FloatRange(min=low, max=high)
    )
    return click.option(
        *decls, type=kind, default=default, show_default=True, multiple=multiple, help=help
    )


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    """Print one ``error:`` line on stderr and exit with ``code``."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


#: The longest passphrase read from a file descriptor.
_MAX_PASSPHRASE_BYTES = 4096


def read_passphrase(
    *,
    confirm: bool,
    env: str = PASSPHRASE_ENV,
    label: str = "Keystore passphrase",
    fd: int | None = None,
) -> bytes:
    """A passphrase from file descriptor ``fd``, the environment variable ``env`` or a prompt.

    ``fd`` (``--passphrase-fd``) is read to its end and closed; one trailing
    newline is not part of the passphrase. ``env`` is then wiped from this
    process (see :func:`forget_env`) whichever source was used, so no child
    inherits it and ``/proc/<pid>/environ`` no longer shows it.
    ``confirm`` means a new passphrase is being set: it is asked twice and must
    pass the strength floor (:func:`~medledger.core.passphrase.check_new_passphrase`).
    """
    from medledger.core.errors import InvalidInput
    from medledger.core.passphrase import check_new_passphrase

    value = os.environ.get(env)
    forget_env(env)
    if fd is not None:
        value = _read_fd(fd)
    elif value is None:
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


def _read_fd(fd: int) -> str:
    """The passphrase written to ``fd`` (a pipe from the launching process), then closed."""
    data = b""
    try:
        while len(data) <= _MAX_PASSPHRASE_BYTES and (chunk := os.read(fd, 4096)):
            data += chunk
    except OSError as exc:
        fail(f"cannot read the passphrase from file descriptor {fd}: {exc.strerror}")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if len(data) > _MAX_PASSPHRASE_BYTES:
        fail(f"the passphrase on file descriptor {fd} is longer than {_MAX_PASSPHRASE_BYTES} bytes")
    if data.endswith(b"\n"):
        data = data[:-1].removesuffix(b"\r")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        fail(f"the passphrase on file descriptor {fd} is not UTF-8")


def forget_env(name: str) -> None:
    """Remove environment variable ``name`` from this process, and wipe its bytes.

    ``os.environ.pop`` alone keeps children from inheriting it, but Linux still
    shows the process's *initial* environment in ``/proc/<pid>/environ`` (to
    the same user, and to root): the value's bytes are overwritten in place
    first, where the C library still points at them.
    """
    if name not in os.environ:
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.getenv.restype = ctypes.c_void_p
        address = libc.getenv(name.encode())
        if address:
            ctypes.memset(address, 0, libc.strlen(ctypes.c_void_p(address)))
    except (OSError, AttributeError):  # no C library to ask: removing it is all we can do
        pass
    os.environ.pop(name, None)


def emit(obj: Any) -> None:
    """Print ``obj`` as indented JSON on stdout (FHIR decimals keep their precision)."""
    import simplejson  # not needed by commands that print no JSON

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
