"""The multi-host harness: isolated namespaces on one bridge, torn down whatever happens."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from medledger.core.errors import InvalidInput
from medledger.localnet.hosts import (
    HostNetwork,
    HostNetworkError,
    call_in_namespace,
    enter_namespace,
    unavailable_reason,
)
from medledger.localnet.relay import LinkDelay, RelayGroup

_REASON = unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

#: Listens on (address, port), answers every connection with its own address, until killed.
_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[1].encode()); c.close()
"""

#: Connects to (address, port); prints what it got, or the error's class name.
_CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        print(c.recv(100).decode())
except OSError as exc:
    print(type(exc).__name__)
"""


def _netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, check=True).stdout.decode()


def _root_links() -> str:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, check=True).stdout
    return "\n".join(sorted(line.split(":")[1].strip() for line in out.decode().splitlines()))


def _serve(net: HostNetwork, host: str | None, address: str, port: int) -> subprocess.Popen[bytes]:
    proc = net.popen(
        host, [sys.executable, "-c", _SERVER, address, str(port)], stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"listening\n"
    return proc


def _connect(net: HostNetwork, host: str | None, address: str, port: int) -> str:
    done = net.run(host, [sys.executable, "-c", _CLIENT, address, str(port)], timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.decode().strip()


def test_hosts_reach_each_other_by_address_and_nothing_is_left_behind() -> None:
    links_before = _root_links()
    with HostNetwork(["a", "b", "c"]) as net:
        a, b, c = (net.host(n) for n in "abc")
        assert len({a.address, b.address, c.address}) == 3
        assert set(net.namespaces()) <= set(_netns_list().split())
        _serve(net, "a", a.address, 7100)
        _serve(net, "a", "127.0.0.1", 7101)
        # Over the bridge, from every other host.
        assert _connect(net, "b", a.address, 7100) == a.address
        assert _connect(net, "c", a.address, 7100) == a.address
        # A loopback listener is the host's own: another host's 127.0.0.1 is not a's.
        assert _connect(net, "b", "127.0.0.1", 7101) == "ConnectionRefusedError"
        assert _connect(net, "b", a.address, 7101) == "ConnectionRefusedError"
        # The bridge namespace (where a capture or a delay relay runs) reaches every host,
        # and every host reaches the bridge's address.
        assert _connect(net, None, a.address, 7100) == a.address
        _serve(net, None, net.bridge_address, 7102)
        assert _connect(net, "c", net.bridge_address, 7102) == net.bridge_address
        made = net.namespaces()
    assert net.namespaces() == []
    listed = _netns_list()
    assert not any(ns in listed for ns in made)
    assert net.tag not in listed
    # No interface was added to (or left in) the machine's own namespace.
    assert _root_links() == links_before


def test_a_failure_inside_still_stops_processes_and_deletes_namespaces(tmp_path: Path) -> None:
    started: list[subprocess.Popen[bytes]] = []
    made: list[str] = []
    with pytest.raises(RuntimeError, match="scenario failed"), HostNetwork(["x", "y"]) as net:
        started.append(_serve(net, "x", net.host("x").address, 7200))
        # A grandchild the harness did not start itself: killed through its namespace.
        net.run("y", ["sh", "-c", "sleep 600 >/dev/null 2>&1 &"], timeout=10)
        assert net.run("y", ["ip", "netns", "identify"]).returncode == 0
        made = net.namespaces()
        raise RuntimeError("scenario failed")
    assert started[0].poll() is not None
    listed = _netns_list()
    assert made and not any(ns in listed for ns in made)


def test_two_runs_side_by_side_do_not_collide() -> None:
    with HostNetwork(["a"]) as one, HostNetwork(["a"]) as two:
        assert one.tag != two.tag
        assert not set(one.namespaces()) & set(two.namespaces())
        # Same addresses, different wires: each run's host answers in its own run only.
        _serve(one, "a", one.host("a").address, 7300)
        assert _connect(two, "a", one.host("a").address, 7300) == "ConnectionRefusedError"


def test_bad_requests_are_refused_before_anything_is_created() -> None:
    with pytest.raises(InvalidInput, match="different"):
        HostNetwork(["a", "a"])
    with pytest.raises(InvalidInput, match="room for 1 hosts"):
        HostNetwork(["a", "b", "c"], subnet="10.1.2.0/30")
    with pytest.raises(InvalidInput, match="1 to"):
        HostNetwork([])


#: Enters namespace argv[1] (unless "-"), prints its interfaces, then tries 127.0.0.1:argv[2].
_ENTERING_CLIENT = """
import socket, sys
from medledger.localnet.hosts import enter_namespace
if sys.argv[1] != "-":
    enter_namespace(sys.argv[1])
print(sorted(name for _, name in socket.if_nameindex()))
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[2])), timeout=5) as c:
        print(c.recv(100).decode())
except OSError as exc:
    print(type(exc).__name__)
"""


def _answer_once(server: socket.socket) -> threading.Thread:
    def answer() -> None:
        server.settimeout(30)
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"parent")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    return thread


def _entering_client(namespace: str, port: int) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _ENTERING_CLIENT, namespace, str(port)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().splitlines()


def test_a_process_that_enters_a_namespace_sees_only_that_hosts_interfaces() -> None:
    """The setns helper a benchmark's institution worker calls first thing."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        # Control: from the parent's namespace the listener answers.
        answering = _answer_once(server)
        assert _entering_client("-", port)[-1] == "parent"
        answering.join(30)
        with HostNetwork(["a"]) as net:
            interfaces, outcome = _entering_client(net.host("a").namespace, port)
    assert interfaces == "['eth0', 'lo']"
    # The parent's 127.0.0.1 is not the host's own loopback.
    assert outcome == "ConnectionRefusedError"


def test_a_thread_in_a_namespace_leaves_the_rest_of_the_process_where_it_was() -> None:
    def interfaces() -> set[str]:
        return {name for _, name in socket.if_nameindex()}

    ours = interfaces()
    with HostNetwork(["a"]) as net:
        bridge = call_in_namespace(net.bridge_namespace, interfaces, timeout=30)
        with pytest.raises(HostNetworkError, match="cannot enter network namespace"):
            call_in_namespace(f"ml{net.tag}nothere", interfaces, timeout=30)
    assert bridge == {"lo", "br0", "v0"}
    assert interfaces() == ours
    with pytest.raises(InvalidInput, match="not a network namespace name"):
        enter_namespace("../../proc/1/ns/net")


def test_a_relay_group_in_the_bridge_namespace_joins_two_hosts() -> None:
    with HostNetwork(["a", "b"]) as net:
        a = net.host("a")
        _serve(net, "a", a.address, 7400)
        with RelayGroup(listen_host=net.bridge_address, namespace=net.bridge_namespace) as relays:
            port = relays.add(a.address, 7400, LinkDelay.from_rtt(2))
            assert _connect(net, "b", net.bridge_address, port) == a.address
        with pytest.raises(HostNetworkError):
            RelayGroup(namespace=f"ml{net.tag}nothere")
