"""A real two-node Ray cluster on 127.0.0.1 for ``ray job submit`` and node-loss tests.

The head (with the dashboard, which serves the job API) and a second worker node are each started
with ``ray start --block`` in a session of their own, with every port chosen free, so two clusters
can run side by side on one machine and stopping one node never touches another Ray. Stopping the
worker kills its whole process group at once (SIGKILL): the raylet, its workers and agents go
together, as when a machine is lost.

    from cluster import two_node_cluster  # noqa: F401   (in a test module)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil
import pytest
from servers import aws_env, free_port, wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ray_bin() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **(extra or {})}
    # The nodes' `python` (the job entrypoint's) is this interpreter, as on a cluster's image.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    return env


def _node_ports() -> list[str]:
    """Ports a node would otherwise take at fixed defaults (two nodes on one host would collide)."""
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    return [f"{k}={v}" for k, v in ports.items()]


@dataclass
class LocalCluster:
    port: int
    dashboard_port: int
    num_cpus: int = 1
    head: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    log_dir: str = ""
    worker_temp_dir: str = ""
    """The second node's own Ray temp dir. Two nodes on one host otherwise share the session's
    runtime_resources/: when the second node sets up a job's working_dir it unpacks the package
    again into the directory the job's driver runs in on the first, and a driver whose working
    directory is replaced under it fails its next import (torch's MKL: "Cannot load
    libtorch_cpu.so"). Nodes of a real cluster each have their own disk."""
    _pgids: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The GCS address (``ray.init(address=...)``, ``ray start --address``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        """The job API (``ray job submit --address``)."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")  # noqa: SIM115 (kept by Popen)
        proc = subprocess.Popen(
            [_ray_bin(), "start", "--block", "--disable-usage-stats", *args],
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._pgids.append(proc.pid)
        return proc

    def start_head(self) -> None:
        self.head = self._spawn(
            [
                "--head",
                f"--port={self.port}",
                f"--num-cpus={self.num_cpus}",
                "--node-ip-address=127.0.0.1",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                *_node_ports(),
            ],
            "head",
        )
        wait_for(self.dashboard_port, timeout=120)

    def start_worker(self, timeout: float = 120) -> None:
        """Start (or restart) the second node and wait until the cluster counts it."""
        self.worker = self._spawn(
            [
                f"--address={self.address}",
                f"--num-cpus={self.num_cpus}",
                "--node-ip-address=127.0.0.1",
                *([f"--temp-dir={self.worker_temp_dir}"] if self.worker_temp_dir else []),
                *_node_ports(),
            ],
            "worker",
        )
        self.wait_nodes(2, timeout)

    def stop_worker(self) -> None:
        """The second node lost at once: its whole process group is killed."""
        if self.worker is not None:
            _kill_group(self.worker)
            self.worker = None

    def alive_nodes(self) -> int:
        proc = subprocess.run(
            [sys.executable, "-c", _COUNT_NODES, self.address],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        return int(proc.stdout.strip() or 0) if proc.returncode == 0 else 0

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"the cluster at {self.address} did not reach {n} alive nodes in {timeout}s")

    def submit(
        self, args: list[str], env: dict[str, str] | None = None, timeout: float = 900
    ) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir <repo> -- python <args>``; waits for the job to end.
        ``env`` goes to the submitting process only (the AWS chain of a driver started by the job API
        comes from the node's environment, not from ``runtime_env``)."""
        return subprocess.run(
            [
                _ray_bin(),
                "job",
                "submit",
                f"--address={self.dashboard}",
                f"--working-dir={REPO}",
                "--",
                "python",
                *args,
            ],
            env=_env(env),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def shutdown(self) -> None:
        for proc in (self.worker, self.head):
            if proc is not None:
                _kill_group(proc)
        self.worker = self.head = None


_COUNT_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads, and any of its descendants that left the group."""
    try:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


@contextlib.contextmanager
def running_cluster(tmp_path_factory):
    """A head and a worker node (1 CPU each) on 127.0.0.1, shut down on exit; the nodes get the
    environment of the test process as it is when this is entered."""
    cluster = LocalCluster(port=free_port(), dashboard_port=free_port())
    cluster.log_dir = str(tmp_path_factory.mktemp("ray-cluster-logs"))
    # Short (unix socket paths are limited to about 107 bytes) and outside pytest's tmp tree.
    cluster.worker_temp_dir = tempfile.mkdtemp(prefix="rayw-")
    try:
        cluster.start_head()
        cluster.start_worker()
        yield cluster
    finally:
        cluster.shutdown()
        shutil.rmtree(cluster.worker_temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head and a worker node (1 CPU each) on 127.0.0.1; the AWS_* variables of the test process's
    environment at start-up reach both nodes (set them before requesting this fixture)."""
    with running_cluster(tmp_path_factory) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def aws_cluster(moto_server, tmp_path_factory):
    """Two nodes whose environment holds the AWS chain for the moto server (set before they start:
    a driver started by the job API reads the node's environment, not the submitter's)."""
    env = aws_env(moto_server, "testing", "testing")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(var, raising=False)
        for var, value in env.items():
            mp.setenv(var, value)
        with running_cluster(tmp_path_factory) as cluster:
            yield cluster
