"""The node's TLS contexts (services.tls): who may connect, and whom a client trusts."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from medledger.core.errors import InvalidInput
from medledger.core.tls import MemberCertificate
from medledger.ledger.clock import SystemClock
from medledger.services.tls import (
    LiveServerTls,
    client_context,
    load_certificate,
    promote_renewed,
    server_context,
    write_certificate,
)

NOW_MS = 1_767_225_600_000


def _member(
    tmp_path: Path, name: str, hosts: tuple[str, ...] = ("127.0.0.1",)
) -> tuple[Path, Path]:
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    write_certificate(cert, key, name, hosts, now_ms=SystemClock().now_ms())
    return cert, key


class _Server:
    """A TLS server on 127.0.0.1 that records, per connection, the peer certificate or error."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.results: list[object] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(10)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.results.append(tls.getpeercert(binary_form=True))
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError) as exc:
                self.results.append(exc)

    def wait_for(self, count: int) -> list[object]:
        deadline = time.monotonic() + 10
        while len(self.results) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.results

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        self.sock.close()
        self._thread.join(10)


@pytest.fixture
def members(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    return {name: _member(tmp_path, name) for name in ("a", "b", "outsider")}


@pytest.fixture
def server(members: dict[str, tuple[Path, Path]]) -> Iterator[_Server]:
    cert_a, key_a = members["a"]
    anchors = [load_certificate(members[m][0]) for m in ("a", "b")]
    srv = _Server(server_context(cert_a, key_a, anchors))
    yield srv
    srv.close()


def _connect(port: int, context: ssl.SSLContext, host: str = "127.0.0.1") -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return tls.recv(2)


def test_a_member_certificate_is_accepted_and_seen_by_the_server(
    server: _Server, members: dict[str, tuple[Path, Path]]
) -> None:
    cert_b, key_b = members["b"]
    ctx = client_context([load_certificate(members["a"][0])], cert_path=cert_b, key_path=key_b)
    assert _connect(server.port, ctx) == b"ok"
    assert server.wait_for(1) == [load_certificate(cert_b).der]


def test_a_client_without_a_certificate_is_served_but_a_non_member_one_is_refused(
    server: _Server, members: dict[str, tuple[Path, Path]]
) -> None:
    anchor = [load_certificate(members["a"][0])]
    assert _connect(server.port, client_context(anchor)) == b"ok"
    cert_x, key_x = members["outsider"]
    ctx = client_context(anchor, cert_path=cert_x, key_path=key_x)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        # TLS 1.3 reports the server's refusal on the first read.
        _connect(server.port, ctx)
    results = server.wait_for(2)
    assert results[0] is None
    assert isinstance(results[1], ssl.SSLError)
    assert "certificate verify failed" in str(results[1])


def test_a_client_trusts_only_its_pinned_certificate_and_checks_the_host(
    server: _Server, members: dict[str, tuple[Path, Path]]
) -> None:
    wrong_anchor = client_context([load_certificate(members["b"][0])])
    with pytest.raises(ssl.SSLCertVerificationError):
        _connect(server.port, wrong_anchor)
    right_anchor = client_context([load_certificate(members["a"][0])])
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _connect(server.port, right_anchor, host="node.example")


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_is_refused(server: _Server, members: dict[str, tuple[Path, Path]]) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(cadata=load_certificate(members["a"][0]).pem())
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError):
        _connect(server.port, old)
    modern = client_context([load_certificate(members["a"][0])])
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        modern.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"


def test_a_client_with_no_anchor_is_refused_before_connecting() -> None:
    with pytest.raises(InvalidInput, match="no TLS trust anchor"):
        client_context([])


def test_certificate_files_are_owner_only_and_checked_on_load(tmp_path: Path) -> None:
    cert, key = _member(tmp_path, "a", hosts=("localhost", "10.0.0.7"))
    assert cert.stat().st_mode & 0o777 == 0o600 and key.stat().st_mode & 0o777 == 0o600
    loaded = load_certificate(cert)
    assert isinstance(loaded, MemberCertificate) and loaded.hosts == ("localhost", "10.0.0.7")
    cert.write_text("garbage")
    with pytest.raises(InvalidInput, match="not a PEM certificate"):
        load_certificate(cert)
    with pytest.raises(InvalidInput, match="not a host name"):
        write_certificate(cert, key, "a", ["http://x"], now_ms=NOW_MS)


def test_a_client_trusting_a_members_old_and_renewed_certificate_accepts_both(
    tmp_path: Path,
) -> None:
    # Same institution, same host: during a renewal a trust store holds both.
    old_cert, old_key = _member(tmp_path, "renewing")
    new_cert, new_key = tmp_path / "renewed.crt", tmp_path / "renewed.key"
    write_certificate(new_cert, new_key, "renewing", ["127.0.0.1"], now_ms=SystemClock().now_ms())
    both = client_context([load_certificate(old_cert), load_certificate(new_cert)])
    for cert, key in ((old_cert, old_key), (new_cert, new_key)):
        srv = _Server(server_context(cert, key))
        try:
            assert _connect(srv.port, both) == b"ok"
        finally:
            srv.close()


def test_a_live_server_context_serves_a_replaced_certificate_to_new_handshakes(
    tmp_path: Path, members: dict[str, tuple[Path, Path]]
) -> None:
    cert_a, key_a = members["a"]
    old = load_certificate(cert_a)
    anchors = [load_certificate(members["b"][0])]
    live = LiveServerTls(cert_a, key_a, lambda: anchors)
    srv = _Server(live.context)
    try:
        assert _connect(srv.port, client_context([old])) == b"ok"
        # Replaced on disk (what node tls-cert, or a promoted renewal, does) ...
        renewed = write_certificate(
            cert_a, key_a, "a", ["127.0.0.1"], now_ms=SystemClock().now_ms()
        )
        # ... the next handshake presents the new one, with no restart.
        with pytest.raises(ssl.SSLCertVerificationError):
            _connect(srv.port, client_context([old]))
        assert _connect(srv.port, client_context([renewed])) == b"ok"
        # The trusted client certificates follow anchors() too.
        cert_b, key_b = members["b"]
        as_b = client_context([renewed], cert_path=cert_b, key_path=key_b)
        assert _connect(srv.port, as_b) == b"ok"
        anchors.clear()
        with pytest.raises((ssl.SSLError, ConnectionError)):
            _connect(srv.port, as_b)
        assert live.reloads == 2
    finally:
        srv.close()


def test_a_live_server_context_keeps_the_last_good_one_while_key_and_certificate_disagree(
    tmp_path: Path, members: dict[str, tuple[Path, Path]]
) -> None:
    cert_a, key_a = members["a"]
    old = load_certificate(cert_a)
    live = LiveServerTls(cert_a, key_a, list)
    srv = _Server(live.context)
    try:
        # A new key alone: half of a replacement (the key is written first).
        write_certificate(
            tmp_path / "x.crt", key_a, "a", ["127.0.0.1"], now_ms=SystemClock().now_ms()
        )
        assert _connect(srv.port, client_context([old])) == b"ok"
        assert live.reloads == 0
    finally:
        srv.close()


def _renewal(tmp_path: Path) -> tuple[Path, Path, Path, Path, MemberCertificate]:
    cert, key = _member(tmp_path, "node")
    next_cert, next_key = tmp_path / "tls.next.crt", tmp_path / "tls.next.key"
    pending = write_certificate(
        next_cert, next_key, "node", ["127.0.0.1"], now_ms=SystemClock().now_ms()
    )
    return cert, key, next_cert, next_key, pending


def test_a_renewed_pair_moves_into_place_only_once_the_consortium_pins_it(tmp_path: Path) -> None:
    cert, key, next_cert, next_key, pending = _renewal(tmp_path)
    old = load_certificate(cert)
    # Not pinned yet (the consortium still pins the old one, or knows no member): kept aside.
    for pinned in (old, None):
        assert not promote_renewed(cert, key, next_cert, next_key, pinned)
        assert load_certificate(cert) == old and next_cert.exists() and next_key.exists()
    assert promote_renewed(cert, key, next_cert, next_key, pending)
    assert load_certificate(cert) == pending
    assert not next_cert.exists() and not next_key.exists()
    # The key that moved is the new certificate's own: a server loads the pair.
    server_context(cert, key)


def test_a_promotion_interrupted_between_its_renames_is_finished(tmp_path: Path) -> None:
    cert, key, next_cert, next_key, pending = _renewal(tmp_path)
    next_key.replace(key)  # the crash came after the key's rename, before the certificate's
    with pytest.raises(InvalidInput):
        server_context(cert, key)  # the old certificate with the new key
    assert promote_renewed(cert, key, next_cert, next_key, None)
    assert load_certificate(cert) == pending
    server_context(cert, key)
