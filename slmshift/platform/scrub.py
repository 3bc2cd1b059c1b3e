"""Secret and PII scrubbing, shared by S2 (training data) and the S1 write path (`log.scrub`).

What is found, in this order (earlier kinds win, so a key's digits are never read as a phone number):
  private_key  PEM private-key blocks, removed whole.
  secret       credentials in URLs (`scheme://user:PASSWORD@host`), HTTP Basic headers and command lines
               (`curl -u`, `sshpass -p`, `--password`); API keys and tokens in the current formats
               of the major LLM and cloud providers (`_PROVIDER_KEYS`); JWTs and bearer tokens; an AWS secret
               access key beside its key id; high-entropy values assigned to words like key/secret/token/
               password; and whatever detect-secrets' keyed plugins flag line by line.
  email        addresses.
  national_id  numbers with a check digit or a strict format (US SSN, UK NI number, Canadian SIN, Indian
               Aadhaar, Spanish DNI/NIE, Italian codice fiscale, Brazilian CPF, French NIR) and any value after
               words like "passport no" or "SSN".
  iban         IBANs, validated by their mod-97 check.
  credit_card  13-19 digit runs that pass the Luhn check.
  ipv4/ipv6    addresses `ipaddress` accepts, not version strings.
  phone        numbers Google's `phonenumbers` finds and holds valid, international or national (a few common
               regions), written the way people write phone numbers (a `+`, separators or a phone word nearby).
               A bare digit run is an id, amount or year in tool calls far more often than a phone number.

Each hit becomes a typed placeholder and is counted per kind. Placeholders contain no digits, quotes or
backslashes, so scrubbing never breaks the JSON a string sits in.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import math
import re
from collections import Counter
from typing import Any, Callable, Iterable

__all__ = ["IDENTIFIER_FIELDS", "PLACEHOLDERS", "Scrubber", "luhn_ok", "scrub_json", "scrub_record", "scrub_text"]

PLACEHOLDERS = {
    "private_key": "[PRIVATE_KEY]",
    "secret": "[SECRET]",
    "email": "[EMAIL]",
    "national_id": "[NATIONAL_ID]",
    "iban": "[IBAN]",
    "credit_card": "[CREDIT_CARD]",
    "ipv4": "[IP]",
    "ipv6": "[IP]",
    "phone": "[PHONE]",
}

# Regions whose national (no `+`) phone formats are recognised; `+CC` numbers are found for every country.
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN", "AU", "JP", "BR", "ES", "IT", "NL", "CN", "MX")

# ---- secrets -------------------------------------------------------------------------------------------------

_PEM = re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----|\Z)",
                  re.S)
_URL_CRED = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,20}://[^\s:/@\"'<>]+:(?P<pw>[^\s@/\"'<>]+)(?=@[\w.-])")

# Token formats that identify a provider by their prefix; the bodies are bounded below by a length that real
# keys exceed, so words like 'sk-learn' or 'hf_hub' stay.
_PROVIDER_KEYS = re.compile("|".join([
    r"sk-ant-(?:api|admin|sid)\d\d-[A-Za-z0-9_-]{20,}",            # Anthropic
    r"sk-(?:proj|svcacct|admin|None|or-v1)-[A-Za-z0-9_-]{20,}",     # OpenAI project/service keys, OpenRouter
    r"sk-[A-Za-z0-9]{20,}(?:T3BlbkFJ[A-Za-z0-9]{20,})?",            # OpenAI legacy, DeepSeek, Moonshot ...
    r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|APKA|AROA|ASCA)[A-Z0-9]{16}",  # AWS key ids
    r"AIza[0-9A-Za-z_-]{35}",                                       # Google / GCP / Gemini API keys
    r"GOCSPX-[A-Za-z0-9_-]{20,}", r"ya29\.[0-9A-Za-z_-]{20,}",       # Google OAuth client secret / token
    r"gh[pousr]_[A-Za-z0-9]{30,}", r"github_pat_[A-Za-z0-9_]{30,}",  # GitHub
    r"glpat-[A-Za-z0-9_-]{20,}",                                    # GitLab
    r"xox[abposre]-[A-Za-z0-9-]{10,}", r"xapp-\d-[A-Za-z0-9-]{10,}",  # Slack
    r"https://hooks\.slack\.com/services/[A-Za-z0-9/]+",
    r"https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[A-Za-z0-9_-]+",  # Discord webhooks
    r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}", r"whsec_[A-Za-z0-9]{20,}",  # Stripe
    r"hf_[A-Za-z0-9]{30,}", r"api_org_[A-Za-z0-9]{30,}",             # Hugging Face
    r"gsk_[A-Za-z0-9]{40,}",                                        # Groq
    r"xai-[A-Za-z0-9]{40,}",                                        # xAI
    r"pplx-[A-Za-z0-9]{40,}",                                       # Perplexity
    r"r8_[A-Za-z0-9]{30,}",                                         # Replicate
    r"fw_[A-Za-z0-9]{20,}",                                         # Fireworks
    r"nvapi-[A-Za-z0-9_-]{40,}",                                    # NVIDIA
    r"npm_[A-Za-z0-9]{36}", r"pypi-AgE[A-Za-z0-9_-]{50,}",           # npm, PyPI
    r"SG\.[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{20,}",                  # SendGrid
    r"SK[0-9a-f]{32}", r"AC[0-9a-f]{32}",                           # Twilio
    r"key-[0-9a-z]{32}",                                            # Mailgun
    r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}",                          # Shopify
    r"dop_v1_[a-f0-9]{64}", r"dapi[a-f0-9]{32}",                    # DigitalOcean, Databricks
    r"AccountKey=[A-Za-z0-9+/]{80,}={0,2}",                         # Azure storage
    r"\d{8,10}:AA[A-Za-z0-9_-]{33}",                                # Telegram bot
    r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWT
]))
_PROVIDER = re.compile(r"(?<![A-Za-z0-9_-])(?:" + _PROVIDER_KEYS.pattern + r")(?![A-Za-z0-9_-])")
_BEARER = re.compile(r"(?i)(?<=\bbearer\s)\s*[A-Za-z0-9._~+/-]{16,}=*")
_BASIC = re.compile(r"(?i)(?<=\bbasic\s)\s*[A-Za-z0-9+/]{8,}={0,2}(?![A-Za-z0-9+/=])")
# passwords given on a command line: curl -u user:PASS, sshpass -p PASS, --password PASS / --password=PASS
_CLI_PASSWORD = re.compile(r"(?:\b(?:curl|wget|http)\b[^\n]{0,200}?\s(?:-u|--user)\s+[^\s:\"']+:|\bsshpass\s+-p\s*|"
                           r"--pass(?:word)?[= ]\s*)"
                           r"[\"']?(?P<pw>[^\s\"']{4,})")
_AWS_ID = re.compile(r"(?:AKIA|ASIA)[A-Z0-9]{16}")
# An AWS secret access key is 40 base64 characters with no prefix: taken only when its key id is in the text
# (or a keyword names it, below), and only with mixed case and a digit, so a git SHA (hex) stays.
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")

_KEYWORD = re.compile(
    r"(?i)(?<![A-Za-z0-9])(?P<kw>(?:[A-Za-z0-9]{1,40}[_.-]){0,4}?(?:api[_ -]?key|apikey|access[_ -]?key(?:[_ -]?id)?|secret|"
    r"token|auth|authorization|password|passwd|pwd|passphrase|credentials?|private[_ -]?key|client[_ -]?key|"
    r"session[_ -]?(?:id|key)|cookie|signature|key)s?)(?![A-Za-z])"
    r"[\"']?\s*(?:[:=]|=>|:=|\bis\b|\bwas\b|\bto\b|\s)\s*[\"']?"
    r"(?P<val>[^\s\"',;)\]}>]+)"
)
_PASSWORDISH = re.compile(r"(?i)pass|pwd")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z_]*(?:\.[A-Za-z_]+)*(?:\(.*)?$")
_VERSION = re.compile(r"^[vV]?\d+(?:\.\d+)+(?:[-+.]?[A-Za-z0-9]+)*$")
_TEMPLATE = re.compile(r"^(?:\$|\{|<|%|\[|\*|x{4,}|X{4,}|\.{3})")
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-./+=~]")
_LONG_TOKEN = re.compile(r"[A-Za-z0-9_\-./+=~:]{16,}")


def _letters_and_digits(token: str) -> bool:
    return any(c.isdigit() for c in token) and any(c.isalpha() for c in token)
# Entropy plugins flag ordinary words in free text (they are meant for source files); IPs are handled with
# validation below: everything else detect-secrets ships is keyed to a known format.
_SKIP_PLUGINS = {"Base64HighEntropyString", "HexHighEntropyString", "IPPublicDetector"}

# ---- PII -----------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_CARD = re.compile(r"(?<![\w-])(?:\d[ -]?){12,18}\d(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)(?![\w-])")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])")
_VERSION_BEFORE = re.compile(r"(?i)(?:\bv|version\s*|release\s*|[=<>~!]=\s*)$")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
_PHONE_HINT = re.compile(r"(?i)(?:phone|tel|call|mobile|cell|fax|whatsapp|sms|text|dial|ring|contact|reach)"
                         r"\w*\W{0,6}(?:(?:me|us|at|on|no|number|nr|is|:)\W{0,4}){0,3}$")
_DATE = re.compile(r"^(?:\d{1,2}[-/.]\d{1,2}[-/.](?:\d{2}|\d{4})|\d{4}[-/.]\d{1,2}[-/.]\d{1,2})$")
# an area code in parentheses is digits only, and a ')' closes a '(' of the number itself
_NOT_PHONE_PARENS = re.compile(r"\([^)]*[^\d)\s][^)]*\)|^[^(]*\)")
_PHONE_CAND = re.compile(r"\d[\d\s().\-/]{5,30}\d")
_ID_KEYWORD = re.compile(
    r"(?i)\b(?:ssn|social security(?: number| no)?|passport(?: number| no\.?| #)?|driver'?s? licen[cs]e"
    r"(?: number| no\.?)?|national (?:id|insurance)(?: number| no\.?)?|tax (?:id|number)|nino|bsn|"
    r"aadhaar|dni|nie|cpf|nif|personalausweis(?:nummer)?|steuer-?id)\b\s*(?:is|:|#|=)?\s*"
    r"(?P<val>(?=[A-Z0-9 -]*\d)[A-Z0-9](?:[A-Z0-9-]| (?=\d)){4,22}[A-Z0-9])")


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum card numbers (and Canadian SINs) carry; rejects ~90% of random digit runs."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_VD = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 6, 7, 8, 9, 5], [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
       [3, 4, 0, 1, 2, 8, 9, 5, 6, 7], [4, 0, 1, 2, 3, 9, 5, 6, 7, 8], [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
       [6, 5, 9, 8, 7, 1, 0, 4, 3, 2], [7, 6, 5, 9, 8, 2, 1, 0, 4, 3], [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
       [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]]
_VP = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 5, 7, 6, 2, 8, 3, 0, 9, 4], [5, 8, 0, 3, 7, 9, 6, 1, 4, 2],
       [8, 9, 1, 6, 0, 4, 3, 5, 2, 7], [9, 4, 5, 3, 1, 2, 6, 8, 7, 0], [4, 2, 8, 6, 5, 7, 3, 9, 0, 1],
       [2, 7, 9, 3, 8, 0, 6, 4, 1, 5], [7, 0, 4, 6, 9, 1, 3, 2, 5, 8]]


def verhoeff_ok(digits: str) -> bool:
    """The Verhoeff check digit of Indian Aadhaar numbers."""
    c = 0
    for i, ch in enumerate(reversed(digits)):
        c = _VD[c][_VP[i % 8][int(ch)]]
    return c == 0


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _cpf_ok(d: str) -> bool:
    if len(set(d)) == 1:
        return False
    for n in (9, 10):
        s = sum(int(d[i]) * (n + 1 - i) for i in range(n)) % 11
        if (0 if s < 2 else 11 - s) != int(d[n]):
            return False
    return True


def _dni_ok(m: re.Match) -> bool:
    s = m.group(0).replace("-", "").replace(" ", "")
    num = s[:-1]
    num = str("XYZ".index(num[0])) + num[1:] if num[0] in "XYZ" else num
    return "TRWAGMYFPDXBNJZSQVHLCKE"[int(num) % 23] == s[-1]


def _nir_ok(m: re.Match) -> bool:
    d = re.sub(r"\s", "", m.group(0))
    return 97 - int(d[:13]) % 97 == int(d[13:])


def _basic_auth(m: re.Match) -> bool:
    """HTTP Basic credentials: base64 of 'user:password'."""
    import base64
    import binascii

    try:
        return b":" in base64.b64decode(m.group(0).strip(), validate=True)
    except (binascii.Error, ValueError):
        return False


_CF_ODD = dict(zip("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                   [1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 1, 0, 5, 7, 9, 13, 15, 17, 19, 21, 2, 4, 18, 20, 11, 3, 6, 8,
                    12, 14, 16, 10, 22, 25, 24, 23]))


def _codice_fiscale_ok(m: re.Match) -> bool:
    """Italian codice fiscale: the 16th letter checks the first 15 characters."""
    s = m.group(0)
    total = sum(_CF_ODD[c] if i % 2 == 0 else (int(c) if c.isdigit() else ord(c) - 65) for i, c in enumerate(s[:15]))
    return chr(65 + total % 26) == s[15]


def _digits(m: re.Match) -> str:
    return re.sub(r"\D", "", m.group(0))


# National ids that are validated by a check digit or a format strict enough to stand alone.
_NATIONAL_IDS: list[tuple[re.Pattern, Callable[[re.Match], bool] | None]] = [
    # US SSN: never area 000/666/9xx, group 00 or serial 0000 (SSA rules)
    (re.compile(r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-])"), None),
    # UK National Insurance number: HMRC's allowed prefix letters, suffix A-D
    (re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z]"
                r" ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])"), None),
    # Brazilian CPF, two check digits
    (re.compile(r"(?<![\d.-])\d{3}\.\d{3}\.\d{3}-\d{2}(?![\d.-])"), lambda m: _cpf_ok(_digits(m))),
    # Spanish DNI / NIE, check letter
    (re.compile(r"(?<![A-Za-z0-9])[XYZ]?\d{7,8}-?[TRWAGMYFPDXBNJZSQVHLCKE](?![A-Za-z0-9])"), _dni_ok),
    # Indian Aadhaar, grouped 4-4-4, Verhoeff check
    (re.compile(r"(?<![\d-])[2-9]\d{3}[ -]\d{4}[ -]\d{4}(?![\d-])"), lambda m: verhoeff_ok(_digits(m))),
    # Canadian SIN, grouped 3-3-3, Luhn
    (re.compile(r"(?<![\d-])[1-79]\d{2}[ -]\d{3}[ -]\d{3}(?![\d-])"), lambda m: luhn_ok(_digits(m))),
    # Italian codice fiscale, check letter
    (re.compile(r"(?<![A-Za-z0-9])[A-Z]{6}\d{2}[A-EHLMPR-T]\d{2}[A-Z]\d{3}[A-Z](?![A-Za-z0-9])"), _codice_fiscale_ok),
    # French NIR (sécurité sociale), grouped, mod-97 key
    (re.compile(r"(?<!\d)[12] ?\d{2} ?(?:0[1-9]|1[0-2]) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?!\d)"), _nir_ok),
]


def _iban_ok(m: re.Match) -> bool:
    s = m.group(0).replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    n = "".join(str(int(c, 36)) for c in s[4:] + s[:4])
    return int(n) % 97 == 1


def _card(m: re.Match) -> bool:
    digits = _digits(m)
    return 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1


def _not_version(text: str, start: int) -> bool:
    return not _VERSION_BEFORE.search(text[max(0, start - 12):start])


def _ipv4(m: re.Match) -> bool:
    try:
        ipaddress.IPv4Address(m.group(0))
    except ValueError:
        return False
    return _not_version(m.string, m.start())


def _ipv6(m: re.Match) -> bool:
    text = m.group(0)
    groups = [g for g in text.split("%")[0].split(":") if g]
    if text != "::1" and not (len(groups) >= 4 or len(groups) >= 2 and any(len(g) == 4 for g in groups)):
        return False  # a Python slice 'l[1::2]', a time 12:30:45, 'std::vector' are not addresses
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# ---- the scrubber --------------------------------------------------------------------------------------------


class _Spans:
    """Non-overlapping replacement spans over one text; the first kind to claim characters keeps them."""

    def __init__(self, text: str) -> None:
        self.text, self.spans = text, []  # (start, end, kind)

    def free(self, a: int, b: int) -> bool:
        return all(b <= s or a >= e for s, e, _ in self.spans)

    def add(self, a: int, b: int, kind: str) -> bool:
        if a < b and self.free(a, b):
            self.spans.append((a, b, kind))
            return True
        return False

    def apply(self, counts: Counter) -> str:
        out, pos = [], 0
        for a, b, kind in sorted(self.spans):
            out += [self.text[pos:a], PLACEHOLDERS[kind]]
            counts[kind] += 1
            pos = b
        out.append(self.text[pos:])
        return "".join(out)


def _value_is_secret(keyword: str, value: str) -> bool:
    """Is `value`, assigned to `keyword` (key/secret/token/password...), a literal credential?"""
    v = value.strip("\"'`")
    if len(v) < 4 or _TEMPLATE.match(v) or _VERSION.match(v) or v.isdigit() or v.upper() in PLACEHOLDERS_TEXT:
        return False
    if _IDENTIFIER.match(v):  # os.environ, get_password(), None, YOUR_API_KEY: names, not values
        return False
    if "(" in v or v.startswith(("http://", "https://", "/", "./")):
        return False
    has_digit, has_alpha = any(c.isdigit() for c in v), any(c.isalpha() for c in v)
    if _PASSWORDISH.search(keyword):
        return len(v) >= 6 and has_digit and has_alpha or len(v) >= 8 and not v.isalnum()
    bare_key = keyword.lower().rstrip("s") in ("key", "token", "auth")
    return has_digit and has_alpha and len(v) >= (16 if bare_key else 8) and _entropy(v) >= 3.0


PLACEHOLDERS_TEXT = {p.upper() for p in PLACEHOLDERS.values()}


@functools.lru_cache(maxsize=1)
def _plugins() -> tuple:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class

    return tuple(cls() for cls in get_mapping_from_secret_type_to_class().values()
                 if cls.__name__ not in _SKIP_PLUGINS)


def _detect_secrets(text: str, spans: _Spans) -> None:
    """detect-secrets' keyed plugins, line by line; a flagged value is widened to its whole token."""
    from detect_secrets.util.code_snippet import get_code_snippet

    offset = 0
    for line in text.split("\n"):
        # Every plugin kept looks for a long token (short keyword values are _KEYWORD's job): skip the lines
        # without one, most of any prompt, which would otherwise cost ~20 plugin scans each.
        if any(_letters_and_digits(t) for t in _LONG_TOKEN.findall(line)):
            context = get_code_snippet(lines=[line], line_number=1)
            for plugin in _plugins():
                try:
                    found = plugin.analyze_line(filename="scrub", line=line, line_number=0, context=context)
                except Exception:  # a plugin tripping on odd input must not stop scrubbing
                    continue
                for secret in found or ():
                    value = secret.secret_value or ""
                    if not value or not _value_is_secret(secret.type, value) and len(value) < 20:
                        continue
                    start = line.find(value)
                    while start >= 0:
                        a, b = start, start + len(value)
                        while a > 0 and _TOKEN_CHARS.match(line[a - 1]):
                            a -= 1
                        while b < len(line) and _TOKEN_CHARS.match(line[b]):
                            b += 1
                        spans.add(offset + a, offset + b, "secret")
                        start = line.find(value, start + len(value))
        offset += len(line) + 1


def _phone_windows(text: str) -> list[tuple[int, int]]:
    """Stretches that could hold a phone number as people write one; phonenumbers' matcher runs on these only
    (on a whole text full of numbers it is slow, and a bare digit run without a phone word is not taken anyway)."""
    out = []
    for m in _PHONE_CAND.finditer(text):
        a, raw = m.start(), m.group(0)
        if a > 0 and text[a - 1] in "+(":
            a -= 1
        if sum(c.isdigit() for c in raw) < (5 if text[a] == "+" else 7):
            continue
        if text[a] in "+(" or re.search(r"\d[\s.\-/)]+\d", raw) or _PHONE_HINT.search(text[max(0, a - 30):a]):
            out.append((a, m.end()))
    return out


def _phones(text: str, spans: _Spans) -> None:
    windows = _phone_windows(text)
    if not windows:
        return
    import phonenumbers

    for w0, w1 in windows:
        lo, hi = max(0, w0 - 1), min(len(text), w1 + 1)  # one character each side for the matcher's edge checks
        for region in PHONE_REGIONS:
            for m in phonenumbers.PhoneNumberMatcher(text[lo:hi], region, leniency=phonenumbers.Leniency.VALID):
                a, b, raw = lo + m.start, lo + m.end, m.raw_string
                if not spans.free(a, b) or _DATE.match(raw) or _NOT_PHONE_PARENS.search(raw):
                    continue  # a date, or arithmetic like '(123.456) - 0.456' or '1.33) - 0.33'
                if not raw.startswith("+") and sum(c.isdigit() for c in raw) < 7:
                    continue  # '0 1 2 3 4 5'; national numbers have 7+ digits
                seps = re.findall(r"\d([\s.\-/)]+)(?=\d)", raw)
                # a single '.' between digits is a decimal number (2.718281828), not a phone number
                formatted = raw.startswith(("+", "00", "(")) or any(set(s) != {"."} for s in seps) or len(seps) >= 2
                if formatted or _PHONE_HINT.search(text[max(0, a - 30):a]):
                    spans.add(a, b, "phone")


def _find(text: str) -> _Spans:
    spans = _Spans(text)

    def each(pattern: re.Pattern, kind: str, check: Callable[[re.Match], bool] | None = None,
             group: int | str = 0) -> None:
        for m in pattern.finditer(text):
            if check is None or check(m):
                spans.add(m.start(group), m.end(group), kind)

    each(_PEM, "private_key")
    each(_URL_CRED, "secret", group="pw")
    each(_PROVIDER, "secret")
    each(_BEARER, "secret")
    each(_BASIC, "secret", _basic_auth)
    each(_CLI_PASSWORD, "secret", lambda m: not _TEMPLATE.match(m.group("pw")), group="pw")
    if _AWS_ID.search(text) or re.search(r"(?i)aws.{0,20}secret", text):
        each(_AWS_SECRET, "secret", lambda m: (re.search(r"[a-z]", m.group(0)) is not None
                                               and re.search(r"[A-Z]", m.group(0)) is not None
                                               and re.search(r"\d", m.group(0)) is not None))
    each(_KEYWORD, "secret", lambda m: _value_is_secret(m.group("kw"), m.group("val")), group="val")
    _detect_secrets(text, spans)
    each(_EMAIL, "email")
    each(_ID_KEYWORD, "national_id", group="val")
    for pattern, check in _NATIONAL_IDS:
        each(pattern, "national_id", check)
    each(_IBAN, "iban", _iban_ok)
    each(_CARD, "credit_card", _card)
    each(_IPV4, "ipv4", _ipv4)
    each(_IPV6, "ipv6", _ipv6)
    _phones(text, spans)
    return spans


def scrub_text(text: str, counts: Counter | None = None) -> str:
    """Replace secrets and PII in `text` by typed placeholders; add one count per replacement to `counts`."""
    if not text or not isinstance(text, str):
        return text
    return _find(text).apply(counts if counts is not None else Counter())


def scrub_json(value: Any, counts: Counter | None = None) -> Any:
    """Scrub every string in a JSON value (keys stay). A string that is itself JSON (a tool call's
    `arguments`) is scrubbed inside and re-encoded, so it still parses."""
    counts = counts if counts is not None else Counter()
    if isinstance(value, str):
        s = value.strip()
        if s[:1] in "{[" and s[-1:] in "}]":
            try:
                inner = json.loads(s)
            except ValueError:
                pass
            else:
                before = sum(counts.values())
                scrubbed = scrub_json(inner, counts)
                # re-encode only when something was removed: a clean string stays byte for byte
                return json.dumps(scrubbed, ensure_ascii=False) if sum(counts.values()) > before else value
        return scrub_text(value, counts)
    if isinstance(value, list):
        return [scrub_json(v, counts) for v in value]
    if isinstance(value, dict):
        return {k: scrub_json(v, counts) for k, v in value.items()}
    return value


# Fields of the S1 records (`Interaction`, `EpisodeResult`) that slmshift itself builds from the config, the
# scenario's task list or a hash: join keys and closed vocabularies, never free text. They are not scrubbed: a false
# positive would change a key (an arm named 'threshold-0.6' gives episode ids ending '0.6/00001', which reads as a
# phone number), splitting episodes from their outcomes and breaking --resume. The gateway scrubs the ones its
# clients supply (workload, session, task, role, call kind) where they come in.
IDENTIFIER_FIELDS = frozenset({
    "id", "experiment_id", "episode_id", "scenario", "task_id", "policy", "role", "call_kind", "category", "expect",
    "model", "tier", "backend", "adapter", "route_kind", "shadow_of", "escalated_from", "retried_from"})


def scrub_record(record: dict, counts: Counter | None = None, fields: Iterable[str] | None = None) -> dict:
    """A copy of an S1 record (an `Interaction` or `EpisodeResult` as a dict) with secrets and PII removed from its
    text: every string field but the identifiers (`IDENTIFIER_FIELDS`), or just `fields` when given. Scrubbing
    every other field, rather than a list of known ones, keeps a text field added later from reaching the log
    unscrubbed (`context` once did). A JSON field (`prompt`, `context`, a tool call `output`) is scrubbed inside
    and stays valid JSON."""
    counts = counts if counts is not None else Counter()
    chosen = None if fields is None else set(fields)
    out = dict(record)
    for f, v in record.items():
        if (f in chosen if chosen is not None else f not in IDENTIFIER_FIELDS) and isinstance(v, str) and v:
            out[f] = scrub_json(v, counts)
    return out


class Scrubber:
    """Scrubs many texts and keeps the counts per kind (what reports show)."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        return scrub_text(text, self.counts)

    def record(self, record: dict) -> dict:
        return scrub_record(record, self.counts)

    def totals(self) -> dict[str, int]:
        return {k: int(self.counts.get(k, 0)) for k in PLACEHOLDERS}
