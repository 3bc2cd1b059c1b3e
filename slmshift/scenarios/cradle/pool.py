"""A team actor's pool of browser actors: created on first use, sized by the YAML and the machine, replaced
when one dies. The browsers are owned by the team actor, so they (and, through PR_SET_PDEATHSIG, their
Chromium processes) die with it when the runner kills the team at the end of an arm."""

from __future__ import annotations

import asyncio
from typing import Any

BROWSER_BYTES = 450 * 1024**2  # measured 270-410 MB PSS per browser, rounded up
MEMORY_SHARE = 0.5  # of the memory available when the pool starts


def pool_size(wanted: int, concurrency: int, teams: int) -> int:
    """Browsers per team: what the YAML asks, no more than episodes run at once, and no more than half the
    machine's available memory holds across all teams."""
    import psutil

    fits = int(psutil.virtual_memory().available * MEMORY_SHARE // BROWSER_BYTES) // max(teams, 1)
    return max(1, min(wanted, concurrency, fits))


class BrowserPool:
    def __init__(self, size: int, num_cpus: float, episode_max_s: float):
        self.size, self.num_cpus, self.episode_max_s = size, num_cpus, episode_max_s
        self._free: asyncio.Queue | None = None
        self.actors: list[Any] = []
        self.replaced = 0

    def _new(self) -> Any:
        from slmshift.scenarios.cradle.browser import browser_actor_class

        actor = browser_actor_class(self.num_cpus).remote(self.episode_max_s)
        self.actors.append(actor)
        return actor

    async def acquire(self) -> Any:
        if self._free is None:
            self._free = asyncio.Queue()
            for _ in range(self.size):
                self._free.put_nowait(self._new())
        return await self._free.get()

    def release(self, actor: Any) -> None:
        assert self._free is not None
        self._free.put_nowait(actor)

    def replace(self, dead: Any) -> Any:
        """A fresh actor for one whose process died; the caller holds it as if acquired."""
        import ray

        try:
            ray.kill(dead)
        except Exception:
            pass
        if dead in self.actors:
            self.actors.remove(dead)
        self.replaced += 1
        return self._new()

    async def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                await actor.close.remote()
            except Exception:
                pass
            ray.kill(actor)
        self.actors, self._free = [], None
