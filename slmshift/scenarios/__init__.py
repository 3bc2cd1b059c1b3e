"""Scenario families. Importing this package registers them with the platform's scenario registry."""

from slmshift.scenarios import cradle, metagpt, operator  # noqa: F401  (register "cradle", "metagpt", "operator")
