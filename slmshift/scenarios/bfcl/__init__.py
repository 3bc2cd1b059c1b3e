"""BFCL v4 (single-turn python categories) as an slmshift scenario.

Tasks come from the data shipped in the installed ``bfcl_eval``; answers are graded in-process
with BFCL's own decoder and AST checker; prompts reuse BFCL's prompting-mode system prompt.
"""

from slmshift.scenarios.bfcl.data import (
    CATEGORIES,
    BFCLTask,
    distractor_calls,
    expected_function_names,
    load_tasks,
    reference_call,
)
from slmshift.scenarios.bfcl.grader import (
    INTENT_SCHEMA,
    Grade,
    decode_calls,
    grade_calls,
    grade_intent,
    intent_distractors,
    intent_reference,
    intent_schema,
)
from slmshift.scenarios.bfcl.prompts import call_messages, intent_messages

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
