"""A chat template that writes today's date, and a `date` whose today() a test sets."""

from __future__ import annotations

import datetime as dt

DATED_TEMPLATE = "{{ strftime_now('%d %B %Y') }}{% for m in messages %}{{ m.content }}{% endfor %}"


class Day(dt.date):
    """`date` whose today() is the `current` day, set by the test (patched into the module that asks)."""

    current = dt.date(2026, 12, 6)

    @classmethod
    def today(cls) -> dt.date:
        return cls.current
