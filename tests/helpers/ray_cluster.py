"""A local Ray cluster as a team starts one: `ray start --head` on 127.0.0.1, then more node processes
(`ray start --address`), each in its own process group so that a test can kill one node outright."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers.project import BIN, ENV

RAY_ENV = {**ENV, "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RayCluster:
    def __init__(self):
        # Ray's socket paths must stay under 107 characters: a short folder, not pytest's tmp_path
        self.temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []

    def start_node(self, cpus: int = 1) -> subprocess.Popen:
        """The head first, then worker nodes; returns once the cluster counts the new node."""
        head = not self.nodes
        where = (["--head", "--port", str(self.port), "--temp-dir", str(self.temp), "--include-dashboard", "false"]
                 if head else ["--address", self.address])
        node = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--node-ip-address", "127.0.0.1",
                                 "--num-cpus", str(cpus), "--disable-usage-stats", *where],
                                env=RAY_ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT)
        self.nodes.append(node)
        self.wait_for_nodes(len(self.alive()))
        return node

    def alive(self) -> list[subprocess.Popen]:
        return [node for node in self.nodes if node.poll() is None]

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = subprocess.run([str(BIN / "ray"), "status", "--address", self.address], env=RAY_ENV,
                                    capture_output=True, text=True)
            active = status.stdout.split("Active:")[-1].split("Pending:")[0]
            if status.returncode == 0 and active.count(" node_") == count:
                return
            time.sleep(1)
        raise TimeoutError(f"the Ray cluster at {self.address} did not reach {count} node(s): {status.stdout}")

    def kill(self, node: subprocess.Popen) -> None:
        """kill -9 a node: `ray start`, its raylet and every process they started (Ray's workers run in
        process groups of their own), as a lost machine."""
        for pid in [node.pid, *descendants(node.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):  # workers first, then the head
            self.kill(node)
        shutil.rmtree(self.temp, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (from /proc), children before their own children."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(0), [])
        found += below
        queue += below
    return found
