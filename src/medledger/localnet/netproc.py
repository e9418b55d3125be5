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
import logging
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medledger.config import ConsortiumConfig, NodePaths, StorageConfig, load_config
from medledger.core.errors import Conflict, InvalidInput, MedledgerError, NotFound
from medledger.core.hashing import sha256
from medledger.core.passphrase import check_new_passphrase
from medledger.ledger.clock import SystemClock
from medledger.localnet.spec import (
    HOST,
    MAX_NETWORK_FILE_BYTES,
    ORDERINGS,
    STORES,
    ApiTokens,
    InstitutionEntry,
    NatsEntry,
    NetworkSpec,
    PostgresEntry,
    dump_network,
    parse_network,
)
from medledger.storage.keystore import FileKeyStore, KdfParams, atomic_write

if TYPE_CHECKING:  # both load heavy or optional packages: imported when a network needs them
    from medledger.localnet.natsserver import NatsNode, NatsSecurity
    from medledger.localnet.pg_embedded import EmbeddedPostgres

__all__ = [
    "create_order_file",
    "node_tls",
    "NETWORK_FILE",
    "NatsStatus",
    "NetworkError",
    "NetworkStatus",
    "NodeStatus",
    "PostgresStatus",
    "Stopped",
    "down",
    "load_network",
    "status",
    "up",
]

NETWORK_FILE = "network.json"
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


def node_tls(node: InstitutionEntry | Mapping[str, Any]) -> ssl.SSLContext:
    """What a client of a ``network.json`` node trusts: its pinned certificate alone.

    ``node`` is an entry of the network, or its JSON (``network up --json``).
    """
    from medledger.services.tls import client_context, load_certificate

    cert = node.tls_cert if isinstance(node, InstitutionEntry) else Path(node["tls_cert"])
    return client_context([load_certificate(cert)])


def _http_status(url: str, tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of GET ``url`` (trusting ``tls``'s anchors); (0, {}) if none answers."""
    try:
        # https (verified against the pinned certificate), or http to 127.0.0.1.
        with urllib.request.urlopen(url, timeout=2.0, context=tls) as resp:  # noqa: S310
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


def load_network(base: Path) -> NetworkSpec:
    """``<base>/network.json``, checked; :class:`NotFound` if ``base`` holds no network.

    A malformed file is :class:`InvalidInput` (see :mod:`~medledger.localnet.spec`),
    and so is a PostgreSQL cluster anywhere but where ``network up`` puts the
    cluster of ``base``: ``down`` stops the cluster the file names.
    """
    path = base / NETWORK_FILE
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_NETWORK_FILE_BYTES + 1)
    except FileNotFoundError:
        raise NotFound(f"{base} holds no network (no {NETWORK_FILE}); run 'network up'") from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read ({exc.strerror or exc})") from None
    spec = parse_network(raw, source=str(path))
    if spec.postgres is not None and spec.postgres.data_dir not in _postgres_data_dirs(base):
        raise InvalidInput(
            f"{path}: postgres.data_dir {str(spec.postgres.data_dir)!r} is not this network's"
            f" ({' or '.join(str(p) for p in _postgres_data_dirs(base))})"
        )
    return spec


def _save_network(base: Path, spec: NetworkSpec) -> None:
    # Holds the API tokens (and a PostgreSQL password): owner only.
    atomic_write(base / NETWORK_FILE, dump_network(spec), mode=0o600)


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


#: The operator's NKey seed (creates the stream; members may not), in ``<dir>/nats/``.
_OPERATOR_SEED = "operator.nk"
#: Every member's pinned certificate: the NATS servers' trust anchors, in ``<dir>/nats/``.
_MEMBER_CERTS = "members.pem"
#: A member's NKey seed, in its node directory (``[consortium] nats_seed``).
_MEMBER_SEED = "nats.nk"


def _create_nats_credentials(base: Path, roots: Sequence[Path]) -> None:
    """One NKey per member and one for the operator; the members' certificates as one file."""
    from medledger.localnet.natsserver import new_nkey
    from medledger.services.tls import load_certificate, pem_bundle

    (base / "nats").mkdir(mode=0o700, exist_ok=True)
    for seed_path in [*(root / _MEMBER_SEED for root in roots), base / "nats" / _OPERATOR_SEED]:
        atomic_write(seed_path, new_nkey()[0], mode=0o600)
    bundle = pem_bundle(load_certificate(NodePaths(root=root).tls_cert) for root in roots)
    atomic_write(base / "nats" / _MEMBER_CERTS, bundle.encode("ascii"), mode=0o600)


def _nkey_public(seed_path: Path) -> str:
    import nkeys  # type: ignore[import-untyped]  # (no type information shipped)

    try:
        return str(nkeys.from_seed(bytearray(seed_path.read_bytes())).public_key.decode("ascii"))
    except (OSError, nkeys.NkeysError) as exc:
        raise NetworkError(f"cannot read the NATS credential {seed_path}: {exc}") from None


def _nats_security(base: Path, spec: NetworkSpec, index: int) -> NatsSecurity | None:
    """Server ``index``'s TLS (institution ``index``'s certificate) and NKey users.

    ``None`` for a network created before NATS had credentials.
    """
    from medledger.localnet.natsserver import (
        NatsSecurity,
        NatsUser,
        member_permissions,
        member_subscriptions,
    )

    operator = base / "nats" / _OPERATOR_SEED
    if not operator.exists():
        return None
    defaults = ConsortiumConfig()
    allowed = member_permissions(defaults.stream, defaults.subject)
    listen = member_subscriptions(defaults.subject)
    users = [
        NatsUser(nkey=_nkey_public(base / n.dir / _MEMBER_SEED), publish=allowed, subscribe=listen)
        for n in spec.nodes
    ]
    users.append(NatsUser(nkey=_nkey_public(operator)))
    owner = NodePaths(root=base / spec.nodes[index % len(spec.nodes)].dir)
    return NatsSecurity(
        cert_file=owner.tls_cert,
        key_file=owner.tls_key,
        ca_file=base / "nats" / _MEMBER_CERTS,
        users=tuple(users),
    )


def _nats_nodes(base: Path, spec: NetworkSpec) -> list[NatsNode]:
    from medledger.localnet.natsserver import NatsNode, NodePorts

    ports = [NodePorts(client=n.client, cluster=n.cluster, http=n.http) for n in spec.nats]
    return [
        NatsNode(
            base / "nats" / n.name,
            name=n.name,
            ports=ports[i],
            peers=[p.cluster for j, p in enumerate(ports) if j != i] if len(ports) > 1 else (),
            security=_nats_security(base, spec, i),
        )
        for i, n in enumerate(spec.nats)
    ]


def _create_stream(base: Path, spec: NetworkSpec, timeout: float) -> None:
    """Create the consortium stream with the operator's credential (members may not)."""
    import asyncio

    from medledger.ledger.ordering.jetstream import JetStreamOrderer
    from medledger.services.tls import client_context, load_certificate

    operator = base / "nats" / _OPERATOR_SEED
    if not operator.exists():
        return  # an older network: the first member creates it
    defaults = ConsortiumConfig()
    anchors = [load_certificate(n.tls_cert) for n in spec.nodes]

    async def create() -> None:
        orderer = await JetStreamOrderer.connect(
            [node.client_url for node in _nats_nodes(base, spec)],
            stream=defaults.stream,
            subject=defaults.subject,
            replicas=spec.replicas or 1,
            retry_for=timeout,
            name="medledger-operator",
            tls=client_context(anchors),
            nkeys_seed=operator,
        )
        await orderer.close()

    # nats-py's TLS transport makes asyncio log a warning on every close: not ours to show.
    asyncio_log = logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.setLevel(logging.ERROR)
    try:
        asyncio.run(create())
    finally:
        asyncio_log.setLevel(level)


def _start_nats(base: Path, spec: NetworkSpec, timeout: float) -> None:
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


def _postgres(spec: PostgresEntry) -> EmbeddedPostgres:
    from medledger.localnet.pg_embedded import EmbeddedPostgres

    return EmbeddedPostgres(spec.data_dir, port=spec.port, password=spec.password)


def _postgres_pid(spec: PostgresEntry) -> int | None:
    """The postmaster's PID if the network's cluster is running (its own lock file says so)."""
    try:
        pid = int((spec.data_dir / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    stat = _proc_stat(pid)
    argv = _proc_argv(pid) or []
    alive = stat is not None and stat[0] not in ("Z", "X")
    return pid if alive and argv and Path(argv[0]).name == "postgres" else None


def _postgres_data_dirs(base: Path) -> tuple[Path, Path]:
    """Where the cluster of the network in ``base`` lives: inside it, or (as root) in /tmp."""
    digest = sha256(str(base).encode()).hex()[:12]
    outside = Path(tempfile.gettempdir()) / f"medledger-network-pg-{digest}"
    return base / "postgres" / "data", outside / "data"


def _create_postgres(base: Path) -> PostgresEntry:
    from medledger.localnet import pg_embedded

    inside, outside = _postgres_data_dirs(base)
    account = pg_embedded.server_account()
    # PostgreSQL refuses root, so it runs as an unprivileged user, which cannot
    # reach a private directory: the cluster then lives in the temporary directory.
    parent = (outside if account is not None and not _world_traversable(base) else inside).parent
    parent.mkdir(mode=0o700)
    if account is not None:
        os.chown(parent, *account)
    spec = PostgresEntry(
        port=pg_embedded.free_port(), password=secrets.token_hex(16), data_dir=parent / "data"
    )
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


def _dsn(spec: PostgresEntry) -> str:
    return (
        f"host={HOST} port={spec.port} user=medledger dbname={_PG_DATABASE}"
        f" password={spec.password} connect_timeout=5"
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
) -> NetworkSpec:
    from medledger.localnet.natsserver import free_ports
    from medledger.node import init_node, write_genesis

    if institutions < 1:
        raise InvalidInput("a network needs at least one institution")
    check_new_passphrase(passphrase, what="keystore passphrase")
    if ordering not in ORDERINGS:
        raise InvalidInput(f"unknown ordering {ordering!r} (solo or jetstream)")
    if store not in STORES:
        raise InvalidInput(f"unknown store {store!r} (sqlite or postgres)")
    leftovers = [p.name for p in base.iterdir() if p.name != ".lock"]
    if leftovers:
        raise Conflict(f"{base} is not empty and holds no {NETWORK_FILE}: {', '.join(leftovers)}")
    servers = _nats_size(institutions) if ordering == "jetstream" else 0
    ports = free_ports(institutions + 3 * servers)
    nats = tuple(
        NatsEntry(
            name=f"n{i}",
            client=ports[institutions + 3 * i],
            cluster=ports[institutions + 3 * i + 1],
            http=ports[institutions + 3 * i + 2],
        )
        for i in range(servers)
    )
    if ordering == "jetstream":
        replicas = replicas if replicas is not None else min(3, servers)
        if not 1 <= replicas <= servers:
            raise InvalidInput(f"replicas must be between 1 and {servers} (the NATS servers)")
    else:
        replicas = None
    postgres: PostgresEntry | None = None
    try:
        storage = StorageConfig()
        if store == "postgres":
            postgres = _create_postgres(base)
            storage = StorageConfig(store="postgres", dsn=_dsn(postgres))
        roots = []
        names = []
        now_ms = SystemClock().now_ms()
        for i in range(institutions):
            name = f"Hospital {i + 1}"
            root = base / f"hospital-{i + 1}"
            init_node(root, name=name, passphrase=passphrase, kdf=kdf, storage=storage)
            roots.append(root)
            names.append(name)
        for i, root in enumerate(roots):
            if ordering == "solo":
                settings = ConsortiumConfig(ordering="solo", order_file="../order.db")
            else:
                # TLS to the servers (verified against the members' certificates), and
                # the member's own NKey.
                own = [f"tls://{HOST}:{s.client}" for s in nats]
                own = own[i % servers :] + own[: i % servers]  # its own server first
                settings = ConsortiumConfig(
                    ordering="jetstream",
                    nats_urls=tuple(own),
                    replicas=replicas or 1,
                    nats_seed=_MEMBER_SEED,
                )
            config = load_config(root, env={})
            replace(config, consortium=settings).save(NodePaths(root=root).config)
        if ordering == "jetstream":
            _create_nats_credentials(base, roots)
        write_genesis(
            consortium,
            roots,
            time_ms=now_ms,
            peer_urls={root.name: f"https://{HOST}:{ports[i]}" for i, root in enumerate(roots)},
        )
        nodes = tuple(
            InstitutionEntry(
                institution=root.name,
                name=names[i],
                dir=root.name,
                port=ports[i],
                tokens=_create_tokens(root, storage, now_ms),
                # The node's pinned certificate: what its clients trust, alone.
                tls_cert=NodePaths(root=root).tls_cert,
            )
            for i, root in enumerate(roots)
        )
        spec = NetworkSpec(
            consortium=consortium,
            ordering="solo" if ordering == "solo" else "jetstream",
            store="sqlite" if store == "sqlite" else "postgres",
            replicas=replicas,
            nodes=nodes,
            nats=nats,
            postgres=postgres,
        )
        if ordering == "solo":
            create_order_file(base / "order.db")
        _save_network(base, spec)
    except BaseException:
        if postgres is not None:
            with contextlib.suppress(MedledgerError):
                _postgres(postgres).stop("immediate")
            if not postgres.data_dir.is_relative_to(base):
                shutil.rmtree(postgres.data_dir.parent, ignore_errors=True)
        for child in base.iterdir():
            if child.name != ".lock":
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)
        raise
    return spec


def _create_tokens(root: Path, storage: StorageConfig, now_ms: int) -> ApiTokens:
    """An admin and a clinician token for the node in ``root``, in its own store.

    ``storage`` carries the DSN with its password (``node.toml`` never holds one).
    """
    from medledger.node import open_token_store

    config = replace(load_config(root), storage=storage)
    tokens = open_token_store(root, config)
    try:
        admin, _ = tokens.create(role="admin", label="network up", now_ms=now_ms)
        clinician, _ = tokens.create(role="clinician", label="network up", now_ms=now_ms)
    finally:
        tokens.close()
    return ApiTokens(admin=admin, clinician=clinician)


def create_order_file(path: Path) -> None:
    """Create the solo order (schema, WAL) once, before several processes open it."""
    import asyncio

    from medledger.ledger.ordering.solo import SoloOrderer

    async def touch() -> None:
        await SoloOrderer(path).close()

    asyncio.run(touch())


def _check_passphrase(base: Path, spec: NetworkSpec, passphrase: bytes) -> None:
    """Fail before starting anything if the passphrase does not open the first keystore."""
    FileKeyStore.open(NodePaths(root=base / spec.nodes[0].dir).keystore, passphrase)


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
    workers: int = 1,
) -> NetworkSpec:
    """Create the network in ``base`` if it holds none, then start what is not running.

    ``workers``: API worker processes of each node started now (``node start
    --workers``); 1 by default, since the whole network shares this machine.

    Returns the network description (``network.json``) once every node answers
    ``/readyz``. On an existing network, options that differ from it are refused.
    """
    base = base.resolve()
    with _locked(base):
        if (base / NETWORK_FILE).exists():
            spec = load_network(base)
            asked: dict[str, int | str | None] = {
                "institutions": institutions,
                "ordering": ordering,
                "store": store,
            }
            have: dict[str, int | str] = {
                "institutions": len(spec.nodes),
                "ordering": spec.ordering,
                "store": spec.store,
            }
            for key, value in asked.items():
                if value is not None and value != have[key]:
                    raise Conflict(
                        f"the network in {base} has {key} {have[key]!r}, not {value!r}"
                        " (use another --dir for a new network)"
                    )
            if replicas is not None and replicas != spec.replicas:
                raise Conflict(f"the network in {base} has {spec.replicas} stream replicas")
        else:
            spec = _create(
                base,
                institutions=3 if institutions is None else institutions,
                ordering=ordering or "solo",
                store=store or "sqlite",
                replicas=replicas,
                consortium=consortium,
                passphrase=passphrase,
                kdf=kdf,
            )
        _check_passphrase(base, spec, passphrase)
        _start(base, spec, passphrase, timeout, workers)
    return spec


def _start(
    base: Path, spec: NetworkSpec, passphrase: bytes, timeout: float, workers: int = 1
) -> None:
    if spec.postgres is not None and _postgres_pid(spec.postgres) is None:
        _postgres(spec.postgres).start()
    if spec.nats:
        _start_nats(base, spec, timeout)
        _create_stream(base, spec, timeout)
    env = _env_without_secrets()
    if spec.postgres is not None:
        env["MEDLEDGER_DSN"] = _dsn(spec.postgres)
    for node in spec.nodes:
        root = base / node.dir
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
            str(node.port),
            "--workers",
            str(workers),
        ]
        _launch_node(argv, root=root, pid_file=pid_file, env=env, passphrase=passphrase)
    deadline = time.monotonic() + timeout
    for node in spec.nodes:
        root = base / node.dir
        tls = node_tls(node)
        while _http_status(f"{node.url}/readyz", tls)[0] != 200:
            if _running(root / "node.pid") is None:
                raise NetworkError(
                    f"node {node.institution} exited while starting: "
                    f"{_log_tail(root / 'node.log', 3)}"
                )
            if time.monotonic() > deadline:
                raise NetworkError(
                    f"node {node.institution} not ready after {timeout:.0f} s"
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


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeStatus:
    """One node process: running (its PID record still names it), ready, chain heights."""

    institution: str
    url: str
    pid: int | None
    ready: bool
    private_height: int | None
    consortium_height: int | None

    @property
    def running(self) -> bool:
        return self.pid is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class NatsStatus:
    """One nats-server process of the network."""

    name: str
    url: str
    pid: int | None

    @property
    def running(self) -> bool:
        return self.pid is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class PostgresStatus:
    """The network's embedded PostgreSQL cluster."""

    port: int
    pid: int | None

    @property
    def running(self) -> bool:
        return self.pid is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkStatus:
    """What :func:`status` saw: every process the network file names."""

    dir: Path
    ordering: str
    store: str
    nodes: tuple[NodeStatus, ...]
    nats: tuple[NatsStatus, ...]
    postgres: PostgresStatus | None

    def to_json(self) -> dict[str, Any]:
        """``network status --json`` (``postgres`` only for a PostgreSQL network)."""
        out: dict[str, Any] = {
            "dir": str(self.dir),
            "ordering": self.ordering,
            "store": self.store,
            "nodes": [
                {
                    "institution": n.institution,
                    "url": n.url,
                    "pid": n.pid,
                    "running": n.running,
                    "ready": n.ready,
                    "private_height": n.private_height,
                    "consortium_height": n.consortium_height,
                }
                for n in self.nodes
            ],
            "nats": [
                {"name": s.name, "url": s.url, "pid": s.pid, "running": s.running}
                for s in self.nats
            ],
        }
        if self.postgres is not None:
            out["postgres"] = {
                "port": self.postgres.port,
                "pid": self.postgres.pid,
                "running": self.postgres.running,
            }
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Stopped:
    """What :func:`down` stopped: PIDs of nodes and nats-servers, and whether PostgreSQL."""

    nodes: tuple[int, ...]
    nats: tuple[int, ...]
    postgres: bool

    def to_json(self) -> dict[str, Any]:
        """``network down --json``."""
        return {"nodes": list(self.nodes), "nats": list(self.nats), "postgres": self.postgres}


def _height(body: Mapping[str, Any], key: str) -> int | None:
    # The answer of whatever listens on the node's port: used only if it is a height.
    value = body.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def status(base: Path) -> NetworkStatus:
    """Every process of the network: running?, URL, readiness, heights."""
    base = base.resolve()
    spec = load_network(base)
    nodes = []
    for node in spec.nodes:
        record = _running(base / node.dir / "node.pid")
        code, body = _http_status(f"{node.url}/readyz", node_tls(node)) if record else (0, {})
        nodes.append(
            NodeStatus(
                institution=node.institution,
                url=node.url,
                pid=record.pid if record else None,
                ready=code == 200,
                private_height=_height(body, "private_height"),
                consortium_height=_height(body, "consortium_height"),
            )
        )
    nats = []
    for server in spec.nats:
        record = _running(base / "nats" / server.name / "nats.pid")
        nats.append(
            NatsStatus(name=server.name, url=server.url, pid=record.pid if record else None)
        )
    postgres = None
    if spec.postgres is not None:
        postgres = PostgresStatus(port=spec.postgres.port, pid=_postgres_pid(spec.postgres))
    return NetworkStatus(
        dir=base,
        ordering=spec.ordering,
        store=spec.store,
        nodes=tuple(nodes),
        nats=tuple(nats),
        postgres=postgres,
    )


def down(base: Path, *, timeout: float = 30.0) -> Stopped:
    """Stop the network's processes — nodes, then NATS, then PostgreSQL — by their PID records.

    SIGTERM first (nodes finish in-flight commits), SIGKILL after ``timeout``
    seconds. A PID whose process is not the one recorded is left alone.
    """
    base = base.resolve()
    with _locked(base):
        spec = load_network(base)
        node_files = [base / n.dir / "node.pid" for n in spec.nodes]
        nats_files = [base / "nats" / s.name / "nats.pid" for s in spec.nats]
        stopped = {}
        for key, files in (("nodes", node_files), ("nats", nats_files)):
            records = [(r, f) for f in files if (r := PidRecord.load(f)) is not None]
            stopped[key] = tuple(_stop(records, timeout))
        postgres = spec.postgres is not None and _postgres_pid(spec.postgres) is not None
        if postgres and spec.postgres is not None:
            _postgres(spec.postgres).stop("fast")
    return Stopped(nodes=stopped["nodes"], nats=stopped["nats"], postgres=postgres)
