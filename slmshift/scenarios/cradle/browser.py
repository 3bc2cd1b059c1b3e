"""MiniWoB++ in real headless Chromium: one browser per `MiniWoBBrowser`, wrapped as a Ray actor.

A browser is driven through miniwob's own `MiniWoBEnvironment` (its reset/step/reward and
`create_action`), with three changes the agent loop needs:

- one Chromium serves any task: switching task navigates the page instead of starting a new browser;
- the page's episode time limit (`core.EPISODE_MAX_TIME`, 10 s by default) is raised, and the reward is
  miniwob's raw reward, not the time-scaled one, so model latency does not decide the grade;
- Chromium and chromedriver are tied to the actor's process (PR_SET_PDEATHSIG), so a killed actor
  (the runner kills team actors, which own their browsers) never leaves a browser behind.

A dead browser (Chromium killed or crashed) comes back as a step result with `crashed=True`; the actor has
already started a fresh browser by then, and the scenario retries the episode.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import stat
import tempfile
import time
import urllib.parse
from typing import Any

from slmshift.platform.errors import SlmshiftError

CHROME_ENV, DRIVER_ENV = "MINIWOB_CHROME_BINARY", "MINIWOB_CHROMEDRIVER"
DEFAULT_CHROME, DEFAULT_DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  # task pages wait in background tabs: keep their timers and rendering at full speed
                  "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                  "--disable-backgrounding-occluded-windows")
MAX_TABS = 16  # task pages kept open per browser; switching to an open one costs no page load
_PR_SET_PDEATHSIG = 1


class BrowserMissingError(SlmshiftError):
    """Chromium or chromedriver is not installed where miniwob looks."""


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver) executables, from the env vars or Debian's default paths.

    Raises BrowserMissingError naming the Debian packages and env vars when either is missing.
    """
    chrome = os.environ.get(CHROME_ENV) or DEFAULT_CHROME
    driver = os.environ.get(DRIVER_ENV) or DEFAULT_DRIVER
    missing = [f"{what} ({path})" for what, path in (("chromium", chrome), ("chromedriver", driver))
               if not (os.path.isfile(path) and os.access(path, os.X_OK)) and not shutil.which(path)]
    if missing:
        raise BrowserMissingError(
            f"the cradle scenario needs headless Chromium, but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Fix: install the Debian packages "
            f"`apt-get install -y chromium chromium-driver`, or set {CHROME_ENV} and {DRIVER_ENV} to the paths "
            "of a Chromium binary and its matching chromedriver.")
    return shutil.which(chrome) or chrome, shutil.which(driver) or driver


def browser_missing() -> str | None:
    """Why the browser cannot start (the fix included), or None when it can."""
    try:
        browser_paths()
    except BrowserMissingError as e:
        return str(e)
    return None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _chrome_wrapper(chrome: str) -> str:
    """A launcher script that makes Chromium die with chromedriver (which dies with this process).

    One file per user and Chromium path, shared by every browser and kept (a killed actor cannot clean up)."""
    import hashlib

    setpriv = "setpriv --pdeathsig KILL -- " if shutil.which("setpriv") else ""  # util-linux; Debian has it
    body = f'#!/bin/sh\nexec {setpriv}"{chrome}" "$@"\n'
    tag = hashlib.sha1(body.encode()).hexdigest()[:12]
    path = os.path.join(tempfile.gettempdir(), f"slmshift-chromium-{os.getuid()}-{tag}.sh")
    if not os.path.exists(path):
        fd, tmp = tempfile.mkstemp(prefix="slmshift-chromium-", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(body)
        os.chmod(tmp, stat.S_IRWXU)
        os.replace(tmp, path)  # atomic: concurrent actors never see a half-written script
    return path


def _quiet_http_server() -> str:
    """miniwob's HTTP server for the `flight.*` tasks (its singleton), without a log line per request."""
    import functools
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    import miniwob.http_server as hs
    from miniwob.selenium_instance import HTML_DIR

    if hs.SERVER_SINGLETON is None:
        class Quiet(SimpleHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

        httpd = ThreadingHTTPServer(("localhost", 0), functools.partial(Quiet, directory=str(HTML_DIR)))
        Thread(target=httpd.serve_forever, daemon=True).start()
        hs.SERVER_SINGLETON = httpd
    return hs.start_http_server(str(HTML_DIR))


def _make_env(task: str, episode_max_s: float) -> Any:
    """A miniwob environment on `task` whose Chromium is started with our flags and lifetime."""
    from miniwob.environment import MiniWoBEnvironment
    from miniwob.selenium_instance import SeleniumInstance
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.wait import WebDriverWait

    chrome, driver_path = browser_paths()

    class Instance(SeleniumInstance):
        def create_driver(self) -> None:
            options = webdriver.ChromeOptions()
            for flag in HEADLESS_FLAGS:
                options.add_argument(flag)
            self.wrapper = _chrome_wrapper(chrome)
            options.binary_location = self.wrapper
            service = Service(executable_path=driver_path, popen_kw={"preexec_fn": _die_with_parent})
            self.driver = webdriver.Chrome(service=service, options=options)
            self.driver.implicitly_wait(5)
            load_page(self)

        def close(self) -> None:
            try:
                self.driver.quit()
            except Exception:  # already dead: nothing left to close
                pass
            self.died = True

    def load_page(inst: Any) -> None:
        inst.driver.get(inst.url)
        WebDriverWait(inst.driver, 10).until(EC.element_to_be_clickable((By.ID, inst.SYNC_SCREEN_ID)))
        inst.driver.execute_script(f"core.EPISODE_MAX_TIME = {int(episode_max_s * 1000)};")
        inst.inner_width, inst.inner_height = inst.driver.execute_script(
            "return [window.innerWidth, window.innerHeight];")

    class Env(MiniWoBEnvironment):
        def _hard_reset_instance(self) -> None:
            if getattr(self, "instance", None):
                self.instance.close()
            self.instance = Instance(index=0, **self.instance_kwargs)
            self.instance.start()

        def switch_task(self, new_task: str) -> None:
            """Go to `new_task`'s page: its open tab if any (no reload), else a new tab (closing the least
            recently used one beyond MAX_TABS)."""
            from miniwob.fields import get_field_extractor
            from miniwob.selenium_instance import DEFAULT_BASE_URL

            inst, driver = self.instance, self.instance.driver
            tabs = self.__dict__.setdefault("tabs", {self.subdomain: driver.current_window_handle})
            inst.force_stop()  # end the episode on the page we leave
            self.subdomain = inst.subdomain = new_task
            if new_task.startswith("flight."):  # served over HTTP, as miniwob's own SeleniumInstance does
                base = _quiet_http_server()
                inst.url = urllib.parse.urljoin(base, new_task.replace(".", "/") + "/wrapper.html")
            else:
                inst.url = urllib.parse.urljoin(DEFAULT_BASE_URL, f"{new_task}.html")
            inst.field_extractor = get_field_extractor(new_task)
            if new_task in tabs:
                tabs[new_task] = tabs.pop(new_task)  # most recently used last
                driver.switch_to.window(tabs[new_task])
                driver.execute_cdp_cmd("Page.bringToFront", {})  # else the page never gets focus events
                return
            if len(tabs) >= MAX_TABS:
                oldest = next(iter(tabs))
                driver.switch_to.window(tabs.pop(oldest))
                driver.close()
                driver.switch_to.window(next(iter(tabs.values())))  # a live tab to open the new one from
            driver.switch_to.new_window("tab")
            tabs[new_task] = driver.current_window_handle
            driver.execute_cdp_cmd("Page.bringToFront", {})
            load_page(inst)

    from miniwob.reward import get_raw_reward

    logging.getLogger("selenium").setLevel(logging.WARNING)
    if task.startswith("flight."):
        _quiet_http_server()  # before miniwob starts its own, noisy one
    return Env(subdomain=task, reward_processor=get_raw_reward)


def flatten(root: Any) -> list[dict[str, Any]]:
    """miniwob's DOM tree as a flat, picklable element list in document order."""
    out: list[dict[str, Any]] = []

    def walk(el: Any, depth: int) -> None:
        out.append({"ref": el.ref, "parent": el.parent.ref if el.parent else 0, "depth": depth, "tag": el.tag,
                    "text": el.text or "", "value": el.value, "id": el.id, "classes": el.classes,
                    "focused": bool(el.focused), "tampered": bool(el.tampered), "leaf": el.is_leaf,
                    "left": el.left, "top": el.top, "width": el.width, "height": el.height})
        for child in el.children:
            walk(child, depth + 1)

    walk(root, 0)
    return out


class MiniWoBBrowser:
    """One headless Chromium playing MiniWoB++ tasks. Use in-process, or as `BrowserActor` (a Ray actor).

    Observations are dicts: utterance, fields (miniwob's parsed task fields), elements (see `flatten`),
    and after a step also reward, done and reason. Actions are `(kind, args)` tuples built by
    `actions.parse_action`: ("click", (ref,)), ("type", (ref, text)), ("press", (key,)).
    """

    def __init__(self, episode_max_s: float = 600.0):
        self.episode_max_s = episode_max_s
        self.env: Any = None
        self.task: str | None = None
        self.restarts = 0
        self.steps = 0
        self._values: dict[int, Any] = {}  # ref -> value on the last page seen, for `type`

    # -- lifecycle ------------------------------------------------------------------------------

    def _start(self, task: str) -> None:
        self.env = _make_env(task, self.episode_max_s)
        self.task = task

    def _restart(self, task: str) -> None:
        logging.getLogger(__name__).warning("browser for %s died; starting a fresh one", task)
        self.close()
        self.restarts += 1
        self._start(task)

    def close(self) -> None:
        if self.env is not None:
            try:
                self.env.instance.close()
            except Exception:
                pass
        self.env, self.task = None, None

    def pids(self) -> list[int]:
        """Process ids of chromedriver and the Chromium processes it started (for tests and memory use)."""
        import psutil

        if self.env is None:
            return []
        try:
            proc = psutil.Process(self.env.instance.driver.service.process.pid)
            return [proc.pid] + [c.pid for c in proc.children(recursive=True)]
        except (psutil.Error, AttributeError):
            return []

    def restart_count(self) -> int:
        return self.restarts

    # -- episodes -------------------------------------------------------------------------------

    def reset(self, task: str, seed: int) -> dict[str, Any]:
        """Start an episode of `task` with `seed`. A dead browser is replaced first."""
        for attempt in range(2):
            try:
                if self.env is None:
                    self._start(task)
                elif task != self.task:
                    self.env.switch_task(task)
                    self.task = task
                obs, info = self.env.reset(seed=seed, options={"record_screenshots": False})
                self._values = {el.ref: el.value for el in info["root_dom"].subtree_elements}
                return {"utterance": obs["utterance"], "fields": [list(f) for f in obs["fields"]],
                        "elements": flatten(info["root_dom"]), "reward": 0.0, "done": False, "reason": None,
                        "crashed": False}
            except Exception as e:
                if attempt == 1 or not _is_browser_failure(e):
                    raise
                self._restart(task)
        raise AssertionError("unreachable")

    def step(self, kind: str, args: tuple) -> dict[str, Any]:
        """Apply one parsed action. On a dead browser, starts a fresh one and returns crashed=True."""
        if self.env is None or self.task is None:
            raise RuntimeError("step() before reset()")
        try:
            for action in self._actions(kind, args):
                obs, reward, done, _, info = self.env.step(action)
                self.steps += 1
                if done:
                    break
        except Exception as e:
            if not _is_browser_failure(e):
                raise
            task = self.task
            self._restart(task)
            return {"crashed": True, "reason": f"browser died: {type(e).__name__}", "done": False,
                    "reward": 0.0, "utterance": "", "fields": [], "elements": []}
        self._values = {} if done else {el.ref: el.value for el in info["root_dom"].subtree_elements}
        elements = [] if done else flatten(info["root_dom"])
        return {"utterance": obs["utterance"], "fields": [list(f) for f in obs["fields"]], "elements": elements,
                "reward": float(reward), "done": bool(done), "reason": info.get("reason"), "crashed": False}

    def _actions(self, kind: str, args: tuple) -> list[Any]:
        """miniwob actions for one grammar action. `type` replaces a field's content: when the field holds
        text, it is clicked and its text selected (Ctrl+A) first, so the typed text overwrites it."""
        u = self.env.unwrapped
        if kind == "click":
            return [u.create_action("CLICK_ELEMENT", ref=int(args[0]))]
        if kind == "type":
            ref, text = int(args[0]), str(args[1])
            if self._values.get(ref) not in (None, "", False, True):
                keys = list(u.action_space_config.allowed_keys)
                return [u.create_action("CLICK_ELEMENT", ref=ref), u.create_action("PRESS_KEY", key=keys.index("C-a")),
                        u.create_action("TYPE_TEXT", text=text)]
            return [u.create_action("FOCUS_ELEMENT_AND_TYPE_TEXT", ref=ref, text=text)]
        if kind == "press":
            keys = list(u.action_space_config.allowed_keys)
            return [u.create_action("PRESS_KEY", key=keys.index(args[0]))]
        raise ValueError(f"unknown action kind {kind!r}")


def _is_browser_failure(e: Exception) -> bool:
    """Errors that mean the browser (or its driver) is gone, not that the action was bad."""
    from selenium.common.exceptions import WebDriverException

    name = type(e).__name__
    return isinstance(e, (WebDriverException, ConnectionError, OSError)) or "MaxRetryError" in name \
        or "ProtocolError" in name


class _ActorBrowser(MiniWoBBrowser):
    def __init__(self, episode_max_s: float = 600.0):
        import sys

        # Selenium makes several small HTTP calls per step; with Ray's threads in the process, the default 5 ms
        # GIL switch interval added ~20 ms per reset (67 -> 46 ms measured on 2 busy cores).
        sys.setswitchinterval(0.0005)
        super().__init__(episode_max_s)


def browser_actor_class(num_cpus: float) -> Any:
    """`MiniWoBBrowser` as a Ray actor class reserving `num_cpus` (fractional: a browser idles while models think)."""
    import ray

    return ray.remote(num_cpus=num_cpus, max_restarts=0)(_ActorBrowser)


def wait_for_pids_gone(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """Pids among `pids` still alive (not zombies) after waiting up to `timeout_s`."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for p in pids:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.Error:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
