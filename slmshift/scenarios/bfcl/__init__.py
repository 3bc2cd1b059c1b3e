"""BFCL v4 (single-turn python categories) as an slmshift scenario.

Tasks come from the data shipped in the installed ``bfcl_eval``; answers are graded in-process
with BFCL's own decoder and AST checker; prompts reuse BFCL's prompting-mode system prompt. Modules, each
importing only those above it: ``api`` (the bfcl_eval shim), ``data``, ``grader``, ``teacher`` (the simulated
teacher's references and distractors), ``prompts``.
"""

from slmshift.scenarios.bfcl.data import CATEGORIES, BFCLTask, expected_function_names, load_tasks
from slmshift.scenarios.bfcl.grader import INTENT_SCHEMA, Grade, decode_calls, grade_calls, grade_intent, intent_schema
from slmshift.scenarios.bfcl.prompts import call_messages, intent_messages
from slmshift.scenarios.bfcl.teacher import distractor_calls, intent_distractors, intent_reference, reference_call

__all__ = [
    "CATEGORIES",
    "BFCLTask",
    "load_tasks",
    "expected_function_names",
    "reference_call",
    "distractor_calls",
    "Grade",
    "decode_calls",
    "grade_calls",
    "grade_intent",
    "intent_reference",
    "intent_distractors",
    "intent_schema",
    "INTENT_SCHEMA",
    "intent_messages",
    "call_messages",
]
