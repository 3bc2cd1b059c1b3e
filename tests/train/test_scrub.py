"""S2 scrubbing: every planted secret and PII kind is removed and counted; ordinary task text is left alone."""

from __future__ import annotations

import json

import pytest

from slmshift.scenarios.bfcl import call_messages, intent_messages, load_tasks
from slmshift.train.scrub import Scrubber, luhn_ok, scrub_text

PLANTED = [
    ("email", "write to jane.roe+news@mail.example.co.uk today", "jane.roe"),
    ("phone", "call +44 20 7946 0958 or (415) 555-0199", "7946"),
    ("phone", "office 415-555-0132.", "555-0132"),
    ("credit_card", "card 4111-1111-1111-1111 exp 12/29", "4111"),
    ("credit_card", "amex 378282246310005", "378282246310005"),
    ("ipv4", "server 198.51.100.7, port 22", "198.51.100.7"),
    ("ipv6", "host 2001:db8:85a3::8a2e:370:7334 up", "8a2e"),
    ("secret", "aws_access_key_id = AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLE"),
    ("secret", "use ghp_1234567890abcdefghijklmnopqrstuvwxyzAB to push", "ghp_"),
    ("secret", "slack xoxb-123456789012-1234567890123-abcdefghijklmnopqrstuvwx", "xoxb"),
    ("secret", 'api_key = "s3cr3t-Zq9vLx2Pw7Rt"', "s3cr3t"),
    ("secret", "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJl", "eyJ"),
    ("secret", "stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "sk_live"),
    ("private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
                    "-----END OPENSSH PRIVATE KEY-----", "b3BlbnNzaC1rZXk"),
]


@pytest.mark.parametrize("kind,text,fragment", PLANTED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(PLANTED)])
def test_planted_secret_is_removed_and_counted(kind, text, fragment):
    s = Scrubber()
    out = s(text)
    assert fragment not in out, out
    assert s.totals()[kind] >= 1, (kind, s.totals(), out)


def test_counts_per_kind_add_up():
    s = Scrubber()
    s("mail a@b.io and c@d.io, card 4111 1111 1111 1111, ip 10.1.2.3")
    assert s.totals()["email"] == 2 and s.totals()["credit_card"] == 1 and s.totals()["ipv4"] == 1


def test_luhn_and_invalid_lookalikes_are_kept():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    text = "card 4111 1111 1111 1112, ip 999.1.1.1, time 12:30:45, year 1510, id 1234567890123"
    assert scrub_text(text) == text


def test_bfcl_prompts_are_not_mangled():
    """Real task text (numbers, names, dates, code) must survive: false positives would corrupt training data."""
    s = Scrubber()
    for task in load_tasks(["simple", "multiple", "parallel"], n=60, seed=1):
        for m in intent_messages(task) + call_messages(task, None):
            s(m["content"])
    assert sum(s.totals().values()) <= 2, s.totals()  # measured: 0 on this sample


def test_scrubbed_json_stays_parsable():
    from slmshift.train.curate import _scrub_messages

    msgs = [{"role": "user", "content": 'my "key" is AKIAIOSFODNN7EXAMPLE\nand mail x@y.com'}]
    out = json.loads(_scrub_messages(json.dumps(msgs), Scrubber()))
    assert out[0]["content"] == 'my "key" is [SECRET]\nand mail [EMAIL]'
