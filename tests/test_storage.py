"""Storage URIs (platform/storage.py): runs, report, convert and the loop's state on s3:// against moto's S3 server
on 127.0.0.1; bad locations are exit 2 naming the flag or field and the fix."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from slmshift.platform.errors import SlmshiftError
from slmshift.platform import storage

BIN = Path(sys.executable).parent
EXPERIMENT = """\
experiment: {name: s3run, seed: 1, storage: runs}
models:
  - {name: small, tier: slm, backend: simulated, resources: {num_cpus: 0}}
  - {name: big, tier: llm, backend: simulated, resources: {num_cpus: 0}}
router: {policies: [{kind: llm}]}
scenarios: [{kind: operator, episodes: 10, options: {categories: [simple, multiple]}}]
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server with bucket `bkt`; the environment points pyarrow (and subprocesses) at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "SLMSHIFT_CACHE": str(tmp_path_factory.mktemp("cache"))}  # mirrors go here, not into ~/.cache
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir("bkt")
    fs, _ = pafs.FileSystem.from_uri("s3://bkt")
    try:
        yield fs
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        server.stop()


def files(fs, prefix: str) -> set[str]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return {i.path[len(prefix) + 1:] for i in infos if i.is_file}


def cli(*args, cwd=None, timeout=600):
    return subprocess.run([str(BIN / "slmshift"), *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env=os.environ.copy())


def test_locations_are_normalized():
    assert storage.normalize("file:///tmp/x/../y") == "/tmp/y"
    assert storage.normalize("s3://b/p/") == "s3://b/p" and storage.is_uri("s3://b/p")
    assert storage.normalize("rel") == str(Path("rel").resolve()) and not storage.is_uri(storage.normalize("rel"))
    assert storage.join("s3://b/p", "run", "config.yaml") == "s3://b/p/run/config.yaml"
    with pytest.raises(SlmshiftError, match=r"--storage: .*query string.*AWS_ENDPOINT_URL"):
        storage.normalize("s3://b/p?endpoint_override=http://x", "--storage")


def test_bad_locations_name_the_field_and_the_fix(s3):
    with pytest.raises(SlmshiftError, match=r"experiment.storage: 'foo://x/y' has an unknown storage scheme 'foo://'"):
        storage.check("foo://x/y", "experiment.storage")
    with pytest.raises(SlmshiftError, match=r"--out: the bucket 'nobucket' .* does not exist\. Fix: create it"):
        storage.check("s3://nobucket/out", "--out")
    with pytest.raises(SlmshiftError, match=r"RUN_DIR: 's3://bkt/nothing' does not exist\. Fix"):
        storage.check("s3://bkt/nothing", "RUN_DIR", write=False)
    e = storage.storage_error("s3://bkt/x", "--storage", OSError(
        "When getting information for key 'x' in bucket 'bkt': AWS Error ACCESS_DENIED during HeadObject operation"))
    assert "access to 's3://bkt/x' was refused" in str(e) and "AWS_ACCESS_KEY_ID" in str(e)
    assert storage.check("s3://bkt/fresh", "--storage") == "s3://bkt/fresh"  # writable: the probe is gone again
    assert files(s3, "bkt/fresh") == set()


def test_mirror_upload_sends_only_what_changed_and_download_restores(s3, tmp_path):
    uri = "s3://bkt/mirror"
    local = storage.mirror_dir(uri)
    assert local == Path(os.environ["SLMSHIFT_CACHE"]) / "storage" / "s3" / "bkt" / "mirror"
    (local / "iter-1").mkdir(parents=True)
    (local / "iter-1" / "a.txt").write_text("a")
    (local / "state.json").write_text("{}")
    assert storage.upload(local, uri) == 2 and storage.upload(local, uri) == 0
    (local / "state.json").write_text('{"x": 1}')
    assert storage.upload(local, uri) == 1
    assert files(s3, "bkt/mirror") == {"iter-1/a.txt", "state.json"}
    assert storage.download(uri, tmp_path / "copy") == 2
    assert json.loads((tmp_path / "copy" / "state.json").read_text()) == {"x": 1}
    assert storage.read_text(f"{uri}/iter-1/a.txt") == "a" and storage.exists(uri) and not storage.exists(f"{uri}/no")


def test_loop_state_is_uploaded_and_a_uri_loop_dir_resumes(s3, tmp_path):
    import slmshift.scenarios  # noqa: F401
    from slmshift.loop import LoopState, load_loop_dir
    from slmshift.platform.config import load_config
    from slmshift.platform.scenario import scenario_options

    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    cfg = load_config(tmp_path / "exp.yaml", scenario_options())
    uri = "s3://bkt/loops/l1"
    ld = storage.mirror_dir(uri)
    ld.mkdir(parents=True)
    state = LoopState(ld, lambda: storage.upload(ld, uri))
    state.doc["config"] = cfg.model_dump(mode="json")
    (ld / "iter-1").mkdir()
    (ld / "iter-1" / "config.json").write_text("{}")
    state.update(1, "collect", status="done", run_dir=str(ld / "iter-1" / "run"))
    assert files(s3, "bkt/loops/l1") == {"state.json", "iter-1/config.json"}
    assert load_loop_dir(uri) == cfg  # what `slmshift loop --resume s3://…` starts from
    with pytest.raises(SlmshiftError, match="does not exist"):
        load_loop_dir("s3://bkt/loops/none")


def test_cli_refuses_bad_storage_before_ray_starts(s3, tmp_path):
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    for where, msg in [("foo://x/runs", "unknown storage scheme 'foo://'"), ("s3://nobucket/runs", "does not exist")]:
        r = cli("run", str(tmp_path / "exp.yaml"), "--storage", where, timeout=120)
        assert r.returncode == 2, r.stdout + r.stderr
        assert f"--storage: " in r.stderr and msg in r.stderr and "Fix:" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.yaml").write_text(EXPERIMENT.replace("storage: runs", "storage: 'gopher://x'"))
    r = cli("run", str(tmp_path / "bad.yaml"), timeout=120)
    assert r.returncode == 2 and "experiment.storage: 'gopher://x' has an unknown storage scheme" in r.stderr


@pytest.mark.slow  # a run, its report and a conversion with LoRA on the tiny model: ~2.5 min on 2 cores
def test_run_report_and_convert_on_s3(s3, tmp_path, tiny_model_dir):
    (tmp_path / "exp.yaml").write_text(EXPERIMENT)
    r = cli("run", str(tmp_path / "exp.yaml"), "--storage", "s3://bkt/runs", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = r.stdout.split("Report: ")[1].split("/report.md")[0]
    assert run_dir.startswith("s3://bkt/runs/s3run-")
    key = run_dir[len("s3://"):]
    assert {"config.yaml", "report.md", "report.json", "episodes.parquet", "interactions/part-00000.parquet"} <= \
        files(s3, key)
    assert not (tmp_path / "runs").exists()

    r = cli("report", run_dir, timeout=180)
    assert r.returncode == 0 and "operator" in r.stdout, r.stderr[-2000:]
    r = cli("run", "--resume", run_dir, cwd=tmp_path)  # reads config and log back from the bucket; nothing left to run
    assert r.returncode == 0 and "10 episode(s) already have an outcome" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]

    r = cli("convert", run_dir, "--base", tiny_model_dir, "--steps", "2", "--batch-size", "2", "--min-train-rows", "2",
            "--no-progress", "--num-cpus", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"Report: {run_dir}/convert/report.md" in r.stdout
    out = files(s3, f"{key}/convert")
    assert {"curated.parquet", "clusters/index.faiss", "clusters/clusters.json", "registry.json", "report.md",
            "report.json"} <= out
    assert any(p.startswith("adapters/") and p.endswith("adapter_config.json") for p in out)
    rep = json.loads(storage.read_text(f"{run_dir}/convert/report.json"))
    assert rep["out_dir"] == f"{run_dir}/convert" and "scenario" in rep["grading"]  # config.yaml read from S3
    assert Path(rep["local_dir"], "registry.json").is_file()  # the working copy serves on this machine


@pytest.mark.slow  # one loop iteration (runs, LoRA on Ray Train, a Ray Tune search) on the tiny model: ~3 min
def test_a_whole_loop_on_s3(s3, tmp_path, tiny_teacher_models, tiny_model_dir):
    """`slmshift loop` with `experiment.storage: s3://…`: every stage's run and the loop's state and report land in
    the bucket, and the URI it prints is what `--resume` takes (then nothing is redone)."""
    (tmp_path / "loop.yaml").write_text(f"""\
experiment: {{name: s3loop, storage: 's3://bkt/loops'}}
ray: {{num_cpus: 2, dashboard: false}}
{tiny_teacher_models}
router: {{policies: [{{kind: llm, name: all-llm}}]}}
scenarios: [{{kind: operator, teams: 1, concurrency: 8, options: {{categories: [simple]}}}}]
loop:
  collect_episodes: 8
  verify_episodes: 4
  max_clusters: 1
  tune_time_budget_s: 10
  convert: {{candidates: [{tiny_model_dir}], min_train_rows: 2, min_promotion_tasks: 1, lora_steps: 2, k_max: 2,
             batch_size: 2}}
""")
    r = cli("loop", str(tmp_path / "loop.yaml"), cwd=tmp_path, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    uri = r.stdout.split("Loop report: ")[1].split("/report.html")[0]
    assert uri.startswith("s3://bkt/loops/s3loop-loop-")
    key = uri[len("s3://"):]
    state = json.loads(storage.read_text(f"{uri}/state.json"))
    assert all(state["iterations"]["1"][s]["status"] == "done" for s in ("collect", "convert", "tune", "verify"))
    have = files(s3, key)
    assert {"state.json", "report.md", "report.html", "iter-1/config.json"} <= have
    assert any(p.startswith("iter-1/tune/") and p.endswith("policy.yaml") for p in have)
    r = cli("loop", "--resume", uri, cwd=tmp_path, timeout=600)
    assert r.returncode == 0 and "iter 1 · verify: done earlier, skipped" in r.stdout, r.stdout[-2000:]
