"""Which MiniWoB++ tasks the cradle scenario can play, and with which models.

The task list is MiniWoB++'s own: the Gymnasium ids `miniwob/<task>-v1` that `import miniwob` registers (128 in
miniwob 1.0, three of them the `flight.*` tasks). A task is *unsupported* when its goal needs an action the
grammar (`click(ref)`, `type(ref, "text")`, `press("Key")`, with the clipboard chords `press("Ctrl+C")` etc.)
cannot express; `UNSUPPORTED` names the missing action for each. Every other task runs with models that are real
(`hf`, `openai`). The simulated teacher answers from the DOM solver (`teacher.py`), so an arm that can send a
call to a simulated model is limited to the solver's tasks: `CradleScenario.check_models` says so at config time.
"""

from __future__ import annotations

import functools

__all__ = ["all_tasks", "supported_tasks", "UNSUPPORTED", "unsupported_reason"]

_DRAG = "a mouse drag from one point to another"
_POINT = "a click at a point of a drawing, not on an element with a ref"
_SELECT = "selecting text with the mouse"
# task -> what it needs that the grammar lacks
UNSUPPORTED: dict[str, str] = {
    **{t: _DRAG for t in ("drag-box", "drag-circle", "drag-cube", "drag-items", "drag-items-grid", "drag-shapes",
                          "drag-shapes-2", "drag-single-shape", "drag-sort-numbers", "resize-textarea")},
    "draw-circle": "drawing a mouse path", "draw-line": "drawing a mouse path",
    **{t: _POINT for t in ("bisect-angle", "circle-center", "right-angle", "find-midpoint", "hot-cold")},
    **{t: _SELECT for t in ("highlight-text", "highlight-text-2", "text-editor")},
    "scroll-text-2": "scrolling a text area",
    "click-scroll-list": "Ctrl/Shift+click to select several entries of a list",
}


@functools.cache
def all_tasks() -> tuple[str, ...]:
    """Every MiniWoB++ task: the `miniwob/*-v1` Gymnasium ids registered by `import miniwob` (no browser needed)."""
    import gymnasium
    import miniwob  # noqa: F401  # registers the environments

    pre, post = "miniwob/", "-v1"
    return tuple(sorted(i[len(pre):-len(post)] for i in gymnasium.registry if i.startswith(pre) and i.endswith(post)))


def supported_tasks() -> tuple[str, ...]:
    """The tasks the action grammar can play."""
    return tuple(t for t in all_tasks() if t not in UNSUPPORTED)


def unsupported_reason(task: str) -> str | None:
    need = UNSUPPORTED.get(task)
    return None if need is None else f"{task} needs {need}, which the action grammar (click, type, press) cannot express"
