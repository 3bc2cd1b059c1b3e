"""The vllm backend: config validation, the request/response mapping and the server's lifetime against a fake vLLM
server (fast, no vLLM needed), and the real engine from its own env (slow; skipped where vLLM is absent)."""

import asyncio
import errno
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest
from pydantic import ValidationError

from slmshift.platform.config import load_config
from slmshift.platform.errors import ConfigError, ModelLoadError
from slmshift.platform.types import LMRequest, ModelSpec, OutputConstraint, VLLMOptions
from slmshift.serve.engines import get_engine_class
from slmshift.serve.engines.vllm_engine import VLLMEngine, log_tail, root_cause

# A stand-in for `python -m vllm.entrypoints.openai.api_server`: the same arguments and routes, echoing what it got.
FAKE_SERVER = '''
import argparse, asyncio, json, os, sys, time
mode = os.environ.get("FAKE_VLLM", "ok")
if mode == "crash":
    print("(EngineCore pid=7) ERROR 11-29 19:17:33 [cpu_worker.py:83] ValueError: not enough memory for the KV cache",
          file=sys.stderr)
    print("RuntimeError: Engine core initialization failed. See root cause above.", file=sys.stderr)
    sys.exit(1)
if mode == "hang":
    time.sleep(3600)
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

ap = argparse.ArgumentParser()
ap.add_argument("--host")
ap.add_argument("--port", type=int)
ap.add_argument("--served-model-name")
ap.add_argument("--lora-modules", nargs="*", default=[])
args, _ = ap.parse_known_args()
with open(os.environ["FAKE_VLLM_LOG"], "w") as f:
    json.dump({"argv": sys.argv[1:], "pid": os.getpid()}, f)
time.sleep(float(os.environ.get("FAKE_VLLM_BIND_DELAY", "0")))  # vLLM's imports come before its bind
# Bound as vLLM's create_server_socket binds it (SO_REUSEADDR and SO_REUSEPORT), before the engine starts; a taken
# port ends the process with "OSError: [Errno 98] Address already in use", as it does vLLM.
import socket
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
sock.bind((args.host, args.port))
models = {args.served_model_name} | {json.loads(m)["name"] for m in args.lora_modules}

async def chat(request):
    body = await request.json()
    if body["messages"][-1]["content"] == "die":
        os._exit(3)
    if body["model"] not in models:
        return JSONResponse({"error": {"message": f"model {body['model']} not found"}}, status_code=404)
    text = f"{body['model']} t={body['temperature']} seed={body['seed']} max={body['max_tokens']}"
    message = {"role": "assistant", "content": text}
    if "structured_outputs" in body:  # echoed, so the test sees what reached vLLM
        message["content"] = text = json.dumps(body["structured_outputs"])
    if body.get("tools") and body.get("tool_choice") not in (None, "auto", "none"):  # as vLLM 0.32 does
        return JSONResponse({"error": {"message": "tool_choice requires --tool-call-parser to be set"}},
                            status_code=400)
    content = [{"token": t, "logprob": -0.25, "bytes": None, "top_logprobs": []} for t in text.split()]
    return JSONResponse({
        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": message,
                     "logprobs": {"content": content} if body.get("logprobs") else None}],
        "usage": {"prompt_tokens": 11, "completion_tokens": len(content), "total_tokens": 11 + len(content)}})

async def health(request):
    return PlainTextResponse("")

async def metrics(request):
    return PlainTextResponse('vllm:prefix_cache_queries_total{engine="0"} 40.0\\n'
                             'vllm:prefix_cache_queries_created{engine="0"} 1.7e9\\n'
                             'vllm:prefix_cache_hits_total{engine="0"} 30.0\\n'
                             'vllm:num_requests_running{engine="0"} 0.0\\n')

app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health),
                        Route("/metrics", metrics)])
uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
'''


@pytest.fixture
def fake_vllm(tmp_path):
    """`vllm` options that start the fake server with this interpreter; `log` gets its argv and pid."""
    pkg = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "api_server.py").write_text(FAKE_SERVER)
    log = tmp_path / "server.json"

    def options(mode: str = "ok", bind_delay: float = 0.0, **kw) -> dict:
        return {"python": sys.executable, "startup_timeout_s": 30,
                "env": {"PYTHONPATH": str(tmp_path / "fake"), "FAKE_VLLM": mode, "FAKE_VLLM_LOG": str(log),
                        "FAKE_VLLM_BIND_DELAY": str(bind_delay)}, **kw}

    options.log = log
    return options


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    return str(d)


def adapter(path, r: int = 8) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "peft_type": "LORA"}))
    return str(path)


def req(content: str = "hi", adapter_name: str | None = None, **kw) -> LMRequest:
    return LMRequest(experiment_id="e", episode_id="ep", call_index=0, scenario="s", role="r", call_kind="k",
                     messages=[{"role": "user", "content": content}], adapter=adapter_name, **kw)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is gone for our purposes (its parent, the watchdog, may not have reaped it yet)
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.2)
    return False


def server_pids(name: str) -> list[int]:
    """Processes whose command line is a vLLM server for model `name` (the watchdog and the server itself)."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"vllm.entrypoints.openai.api_server" in argv and name.encode() in argv:
            pids.append(int(d))
    return pids


# --- config validation ----------------------------------------------------------------------------------------

EXPERIMENT = """\
experiment: {{name: v, storage: {storage}}}
models:
  - name: small
    tier: slm
    backend: vllm
    source: {source}
{extra}  - {{name: big, tier: llm, backend: simulated, resources: {{num_cpus: 0}}}}
router: {{policies: [{{kind: llm}}]}}
scenarios: [{{kind: operator, episodes: 1}}]
"""


def experiment(tmp_path, extra: str = "", source: str = "packaged:smollm2-135m"):
    p = tmp_path / "exp.yaml"
    p.write_text(EXPERIMENT.format(storage=tmp_path, source=source, extra=textwrap.indent(extra, "    ")))
    return p


def test_registered_and_options_are_strict():
    assert get_engine_class("vllm") is VLLMEngine
    spec = ModelSpec(name="m", tier="slm", backend="vllm", source="x")
    assert spec.vllm.enable_prefix_caching and spec.vllm.kv_cache_mb == 2048
    with pytest.raises(ValidationError, match="gpu_mem"):
        ModelSpec(name="m", tier="slm", backend="vllm", source="x", vllm={"gpu_mem": 0.5})


def test_interpreter_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # a venv's python is a symlink to the base interpreter: made absolute, never resolved
    (tmp_path / "env" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / "env" / "bin" / "python")
    assert VLLMOptions(python="env/bin/python").interpreter() == str(tmp_path / "env" / "bin" / "python")
    monkeypatch.setenv("SLMSHIFT_VLLM_ENV", "env")
    assert VLLMOptions().interpreter() == str(tmp_path / "env" / "bin" / "python")
    assert VLLMOptions(python="python3").interpreter().endswith("/python3")  # looked up on PATH


def test_missing_interpreter_is_a_config_error_naming_field_and_fix(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(experiment(tmp_path, "vllm: {python: /no/such/python}\n"))
    msg = str(e.value)
    assert "models[0].vllm.python" in msg and "cannot run /no/such/python" in msg
    assert "scripts/setup-vllm.sh" in msg


def test_env_without_vllm_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"vLLM is not installed in .*python.*setup-vllm\.sh"):
        load_config(experiment(tmp_path, f"vllm: {{python: {sys.executable}}}\n"))


def test_cli_exit_2_names_the_fix(tmp_path):
    p = experiment(tmp_path, "vllm: {python: /no/such/python}\n")
    r = subprocess.run([sys.executable, "-m", "slmshift.cli", "run", str(p)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "models[0].vllm.python" in r.stderr and "scripts/setup-vllm.sh" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_adapters_are_accepted_for_vllm(tmp_path, fake_vllm):
    a = adapter(tmp_path / "a")
    opts = json.dumps(fake_vllm())
    cfg = load_config(experiment(tmp_path, f"vllm: {opts}\nadapters: {{sql: {a}}}\n"))
    assert cfg.models[0].adapters == {"sql": a}
    with pytest.raises(ConfigError, match="source.*required for backend 'vllm'"):
        load_config(experiment(tmp_path, f"vllm: {opts}\n", source="''"))


def test_log_summaries():
    log = ("(APIServer pid=1) WARNING 11-29 19:14:50 [system_utils.py:255] Found ulimit of 20000 ... like "
           "`OSError: [Errno 24] Too many open files`\n"
           "(EngineCore pid=2) ERROR 11-29 19:17:33 [cpu_worker.py:83] ValueError: Available memory is short\n\n"
           "(EngineCore pid=2) ERROR 11-29 19:17:39 [core.py:1510] RuntimeError: Engine core initialization failed.")
    assert root_cause(log) == "ValueError: Available memory is short"
    assert log_tail(log, 2) == ("ValueError: Available memory is short | "
                                "RuntimeError: Engine core initialization failed.")


# --- the request/response mapping and the server's lifetime, against the fake server ---------------------------

def test_mapping_adapters_logprobs_and_server_args(tmp_path, fake_vllm, model_dir):
    a, b = adapter(tmp_path / "a", r=8), adapter(tmp_path / "b", r=20)
    spec = ModelSpec(name="slm", tier="slm", backend="vllm", source=model_dir, adapters={"a": a, "b": b},
                     batching={"max_batch_size": 16}, vllm=fake_vllm(max_model_len=4096, extra_args=["--seed", "1"]))
    engine = VLLMEngine(spec)
    try:
        argv = json.loads(fake_vllm.log.read_text())["argv"]
        flags = " ".join(argv)
        assert argv[argv.index("--model") + 1] == model_dir and argv[argv.index("--served-model-name") + 1] == "slm"
        for expected in ("--enable-prefix-caching", "--max-num-seqs 16", "--max-model-len 4096",
                         f"--kv-cache-memory-bytes {2048 * 2**20}", "--generation-config vllm", "--enable-lora",
                         "--max-loras 2", "--max-lora-rank 32", "--seed 1"):
            assert expected in flags
        loras = [json.loads(x) for x in argv[argv.index("--lora-modules") + 1:][:2]]
        assert loras == [{"name": "slm:a", "path": a, "base_model_name": "slm"},
                         {"name": "slm:b", "path": b, "base_model_name": "slm"}]

        out = asyncio.run(engine.generate([req(max_tokens=20, temperature=0.3, seed=5), req(adapter_name="b"),
                                           req(adapter_name="zzz")]))
        assert out[0].text == "slm t=0.3 seed=5 max=20" and out[0].error is None and out[0].adapter is None
        assert (out[0].tokens_in, out[0].tokens_out, out[0].mean_logprob) == (11, 4, -0.25)
        assert (out[0].backend, out[0].tier, out[0].model) == ("vllm", "slm", "slm")
        assert out[1].text.startswith("slm:b ") and out[1].adapter == "b" and out[1].error is None
        assert "adapter 'zzz' requested, but it is not loaded on model 'slm' (adapters: a, b)" in out[2].error
        assert engine.stats() == {"prefix_query_tokens": 40.0, "prefix_hit_tokens": 30.0, "prefix_token_hit_rate": 0.75}
        assert json.loads(argv[argv.index("--structured-outputs-config") + 1]) == {
            "backend": "guidance", "disable_any_whitespace": True}
    finally:
        engine.close()


def test_constraints_and_tool_choice_go_as_structured_outputs(fake_vllm, model_dir):
    engine = VLLMEngine(ModelSpec(name="slm", tier="slm", backend="vllm", source=model_dir, vllm=fake_vllm()))
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
             {"name": "get_weather", "parameters": {"type": "object"}}]  # a bare function spec is wrapped
    try:
        schema, regex, lark = {"type": "object"}, r"click\([0-9]+\)", 'start: "a" | "b"'
        out = asyncio.run(engine.generate([
            req(json_schema=schema), req(constraint=OutputConstraint(regex=regex)),
            req(constraint=OutputConstraint(grammar=lark)), req(json_schema=schema, constrained=False),
            req(constraint=(out_constraint := OutputConstraint(tools=tools, tool_choice={
                "type": "function", "function": {"name": "get_weather"}}))),
            req(constraint=OutputConstraint(tools=tools, tool_choice="auto"))]))
        assert [json.loads(r.text) for r in out[:3]] == [{"json": schema}, {"regex": regex}, {"grammar": lark}]
        assert [r.constrained for r in out] == [True, True, True, False, True, False]
        assert not out[3].text.startswith("{")  # not constrained: nothing sent
        # a named or required tool_choice goes as the schema of the tool-call text (vLLM's own needs a parser)
        assert json.loads(out[4].text) == {"json": out_constraint.calls_schema()}
        assert "tool_calls" not in out[5].text  # 'auto': no tools sent, the model answers in text
    finally:
        engine.close()


def test_close_stops_the_server(fake_vllm, model_dir):
    engine = VLLMEngine(ModelSpec(name="m", tier="slm", backend="vllm", source=model_dir, vllm=fake_vllm()))
    pid = json.loads(fake_vllm.log.read_text())["pid"]
    engine.close()
    assert wait_gone(pid, 5) and not os.path.exists(engine.log_path)  # a clean stop leaves no log behind
    engine.close()  # idempotent


@pytest.mark.parametrize("ray_style", [False, True], ids=["owner-killed", "owner-and-watchdog-killed"])
def test_server_dies_with_its_owner(fake_vllm, model_dir, ray_style):
    """SIGKILL of the replica's process (no close, no atexit): the watchdog sees the lifeline end and stops the
    server. Ray also SIGKILLs a dead worker's children (the watchdog): the server then gets its parent-death signal."""
    code = (f"from slmshift.platform.types import ModelSpec\nfrom slmshift.serve.engines.vllm_engine import VLLMEngine\n"
            f"e = VLLMEngine(ModelSpec(name='m', tier='slm', backend='vllm', source={model_dir!r}, "
            f"vllm={fake_vllm()!r}))\nprint(e.proc.pid, e.log_path, flush=True)\nimport time; time.sleep(600)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        watchdog, log = owner.stdout.readline().split()
        watchdog = int(watchdog)
        pid = json.loads(fake_vllm.log.read_text())["pid"]
        assert alive(pid)
        owner.send_signal(signal.SIGKILL)
        if ray_style:
            os.kill(watchdog, signal.SIGKILL)
        owner.wait()
        assert wait_gone(pid), "the vLLM server outlived its replica"
        os.unlink(log)  # kept, as after any replica that died without closing its engine
    finally:
        if owner.poll() is None:
            owner.kill()


def test_server_dying_mid_run_is_named_in_the_error(fake_vllm, model_dir):
    engine = VLLMEngine(ModelSpec(name="m", tier="slm", backend="vllm", source=model_dir, vllm=fake_vllm()))
    try:
        engine.check_health()  # alive: no complaint
        out = asyncio.run(engine.generate([req("die")]))[0]
        assert out.text == "" and "the vLLM server exited with code 3" in out.error and engine.log_path in out.error
        with pytest.raises(RuntimeError, match="is gone .exit code 3"):  # so Serve replaces the replica
            engine.check_health()
    finally:
        engine.close()
    assert os.path.exists(engine.log_path)  # named in the error: kept
    os.unlink(engine.log_path)


@pytest.mark.parametrize("reuse_address", [False, True], ids=["plain-bind", "so-reuseaddr"])
def test_a_port_taken_while_the_server_starts(fake_vllm, model_dir, reuse_address):
    """The server binds its port seconds after the engine chose it (vLLM's imports come first). Another process
    binding that port meanwhile, as any free-port helper or server does, must not get it; one that binds it anyway
    (SO_REUSEADDR, as Python's http.server does) and listens first costs a start on a new port, not the replica."""
    spec = ModelSpec(name="m", tier="slm", backend="vllm", source=model_dir, vllm=fake_vllm(bind_delay=1.5))
    started: dict = {}

    def start():
        try:
            started["engine"] = VLLMEngine(spec)
        except Exception as e:
            started["error"] = e

    thread = threading.Thread(target=start)
    thread.start()
    deadline = time.time() + 30
    while True:  # the server writes its argv (the port) before it binds
        try:
            argv = json.loads(fake_vllm.log.read_text())["argv"]
            break
        except (OSError, ValueError):
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
    port = int(argv[argv.index("--port") + 1])
    other = socket.socket()
    if reuse_address:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        try:
            other.bind(("127.0.0.1", port))
            other.listen()
            taken = True
        except OSError as e:
            assert e.errno == errno.EADDRINUSE
            taken = False
        assert taken == reuse_address  # only a process that asks to share the address gets it
        thread.join(60)
        assert "error" not in started, started.get("error")
        engine = started["engine"]
        try:
            assert (engine.port != port) if taken else (engine.port == port)
            out = asyncio.run(engine.generate([req()]))[0]
            assert out.error is None and out.text.startswith("m t=0.0"), out  # our server answered
        finally:
            engine.close()
    finally:
        other.close()
        thread.join(60)


def test_failed_start_names_the_root_cause(fake_vllm, model_dir):
    spec = ModelSpec(name="m", tier="slm", backend="vllm", source=model_dir, vllm=fake_vllm("crash"))
    with pytest.raises(ModelLoadError) as e:
        VLLMEngine(spec)
    msg = str(e.value)
    log = msg.split("(full log: ")[1].split(")")[0]
    assert os.path.exists(log)
    os.unlink(log)
    assert "exited with code 1 while starting: ValueError: not enough memory for the KV cache" in msg
    assert "Server log tail:" in msg and "RuntimeError: Engine core initialization failed" in msg
    assert "\n" not in msg  # one line: what Serve shows of a replica that failed to start


def test_start_up_timeout(fake_vllm, model_dir):
    spec = ModelSpec(name="m", tier="slm", backend="vllm", source=model_dir, vllm=fake_vllm("hang", startup_timeout_s=2))
    t0 = time.time()
    with pytest.raises(ModelLoadError, match=r"did not answer .*/health within vllm.startup_timeout_s=2 s") as e:
        VLLMEngine(spec)
    assert time.time() - t0 < 30
    os.unlink(str(e.value).split("(full log: ")[1].split(")")[0])


def test_engine_refuses_an_env_without_vllm(model_dir):
    spec = ModelSpec(name="m", tier="slm", backend="vllm", source=model_dir, vllm={"python": sys.executable})
    with pytest.raises(ModelLoadError, match="vLLM is not installed in .*scripts/setup-vllm.sh"):
        VLLMEngine(spec)


# --- the real engine --------------------------------------------------------------------------------------------

VLLM_MISSING = VLLMOptions().problem()


@pytest.mark.slow
@pytest.mark.skipif(VLLM_MISSING is not None, reason=f"no vLLM env: {VLLM_MISSING} (scripts/setup-vllm.sh makes one)")
def test_real_vllm_behind_serve(ray_cluster, tmp_path):
    """vLLM from its own env behind a Serve deployment: SmolLM2-135M with a peft LoRA adapter, log-probs, prefix
    caching; greedy tokens match the hf engine's; each kind of output constraint holds; deleting the app stops the
    server."""
    import torch
    from peft import LoraConfig, get_peft_model
    from ray import serve

    from slmshift.serve.deployment import deploy_models
    from slmshift.serve.engines.hf import HFEngine
    from slmshift.serve.sources import load_model_and_tokenizer

    # An adapter that changes the output: random A and B (peft's default B = 0 would leave the model as it was),
    # scaled up (alpha/r = 32) so that greedy text changes too.
    torch.manual_seed(0)
    base, _ = load_model_and_tokenizer("packaged:smollm2-135m")
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=256, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(tmp_path / "lora"))
    del base, peft_model

    spec = ModelSpec(name="smol-vllm", tier="slm", backend="vllm", source="packaged:smollm2-135m",
                     resources={"num_cpus": 1}, adapters={"noisy": str(tmp_path / "lora")},
                     vllm={"dtype": "float32", "enforce_eager": True, "max_model_len": 2048, "kv_cache_mb": 512})
    handle = deploy_models([spec], available_cpus=2)[spec.name]
    # over 128 tokens: vLLM's CPU backend caches prefixes in blocks of 128
    prompts = ["What is the capital of France? " + "Answer in one short sentence, please. " * 20,
               "Name three colours."]
    out = [handle.remote(req(p, max_tokens=12)).result(timeout_s=300) for p in prompts]
    again = handle.remote(req(prompts[0], max_tokens=12)).result(timeout_s=300)
    tuned = handle.remote(req(prompts[1], adapter_name="noisy", max_tokens=12)).result(timeout_s=300)
    info = handle.info.remote().result(timeout_s=60)
    for r in out + [again, tuned]:
        assert r.error is None and r.backend == "vllm" and r.tokens_out > 0
        assert r.mean_logprob is not None and r.mean_logprob <= 0
    assert again.text == out[0].text  # greedy
    assert tuned.adapter == "noisy" and tuned.text != out[1].text
    assert info["params"] == 134.5e6 and info["stats"]["prefix_hit_tokens"] >= 128

    # Output constraints, enforced by vLLM's structured outputs: every kind holds its answer to the constraint
    # (bounded grammars: vLLM does not close an answer its max_tokens would cut).
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}},
             {"type": "function", "function": {"name": "get_time", "parameters": {
                 "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                 "additionalProperties": False}}}]
    constraints = [OutputConstraint(json_schema=schema), OutputConstraint(regex=r'click\((3|14)\)|press\("Enter"\)'),
                   OutputConstraint(grammar='start: "[" NAME "(x=" /[0-9]{1,3}/ ")]"\nNAME: "f" | "g"'),
                   OutputConstraint(tools=tools, tool_choice="required"),
                   OutputConstraint(tools=tools, tool_choice={"type": "function", "function": {"name": "get_time"}})]
    held = [handle.remote(req("Answer now.", max_tokens=60, constraint=c)).result(timeout_s=300) for c in constraints]
    assert all(r.error is None and r.constrained for r in held), [r.error for r in held]
    assert set(json.loads(held[0].text)) == {"city"}
    assert re.fullmatch(r'click\((3|14)\)|press\("Enter"\)', held[1].text)
    assert re.fullmatch(r"\[[fg]\(x=[0-9]{1,3}\)\]", held[2].text)
    calls = [json.loads(r.text)["tool_calls"] for r in held[3:]]
    assert calls[0] and {c["name"] for c in calls[0]} <= {"get_weather", "get_time"}
    assert [c["name"] for c in calls[1]] == ["get_time"] * len(calls[1])

    # The hf engine, same weights, template and adapter, float32, greedy: the same tokens.
    hf = HFEngine(ModelSpec(name="smol-hf", tier="slm", backend="hf", source="packaged:smollm2-135m",
                            adapters={"noisy": str(tmp_path / "lora")}))
    want = asyncio.run(hf.generate([req(p, max_tokens=12) for p in prompts]
                                   + [req(prompts[1], adapter_name="noisy", max_tokens=12)]))
    hf.close()
    assert [r.text for r in out + [tuned]] == [r.text for r in want]
    assert [r.tokens_out for r in out + [tuned]] == [r.tokens_out for r in want]

    pids = server_pids(spec.name)
    assert pids
    serve.delete(spec.name)
    assert all(wait_gone(pid, 60) for pid in pids), "the vLLM server outlived its Serve replica"
    for log in glob.glob(os.path.join(tempfile.gettempdir(), f"slmshift-vllm-{spec.name}-*.log")):
        os.unlink(log)  # Ray kills the replica without closing its engine: the log stays, as Ray's own logs do
