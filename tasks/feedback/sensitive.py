"""Secrets and personal data in chat text: what counts as such, and where it is.

Seven categories, each masked with its placeholder by `tasks.feedback.redact`:

| category | found by | placeholder |
| --- | --- | --- |
| `secret` | known key prefixes (`sk-`, `ghp_`, `github_pat_`, `AKIA`, `xox?-`, `hf_`, `glpat-`, `AIza`, Stripe `sk_live_`), Slack and Discord webhook URLs, `Bearer <token>`, JWTs, PEM private keys, `password=`/`api_key:`-style assignments, a URL's password, a password said in prose, long high-entropy tokens | `[SECRET]` |
| `email` | RFC 5322's common shape, `local@domain.tld` | `[EMAIL]` |
| `iban` | bank account numbers in IBAN form (`DE89 3704 0044 0532 0130 00`) whose ISO 13616 check digits hold | `[IBAN]` |
| `card` | 13-19 digits (spaces, dashes or dots between groups) that pass the Luhn check and start like a card network's number | `[CARD]` |
| `ip` | IPv4 and IPv6 addresses that the standard `ipaddress` module parses (not version numbers) | `[IP]` |
| `national_id` | US social security numbers (`123-45-6789`, or nine digits after "SSN") and UK National Insurance numbers | `[NATIONAL_ID]` |
| `phone` | international (`+CC ...`), North American (`(555) 123-4567`) and European grouped forms with 7-15 digits, or a digit run next to "call", "phone", "tel", "my number", ... | `[PHONE]` |

Look-alike characters (full-width forms, other scripts' digits, typeset dashes and spaces)
are read as their ASCII forms for the search (`_Folding`). Categories are searched in that
order and a later one never claims text an earlier one matched (a key holding digits is a
secret, not a phone number). Only the standard library: Presidio, the usual library for
this, needs spaCy language models from a model hub, which this project's machines cannot
reach; `phonenumbers` (not installed here) would add per-country phone rules. The recall
and precision of these rules on a labelled set are measured by
`benchmarks/bench_redaction.py` and asserted by `tests/unit/feedback/test_redact.py`.

    from tasks.feedback.sensitive import find_sensitive
    find_sensitive("mail me at ann@example.org")   # -> [Finding(Category.EMAIL, 11, 26)]
"""

from __future__ import annotations

import ipaddress
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum


class Category(StrEnum):
    """What a finding is; also its placeholder's name (`[EMAIL]`, ...)."""

    SECRET = "secret"
    EMAIL = "email"
    IBAN = "iban"  # before cards: an IBAN's digits can pass the Luhn check
    CARD = "card"
    IP = "ip"
    NATIONAL_ID = "national_id"
    PHONE = "phone"


CATEGORIES: tuple[Category, ...] = tuple(Category)  # also the order of the search


@dataclass(frozen=True)
class Finding:
    """One piece of sensitive text: `text[start:end]` is of `category`."""

    category: Category
    start: int
    end: int


# -- secrets ------------------------------------------------------------------------------

_KEY_PREFIXES = re.compile(
    r"(?<![A-Za-z0-9_-])(?:"
    r"sk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,}"  # OpenAI, Anthropic
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"  # Stripe
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|hf_[A-Za-z0-9]{30,}|glpat-[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35}"  # Hugging Face, GitLab, Google
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT (header.payload.signature)
    r"|https://hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9_/-]{16,}"  # Slack webhooks: the URL is the key
    r"|https://(?:ptb\.|canary\.)?discord(?:app)?\.com/api/webhooks/\d+/[A-Za-z0-9_-]{20,}"  # Discord webhooks
    r")"
)
_PEM = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.DOTALL)
_BEARER = re.compile(r"\bBearer\s+([A-Za-z0-9._~+/=-]{12,})")
# `password: hunter2`, `api_key="..."`, `token=...`, `DB_PASSWORD=...`: the value is a secret whatever it looks like.
_ASSIGNED = re.compile(
    # The name may end an environment variable's: DB_PASSWORD=..., OPENAI_API_KEY=...
    # It starts where a name does (not after each of its underscores: quadratic on `a_a_a_...`).
    # PGPASSWORD and DB_PASS too; `pass` alone only after an underscore ("boarding pass: AB12CD" is none).
    r"(?i)(?<![a-z0-9_])(?:[a-z0-9]+_)*(?:[a-z0-9]*(?:password|passwd)|api[_-]?key|access[_-]?key|secret(?:[_-]?key)?|"
    r"client[_-]?secret|token|auth[_-]?token|pwd|(?<=_)pass)\b[\"']?\s*[:=]\s*[\"']?([^\s\"',;]{6,})"
)
# `postgres://app:hunter2@db/prod`: the password in a URL's user part.
_URL_PASSWORD = re.compile(r"(?i)\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]+:([^\s/@]+)@")
# `my password is hunter2!`: said in prose rather than assigned; only a value with a digit or a
# symbol in it ("your password is incorrect", "was reset" are sentences, not secrets).
_SAID_PASSWORD = re.compile(r"(?i)\b(?:password|passwd|passphrase)\s+(?:is|was)\s*:?\s+[\"']?([^\s\"',;]{4,}?)[\"'.,;!?]*(?=\s|$)")
_TOKEN = re.compile(r"(?<![A-Za-z0-9_+/-])[A-Za-z0-9_+/-]{24,}={0,2}(?![A-Za-z0-9_+/=-])")
_HEX_OR_UUID = re.compile(r"[0-9a-fA-F]+|[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}")
MIN_TOKEN_ENTROPY = 3.5  # bits per character; English words and identifiers stay below


def _entropy(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def _high_entropy(token: str) -> bool:
    """A random-looking key: letters and digits mixed, high entropy, not a hex hash or a UUID
    (commit ids and request ids are everyday chat, not credentials)."""
    if _HEX_OR_UUID.fullmatch(token):
        return False
    parts = token.split("/")
    if len(parts) > 1 and (not all(parts) or sum(p.lower() != p for p in parts) * 2 < len(parts)):
        return False  # a path (lower-case folder names), not base64 like an AWS secret key
    has = [any(c.islower() for c in token), any(c.isupper() for c in token), any(c.isdigit() for c in token)]
    return has[2] and sum(has) >= 2 and _entropy(token) >= MIN_TOKEN_ENTROPY


def _secrets(text: str) -> Iterator[tuple[int, int]]:
    for pattern in (_PEM, _KEY_PREFIXES):
        yield from (m.span() for m in pattern.finditer(text))
    for pattern in (_BEARER, _ASSIGNED, _URL_PASSWORD):
        yield from (m.span(1) for m in pattern.finditer(text))
    yield from (m.span(1) for m in _SAID_PASSWORD.finditer(text) if not m.group(1).isalpha())
    yield from (m.span() for m in _TOKEN.finditer(text) if _high_entropy(m.group()))


# -- e-mail addresses ---------------------------------------------------------------------

_EMAIL = re.compile(
    # An apostrophe inside the local part (o'neil@...) is part of the address; one before it quotes it.
    # Letters and digits of any script (josé.garcía@correo.es, RFC 6531); the full-width at sign and
    # zero-width characters around it are the ways an address is written to slip past a filter.
    r"(?<![\w.%+-])[^\W_](?:[\w.%+'-]{0,62}[\w%+-])?"
    r"[\u200b-\u200d\u2060\ufeff]*[@\uff20][\u200b-\u200d\u2060\ufeff]*"
    r"(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,24}(?![\w-])"
)


def _emails(text: str) -> Iterator[tuple[int, int]]:
    yield from (m.span() for m in _EMAIL.finditer(text))


# -- card numbers -------------------------------------------------------------------------

_CARD = re.compile(r"(?<![\d.,+-])\d(?:[ .-]?\d){12,18}(?![\d]|[.,-]\d)")  # `+49...` is a phone
# Issuer prefixes of the networks people paste: Visa, Mastercard, Amex, Discover, Diners, JCB, UnionPay, Maestro.
_CARD_PREFIX = re.compile(r"4|5[1-5]|2[2-7]|3[47]|3[068]|35|6(?:011|5|4[4-9]|2)|5[06-8]|6[37]")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum of a card number (digits only)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _cards(text: str) -> Iterator[tuple[int, int]]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if _CARD_PREFIX.match(digits) and luhn_valid(digits) and _consistent_groups(m.group()):
            yield m.span()


def _consistent_groups(number: str) -> bool:
    """Cards are written as one run or in groups of 4 (Amex 4-6-5, Diners 4-6-4): not a date or an id."""
    groups = re.split(r"[ .-]", number)
    return len(groups) == 1 or all(len(g) == 4 for g in groups[:-1]) or [len(g) for g in groups] in ([4, 6, 5], [4, 6, 4])


# -- bank accounts ------------------------------------------------------------------------

# Grouped by spaces (the printed form) or dashes, or not at all, in either case ("de89 3704 ..."
# as people type it). A match is cut to its country's length (ISO 13616's registry), so a word
# after the number is not taken for its last group, and the check digits keep out the rest.
_IBAN = re.compile(r"(?i)(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ -]?[A-Z0-9]{4}){2,7}(?:[ -]?[A-Z0-9]{1,3})?(?![A-Za-z0-9])")
_IBAN_SEPARATORS = re.compile(r"[ -]")
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24,
    "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24,
    "XK": 20,
}


def iban_valid(iban: str) -> bool:
    """ISO 13616's check: the account with its first four characters moved to the end, letters
    as numbers (A=10 ... Z=35), is 1 modulo 97."""
    compact = _IBAN_SEPARATORS.sub("", iban).upper()
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def _iban_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The IBAN at `start`, cut to its country's length within `text[start:end]`; None when there is none."""
    length = _IBAN_LENGTHS.get(text[start:start + 2].upper())
    if length is None:
        return None
    seen = 0
    for k in range(start, end):
        seen += text[k].isalnum()
        if seen == length:
            stop = k + 1
            if stop < len(text) and text[stop].isalnum() or not iban_valid(text[start:stop]):
                return None  # the number goes on: not a whole IBAN of the country
            return start, stop
    return None


def _ibans(text: str) -> Iterator[tuple[int, int]]:
    for m in _IBAN.finditer(text):
        span = _iban_span(text, *m.span())
        if span is not None:
            yield span


# -- national identity numbers ------------------------------------------------------------

# US social security numbers in their written form (area 001-899 but 666, group and serial
# not zero), or nine digits that the sentence calls one; UK National Insurance numbers.
_SSN = re.compile(r"(?<![\w.-])(?!000|666|9)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\w-]|\.\d)")
_SSN_SAID = re.compile(r"(?i)\b(?:ssn|social security(?: number| no\.?| #)?)[^\d\n]{0,12}((?!000|666|9)\d{3} ?\d{2} ?\d{4})(?![\w-])")
_NINO = re.compile(r"(?<![A-Za-z0-9])(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D](?![A-Za-z0-9])")


def _national_ids(text: str) -> Iterator[tuple[int, int]]:
    yield from (m.span() for m in _SSN.finditer(text))
    yield from (m.span(1) for m in _SSN_SAID.finditer(text))
    yield from (m.span() for m in _NINO.finditer(text))


# -- IP addresses -------------------------------------------------------------------------

_IPV4 = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:.])([0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:%\w+)?)(?![\w:])")
_VERSION_BEFORE = re.compile(r"(?i)(?:\bv|version\s*|release\s*|build\s*|python\s*|node\s*)$")


def _ips(text: str) -> Iterator[tuple[int, int]]:
    for m in _IPV4.finditer(text):
        if _VERSION_BEFORE.search(text[max(0, m.start() - 10):m.start()]):
            continue
        try:
            ipaddress.IPv4Address(m.group(1))
        except ValueError:
            continue
        yield m.span(1)
    for m in _IPV6.finditer(text):
        candidate = m.group(1)
        if candidate.count(":") < 2 or sum(c.isalnum() for c in candidate) < 3:
            continue  # "::", clock times and ratios are not addresses
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield m.span(1)


# -- phone numbers ------------------------------------------------------------------------

_SEP = r"[ .\-\u00a0]"
_PHONE = re.compile(
    r"(?<![\w+\-./])(?<!\d )(?:"  # not the tail of a longer run of digit groups (a card, an id)
    rf"(?:\+\d{{1,3}}|00\d{{1,3}}(?={_SEP})|\(\+\d{{1,3}}\))(?:{_SEP}?\(0\))?{_SEP}?(?:\(?\d{{1,5}}\)?{_SEP}?){{1,5}}\d{{2,6}}"  # +44 20 7946 0958, +1 (415) 555-0134
    rf"|\(\d{{2,5}}\){_SEP}?\d{{3,4}}{_SEP}?\d{{3,4}}"  # (415) 555-0134, (030) 1234 5678
    rf"|\d{{3}}[.\-]\d{{3}}[.\-]\d{{4}}|\d{{3}} \d{{3}} \d{{4}}"  # 415-555-0134, 415.555.0134, 415 555 0134
    rf"|0\d(?:{_SEP}\d\d){{4}}"  # 06 12 34 56 78 (France)
    rf"|\(0\)\d{{2,4}}{_SEP}\d{{3,4}}{_SEP}?\d{{3,4}}"  # (0)20 7946 0958: the trunk zero in brackets, the country left out
    rf"|0\d{{2,4}}{_SEP}\d{{3,4}}{_SEP}?\d{{3,4}}"  # 020 7946 0958, 07700 900123, 030 12345678
    rf"|0\d{{2,4}}/\d{{4,8}}"  # 030/1234567, 0301/2345678 (Germany)
    r")(?![\w\-/]|\.\d| \d)"
)
# The word, or a compound (`phone_number`, `mobileNo`), at a word's edge; not a plural: "calls: 1234567" is a count.
# Words that say the digits after them are a number to call: within a few words ("call me on
# Monday at 4155550134"), or right before them ("text me 415...", "contact us at 415...",
# "my number is 415..."), where "text 20160318" or "our number of users 1234567" is no phone.
_PHONE_WORDS = re.compile(r"(?i)(?<![a-z])(?:(?:call|phone|tel|telephone|mobile|cell|whatsapp|sms|fax|reach me|ring|telefon"
                          r"|telefono|teléfono|mobil|portable|numéro)(?:[ _-]?(?:number|num|no|nr))?(?![a-z])[^\d\n]{0,20}"
                          r"|(?:text (?:me|us)|contact(?: me| us)?)(?: at| on| via| under)?\s*:?\s*"
                          r"|(?:my|our|his|her|their|your) (?:phone |mobile |cell )?(?:number|digits)(?: is| are)?\s*:?\s*)$")
# An international number glued to the word that says it is one ("Tel.+33 6 12 34 56 78",
# "phone:+33612345678"), which _PHONE's look-behind leaves out as the tail of something longer;
# after any other word (`n+1000000`, a version's `+20240318`) it is none.
_GLUED_INTERNATIONAL = re.compile(
    rf"(?i)(?<![a-z])(?:tel|phone|mobile|mob|cell|fax|telefon|t[eé]l[eé]phone|whatsapp)[.:]?"
    rf"(\+\d{{1,3}}(?:{_SEP}?\(0\))?{_SEP}?(?:\(?\d{{1,5}}\)?{_SEP}?){{1,5}}\d{{2,6}})(?![\w\-/]|\.\d| \d)"
)
_BARE_DIGITS = re.compile(r"(?<![\w+\-./])\+?\d(?:[ \-.]?\d){6,14}(?![\w\-/]|\.\d)")


def _phones(text: str) -> Iterator[tuple[int, int]]:
    for m in _PHONE.finditer(text):
        if 7 <= sum(c.isdigit() for c in m.group()) <= 15:
            yield m.span()
    for m in _GLUED_INTERNATIONAL.finditer(text):
        if 7 <= sum(c.isdigit() for c in m.group(1)) <= 15:
            yield m.span(1)
    for m in _BARE_DIGITS.finditer(text):  # 5551234567, 415 5550134 count only where the sentence says it is a number to call
        if _PHONE_WORDS.search(text[max(0, m.start() - 40):m.start()]):
            yield m.span()


# -- the whole search ---------------------------------------------------------------------

_FINDERS = {Category.SECRET: _secrets, Category.EMAIL: _emails, Category.IBAN: _ibans, Category.CARD: _cards,
            Category.IP: _ips, Category.NATIONAL_ID: _national_ids, Category.PHONE: _phones}


class _Folding(dict):
    """`str.translate` table: a character written in place of an ASCII one, mapped to it.

    Full-width forms (`４１５－５５５`, `１９２．１６８`), the digits of other scripts, the dashes
    and spaces of typeset text (`415–555–0134`, `+44 20` with a narrow no-break space) and the
    ideographic full stop. One character for one, so a span found in the folded text is the
    same span of the original. Filled as characters are met (most text is ASCII and skips it).
    """

    DASHES = frozenset("\u2010\u2011\u2012\u2013\u2014\u2015\u2212\ufe58\ufe63")
    SPACES = frozenset("\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000")

    def __missing__(self, code: int) -> str:
        char = chr(code)
        if 0xFF01 <= code <= 0xFF5E:
            folded = chr(code - 0xFEE0)
        elif char.isdecimal():
            folded = str(unicodedata.decimal(char))
        else:
            folded = "-" if char in self.DASHES else " " if char in self.SPACES else "." if char in "\u3002\uff61" else char
        self[code] = folded
        return folded


_FOLDING = _Folding()


def find_sensitive(text: str) -> list[Finding]:
    """Every secret and piece of personal data in `text`, in order, none overlapping.

    A category searched earlier (see `CATEGORIES`) keeps text a later one also matches. The
    search reads the text with look-alike characters folded to ASCII (`_Folding`).
    """
    folded = text if text.isascii() else text.translate(_FOLDING)
    taken: list[Finding] = []
    for category in CATEGORIES:
        for start, end in _FINDERS[category](folded):
            if start < end and not any(start < f.end and f.start < end for f in taken):
                taken.append(Finding(category, start, end))
    return sorted(taken, key=lambda f: f.start)
