"""Scenario families. Importing this package registers them with the platform's scenario registry."""

from slmshift.scenarios import operator  # noqa: F401  (registers "operator")
