"""BFCL v4's multi-turn categories on its executable backends (file system, messaging, trading, travel, ...).

Modules, each importing only those above it: ``data`` (tasks, function docs), ``executor`` (model calls parsed
with ``ast`` and run against the episode's own backend objects, never ``eval``), ``grader`` (BFCL's
``state_checker`` / ``response_checker`` per turn), ``teacher`` (the simulated teacher's answers from the
ground-truth call sequence), ``prompts``.
"""

from slmshift.scenarios.bfcl.multiturn.data import MT_CATEGORIES, MultiTurnTask, load_multi_turn_tasks, mt_task_by_id
from slmshift.scenarios.bfcl.multiturn.executor import Backends, ParsedCall, ParsedStep, parse_step
from slmshift.scenarios.bfcl.multiturn.grader import EpisodeGrader, TurnCheck, grade_step, grade_turn_intent

__all__ = ["MT_CATEGORIES", "MultiTurnTask", "load_multi_turn_tasks", "mt_task_by_id", "Backends", "ParsedCall",
           "ParsedStep", "parse_step", "EpisodeGrader", "TurnCheck", "grade_step", "grade_turn_intent"]
