"""A labelled set for redaction: chat sentences holding secrets and personal data, and hard
negatives that look like them (dates, versions, order ids, prices, the project's own date
data), built deterministically from a seed. Used by tests/unit/feedback/test_redact.py
and benchmarks/bench_redaction.py.
"""

from __future__ import annotations

import json
import random
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CATEGORIES = ("secret", "email", "card", "iban", "ip", "national_id", "phone")


@dataclass(frozen=True)
class Case:
    """A text and the sensitive substrings in it, each with its category (none: a negative)."""

    text: str
    items: tuple[tuple[str, str], ...] = ()  # (category, substring)


@dataclass
class Scores:
    """Per category: items found (true positives), items missed, findings on no item (false positives)."""

    found: Counter = field(default_factory=Counter)
    missed: Counter = field(default_factory=Counter)
    false: Counter = field(default_factory=Counter)

    def recall(self, category: str) -> float:
        total = self.found[category] + self.missed[category]
        return self.found[category] / total if total else 1.0

    def precision(self, category: str) -> float:
        total = self.found[category] + self.false[category]
        return self.found[category] / total if total else 1.0

    def table(self) -> list[dict]:
        return [{"category": c, "items": self.found[c] + self.missed[c], "found": self.found[c],
                 "missed": self.missed[c], "false_positives": self.false[c],
                 "recall": round(self.recall(c), 4), "precision": round(self.precision(c), 4)} for c in CATEGORIES]


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    from tasks.feedback.sensitive import luhn_valid

    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return next(body + d for d in string.digits if luhn_valid(body + d))


def _not_luhn(rng: random.Random) -> str:
    digits = _luhn_complete("4", 16, rng)
    digits = digits[:-1] + str((int(digits[-1]) + rng.randint(1, 9)) % 10)
    return " ".join(digits[i:i + 4] for i in range(0, 16, 4))


def _card(rng: random.Random) -> str:
    network = rng.choice(["visa", "mc", "mc2", "amex", "discover", "jcb"])
    if network == "amex":
        digits = _luhn_complete(rng.choice(["34", "37"]), 15, rng)
        return rng.choice([digits, f"{digits[:4]} {digits[4:10]} {digits[10:]}", f"{digits[:4]}-{digits[4:10]}-{digits[10:]}"])
    prefix = {"visa": "4", "mc": f"5{rng.randint(1, 5)}", "mc2": str(rng.randint(2221, 2720)),
              "discover": "6011", "jcb": str(rng.randint(3528, 3589))}[network]
    digits = _luhn_complete(prefix, 16, rng)
    sep = rng.choice(["", " ", "-"])
    return sep.join(digits[i:i + 4] for i in range(0, 16, 4))


FIRST = ["ann", "bob", "chen", "dara", "emil", "fatima", "goran", "hana", "ivan", "julia", "kofi", "lena", "marta", "nils"]
LAST = ["smith", "okafor", "nguyen", "garcia", "muller", "rossi", "kowalski", "tanaka", "haddad", "silva"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.co.uk", "gmail.com", "uni-example.de", "example.io"]


def _email(rng: random.Random) -> str:
    f, last, d = rng.choice(FIRST), rng.choice(LAST), rng.choice(DOMAINS)
    local = rng.choice([f"{f}.{last}", f"{f}_{last}", f"{f}{rng.randint(1, 99)}", f"{f[0]}.{last}+support", f"{last}-{f}"])
    address = f"{local}@{d}"
    return address.upper() if rng.random() < 0.1 else address


def _phone(rng: random.Random) -> str:
    def d(n: int) -> str:
        return "".join(rng.choice(string.digits) for _ in range(n))

    area = str(rng.randint(201, 989))
    return rng.choice([
        f"({area}) 555-{d(4)}", f"{area}-555-{d(4)}", f"{area}.555.{d(4)}", f"+1 {area} 555 {d(4)}",
        f"+1-{area}-555-{d(4)}", f"+1 ({area}) 555-{d(4)}", f"+44 20 7946 {d(4)}", f"020 7946 {d(4)}",
        f"07700 900{d(3)}", f"+44 7700 900{d(3)}", f"+49 30 {d(8)}", f"030 {d(8)}", f"+49 151 {d(8)}",
        f"06 {d(2)} {d(2)} {d(2)} {d(2)}", f"+33 6 {d(2)} {d(2)} {d(2)} {d(2)}", f"+91 98{d(3)} {d(5)}",
        f"+61 4{d(2)} {d(3)} {d(3)}", f"0044 20 7946 {d(4)}", f"(+49) 30 {d(7)}", f"+81 3-{d(4)}-{d(4)}", f"+34 6{d(2)} {d(3)} {d(3)}",
    ])


def _iban(rng: random.Random) -> str:
    """A valid IBAN of a common country (its bank code letters where the country has them)."""
    country, letters, digits = rng.choice([("DE", 0, 18), ("FR", 0, 23), ("GB", 4, 14), ("ES", 0, 20), ("NL", 4, 10),
                                           ("IT", 1, 22), ("BE", 0, 12), ("CH", 0, 17), ("PL", 0, 24)])
    bban = "".join(rng.choice(string.ascii_uppercase) for _ in range(letters)) + "".join(rng.choice(string.digits) for _ in range(digits))
    check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    iban = f"{country}{check:02d}{bban}"
    return iban if rng.random() < 0.3 else " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))


def _national_id(rng: random.Random) -> str:
    if rng.random() < 0.6:  # a US social security number: area 001-899 but 666
        area = rng.choice([a for a in range(1, 900) if a != 666])
        return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"
    first, second = rng.choice("ABCEHJKLMNOPRSTWXYZ"), rng.choice("ABCEHJKLMNPRSTWXYZ")
    number = "".join(rng.choice(string.digits) for _ in range(6))
    suffix = rng.choice("ABCD")
    return rng.choice([f"{first}{second}{number}{suffix}", f"{first}{second} {number[:2]} {number[2:4]} {number[4:]} {suffix}"])


def _ip(rng: random.Random) -> str:
    if rng.random() < 0.6:
        return rng.choice([f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}", f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                           f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"])
    def h() -> str:
        return format(rng.randint(1, 0xFFFF), "x")

    return rng.choice([f"2001:db8:{h()}:{h()}::{h()}", f"fe80::{h()}:{h()}:{h()}:{h()}",
                       ":".join(h() for _ in range(8)), f"2a02:{h()}:{h()}::{h()}:{h()}"])


def _secret(rng: random.Random) -> str:
    alnum = string.ascii_letters + string.digits
    def r(n: int, chars: str = alnum) -> str:
        return "".join(rng.choice(chars) for _ in range(n))

    b64url = alnum + "-_"
    return rng.choice([
        f"sk-proj-{r(48, b64url)}", f"sk-{r(48)}", f"sk-ant-api03-{r(40, b64url)}", f"ghp_{r(36)}",
        f"github_pat_{r(22)}_{r(59)}", f"AKIA{r(16, string.ascii_uppercase + string.digits)}",
        f"xoxb-{r(12, string.digits)}-{r(13, string.digits)}-{r(24)}", f"hf_{r(34)}", f"glpat-{r(20, b64url)}",
        f"eyJhbGciOiJIUzI1NiJ9.eyJ{r(40, b64url)}.{r(43, b64url)}", f"sk_live_{r(24)}", r(40),
        f"{r(13)}/{r(7, string.ascii_uppercase + string.digits)}/{r(18)}",  # an AWS secret access key
    ])


POSITIVE_TEMPLATES = {
    "email": ["You can reach me at {x}.", "my email is {x} if you need it", "Send the invoice to <{x}> please.",
              "Forward this to {x}, {x2} and me.", "Contact: {x}", "why does {x} bounce?"],
    "phone": ["Call me at {x} tomorrow.", "my number is {x}", "Phone: {x}", "text {x} when you land",
              "Our office line ({x}) is closed on Sundays.", "Is {x} a valid number?"],
    "card": ["My card number is {x}, expiry 04/27.", "charge {x} please", "Card: {x}", "I paid with {x} and was billed twice"],
    "iban": ["Please transfer it to {x}.", "My IBAN is {x}", "IBAN: {x}", "refund to account {x}, thanks"],
    "national_id": ["My SSN is {x}", "social security number {x} on the form", "NI number: {x}", "the form asks for {x} again"],
    "ip": ["The server at {x} refuses connections.", "ssh into {x} and restart it", "Allow {x} in the firewall.",
           "ping {x} returns nothing", "my IP is {x}"],
    "secret": ["Here is my API key: {x}", "export OPENAI_API_KEY={x}", "curl -H 'Authorization: Bearer {x}' https://api.example.com",
               "Why does {x} get a 401?", "token {x} expired", "config: api_key = {x}"],
}
MAKERS = {"email": _email, "phone": _phone, "card": _card, "iban": _iban, "ip": _ip, "national_id": _national_id,
          "secret": _secret}


def _negatives(rng: random.Random, n: int) -> list[str]:
    def d(k: int) -> str:
        return "".join(rng.choice(string.digits) for _ in range(k))

    months = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
    makers = [
        lambda: f"Convert this ISO date: {rng.randint(1900, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        lambda: f"The meeting moved to {rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(1950, 2050)}.",
        lambda: f"Deadline {rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}/{rng.randint(1950, 2050)} at {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}",
        lambda: f"{rng.choice(months)} {rng.randint(1, 28)}, {rng.randint(1900, 2099)}",
        lambda: f"Upgrade from v{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 20)} to version {rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}",
        lambda: f"It fails on Python 3.{rng.randint(8, 13)}.{rng.randint(0, 12)} and Windows build 10.0.{rng.randint(17000, 26000)}.{rng.randint(1, 4000)}",
        lambda: f"Where is order ORD-{rng.randint(2015, 2026)}-{d(6)}? Invoice INV-{d(8)}.",
        lambda: f"Order #{d(rng.randint(5, 9))} was shipped, tracking 1Z{d(3)}AA{d(10)}.",
        lambda: f"It costs ${rng.randint(1, 9)},{d(3)}.{d(2)} or €{rng.randint(1, 999)}.{d(2)}, about {rng.randint(1, 99)}% off.",
        lambda: f"The run took {rng.randint(1, 59)}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d} and used {d(6)} tokens.",
        lambda: f"Commit {''.join(rng.choice('0123456789abcdef') for _ in range(40))} broke the build.",
        lambda: f"request id {'-'.join(''.join(rng.choice('0123456789abcdef') for _ in range(k)) for k in (8, 4, 4, 4, 12))}",
        lambda: f"ISBN 978-{rng.randint(0, 9)}-{d(2)}-{d(6)}-{rng.randint(0, 9)}, page {rng.randint(1, 900)}",
        lambda: f"The population grew from {rng.randint(1, 9)},{d(3)},{d(3)} in {rng.randint(1950, 1999)} to {d(7)}.",
        lambda: f"Fine-tune Llama-3.1-8B-Instruct or mistral-7b-instruct-v0.3 with lr 2e-{rng.randint(4, 6)}",
        lambda: f"Coordinates {rng.randint(-89, 89)}.{d(4)}, {rng.randint(-179, 179)}.{d(4)}; zip {d(5)}",
        lambda: f"The score was {rng.randint(0, 9)}-{rng.randint(0, 9)} in {rng.randint(1990, 2025)}-{rng.randint(1990, 2025)}, aspect 16:9.",
        lambda: f"Colour #{''.join(rng.choice('0123456789abcdef') for _ in range(6))}, internationalization_configuration_settings",
        lambda: f"Read /usr/lib/python3.11/site-packages/transformers/models/llama/modeling_llama.py line {d(3)}",
        lambda: f"Call the function twice and wait {rng.randint(2, 60)} seconds; step {d(4)} of {d(5)}.",
        lambda: f"Reference {_not_luhn(rng)} is not a card: its checksum fails.",
        lambda: f"@{rng.choice(FIRST)} thanks! See issue #{d(4)} and PR {d(5)}.",
        # words that name phones and passwords elsewhere, before what is neither
        lambda: f"Rewrite the text {rng.randint(1900, 2099)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d} in words.",
        lambda: f"Our number of users grew to {d(7)}; a handy table of {d(2)} {d(3)} {d(3)} rows.",
        lambda: rng.choice(["Your password is incorrect.", "Your password was reset successfully.",
                            "The password is required.", "My password was stolen, help!"]),
    ]
    return [rng.choice(makers)() for _ in range(n)]


def project_date_texts() -> list[str]:
    """Every message of the project's own data set (ISO dates and dates in words)."""
    texts = []
    for line in (REPO / "data" / "dates.jsonl").read_text(encoding="utf-8").splitlines():
        texts += [m["content"] for m in json.loads(line)["messages"]]
    return texts


def labelled_cases(per_category: int = 200, negatives: int = 1000, seed: int = 24) -> list[Case]:
    """`per_category` positives of each category (some sentences hold two items), `negatives`
    generated hard negatives, and the project's date data as further negatives."""
    rng = random.Random(seed)
    cases = []
    for category, templates in POSITIVE_TEMPLATES.items():
        for _ in range(per_category):
            template = rng.choice(templates)
            x, x2 = MAKERS[category](rng), MAKERS[category](rng)
            items = ((category, x), (category, x2)) if "{x2}" in template else ((category, x),)
            cases.append(Case(template.format(x=x, x2=x2), items))
    cases += [Case(text) for text in _negatives(rng, negatives)]
    cases += [Case(text) for text in project_date_texts()]
    return cases


def score(cases: list[Case]) -> Scores:
    """Run the redaction's finder over `cases`: an item counts as found when one finding of its
    category covers it whole; a finding that overlaps no item of its category is false."""
    from tasks.feedback.sensitive import find_sensitive

    scores = Scores()
    for case in cases:
        spans, at = [], 0
        for category, item in case.items:
            start = case.text.index(item, at)
            spans.append((category, start, start + len(item)))
            at = start + len(item)
        findings = find_sensitive(case.text)
        for category, start, end in spans:
            hit = any(f.category == category and f.start <= start and end <= f.end for f in findings)
            (scores.found if hit else scores.missed)[category] += 1
        for f in findings:
            if not any(c == f.category and f.start < e and s < f.end for c, s, e in spans):
                scores.false[f.category.value] += 1
    return scores
