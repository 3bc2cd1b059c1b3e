"""S2 scrubbing entry point. The scrubber itself lives in `slmshift.platform.scrub`, so that the S1 write path
(`log.scrub`) and S2 remove the same secrets and PII; this module keeps S2's import path."""

from __future__ import annotations

from slmshift.platform.scrub import PLACEHOLDERS, Scrubber, luhn_ok, scrub_json, scrub_record, scrub_text

__all__ = ["PLACEHOLDERS", "Scrubber", "luhn_ok", "scrub_json", "scrub_record", "scrub_text"]
