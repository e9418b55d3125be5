"""A consortium on this machine with one process per node: ``medledger network up|status|down``.

Unlike :mod:`medledger.localnet.network` (every node inside one process), each
institution here runs its own ``medledger node start`` process, as it would
in production, and the processes share an ordering service:

* ``solo``: one SQLite order file, ``<dir>/order.db``, opened by every node;
* ``jetstream``: a NATS cluster of one ``nats-server`` per institution (one
  server below three institutions), stream replicas ``min(3, servers)``.

Layout of a network directory::

    <dir>/network.json        what was created: nodes, ports, tokens (mode 0600)
    <dir>/order.db            the solo order
    <dir>/<institution>/      a node directory (node.toml, keys, chains, …)
        node.log, node.pid    the node process's JSON log lines and PID record
    <dir>/nats/n<i>/          nats.conf, nats.log, nats.pid, store/
    <dir>/postgres/data/      the embedded PostgreSQL cluster (``--store postgres``; as
                              root with a private <dir>: in the temporary directory)

Processes are detached (own session), so they outlive ``network up``. A PID
record holds the PID, the process's start time (``/proc/<pid>/stat``) and
its argv: :func:`down` signals a PID only while ``/proc`` still shows that
very process, never one that reused the number. ``up`` on an existing
directory starts whatever is not running and keeps all data. The keystore
passphrase reaches a node process through a pipe (``node start
--passphrase-fd``), never argv or the environment, which ``/proc`` shows for
the node's whole life. Everything is created owner-only: directories 0700,
files 0600 (explicit modes, and the umask of every process started here).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medledger.config import ConsortiumConfig, NodePaths, StorageConfig, load_config
from medledger.core.errors import Conflict, InvalidInput, MedledgerError, NotFound
from medledger.core.hashing import sha256
from medledger.core.passphrase import check_new_passphrase
from medledger.ledger.clock import SystemClock
from medledger.storage.keystore import FileKeyStore, KdfParams, atomic_write
from medledger.storage.sqlite.tokens import SqliteTokenStore

__all__ = [
    "create_order_file",
    "NETWORK_FILE",
    "NetworkError",
    "down",
    "load_network",
    "status",
    "up",
]

NETWORK_FILE = "network.json"
HOST = "127.0.0.1"
_VERSION = 1
_POLL_S = 0.1
_PG_DATABASE = "medledger"


class NetworkError(MedledgerError):
    """A network process could not be started, or did not become ready."""


# -- processes and PID records ----------------------------------------------------------


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of ``pid`` from ``/proc``, or ``None`` if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[19])


def _proc_argv(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]]


@dataclass(frozen=True, slots=True, kw_only=True)
class PidRecord:
    """A process this module started: PID, start time and argv (see module docstring)."""

    pid: int
    start_ticks: int
    argv: tuple[str, ...]

    def running(self) -> bool:
        """True while ``/proc`` shows this very process, alive (a zombie is not)."""
        stat = _proc_stat(self.pid)
        if stat is None or stat[0] in ("Z", "X") or stat[1] != self.start_ticks:
            return False
        return tuple(_proc_argv(self.pid) or ()) == self.argv

    def save(self, path: Path) -> None:
        data = {"pid": self.pid, "start_ticks": self.start_ticks, "argv": list(self.argv)}
        atomic_write(path, (json.dumps(data) + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> PidRecord | None:
        try:
            data = json.loads(path.read_text())
            return cls(
                pid=int(data["pid"]),
                start_ticks=int(data["start_ticks"]),
                argv=tuple(str(a) for a in data["argv"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _running(pid_file: Path) -> PidRecord | None:
    record = PidRecord.load(pid_file)
    return record if record is not None and record.running() else None


#: The umask of every process started here: what they create is their owner's alone.
PRIVATE_UMASK = 0o077
#: What ``node start --passphrase-fd`` reads at most (far below a pipe's capacity).
_MAX_PASSPHRASE_BYTES = 4096


def _launch(
    argv: Sequence[str],
    *,
    log: Path,
    pid_file: Path,
    env: Mapping[str, str],
    cwd: Path,
    pass_fds: Sequence[int] = (),
) -> PidRecord:
    """Start ``argv`` detached (own session, output appended to ``log``) and record it.

    ``pass_fds`` stay open in the child (a pipe carrying its passphrase).
    """
    sink = os.fdopen(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab")
    with sink:
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
                pass_fds=tuple(pass_fds),
                umask=PRIVATE_UMASK,
            )
        except OSError as exc:
            raise NetworkError(f"cannot start {argv[0]}: {exc}") from None
    try:
        stat = _proc_stat(proc.pid)
        record = PidRecord(pid=proc.pid, start_ticks=stat[1] if stat else -1, argv=tuple(argv))
        record.save(pid_file)
    except BaseException as exc:
        # Without its PID record `network down` could never stop it: stop it now
        # (our own child, so its PID cannot have been reused before the wait).
        proc.kill()
        proc.wait()
        if isinstance(exc, OSError):
            raise NetworkError(
                f"cannot record the PID of {argv[0]} in {pid_file} ({exc.strerror or exc});"
                " stopped it"
            ) from None
        raise
    return record


def _stop(records: Sequence[tuple[PidRecord, Path]], timeout: float) -> list[int]:
    """SIGTERM every recorded process still running, wait, then SIGKILL stragglers."""
    live = [(r, p) for r, p in records if r.running()]
    for record, _ in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(r.running() for r, _ in live) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    for record, _ in live:
        if record.running():  # still that very process: checked again right before the kill
            with contextlib.suppress(ProcessLookupError):
                os.kill(record.pid, signal.SIGKILL)
    while any(r.running() for r, _ in live):
        time.sleep(_POLL_S)
    for _, path in records:
        path.unlink(missing_ok=True)
    return [r.pid for r, _ in live]


def _http_status(url: str) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of GET ``url``; (0, {}) if nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:  # noqa: S310 (http to 127.0.0.1)
            return int(resp.status), json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read() or b"{}")
        except ValueError:
            body = {}
        exc.close()
        return int(exc.code), body
    except (OSError, ValueError):
        return 0, {}


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "no log"


# -- the network description ------------------------------------------------------------


def load_network(base: Path) -> dict[str, Any]:
    """``<base>/network.json``; :class:`NotFound` if ``base`` holds no network."""
    try:
        data: dict[str, Any] = json.loads((base / NETWORK_FILE).read_text())
    except FileNotFoundError:
        raise NotFound(f"{base} holds no network (no {NETWORK_FILE}); run 'network up'") from None
    except ValueError as exc:
        raise InvalidInput(f"{base / NETWORK_FILE}: {exc}") from None
    if data.get("version") != _VERSION:
        raise InvalidInput(f"{base / NETWORK_FILE}: unknown version {data.get('version')!r}")
    return data


def _save_network(base: Path, data: Mapping[str, Any]) -> None:
    # Holds the API tokens (and a PostgreSQL password): owner only.
    atomic_write(base / NETWORK_FILE, (json.dumps(data, indent=2) + "\n").encode(), mode=0o600)


@contextlib.contextmanager
def _locked(base: Path) -> Iterator[None]:
    """One ``up``/``down`` at a time per network directory."""
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.fdopen(os.open(base / ".lock", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a")
    with lock as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"another 'network up' or 'down' is running on {base}") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _medledger_argv() -> list[str]:
    """How to run the ``medledger`` command with this interpreter (argv as /proc shows it)."""
    script = Path(sys.executable).parent / "medledger"
    if script.is_file():
        return [sys.executable, str(script)]
    return [sys.executable, "-c", "from medledger.cli import main; main()"]


# -- NATS -------------------------------------------------------------------------------


def _nats_size(institutions: int) -> int:
    return institutions if institutions >= 3 else 1


def _nats_nodes(base: Path, spec: Sequence[Mapping[str, Any]]) -> list[Any]:
    from medledger.localnet.natsserver import NatsNode, NodePorts

    ports = [NodePorts(client=n["client"], cluster=n["cluster"], http=n["http"]) for n in spec]
    return [
        NatsNode(
            base / "nats" / n["name"],
            name=n["name"],
            ports=ports[i],
            peers=[p.cluster for j, p in enumerate(ports) if j != i] if len(ports) > 1 else (),
        )
        for i, n in enumerate(spec)
    ]


def _start_nats(base: Path, spec: Sequence[Mapping[str, Any]], timeout: float) -> None:
    nodes = _nats_nodes(base, spec)
    for node in nodes:
        pid_file = node.directory / "nats.pid"
        if _running(pid_file) is not None:
            continue
        node.store_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(node.config_path, node.config_text().encode("utf-8"))
        _launch(
            [str(node.binary), "-c", str(node.config_path)],
            log=node.directory / "nats.out",
            pid_file=pid_file,
            env=_env_without_secrets(),
            cwd=node.directory,
        )
    deadline = time.monotonic() + timeout
    for node in nodes:
        while _http_status(f"{node.monitor_url}/healthz")[0] != 200:
            if _running(node.directory / "nats.pid") is None:
                raise NetworkError(
                    f"nats-server {node.name} exited while starting: {node.last_error()}"
                )
            if time.monotonic() > deadline:
                raise NetworkError(f"nats-server {node.name} not healthy after {timeout:.0f} s")
            time.sleep(_POLL_S)


# -- PostgreSQL -------------------------------------------------------------------------


def _postgres(spec: Mapping[str, Any]) -> Any:
    from medledger.localnet.pg_embedded import EmbeddedPostgres

    return EmbeddedPostgres(
        Path(spec["data_dir"]), port=int(spec["port"]), password=str(spec["password"])
    )


def _postgres_pid(spec: Mapping[str, Any]) -> int | None:
    """The postmaster's PID if the network's cluster is running (its own lock file says so)."""
    try:
        pid = int((Path(spec["data_dir"]) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    stat = _proc_stat(pid)
    argv = _proc_argv(pid) or []
    alive = stat is not None and stat[0] not in ("Z", "X")
    return pid if alive and argv and Path(argv[0]).name == "postgres" else None


def _create_postgres(base: Path) -> dict[str, Any]:
    from medledger.localnet import pg_embedded

    parent = base / "postgres"
    account = pg_embedded.server_account()
    if account is not None and not _world_traversable(base):
        # PostgreSQL refuses root, so it runs as an unprivileged user, which cannot
        # reach a private directory: the cluster then lives in the temporary directory.
        digest = sha256(str(base).encode()).hex()[:12]
        parent = Path(tempfile.gettempdir()) / f"medledger-network-pg-{digest}"
    parent.mkdir(mode=0o700)
    if account is not None:
        os.chown(parent, *account)
    spec = {
        "port": pg_embedded.free_port(),
        "password": secrets.token_hex(16),
        "data_dir": str(parent / "data"),
    }
    server = _postgres(spec)
    try:
        server.initdb(auth="scram", fsync=True)
        server.start()
        server.create_database(_PG_DATABASE)
    except BaseException:
        if server.running():
            with contextlib.suppress(MedledgerError):
                server.stop("immediate")
        shutil.rmtree(parent, ignore_errors=True)
        raise
    return spec


def _world_traversable(path: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in [path, *path.parents])


def _dsn(spec: Mapping[str, Any]) -> str:
    return (
        f"host={HOST} port={spec['port']} user=medledger dbname={_PG_DATABASE}"
        f" password={spec['password']} connect_timeout=5"
    )


# -- up ---------------------------------------------------------------------------------


def _create(
    base: Path,
    *,
    institutions: int,
    ordering: str,
    store: str,
    replicas: int | None,
    consortium: str,
    passphrase: bytes,
    kdf: KdfParams | None,
) -> dict[str, Any]:
    from medledger.localnet.natsserver import free_ports
    from medledger.node import init_node, write_genesis

    if institutions < 1:
        raise InvalidInput("a network needs at least one institution")
    check_new_passphrase(passphrase, what="keystore passphrase")
    if ordering not in ("solo", "jetstream"):
        raise InvalidInput(f"unknown ordering {ordering!r} (solo or jetstream)")
    if store not in ("sqlite", "postgres"):
        raise InvalidInput(f"unknown store {store!r} (sqlite or postgres)")
    leftovers = [p.name for p in base.iterdir() if p.name != ".lock"]
    if leftovers:
        raise Conflict(f"{base} is not empty and holds no {NETWORK_FILE}: {', '.join(leftovers)}")
    servers = _nats_size(institutions) if ordering == "jetstream" else 0
    ports = free_ports(institutions + 3 * servers)
    data: dict[str, Any] = {
        "version": _VERSION,
        "consortium": consortium,
        "ordering": ordering,
        "store": store,
        "replicas": None,
        "nodes": [],
        "nats": [],
        "postgres": None,
    }
    if ordering == "jetstream":
        data["nats"] = [
            {
                "name": f"n{i}",
                "client": ports[institutions + 3 * i],
                "cluster": ports[institutions + 3 * i + 1],
                "http": ports[institutions + 3 * i + 2],
            }
            for i in range(servers)
        ]
        data["replicas"] = replicas if replicas is not None else min(3, servers)
        if not 1 <= data["replicas"] <= servers:
            raise InvalidInput(f"replicas must be between 1 and {servers} (the NATS servers)")
    try:
        storage = StorageConfig()
        if store == "postgres":
            data["postgres"] = _create_postgres(base)
            storage = StorageConfig(store="postgres", dsn=_dsn(data["postgres"]))
        roots = []
        now_ms = SystemClock().now_ms()
        for i in range(institutions):
            name = f"Hospital {i + 1}"
            root = base / f"hospital-{i + 1}"
            init_node(root, name=name, passphrase=passphrase, kdf=kdf, storage=storage)
            roots.append(root)
            port = ports[i]
            data["nodes"].append(
                {
                    "institution": root.name,
                    "name": name,
                    "dir": root.name,
                    "port": port,
                    "url": f"http://{HOST}:{port}",
                    "tokens": {},
                }
            )
        for i, root in enumerate(roots):
            if ordering == "solo":
                settings = ConsortiumConfig(ordering="solo", order_file="../order.db")
            else:
                own = [f"nats://{HOST}:{n['client']}" for n in data["nats"]]
                own = own[i % servers :] + own[: i % servers]  # its own server first
                settings = ConsortiumConfig(
                    ordering="jetstream", nats_urls=tuple(own), replicas=data["replicas"]
                )
            config = load_config(root, env={})
            replace(config, consortium=settings).save(NodePaths(root=root).config)
        write_genesis(
            consortium,
            roots,
            time_ms=now_ms,
            peer_urls={n["institution"]: n["url"] for n in data["nodes"]},
        )
        for node, root in zip(data["nodes"], roots, strict=True):
            tokens = SqliteTokenStore(root / "tokens.db")
            try:
                for role in ("admin", "clinician"):
                    text, _ = tokens.create(role=role, label="network up", now_ms=now_ms)
                    node["tokens"][role] = text
            finally:
                tokens.close()
        if ordering == "solo":
            create_order_file(base / "order.db")
        _save_network(base, data)
    except BaseException:
        if data["postgres"] is not None:
            with contextlib.suppress(MedledgerError):
                _postgres(data["postgres"]).stop("immediate")
            data_dir = Path(data["postgres"]["data_dir"])
            if not data_dir.is_relative_to(base):
                shutil.rmtree(data_dir.parent, ignore_errors=True)
        for child in base.iterdir():
            if child.name != ".lock":
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    return data


def create_order_file(path: Path) -> None:
    """Create the solo order (schema, WAL) once, before several processes open it."""
    import asyncio

    from medledger.ledger.ordering.solo import SoloOrderer

    async def touch() -> None:
        await SoloOrderer(path).close()

    asyncio.run(touch())


def _check_passphrase(base: Path, data: Mapping[str, Any], passphrase: bytes) -> None:
    """Fail before starting anything if the passphrase does not open the first keystore."""
    first = data["nodes"][0]
    FileKeyStore.open(NodePaths(root=base / first["dir"]).keystore, passphrase)


def up(
    base: Path,
    *,
    passphrase: bytes,
    institutions: int | None = None,
    ordering: str | None = None,
    store: str | None = None,
    replicas: int | None = None,
    consortium: str = "local",
    kdf: KdfParams | None = None,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Create the network in ``base`` if it holds none, then start what is not running.

    Returns the network description (``network.json``) once every node answers
    ``/readyz``. On an existing network, options that differ from it are refused.
    """
    base = base.resolve()
    with _locked(base):
        if (base / NETWORK_FILE).exists():
            data = load_network(base)
            asked = {"institutions": institutions, "ordering": ordering, "store": store}
            have = {
                "institutions": len(data["nodes"]),
                "ordering": data["ordering"],
                "store": data["store"],
            }
            for key, value in asked.items():
                if value is not None and value != have[key]:
                    raise Conflict(
                        f"the network in {base} has {key} {have[key]!r}, not {value!r}"
                        " (use another --dir for a new network)"
                    )
            if replicas is not None and replicas != data["replicas"]:
                raise Conflict(f"the network in {base} has {data['replicas']} stream replicas")
        else:
            data = _create(
                base,
                institutions=3 if institutions is None else institutions,
                ordering=ordering or "solo",
                store=store or "sqlite",
                replicas=replicas,
                consortium=consortium,
                passphrase=passphrase,
                kdf=kdf,
            )
        _check_passphrase(base, data, passphrase)
        _start(base, data, passphrase, timeout)
    return data


def _start(base: Path, data: Mapping[str, Any], passphrase: bytes, timeout: float) -> None:
    if data["postgres"] is not None and _postgres_pid(data["postgres"]) is None:
        _postgres(data["postgres"]).start()
    if data["nats"]:
        _start_nats(base, data["nats"], timeout)
    env = _env_without_secrets()
    if data["postgres"] is not None:
        env["MEDLEDGER_DSN"] = _dsn(data["postgres"])
    started = []
    for node in data["nodes"]:
        root = base / node["dir"]
        pid_file = root / "node.pid"
        if _running(pid_file) is not None:
            continue
        argv = [
            *_medledger_argv(),
            "node",
            "start",
            "--dir",
            str(root),
            "--host",
            HOST,
            "--port",
            str(node["port"]),
        ]
        _launch_node(argv, root=root, pid_file=pid_file, env=env, passphrase=passphrase)
        started.append(node)
    deadline = time.monotonic() + timeout
    for node in data["nodes"]:
        root = base / node["dir"]
        while _http_status(f"{node['url']}/readyz")[0] != 200:
            if _running(root / "node.pid") is None:
                raise NetworkError(
                    f"node {node['institution']} exited while starting: "
                    f"{_log_tail(root / 'node.log', 3)}"
                )
            if time.monotonic() > deadline:
                raise NetworkError(
                    f"node {node['institution']} not ready after {timeout:.0f} s"
                    f" (log: {root / 'node.log'})"
                )
            time.sleep(_POLL_S)


def _env_without_secrets() -> dict[str, str]:
    """This process's environment without ``MEDLEDGER_*`` (passphrases, DSNs, overrides)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MEDLEDGER_")}


def _launch_node(
    argv: Sequence[str], *, root: Path, pid_file: Path, env: Mapping[str, str], passphrase: bytes
) -> None:
    """Start a node with its passphrase on a pipe: ``--passphrase-fd`` names the read end.

    The whole passphrase is written before the child starts (a pipe holds far
    more than the 4 KiB a passphrase may have), so nothing here can block.
    """
    if len(passphrase) > _MAX_PASSPHRASE_BYTES:
        raise InvalidInput(f"the passphrase is longer than {_MAX_PASSPHRASE_BYTES} bytes")
    read_end, write_end = os.pipe()
    try:
        try:
            os.write(write_end, passphrase)
        finally:
            os.close(write_end)
        _launch(
            [*argv, "--passphrase-fd", str(read_end)],
            log=root / "node.log",
            pid_file=pid_file,
            env=env,
            cwd=root,
            pass_fds=(read_end,),
        )
    finally:
        os.close(read_end)


# -- status and down ----------------------------------------------------------------------


def status(base: Path) -> dict[str, Any]:
    """Every process of the network: running?, URL, readiness, heights."""
    base = base.resolve()
    data = load_network(base)
    nodes = []
    for node in data["nodes"]:
        record = _running(base / node["dir"] / "node.pid")
        code, body = _http_status(f"{node['url']}/readyz") if record else (0, {})
        nodes.append(
            {
                "institution": node["institution"],
                "url": node["url"],
                "pid": record.pid if record else None,
                "running": record is not None,
                "ready": code == 200,
                "private_height": body.get("private_height"),
                "consortium_height": body.get("consortium_height"),
            }
        )
    nats = []
    for spec in data["nats"]:
        record = _running(base / "nats" / spec["name"] / "nats.pid")
        nats.append(
            {
                "name": spec["name"],
                "url": f"nats://{HOST}:{spec['client']}",
                "pid": record.pid if record else None,
                "running": record is not None,
            }
        )
    result: dict[str, Any] = {
        "dir": str(base),
        "ordering": data["ordering"],
        "store": data["store"],
        "nodes": nodes,
        "nats": nats,
    }
    if data["postgres"] is not None:
        pid = _postgres_pid(data["postgres"])
        result["postgres"] = {"port": data["postgres"]["port"], "pid": pid, "running": bool(pid)}
    return result


def down(base: Path, *, timeout: float = 30.0) -> dict[str, Any]:
    """Stop the network's processes — nodes, then NATS, then PostgreSQL — by their PID records.

    SIGTERM first (nodes finish in-flight commits), SIGKILL after ``timeout``
    seconds. A PID whose process is not the one recorded is left alone.
    """
    base = base.resolve()
    with _locked(base):
        data = load_network(base)
        node_files = [base / n["dir"] / "node.pid" for n in data["nodes"]]
        nats_files = [base / "nats" / s["name"] / "nats.pid" for s in data["nats"]]
        stopped: dict[str, Any] = {"nodes": [], "nats": [], "postgres": False}
        for key, files in (("nodes", node_files), ("nats", nats_files)):
            records = [(r, f) for f in files if (r := PidRecord.load(f)) is not None]
            stopped[key] = _stop(records, timeout)
        if data["postgres"] is not None and _postgres_pid(data["postgres"]) is not None:
            _postgres(data["postgres"]).stop("fast")
            stopped["postgres"] = True
    return stopped
