"""API keys with names and roles: who may ask the model, who may teach it, who may reload it.

Three roles: `infer` (chat, generate, models, metrics), `feedback` (`POST /feedback`) and
`admin` (`POST /admin/*`). A key may also be `trusted`: its feedback reaches training without
a person approving it (see docs/guides/trust.md). Keys come from the environment, read
again on every request, so adding, removing or rotating a key needs no restart:

- `FTLLM_API_KEYS`: several keys, either as JSON,
  `[{"name": "web", "key": "...", "roles": ["infer", "feedback"], "trusted": false}]`,
  or as `name:role+role[+trusted]=secret` entries separated by commas or newlines:
  `web:infer+feedback=s3cret,ops:infer+feedback+admin+trusted=0ther`.
- `FTLLM_API_KEYS_FILE`: a file holding the same (one entry a line, `#` comments: a line that
  starts with one, and in the compact form what follows one after a space), kept out of
  the repository (mode 600). In either place a secret may be given as `sha256:<hex digest>`
  instead, so that the file never holds the key itself.
- `FTLLM_API_KEY`: the single key of earlier versions: one key named `default` with every role,
  trusted (its holder is the operator).

With none of them set the service is open: every caller is `anonymous`, with every role,
and not trusted. In memory only SHA-256 digests are kept; a presented key is hashed and
compared with every digest in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from tasks.errors import ConfigError

KEYS_ENV, KEYS_FILE_ENV, SINGLE_KEY_ENV = "FTLLM_API_KEYS", "FTLLM_API_KEYS_FILE", "FTLLM_API_KEY"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Role(StrEnum):
    INFER = "infer"
    FEEDBACK = "feedback"
    ADMIN = "admin"


ALL_ROLES = frozenset(Role)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the key's name, its roles, and whether its feedback is trusted."""

    name: str
    roles: frozenset[Role]
    trusted: bool = False

    def may(self, role: Role) -> bool:
        return role in self.roles


ANONYMOUS = Caller("anonymous", ALL_ROLES, trusted=False)


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class KeyRing:
    """The configured keys, as (SHA-256 digest, caller) pairs."""

    keys: tuple[tuple[bytes, Caller], ...]

    def identify(self, presented: str) -> Caller | None:
        """The caller whose key this is, or None; compares with every key, in constant time each."""
        given, found = digest(presented), None
        for key_digest, caller in self.keys:
            if hmac.compare_digest(given, key_digest):
                found = caller
        return found

    def names(self) -> list[str]:
        return [caller.name for _, caller in self.keys]

    def untrusted(self) -> KeyRing:
        """The same keys, none of them trusted."""
        return KeyRing(tuple((d, replace(caller, trusted=False)) for d, caller in self.keys))


def _entry(name: str, secret: str, roles: list[str], trusted: bool, where: str) -> tuple[bytes, Caller]:
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"{where}: key name {name!r} must be letters, digits, '_', '.', '-' (up to 64).")
    unknown = sorted(set(roles) - {r.value for r in Role})
    if unknown or not roles:
        raise ConfigError(f"{where}: key {name!r} has roles {roles}; give one or more of infer, feedback, admin.")
    if secret.startswith("sha256:"):
        hexdigest = secret.removeprefix("sha256:").strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", hexdigest):
            raise ConfigError(f"{where}: key {name!r}: 'sha256:' must be followed by 64 hex digits.")
        key_digest = bytes.fromhex(hexdigest)
    elif len(secret.strip()) < 8:
        raise ConfigError(f"{where}: key {name!r} is shorter than 8 characters; use a long random secret.")
    else:
        key_digest = digest(secret.strip())
    return key_digest, Caller(name, frozenset(Role(r) for r in roles), trusted)


def parse_keys(text: str, where: str) -> KeyRing:
    """Keys from JSON or `name:role+role[+trusted]=secret` entries (see the module docstring).

    Raises:
        ConfigError: naming `where` (the variable or file) and what to fix; never the secret.
    """
    # A line that starts with `#` is a comment, in either form (one above JSON made it read as
    # the compact form); in the compact form so is what follows a `#` after a space. A `#`
    # inside a secret is part of it (the secret was cut there, and its prefix let in).
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).strip()
    entries: list[tuple[bytes, Caller]] = []
    if text.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg} at line {err.lineno}).") from None
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not isinstance(item.get("key"), str):
                raise ConfigError(f"{where}: entry {i} needs a string 'name' and 'key' (and 'roles', 'trusted').")
            unknown = sorted(set(item) - {"name", "key", "roles", "trusted"})
            if unknown:
                raise ConfigError(f"{where}: entry {i} ({item['name']!r}) has unknown fields {unknown}; an entry has "
                                  "'name', 'key', 'roles' and 'trusted'.")
            if "roles" not in item:  # as in the compact form: a key with every role, admin among them, is said
                raise ConfigError(f"{where}: entry {i} ({item['name']!r}) has no 'roles'; give one or more of infer, "
                                  "feedback, admin.")
            roles, trusted = item["roles"], item.get("trusted", False)
            # Strict: `"trusted": "false"` is a non-empty string, which bool() would read as trusted.
            if not isinstance(trusted, bool):
                raise ConfigError(f"{where}: entry {i} ({item['name']!r}): 'trusted' must be true or false (a JSON "
                                  f"boolean), not {json.dumps(trusted)}.")
            if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
                raise ConfigError(f"{where}: entry {i} ({item['name']!r}): 'roles' must be a list of role names.")
            entries.append(_entry(item["name"], item["key"], roles, trusted, where))
    else:
        lines = [re.sub(r"\s#.*$", "", line) for line in text.splitlines()]
        for number, chunk in enumerate((c.strip() for line in lines for c in line.split(",")), 1):
            if not chunk:
                continue
            head, sep, secret = chunk.partition("=")
            name, colon, role_list = head.strip().partition(":")
            if not sep or not colon:
                raise ConfigError(f"{where}: entry {number} is not 'name:role+role=secret' (roles: infer, feedback, "
                                  "admin; add '+trusted' for a trusted key).")
            flags = [r.strip() for r in role_list.split("+") if r.strip()]
            roles = [r for r in flags if r != "trusted"]
            entries.append(_entry(name.strip(), secret, roles, "trusted" in flags, where))
    names = [caller.name for _, caller in entries]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: key names must be unique; {sorted({n for n in names if names.count(n) > 1})} repeat.")
    if len({d for d, _ in entries}) != len(entries):
        raise ConfigError(f"{where}: two keys have the same secret; give each key its own.")
    return KeyRing(tuple(entries))


@lru_cache(maxsize=8)
def _parsed(text: str, where: str) -> KeyRing:
    return parse_keys(text, where)


@lru_cache(maxsize=8)
def _file(path: str, mtime_ns: int, size: int) -> KeyRing:
    return parse_keys(Path(path).read_text(encoding="utf-8"), f"{KEYS_FILE_ENV} file {path}")


def load_keyring(env: dict[str, str] | None = None, *, gone: Callable[[str], None] | None = None) -> KeyRing | None:
    """The keys configured now (None: no key, the service is open).

    Cheap enough for every request: a variable is parsed once per distinct value and the
    file once per modification time, so rotation takes effect on the next request.

    Args:
        gone: where the key file is missing, call it with the message and take the file as
            holding no key: deleting the file revokes its keys (a running service answers
            them 401, and is not opened to everyone). Without it a missing file is an error
            (the service's start).

    Raises:
        ConfigError: a key variable or file that cannot be used.
    """
    env = os.environ if env is None else env
    rings: list[KeyRing] = []
    if env.get(KEYS_ENV, "").strip():
        rings.append(_parsed(env[KEYS_ENV], KEYS_ENV))
    if env.get(KEYS_FILE_ENV, "").strip():
        path = Path(env[KEYS_FILE_ENV]).expanduser()
        try:
            stat = path.stat()
        except OSError:
            missing = f"{KEYS_FILE_ENV}={path}: no such file; create it (mode 600) or unset the variable."
            if gone is None:
                raise ConfigError(missing) from None
            gone(missing + " Its keys are refused until it is back.")
            rings.append(KeyRing(()))
        else:
            rings.append(_file(str(path), stat.st_mtime_ns, stat.st_size))
    if env.get(SINGLE_KEY_ENV, "").strip():
        rings.append(KeyRing(((digest(env[SINGLE_KEY_ENV].strip()), Caller("default", ALL_ROLES, trusted=True)),)))
    if not rings:
        return None
    merged = KeyRing(tuple(entry for ring in rings for entry in ring.keys))
    names = merged.names()
    if len(set(names)) != len(names):
        raise ConfigError(f"key names repeat across {KEYS_ENV}, {KEYS_FILE_ENV} and {SINGLE_KEY_ENV} "
                          f"({SINGLE_KEY_ENV}'s key is named 'default'); rename one.")
    return merged


def feedback_bucket(caller: Caller, user: str | None, address: str | None) -> str:
    """The name `POST /feedback` is rate-limited under.

    A trusted key (the operator's own front end) relays many end users: its limit is per end
    user it names. An untrusted key's user ids are not believed: its limit is the key's. On an
    open service (no key configured) every caller is `anonymous`, so the limit is per client
    address: one client cannot use up everybody's (behind a proxy, the proxy's address is
    every client's).
    """
    if caller is ANONYMOUS:
        return f"{caller.name}@{address or 'unknown'}"
    return f"{caller.name}\x00{user}" if caller.trusted and user else caller.name


class RateLimiter:
    """At most `limit` calls per `window` seconds per key name (a sliding window), in memory.

    Per process: behind several service workers each allows `limit`; the service runs one.
    """

    # Names kept before the idle ones are dropped: a trusted key's limit is per end user it
    # names, and the names it may send are unbounded.
    SWEEP_AT = 4096

    def __init__(self, limit: int, window: float) -> None:
        self.limit, self.window = limit, window
        self._calls: dict[str, deque[float]] = {}
        self._lock = threading.Lock()
        self._sweep_at = self.SWEEP_AT

    def acquire(self, name: str, now: float | None = None) -> int | None:
        """Count a call of `name`; None when allowed, else the seconds until it would be (at least 1)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._calls) >= self._sweep_at:  # forget the names with no call in the window
                self._calls = {k: q for k, q in self._calls.items() if q and q[-1] > now - self.window}
                self._sweep_at = max(self.SWEEP_AT, 2 * len(self._calls))
            calls = self._calls.setdefault(name, deque())
            while calls and calls[0] <= now - self.window:
                calls.popleft()
            if len(calls) >= self.limit:
                return max(1, math.ceil(calls[0] + self.window - now))
            calls.append(now)
            return None
