"""`ray job submit` of a small real run (smoke preset, one actor) to the test's own Ray cluster.

The test starts a loopback head (127.0.0.1 only, ports picked at runtime, its own temp dir and
its own auth token: token mode, as deploy/README.md requires on real clusters), submits the CLI
as a job the way deploy/submit.sh does (working dir + deploy/runtime_env.yaml), and checks the
run folder that `--out` names. Teardown stops only this head (SIGTERM to its `ray start
--block`), never `ray stop`, which would end every Ray cluster of the user on the machine.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600  # generous: a loaded 2-core CI box; the whole test takes ~2 minutes when idle
PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port",
              "--dashboard-agent-grpc-port", "--ray-client-server-port",
              "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
              "--object-manager-port")


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")  # the venv's CLI, same Ray as this Python
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        pytest.skip("the `ray` CLI is not installed (pip install 'ray[default]')")
    return found


def _free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together), outside Ray's worker port range."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            if not 10002 <= s.getsockname()[1] <= 19999:  # `ray start`'s default worker ports
                ports.append(s.getsockname()[1])
        return ports
    finally:
        for s in socks:
            s.close()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # the ray CLI colours its messages


def _procs() -> dict[int, tuple[int, str, str, str]]:
    """pid -> (parent pid, state, start time, command line) for every live process."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmd = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), fields[0], fields[19],
                                  cmd.decode(errors="replace").strip())
    return table


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.ray = _ray_cli()
        # Unix sockets live under the temp dir and their paths are limited to 107 bytes:
        # pytest's tmp_path is too deep, so a short folder directly under /tmp
        self.temp = Path(tempfile.mkdtemp(prefix="rjs-", dir="/tmp"))
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes
        token.chmod(0o600)
        self.token = token.read_text()
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env.update({
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # else Ray binds the external interface
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),  # head and client
            # the job's driver runs `python` from the head's PATH: this venv's
            "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                     self.env.get("PATH", "")]),
        })
        ports = dict(zip(PORT_FLAGS, _free_ports(len(PORT_FLAGS)), strict=True))
        self.gcs_port, self.url = ports["--port"], f"http://127.0.0.1:{ports['--dashboard-port']}"
        self.log = tmp / "ray-start.log"
        with open(self.log, "wb") as log:
            self.head = subprocess.Popen(
                [self.ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                 "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={self.temp}",
                 "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.known: dict[int, tuple[str, str]] = {}  # pid -> (start time, cmdline)
        self.stopped = False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        request = urllib.request.Request(f"{self.url}/api/version",
                                         headers={"Authorization": f"Bearer {self.token}"})
        while True:
            assert self.head.poll() is None, f"ray start exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(request, timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no dashboard:\n{self.log.read_text()[-3000:]}"
            time.sleep(0.5)

    def ray_cmd(self, *args: str, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([self.ray, *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def track(self) -> None:
        """Remember the head's descendants and every process naming its temp dir."""
        table, mark = _procs(), str(self.temp)
        children: dict[int, list[int]] = {}
        for pid, (ppid, *_) in table.items():
            children.setdefault(ppid, []).append(pid)
        todo = [pid for pid, (*_, cmd) in table.items() if mark in cmd]
        todo += [pid for pid, (start, _) in self.known.items()
                 if pid in table and table[pid][2] == start]
        if self.head.poll() is None:  # once reaped, its pid may belong to someone else
            todo.append(self.head.pid)
        seen = set()
        while todo:
            pid = todo.pop()
            if pid in seen or pid not in table:
                continue
            seen.add(pid)
            self.known.setdefault(pid, (table[pid][2], table[pid][3]))
            todo.extend(children.get(pid, []))

    def alive(self) -> list[str]:
        """The known processes still running (the same start time: not a reused pid)."""
        self.track()
        table = _procs()
        return [f"{pid}: {cmd[:200]}" for pid, (start, cmd) in self.known.items()
                if pid in table and table[pid][2] == start and table[pid][1] != "Z"]

    def stop(self) -> list[str]:
        """Stop this head only; returns what was still running 30 s later (then killed)."""
        if self.stopped:
            return []
        self.stopped = True
        self.track()
        if self.head.poll() is None:
            self.head.send_signal(signal.SIGTERM)  # ray start --block kills what it started
            try:
                self.head.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.head.kill()
                self.head.wait()
        deadline = time.monotonic() + 30
        while (left := self.alive()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for line in left:  # only processes of this cluster: its descendants / its temp dir
            try:
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)
        return left


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    try:
        c.wait_ready()
        yield c
    finally:
        left = c.stop()  # also when the test failed; a no-op after the test's own stop()
    if left:
        pytest.fail(f"processes of the test cluster outlived it: {left}")


def test_job_submit_runs_the_cli_on_the_cluster(cluster, tmp_path):
    out = tmp_path / "run"  # absolute: the job runs in an uploaded copy of the repository
    sid = f"dfolora-test-{secrets.token_hex(4)}"
    proc = cluster.ray_cmd(
        "job", "submit", "--address", cluster.url, "--submission-id", sid,
        "--runtime-env", "deploy/runtime_env.yaml", "--working-dir", str(ROOT), "--",
        "python", "-m", "orchestrator.cli", "run", "--preset", "smoke",
        "--set", "cluster.num_actors=1", "--out", str(out), "--progress", "lines")
    logs = _plain(proc.stdout + proc.stderr)
    cluster.track()
    assert proc.returncode == 0, logs[-4000:]
    status = cluster.ray_cmd("job", "status", "--address", cluster.url, sid, timeout=120)
    assert f"Job '{sid}' succeeded" in _plain(status.stdout + status.stderr), status.stdout

    # the upload is the code only: runtime_env.yaml excludes .venv (2 GB), runs/, .git
    pkg = re.search(r"Uploading package gcs://(_ray_pkg_\w+)\.zip", logs)
    assert pkg, logs[-4000:]
    unpacked = list(cluster.temp.glob(f"session_2*/runtime_resources/working_dir_files/"
                                      f"{pkg[1]}"))
    assert len(unpacked) == 1 and (unpacked[0] / "orchestrator/cli.py").is_file(), unpacked
    assert not (unpacked[0] / ".venv").exists() and not (unpacked[0] / ".git").exists()
    size = sum(f.stat().st_size for f in unpacked[0].rglob("*") if f.is_file())
    assert size < 5e6, f"uploaded working dir: {size / 1e6:.1f} MB"
    # the driver joined this cluster (RAY_ADDRESS set by the job), not a local one of its own
    assert f"127.0.0.1:{cluster.gcs_port}" in logs, logs[-4000:]
    assert "test accuracy" in logs and f"outputs in {out}" in logs, logs[-4000:]

    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = results["final"]["test"]  # smoke: 40 test examples, scored by the actor
    hits = test["accuracy"] * 40
    assert test["n"] == sum(test["predicted_counts"]) == 40 and abs(hits - round(hits)) < 1e-9
    assert test == records[-1]["test"]
    assert results["evaluations"] == 40
    assert yaml.safe_load((out / "config.yaml").read_text())["cluster"]["num_actors"] == 1
    assert sum(r["event"] == "generation" for r in records) == 4
    assert (out / "adapter/adapter_config.json").is_file()
    assert any((out / "checkpoints").iterdir())

    left = cluster.stop()
    assert not left, f"processes of the test cluster outlived it: {left}"


def test_job_submit_runs_a_sweep_like_a_single_run(cluster, tmp_path):
    """`dfolora sweep` submitted as one job: its runs are child processes of the job's driver,
    inherit RAY_ADDRESS and put their actors on this cluster; the compare table ends the job."""
    root = tmp_path / "grid"
    sid = f"dfolora-test-{secrets.token_hex(4)}"
    proc = cluster.ray_cmd(
        "job", "submit", "--address", cluster.url, "--submission-id", sid,
        "--runtime-env", "deploy/runtime_env.yaml", "--working-dir", str(ROOT), "--",
        "python", "-m", "orchestrator.cli", "sweep", "--preset", "smoke", "--seeds", "1", "2",
        "--set", "cluster.num_actors=1", "--root", str(root))
    logs = _plain(proc.stdout + proc.stderr)
    cluster.track()
    assert proc.returncode == 0, logs[-4000:]
    status = cluster.ray_cmd("job", "status", "--address", cluster.url, sid, timeout=120)
    assert f"Job '{sid}' succeeded" in _plain(status.stdout + status.stderr), status.stdout
    assert "smoke-seed1: starting" in logs and "smoke-seed2: starting" in logs, logs[-4000:]
    table = [line for line in logs.splitlines() if re.search(r"smoke-seed\d\s+dfo-lora", line)]
    assert len(table) == 2, logs[-4000:]  # the compare table: one row per finished run
    for seed in (1, 2):
        folder = root / f"smoke-seed{seed}"
        results = json.loads((folder / "results.json").read_text())
        assert results["seed"] == seed and results["evaluations"] == 40
        run_log = (root / "logs" / f"smoke-seed{seed}.log").read_text()
        assert f"127.0.0.1:{cluster.gcs_port}" in run_log, run_log[-3000:]  # this cluster's
    left = cluster.stop()
    assert not left, f"processes of the test cluster outlived it: {left}"
