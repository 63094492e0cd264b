"""Named API keys with roles: parsing, hashing, errors that name the variable, rotation."""

from __future__ import annotations

import hashlib
import json

import pytest

from serving.keys import ALL_ROLES, Role, load_keyring, parse_keys
from tasks.errors import ConfigError


def test_compact_and_json_forms_give_the_same_callers():
    compact = parse_keys("web:infer+feedback=web-secret-1, ops:infer+feedback+admin+trusted=ops-secret-2", "X")
    as_json = parse_keys(json.dumps([{"name": "web", "key": "web-secret-1", "roles": ["infer", "feedback"]},
                                     {"name": "ops", "key": "ops-secret-2", "roles": ["infer", "feedback", "admin"],
                                      "trusted": True}]), "X")
    assert compact == as_json
    web, ops = compact.identify("web-secret-1"), compact.identify("ops-secret-2")
    assert (web.name, web.roles, web.trusted) == ("web", {Role.INFER, Role.FEEDBACK}, False)
    assert (ops.name, ops.roles, ops.trusted) == ("ops", ALL_ROLES, True)
    assert compact.identify("web-secret-2") is None and compact.identify("") is None


def test_only_digests_are_kept_and_a_digest_may_stand_for_the_secret():
    ring = parse_keys(f"bot:infer=sha256:{hashlib.sha256(b'bot-secret-9').hexdigest()}", "FTLLM_API_KEYS_FILE")
    assert ring.identify("bot-secret-9").name == "bot"
    assert "bot-secret-9" not in repr(ring) and "web-secret-1" not in repr(parse_keys("web:infer=web-secret-1", "X"))


@pytest.mark.parametrize(("text", "message"), [
    ("web=infer", r"FTLLM_API_KEYS: entry 1 is not 'name:role\+role=secret'"),
    ("web:infer+write=long-secret", r"key 'web' has roles \['infer', 'write'\]"),
    ("web:infer=short", "shorter than 8 characters"),
    ("a:infer=long-secret-1,a:admin=long-secret-2", r"names must be unique; \['a'\] repeat"),
    ("a:infer=long-secret-1,b:admin=long-secret-1", "same secret"),
    ("[{\"name\": \"a\"}]", "entry 0 needs a string 'name' and 'key'"),
    ("web:infer=sha256:abc", "64 hex digits"),
    # a string is not a boolean: "false" would have been read as trusted
    ('[{"name": "p", "key": "long-secret-1", "roles": ["feedback"], "trusted": "false"}]',
     r"entry 0 \('p'\): 'trusted' must be true or false \(a JSON boolean\), not \"false\""),
    ('[{"name": "p", "key": "long-secret-1", "roles": ["feedback"], "trusted": 1}]', "'trusted' must be true or false"),
    # every role, admin among them, is said, not implied (the compact form refuses no roles too)
    ('[{"name": "p", "key": "long-secret-1"}]', r"entry 0 \('p'\) has no 'roles'"),
    ('[{"name": "p", "key": "long-secret-1", "roles": "feedback"}]', "'roles' must be a list of role names"),
    ('[{"name": "p", "key": "long-secret-1", "roles": ["infer"], "trust": true}]', r"unknown fields \['trust'\]"),
])
def test_bad_keys_are_named_without_the_secret(text, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_keys(text, "FTLLM_API_KEYS")
    assert "long-secret" not in str(err.value)


def test_the_single_key_of_earlier_versions_has_every_role_and_is_trusted():
    caller = load_keyring({"FTLLM_API_KEY": "only-one-key"}).identify("only-one-key")
    assert (caller.name, caller.roles, caller.trusted) == ("default", ALL_ROLES, True)
    assert load_keyring({}) is None


def test_a_rewritten_file_takes_effect_on_the_next_read(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nweb:infer=first-secret\n")
    env = {"FTLLM_API_KEYS_FILE": str(keys), "FTLLM_API_KEYS": "ops:admin=ops-secret-1"}
    assert load_keyring(env).identify("first-secret").name == "web"
    keys.write_text("web:infer=second-secret-longer\n")  # another size, so another cache entry even within one mtime tick
    ring = load_keyring(env)
    assert ring.identify("first-secret") is None and ring.identify("second-secret-longer").name == "web"
    assert ring.identify("ops-secret-1").name == "ops"
    with pytest.raises(ConfigError, match="FTLLM_API_KEYS_FILE=.*no such file"):
        load_keyring({"FTLLM_API_KEYS_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="names repeat"):
        load_keyring({"FTLLM_API_KEYS": "default:infer=another-secret", "FTLLM_API_KEY": "only-one-key"})


def test_a_deleted_key_file_revokes_its_keys_and_opens_nothing(tmp_path):
    """A running service kept the keys of a deleted file (untrusted): deleting the file did not
    revoke a leaked key. Now its keys are refused; the other variables' keys still work."""
    keys = tmp_path / "keys"
    keys.write_text("web:infer+feedback+trusted=first-secret\n")
    said: list[str] = []
    ring = load_keyring({"FTLLM_API_KEYS_FILE": str(keys)}, gone=said.append)
    assert ring.identify("first-secret").trusted and said == []
    keys.unlink()
    alone = load_keyring({"FTLLM_API_KEYS_FILE": str(keys)}, gone=said.append)
    assert alone is not None and alone.identify("first-secret") is None  # refused, not an open service
    both = load_keyring({"FTLLM_API_KEYS_FILE": str(keys), "FTLLM_API_KEYS": "ops:admin=ops-secret-1"}, gone=said.append)
    assert both.identify("first-secret") is None and both.identify("ops-secret-1").name == "ops"
    assert len(said) == 2 and "no such file" in said[0] and "refused until it is back" in said[0]


def test_comments_are_read_as_comments_and_a_hash_in_a_secret_is_part_of_it():
    """A comment above JSON made the file read as the compact form (refused, so a rotation meant
    to take a key's trust away did not happen); a `#` inside a secret cut it there."""
    ring = parse_keys('# ops leaked: no longer trusted\n[{"name": "ops", "key": "ops-secret-1", "roles": ["feedback"], '
                      '"trusted": false}]', "FTLLM_API_KEYS_FILE")
    assert ring.identify("ops-secret-1").trusted is False
    ring = parse_keys("web:infer=abcdefgh#ijkl  # the web front end\n# a whole line\nops:admin=ops-secret-2", "X")
    assert ring.identify("abcdefgh#ijkl").name == "web" and ring.identify("abcdefgh") is None
    assert ring.identify("ops-secret-2").name == "ops"
    # In JSON a " #" is text: only whole lines are comments there.
    ring = parse_keys('[{"name": "web", "key": "pass phrase #1 abc", "roles": ["infer"]}]', "X")
    assert ring.identify("pass phrase #1 abc").name == "web"


def test_keys_read_before_a_broken_setting_answer_untrusted():
    ring = parse_keys("ops:feedback+trusted=ops-secret-1,web:infer=web-secret-1", "X")
    assert [c.trusted for _, c in ring.untrusted().keys] == [False, False]
    assert ring.untrusted().identify("ops-secret-1").name == "ops" and ring.identify("ops-secret-1").trusted
