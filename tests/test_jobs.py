"""Ray jobs against a `ray start --head` with token authentication on (Ray 2.60 turns it on whenever a token exists
on the head's machine, and every embedded `ray.init()` leaves one in ~/.ray/auth_token).

The head runs on free ports in its own temp dir with its own HOME (its own ~/.ray/auth_token), and is stopped by
signalling its own process group: other Ray clusters on the machine are never touched."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from slmshift.platform.log import read_episodes, read_interactions

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a head, three jobs and a run: ~2 min on 2 cores

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXPERIMENT = """\
experiment: {name: jobs, storage: STORAGE}
models:
  - {name: small, tier: slm, backend: simulated, resources: {num_cpus: 0}}
  - {name: big, tier: llm, backend: simulated, resources: {num_cpus: 0}}
router: {policies: [{kind: llm}, {kind: slm}]}
scenarios: [{kind: operator, episodes: 2}]
"""


@dataclass
class Head:
    url: str
    gcs: str  # host:port for `ray.init(address=...)`
    env: dict  # the shell of a user on the head's machine: its HOME, the venv on PATH, no Ray variables
    token: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER", "RAY_AUTH"))}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0")
    # What an earlier embedded run leaves on a machine: a token, which `ray start --head` then enforces.
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    token = (home / ".ray" / "auth_token").read_text().strip()
    ports = {k: _free_port() for k in ("port", "dashboard-port", "dashboard-agent-listen-port",
                                       "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
                                       "ray-client-server-port", "node-manager-port", "object-manager-port")}
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must fit in 107 characters
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--temp-dir", temp,
           "--dashboard-host", "127.0.0.1", "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats",
           "--min-worker-port", "0", "--max-worker-port", "0"] + [a for k, v in ports.items() for a in (f"--{k}", str(v))]
    proc = subprocess.Popen(cmd, env=env, stdout=open(Path(temp) / "start.log", "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None, (Path(temp) / "start.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.time() < deadline, "the head's dashboard did not come up in 120 s"
            time.sleep(1)
        assert "Token authentication is enabled" in (Path(temp) / "start.log").read_text()
        yield Head(url, f"127.0.0.1:{ports['port']}", env, token)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops its own processes on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def _run(args, env, timeout=400, cwd=REPO):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_plain_ray_job_submit_is_refused_without_token_mode(head):
    """The issue as reported: Ray's own CLI sends no token unless RAY_AUTH_MODE=token."""
    r = _run([str(BIN / "ray"), "job", "submit", "--address", head.url, "--no-wait", "--", "true"], head.env)
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr


def test_ray_job_submit_with_token_mode_and_the_repo_as_working_dir(head):
    """The documented raw path: RAY_AUTH_MODE=token, the repo uploaded (.rayignore keeps it small), slmshift on the
    head's PATH; the driver joins the cluster with the token the head's environment carries."""
    env = {**head.env, "RAY_AUTH_MODE": "token"}
    probe = ("import ray, slmshift, os; ray.init(); print('cpus', ray.cluster_resources()['CPU'], "
             "os.environ['RAY_AUTH_MODE'], os.path.isdir('slmshift'))")
    r = _run([str(BIN / "ray"), "job", "submit", "--address", head.url, "--working-dir", ".", "--",
              "python", "-c", probe], env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "cpus 2.0 token True" in r.stdout and "succeeded" in r.stdout


def test_slmshift_job_submit_runs_the_experiment_and_says_where(head, tmp_path):
    """`slmshift job submit` with nothing set: the local head's token is found and sent; the run's outputs land in
    the storage given, and the command prints the run dir."""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(EXPERIMENT.replace("STORAGE", "runs"))
    r = _run([str(BIN / "slmshift"), "job", "submit", str(cfg), "--address", head.url,
              "--storage", str(tmp_path / "out")], head.env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "SUCCEEDED" in r.stdout and "Run outputs: " in r.stdout
    run_dir = r.stdout.split("Run outputs: ")[1].split(" (report.md")[0]
    assert run_dir.startswith(str(tmp_path / "out" / "jobs-"))
    assert (Path(run_dir) / "report.md").is_file() and (Path(run_dir) / "report.json").is_file()
    assert list((Path(run_dir) / "interactions").glob("*.parquet"))
    eps = read_episodes(run_dir)
    assert len(eps) == 4 and set(eps["policy"]) == {"llm", "slm"}  # 2 episodes x 2 arms
    assert len(read_interactions(run_dir)) >= 4


def test_slmshift_run_joins_the_local_head_by_explicit_address(head, tmp_path):
    """Ray sends no token for an explicit address; slmshift applies Ray's 'auto' rule to a head on this machine."""
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(EXPERIMENT.replace("STORAGE", str(tmp_path / "runs")))
    r = _run([str(BIN / "slmshift"), "run", str(cfg), "--address", head.gcs, "--episodes", "1"], head.env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"Ray cluster at {head.gcs}" in r.stdout and "2 episodes logged" in r.stdout


def test_a_wrong_token_is_exit_2_with_the_fix(head, tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(EXPERIMENT.replace("STORAGE", str(tmp_path)))
    env = {**head.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    r = _run([str(BIN / "slmshift"), "job", "submit", str(cfg), "--address", head.url], env, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refused the job (the token sent was refused" in r.stderr and "RAY_AUTH_MODE=token" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_no_dashboard_is_exit_2_with_the_fix(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(EXPERIMENT.replace("STORAGE", str(tmp_path)))
    r = _run([str(BIN / "slmshift"), "job", "submit", str(cfg), "--address", f"http://127.0.0.1:{_free_port()}"],
             os.environ.copy(), timeout=120)
    assert r.returncode == 2 and "Could not reach the Ray dashboard" in r.stderr and "ray start --head" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
