"""`slmshift loop`: two iterations end to end with a tiny random SLM and a simulated teacher, resume after a kill,
disjoint train/verify tasks, and a report whose HTML renders in headless Chromium."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slmshift.platform.log import read_episodes, read_interactions

# Whole loops (runs, LoRA on Ray Train, a Ray Tune search): minutes each on 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

YAML = """\
experiment: {{name: loop, storage: {storage}}}
ray: {{num_cpus: 2, dashboard: false}}
{models}
router:
  policies: [{{kind: llm, name: all-llm}}]
scenarios:
  - kind: operator
    teams: 1
    concurrency: 8
    options: {{categories: [simple]}}
{extra}loop:
  collect_episodes: 12
  verify_episodes: 4
  max_clusters: 1
  tune_time_budget_s: 20
  convert: {{candidates: [{tiny}], min_train_rows: 2, min_promotion_tasks: 1, lora_steps: 2, k_max: 2, batch_size: 2}}
"""


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "slmshift.cli", *args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def loop_run(tmp_path_factory, tiny_teacher_models, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("loop")
    cfg = tmp / "loop.yaml"
    metagpt = "  - {kind: metagpt, teams: 1, concurrency: 4}\n"  # a second agent system: one table row each
    cfg.write_text(YAML.format(storage=tmp / "runs", models=tiny_teacher_models, tiny=tiny_model_dir, extra=metagpt))
    r = cli("loop", str(cfg), "--iterations", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    loop_dir = Path(next(ln.split("Loop report: ")[1].split("/report.html")[0]
                         for ln in r.stdout.splitlines() if "Loop report: " in ln))
    return loop_dir, cfg, r


def test_two_iterations_write_the_table(loop_run):
    loop_dir, _, r = loop_run
    state = json.loads((loop_dir / "state.json").read_text())
    for it in ("1", "2"):
        assert all(state["iterations"][it][s]["status"] == "done" for s in ("collect", "convert", "tune", "verify"))
    md = (loop_dir / "report.md").read_text()
    assert "The paper's table, measured" in md and "Open Operator" in md and "40%" in md and "simulated" in md
    assert "| MetaGPT | metagpt | 60% |" in md and "| Open Operator | operator | 40% |" in md
    # the console shows our stages, not Ray Data's execution plans (those go to the session's log files)
    assert "Execution plan" not in r.stdout + r.stderr and "Progress bars disabled" not in r.stdout + r.stderr
    assert (loop_dir / "iter-2" / "config.json").is_file() and "rough estimate" in r.stdout
    assert "S5 LoRA " in r.stdout and "step 2/2, loss " in r.stdout  # the worker's steps reach the loop's console
    # iteration 2 collected with the router iteration 1 tuned, paired on the other tier
    run2 = state["iterations"]["2"]["collect"]["run_dir"]
    calls = read_interactions(run2, include_shadow=True)
    assert calls["shadow"].astype(bool).any() and set(calls[~calls.shadow.astype(bool)]["policy"]) == {"collect-2"}


def test_train_and_verify_tasks_are_disjoint(loop_run):
    loop_dir, _, _ = loop_run
    state = json.loads((loop_dir / "state.json").read_text())
    train = set().union(*(set(read_episodes(state["iterations"][i]["collect"]["run_dir"]).task_id) for i in "12"))
    verify = set().union(*(set(read_episodes(state["iterations"][i]["verify"]["run_dir"]).task_id) for i in "12"))
    assert train and verify and not train & verify


def test_html_report_renders_in_chromium(loop_run):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    from slmshift.scenarios.cradle.browser import browser_missing

    missing = browser_missing()
    if missing:
        pytest.skip(missing)
    loop_dir, _, _ = loop_run
    opts = Options()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        opts.add_argument(flag)
    opts.binary_location = os.environ.get("MINIWOB_CHROME_BINARY", "/usr/bin/chromium")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(os.environ.get("MINIWOB_CHROMEDRIVER",
                                                                           "/usr/bin/chromedriver")))
    try:
        driver.get((loop_dir / "report.html").as_uri())
        images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert images and all(done and width > 0 for done, width in images)
        assert "paper's table" in driver.find_element("tag name", "body").text
        assert [e for e in driver.get_log("browser") if e["level"] == "SEVERE"] == []
    finally:
        driver.quit()


def test_resume_after_a_kill_does_not_redo_finished_stages(tmp_path, tiny_teacher_models, tiny_model_dir):
    cfg = tmp_path / "loop.yaml"
    cfg.write_text(YAML.format(storage=tmp_path / "runs", models=tiny_teacher_models, tiny=tiny_model_dir, extra=""))
    proc = subprocess.Popen([sys.executable, "-m", "slmshift.cli", "loop", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    loop_dir, deadline = None, time.time() + 600
    while time.time() < deadline:  # kill the whole process group once collect is done and convert has started
        dirs = list((tmp_path / "runs").glob("loop-loop-*")) if (tmp_path / "runs").is_dir() else []
        if dirs and (dirs[0] / "state.json").is_file():
            st = json.loads((dirs[0] / "state.json").read_text())["iterations"].get("1", {})
            if st.get("convert", {}).get("status") == "running":
                loop_dir = dirs[0]
                break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert loop_dir is not None, "the loop never reached convert"
    collect_run = json.loads((loop_dir / "state.json").read_text())["iterations"]["1"]["collect"]["run_dir"]
    n_before = len(read_interactions(collect_run, include_shadow=True))
    r = cli("loop", "--resume", str(loop_dir))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "iter 1 · collect: done earlier, skipped" in r.stdout
    st = json.loads((loop_dir / "state.json").read_text())["iterations"]["1"]
    assert st["collect"]["run_dir"] == collect_run and all(st[s]["status"] == "done" for s in st)
    df = read_interactions(collect_run, include_shadow=True)
    assert len(df) == n_before and df["id"].is_unique  # nothing collected twice


def test_sigterm_mid_stage_stops_cleanly_and_says_how_to_resume(tmp_path, tiny_teacher_models, tiny_model_dir):
    """SIGTERM (what a scheduler or `kill` sends) during convert: exit 130, the stage marked interrupted, the
    report written and the resume command printed, as for Ctrl-C."""
    cfg = tmp_path / "loop.yaml"
    cfg.write_text(YAML.format(storage=tmp_path / "runs", models=tiny_teacher_models, tiny=tiny_model_dir, extra=""))
    proc = subprocess.Popen([sys.executable, "-m", "slmshift.cli", "loop", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    loop_dir, deadline = None, time.time() + 600
    while time.time() < deadline and loop_dir is None:
        for d in (tmp_path / "runs").glob("loop-loop-*") if (tmp_path / "runs").is_dir() else []:
            if (d / "state.json").is_file():
                st = json.loads((d / "state.json").read_text())["iterations"].get("1", {})
                if st.get("convert", {}).get("status") == "running":
                    loop_dir = d
        time.sleep(0.5)
    assert loop_dir is not None, "the loop never reached convert"
    proc.send_signal(signal.SIGTERM)  # the loop's own process only, as `kill PID` does
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert f"Resume with: slmshift loop --resume {loop_dir}" in out
    st = json.loads((loop_dir / "state.json").read_text())["iterations"]["1"]
    assert st["collect"]["status"] == "done" and st["convert"]["status"] == "interrupted"
    assert (loop_dir / "report.md").is_file()
