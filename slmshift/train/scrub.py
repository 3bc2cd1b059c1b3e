"""S2 scrubbing: remove secrets and PII from text before it can reach a training set.

Secrets (API keys, tokens, private keys) are found with detect-secrets' plugins run on each line; PEM
private-key blocks are removed whole by a pattern (the plugin flags only the header line). PII that
detect-secrets does not cover (emails, phone numbers, IPv4/IPv6 addresses, credit-card numbers) is found
with patterns validated where a check exists: `ipaddress` for IPs, the Luhn checksum for cards. Each hit
is replaced by a typed placeholder, and counted per kind for the conversion report.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections import Counter
from typing import Callable

__all__ = ["Scrubber", "scrub_text", "luhn_ok", "PLACEHOLDERS"]

PLACEHOLDERS = {
    "private_key": "[PRIVATE_KEY]",
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "credit_card": "[CREDIT_CARD]",
    "ipv4": "[IP]",
    "ipv6": "[IP]",
    "phone": "[PHONE]",
}

# Entropy plugins flag ordinary words when scanning free text (they are meant for source files), and
# IPs are handled below with validation: everything else detect-secrets ships is keyed to a known format.
_SKIP_PLUGINS = {"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"}
_PEM = re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S)
# A flagged value is often only part of the token (e.g. 'ghp' for a GitHub token): widen it to the token.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-./+=~]")
_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")  # a sentence's full stop may follow
_IPV6 = re.compile(r"(?<![0-9A-Fa-f:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![0-9A-Fa-f:])")
# Phone numbers: international (+CC …) or North-American style with separators. Bare digit runs are left
# alone: in tool calls they are ids, amounts and years far more often than phone numbers.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?(?:\(\d{1,4}\)[\s.-]?)?\d{1,4}(?:[\s.-]?\d{2,4}){2,4}"
    r"|\(\d{3}\)\s?\d{3}[\s.-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w])"
)


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum card numbers carry; rejects ~90% of random digit runs."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    return 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1


def _ipv4(m: re.Match) -> bool:
    try:
        ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return False
    return True


def _ipv6(m: re.Match) -> bool:
    text = m.group(0)
    if text.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", text):
        return False  # '::' alone, or a time like 12:30:45 that ipaddress would reject anyway
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _phone(m: re.Match) -> bool:
    digits = re.sub(r"\D", "", m.group(0))
    return 7 <= len(digits) <= 15


# Order matters: private keys and secrets first (a key may contain '@' or digit runs), cards before phones.
_PATTERNS: list[tuple[str, re.Pattern, Callable[[re.Match], bool] | None]] = [
    ("email", _EMAIL, None),
    ("credit_card", _CARD, _card),
    ("ipv4", _IPV4, _ipv4),
    ("ipv6", _IPV6, _ipv6),
    ("phone", _PHONE, _phone),
]


@functools.lru_cache(maxsize=1)
def _plugins() -> tuple:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    return tuple(cls() for cls in get_mapping_from_secret_type_to_class().values()
                 if cls.__name__ not in _SKIP_PLUGINS)


def _secret_spans(line: str) -> list[tuple[int, int]]:
    """Character spans of secrets detect-secrets finds in one line, widened to whole tokens."""
    from detect_secrets.util.code_snippet import get_code_snippet

    context = get_code_snippet(lines=[line], line_number=1)
    spans = []
    for plugin in _plugins():
        try:
            found = plugin.analyze_line(filename="scrub", line=line, line_number=0, context=context)
        except Exception:  # a plugin tripping on odd input must not stop curation
            continue
        for secret in found or ():
            value = secret.secret_value or ""
            start = line.find(value) if value else -1
            while start >= 0:
                a, b = start, start + len(value)
                while a > 0 and _TOKEN_CHARS.match(line[a - 1]):
                    a -= 1
                while b < len(line) and _TOKEN_CHARS.match(line[b]):
                    b += 1
                spans.append((a, b))
                start = line.find(value, start + len(value))
    return spans


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


def _redact_secrets(text: str, counts: Counter) -> str:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        spans = _merge(_secret_spans(line))
        for a, b in reversed(spans):
            line = line[:a] + PLACEHOLDERS["secret"] + line[b:]
            counts["secret"] += 1
        lines[i] = line
    return "\n".join(lines)


def scrub_text(text: str, counts: Counter | None = None) -> str:
    """Replace secrets and PII in `text` by placeholders; add one count per replacement to `counts`."""
    counts = counts if counts is not None else Counter()
    if not text:
        return text

    def pem(_: re.Match) -> str:
        counts["private_key"] += 1
        return PLACEHOLDERS["private_key"]

    text = _PEM.sub(pem, text)
    text = _redact_secrets(text, counts)
    for kind, pattern, check in _PATTERNS:
        def repl(m: re.Match, kind: str = kind, check=check) -> str:
            if check is not None and not check(m):
                return m.group(0)
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(repl, text)
    return text


class Scrubber:
    """Scrubs many texts and keeps the counts per kind (what the report shows)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        return scrub_text(text, self.counts)

    def totals(self) -> dict[str, int]:
        return {k: int(self.counts.get(k, 0)) for k in PLACEHOLDERS}
