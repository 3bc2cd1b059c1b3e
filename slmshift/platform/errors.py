"""User-facing errors. The CLI prints them as one paragraph and exits 2, never with a traceback."""

from __future__ import annotations


def one_line_error(exc: BaseException) -> str:
    """`Type: first line of the message` (just `Type` for an empty one), for errors quoted inside our own."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


class SlmshiftError(Exception):
    """An error the user can fix: says what is wrong, where, and what to do."""

    exit_code = 2


class ConfigError(SlmshiftError):
    """A bad experiment file. `problems` holds one line per invalid field, each naming its path."""

    def __init__(self, path: str, problems: list[str], hint: str = ""):
        self.path, self.problems, self.hint = path, problems, hint
        lines = [f"{path}: invalid experiment config ({len(problems)} problem{'s' * (len(problems) != 1)})"]
        lines += [f"  - {p}" for p in problems]
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


class ModelLoadError(SlmshiftError):
    """An engine could not load its model."""


class RayConnectError(SlmshiftError):
    """The Ray cluster could not be reached or started."""
