"""Scenario families. Importing this package registers them with the platform's scenario registry."""

from slmshift.scenarios import cradle, metagpt, operator  # noqa: F401  (register "cradle", "metagpt", "operator")
from slmshift.scenarios import operator_multiturn  # noqa: F401  (registers "operator_multiturn")
