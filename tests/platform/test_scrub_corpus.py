"""The shared scrubber on a planted-secrets corpus of real formats (recall) and on look-alikes that must be kept
exactly (false positives): BFCL prompts and reference calls, HumanEval code, version strings, hashes, code."""

from __future__ import annotations

import json
import random
import string
from collections import Counter

import pytest

from slmshift.platform.scrub import Scrubber, scrub_json, scrub_record, scrub_text

_rng = random.Random(20261129)
_ALNUM = string.ascii_letters + string.digits


def _r(n: int, chars: str = _ALNUM) -> str:
    """A fresh random body, so the corpus holds no key published anywhere as an example."""
    while True:
        s = "".join(_rng.choice(chars) for _ in range(n))
        if chars != _ALNUM or (any(c.isdigit() for c in s) and any(c.isupper() for c in s)
                               and any(c.islower() for c in s)):
            return s


_HEX = "0123456789abcdef"
_B64 = _ALNUM + "/+"
_AWS_SECRET = _r(40, _B64)

# (kind, text, fragment that must be gone). Formats as providers issue them in 2025-2026.
PLANTED: list[tuple[str, str, str]] = [
    # LLM providers
    ("secret", f"export OPENAI_API_KEY=sk-proj-{_r(48)}_{_r(20)}", "sk-proj-"),
    ("secret", f"client = OpenAI(api_key='sk-{_r(48)}')", "sk-"),
    ("secret", f"openai key: sk-svcacct-{_r(64)}", "sk-svcacct"),
    ("secret", f"ANTHROPIC_API_KEY=sk-ant-api03-{_r(86)}-{_r(6)}AA", "sk-ant-"),
    ("secret", f"use sk-ant-admin01-{_r(80)} for the org", "sk-ant-admin01"),
    ("secret", f"gemini: AIza{_r(35, _ALNUM + '_-')}", "AIza"),
    ("secret", f"HF_TOKEN=hf_{_r(34)}", "hf_"),
    ("secret", f"groq key gsk_{_r(52)}", "gsk_"),
    ("secret", f"xai-{_r(80)} is my grok key", "xai-"),
    ("secret", f"perplexity pplx-{_r(48)}", "pplx-"),
    ("secret", f"REPLICATE_API_TOKEN=r8_{_r(37)}", "r8_"),
    ("secret", f"openrouter sk-or-v1-{_r(64, _HEX)}", "sk-or-v1"),
    ("secret", f"nvidia: nvapi-{_r(64)}", "nvapi-"),
    ("secret", f"MISTRAL_API_KEY=\"{_r(32)}\"", "MISTRAL_API_KEY=\"" + "x"),  # fragment fixed below
    ("secret", f"cohere api key is {_r(40)}", "cohere api key is " + "x"),
    # cloud
    ("secret", f"aws_access_key_id = AKIA{_r(16, string.ascii_uppercase + string.digits)}", "AKIA"),
    ("secret", f"AKIA{_r(16, string.ascii_uppercase + string.digits)} / {_AWS_SECRET}", _AWS_SECRET),
    ("secret", f"keys: ASIA{_r(16, string.ascii_uppercase + string.digits)},{_AWS_SECRET[::-1]}", _AWS_SECRET[::-1]),
    ("secret", f"aws_secret_access_key={_r(40, _B64)}", "aws_secret_access_key=" + "x"),
    ("secret", f"GOOGLE_CLIENT_SECRET=GOCSPX-{_r(28)}", "GOCSPX-"),
    ("secret", f"Authorization: Bearer ya29.{_r(120, _ALNUM + '_-')}", "ya29."),
    ("secret", f"DefaultEndpointsProtocol=https;AccountName=acme;AccountKey={_r(86, _B64)}==", "AccountKey=" + "x"),
    ("secret", f"DO token dop_v1_{_r(64, _HEX)}", "dop_v1_"),
    ("secret", f"databricks dapi{_r(32, _HEX)}", "dapi"),
    # code hosting, chat, payments, mail
    ("secret", f"git push https://ghp_{_r(36)}@github.com/acme/x", "ghp_"),
    ("secret", f"GH_TOKEN=github_pat_{_r(22)}_{_r(59)}", "github_pat_"),
    ("secret", f"token glpat-{_r(20)}", "glpat-"),
    ("secret", f"slack bot xoxb-{_r(12, string.digits)}-{_r(13, string.digits)}-{_r(24)}", "xoxb-"),
    ("secret", f"hook https://hooks.slack.com/services/T{_r(8)}/B{_r(8)}/{_r(24)}", "hooks.slack.com"),
    ("secret", f"stripe.api_key = \"sk_live_{_r(99)}\"", "sk_live_"),
    ("secret", f"rk_test_{_r(24)} restricted", "rk_test_"),
    ("secret", f"endpoint secret whsec_{_r(32)}", "whsec_"),
    ("secret", f"SENDGRID=SG.{_r(22)}.{_r(43)}", "SG."),
    ("secret", f"twilio sid AC{_r(32, _HEX)} auth {_r(32, _HEX)}", "AC"),
    ("secret", f"npm token npm_{_r(36)}", "npm_"),
    ("secret", f"pypi-AgEIcHlwaS5vcmc{_r(60, _ALNUM + '_-')}", "pypi-AgE"),
    ("secret", "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlX2hlcmU", "eyJ"),
    ("secret", f"telegram {_r(10, string.digits)}:AA{_r(33, _ALNUM + '_-')}", ":AA"),
    # keyword + value
    ("secret", f'"client_secret": "{_r(24)}"', '"client_secret": "' + "x"),
    ("secret", f"password: hunter2{_r(3, string.digits)}", "hunter2"),
    ("secret", "my password is Tr0ub4dor&3", "Tr0ub4dor"),
    ("secret", f"DB_PASSWORD='{_r(16)}'", "DB_PASSWORD='" + "x"),
    ("secret", f"postgres://app:{_r(18)}@db.internal:5432/prod", "postgres://app:" + "x"),
    ("secret", f"x-api-key: {_r(32, _HEX)}", "x-api-key: " + "x"),
    ("secret", f"session_token={_r(40, _B64)}", "session_token=" + "x"),
    ("private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA1c7+9z5Pad7OejecsQ0bu3aozN3tihPmljnnudb9G3HecG\n"
                    "-----END RSA PRIVATE KEY-----", "MIIEpAIBAAKCAQEA"),
    # phones: international and national formats
    ("phone", "call me on +44 7911 123456", "7911 123456"),
    ("phone", "UK office 020 7946 0958", "7946 0958"),
    ("phone", "Berlin: +49 30 901820-0", "901820"),
    ("phone", "Tel. 030 23125 0", "23125"),
    ("phone", "appelez le 06 12 34 56 78", "12 34 56 78"),
    ("phone", "+33 1 42 68 53 00 (Paris)", "42 68 53"),
    ("phone", "India +91 98765 43210", "98765 43210"),
    ("phone", "mobile 098765 43210", "98765 43210"),
    ("phone", "Sydney (02) 9374 4000", "9374 4000"),
    ("phone", "+61 412 345 678", "412 345 678"),
    ("phone", "Tokyo 03-3224-9999", "3224-9999"),
    ("phone", "+81 90-1234-5678", "1234-5678"),
    ("phone", "ligue (11) 98765-4321", "98765-4321"),
    ("phone", "US (415) 555-0132 or 1-800-555-0199", "555-0132"),
    ("phone", "phone: 212.555.0147", "555.0147"),
    ("phone", "whatsapp +34 612 34 56 78", "612 34 56"),
    ("phone", "+1 (646) 555-3890 ext. 12", "555-3890"),
    ("phone", "+52 55 1234 5678", "1234 5678"),
    # national ids
    ("national_id", "SSN 536-22-1234 on file", "536-22-1234"),
    ("national_id", "social security number: 078051120", "078051120"),
    ("national_id", "NI number JG 10 37 56 A", "10 37 56"),
    ("national_id", "nino AB123456D", "AB123456D"),
    ("national_id", "CPF 111.444.777-35", "111.444.777-35"),
    ("national_id", "DNI 12345678Z", "12345678Z"),
    ("national_id", "NIE X1234567L", "X1234567L"),
    ("national_id", "Aadhaar 2345 6789 0124", "6789 0124"),
    ("national_id", "SIN 130 692 544", "130 692 544"),
    ("national_id", "passport no: 533180597", "533180597"),
    ("national_id", "numéro de sécurité sociale 1 85 05 78 006 084 91", "006 084"),
    # emails, IPs, cards, IBAN
    ("email", "write to jane.roe+news@mail.example.co.uk today", "jane.roe"),
    ("email", "contact: Ravi.K@acme-corp.in", "Ravi.K"),
    ("ipv4", "ssh root@203.0.113.42 -p 22", "203.0.113.42"),
    ("ipv6", "host 2001:db8:85a3::8a2e:370:7334 up", "8a2e"),
    ("ipv6", "link-local fe80::1ff:fe23:4567:890a%eth0", "fe23"),
    ("credit_card", "card 4111-1111-1111-1111 exp 12/29", "4111"),
    ("credit_card", "amex 378282246310005", "378282246310005"),
    ("credit_card", "mc 5555 5555 5555 4444", "5555 4444"),
    ("iban", "IBAN DE89 3704 0044 0532 0130 00", "3704 0044"),
    ("iban", "pay to GB82WEST12345698765432", "GB82WEST"),
    # written after the patterns above were tuned, kept whatever they scored (plain-word passwords are missed)
    ("phone", "My number is 07911 123456, ring anytime", "123456"),
    ("phone", "tel +49 (0)30 12345678", "12345678"),
    ("phone", "номер +7 912 345-67-89", "345-67-89"),
    ("phone", "+86 138 0013 8000", "0013 8000"),
    ("phone", "phone 4155550132", "4155550132"),
    ("national_id", "ssn: 123 45 6789", "45 6789"),
    ("national_id", "Personalausweis L01X00T47", "L01X00T47"),
    ("secret", f"token=ghs_{_r(36)}", "ghs_"),
    ("secret", "pwd: letmein", "letmein"),
    ("secret", f"mongodb+srv://admin:{_r(12)}@cluster0.mongodb.net", "admin:" + "x"),
    ("iban", "iban: FR14 2004 1010 0505 0001 3M02 606", "2004 1010"),
    # a second probe found these missed; the patterns for them came after
    ("secret", "Authorization: Basic dXNlcjpwYXNzd29yZDEyMw==", "dXNlcjpw"),
    ("secret", f"curl -u admin:{_r(12)} https://api.example.com", "admin:" + "x"),
    ("secret", f'sshpass -p "{_r(10)}" ssh root@host', 'sshpass -p "' + "x"),
    ("secret", f"https://discord.com/api/webhooks/{_r(18, string.digits)}/{_r(68, _ALNUM + '_-')}", "webhooks/"),
    ("national_id", "Codice fiscale RSSMRA85T10A562S", "RSSMRA85T10A562S"),
]
# Keyword-only values: the fragment is the value itself.
for i, (kind, text, frag) in enumerate(PLANTED):
    if frag.endswith("x") and frag[:-1] in text:
        PLANTED[i] = (kind, text, text[text.index(frag[:-1]) + len(frag[:-1]):].strip("\"'= ")[:12])

# Things that look like secrets or PII and are not: every one must come back unchanged.
LOOKALIKES = [
    "pip install ray==2.60.0 torch>=2.3.1 numpy~=1.26.4.1",
    "release v10.1.2.3 and version 4.0.0.12 are out",
    "commit 3f786850e387550fdab836ed7e6dc881de23001b fixed it",
    "uuid 550e8400-e29b-41d4-a716-446655440000",
    "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    'api_key = os.environ["OPENAI_API_KEY"]',
    "token = get_token(user)",
    'password = getpass.getpass("Password: ")',
    "max_tokens=256, temperature=0.7, top_k=40",
    "secret_key: ${SECRET_KEY}",
    "api_key: <your-api-key>",
    'headers = {"Authorization": f"Bearer {token}"}',
    "OPENAI_API_KEY=sk-...",
    "std::vector<int> v; std::map<std::string, int> m;",
    "at 12:30:45 on 2024-03-15, ETA 2024-03-15T12:30:45Z",
    "the primary key is user_id; the sort key is created_at",
    "pi = 3.14159265358979, e = 2.718281828",
    "order 4155550132 shipped; invoice 1234567890123; zip 94107",
    "range(1000000, 2000000) and x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]",
    "scikit-learn, sk-learn, hf_hub_download, hf_transfer",
    "tokens_in=1532 tokens_out=87 cost_usd=0.00231",
    "Ratio 1:1000, scale 1:25000",
    "ISBN 978-0-306-40615-7",
    "model Qwen2.5-7B-Instruct at 2.5e-05 lr, batch 32, seed 1234",
    "def f(key, value):\n    return {key: value}",
    "assert candidate(100, 2) == 50 and candidate(3, 5) == 0",
    "git push -u origin:main; the basic idea is simple",
    "RSSMRA85T10A562X is not a valid codice fiscale",
    "mysql --password=$DB_PASS -h db",
]


def _recall(corpus=PLANTED) -> tuple[int, list[str]]:
    missed = []
    for kind, text, frag in corpus:
        s = Scrubber()
        out = s(text)
        if frag in out or s.totals()[kind] < 1:
            missed.append(f"{kind}: {text!r} -> {out!r} {s.totals()}")
    return len(corpus) - len(missed), missed


def test_recall_on_planted_secrets_and_pii():
    caught, missed = _recall()
    recall = caught / len(PLANTED)
    print(f"\nscrub recall: {caught}/{len(PLANTED)} = {recall:.3f}; missed: {missed}")
    assert recall >= 0.95, "\n".join(missed)


def test_lookalikes_are_kept_exactly():
    changed = [(t, scrub_text(t)) for t in LOOKALIKES if scrub_text(t) != t]
    print(f"\nscrub false positives on {len(LOOKALIKES)} look-alikes: {len(changed)}")
    assert not changed, changed


def test_bfcl_prompts_and_reference_calls_are_kept():
    from slmshift.scenarios.bfcl import call_messages, intent_messages, load_tasks, reference_call

    texts = []
    for task in load_tasks(["simple", "multiple", "parallel", "parallel_multiple"], n=300, seed=3):
        texts += [m["content"] for m in intent_messages(task) + call_messages(task, None)] + [reference_call(task)]
    s = Scrubber()
    changed = [(t, s(t)) for t in texts if scrub_text(t) != t]
    # A few BFCL requests carry real-looking email addresses (send_email(to='john.doe@example.com')): removing
    # those is the point; every other change would be a false positive.
    print(f"\nscrub on {len(texts)} BFCL texts: {len(changed)} changed, kinds {dict(+s.counts)}")
    assert set(+s.counts) <= {"email"}, [c for c in changed if "[EMAIL]" not in c[1]][:3]


def test_humaneval_code_is_kept():
    from slmshift.scenarios.metagpt.data import load_problems

    texts = [t for p in load_problems() for t in (p.canonical_code, p.test)]
    changed = [(t, scrub_text(t)) for t in texts if scrub_text(t) != t]
    print(f"\nscrub false positives on {len(texts)} HumanEval programs and tests: {len(changed)}")
    assert not changed, changed[:2]


def test_counts_per_kind():
    s = Scrubber()
    s("mail a@b.io and c@d.io, card 4111 1111 1111 1111, ip 10.1.2.3, call +44 20 7946 0958")
    t = s.totals()
    assert (t["email"], t["credit_card"], t["ipv4"], t["phone"]) == (2, 1, 1, 1), t
    assert sum(t.values()) == 5


def test_scrub_record_keeps_json_valid_and_other_fields():
    key = f"sk-proj-{_r(40)}"
    call = json.dumps({"name": "send_sms", "arguments": json.dumps({"to": "+44 7911 123456", "key": key})})
    rec = {"id": "abc", "prompt": json.dumps([{"role": "user", "content": f"my key is {key}\nmail x@y.com"}]),
           "output": call, "tokens_in": 12, "error": None}
    counts = Counter()
    out = scrub_record(rec, counts)
    assert out["id"] == "abc" and out["tokens_in"] == 12 and out["error"] is None and rec["prompt"] != out["prompt"]
    msgs = json.loads(out["prompt"])
    assert msgs == [{"role": "user", "content": "my key is [SECRET]\nmail [EMAIL]"}]
    args = json.loads(json.loads(out["output"])["arguments"])
    assert args == {"to": "[PHONE]", "key": "[SECRET]"}
    assert counts == Counter({"secret": 2, "email": 1, "phone": 1})


def test_clean_json_is_kept_byte_for_byte():
    rec = {"prompt": '[{"role":"user","content":"sum [1,2,3]"}]', "output": '{"name":"f","arguments":"{\\"a\\":1}"}'}
    assert scrub_record(rec) == rec


def test_scrub_json_leaves_keys_and_non_strings():
    assert scrub_json({"password": 12345678, "a@b.io": ["c@d.io", 1.5, None]}) == {
        "password": 12345678, "a@b.io": ["[EMAIL]", 1.5, None]}


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "plain words only"])
def test_trivial_text_unchanged(text):
    assert scrub_text(text) == text


@pytest.mark.parametrize("kind", ["digits", "hex", "base64", "numbers"])
def test_long_machine_text_scrubs_in_linear_time(kind):
    """Tool outputs hold long blobs; a backtracking pattern once took minutes on 20k hex characters."""
    import base64
    import time

    rng = random.Random(7)
    text = {"digits": "".join(rng.choice(string.digits) for _ in range(20000)),
            "hex": bytes(rng.getrandbits(8) for _ in range(10000)).hex(),
            "base64": base64.b64encode(bytes(rng.getrandbits(8) for _ in range(15000))).decode(),
            "numbers": ", ".join(str(rng.randint(0, 10**9)) for _ in range(3000))}[kind]
    t0 = time.perf_counter()
    assert scrub_text(text) == text
    assert time.perf_counter() - t0 < 10, "measured < 0.5 s each on a busy 2-core machine"
