"""Redaction of secrets and personal data: the targets on the labelled set, and masking or
dropping whole examples."""

from __future__ import annotations

import json

import pytest

from tasks.feedback.redact import redact_example, redact_examples, redact_text
from tasks.feedback.sensitive import find_sensitive, luhn_valid
from tests.support.redaction import labelled_cases, score

TARGET_RECALL = {"email": 0.99, "card": 0.99, "secret": 0.99, "phone": 0.95, "ip": 0.95, "iban": 0.99, "national_id": 0.95}
TARGET_PRECISION = 0.95


@pytest.fixture(scope="module")
def scores():
    return score(labelled_cases())


@pytest.mark.parametrize("category", sorted(TARGET_RECALL))
def test_targets_on_the_labelled_set(scores, category):
    assert scores.found[category] >= 200  # the set holds the category
    assert scores.recall(category) >= TARGET_RECALL[category], scores.table()
    assert scores.precision(category) >= TARGET_PRECISION, scores.table()


def test_the_scorer_counts_misses_and_false_positives():
    from tests.support.redaction import Case

    scored = score([Case("mail ann@example.com", (("email", "ann@example.com"),)),
                    Case("no phone here", (("phone", "phone"),)),  # a label the finder cannot match
                    Case("call +44 20 7946 0958 now")])  # an unlabelled phone number: a false positive
    assert (scored.found["email"], scored.missed["phone"], scored.false["phone"]) == (1, 1, 1)
    assert scored.recall("phone") == 0.0 and scored.precision("phone") == 0.0


def test_masks_each_category_with_its_placeholder():
    text = ("I'm ann.smith@example.com, +1 (415) 555-0134, card 4111 1111 1111 1111, "
            "host 10.0.0.7 / 2001:db8::8a2e:370:7334, key sk-proj-Abc123def456GHI789jkl012MNO345")
    masked, counts = redact_text(text)
    assert masked == "I'm [EMAIL], [PHONE], card [CARD], host [IP] / [IP], key [SECRET]"
    assert counts == {"email": 1, "phone": 1, "card": 1, "ip": 2, "secret": 1}



def test_an_apostrophe_inside_an_address_is_masked_with_it_and_quotes_around_one_are_not():
    masked, counts = redact_text("write to o'neil@example.co.uk or 'bo@example.org', it's urgent")
    assert masked == "write to [EMAIL] or '[EMAIL]', it's urgent" and counts == {"email": 2}

def test_hard_negatives_stay():
    for text in ["Convert this ISO date: 2006-02-20", "February 20, 2006", "upgrade v1.2.3 to version 2.10.4.1",
                 "order ORD-2024-000123 costs $1,299.00", "at 12:30:45 on 20.02.2006",
                 "4111 1111 1111 1112", "commit ba1e26b5d0c6a404ee2d4b7e648a0fea99a971b9"]:
        assert find_sensitive(text) == [], text


def test_luhn():
    assert luhn_valid("4111111111111111") and luhn_valid("378282246310005")
    assert not luhn_valid("4111111111111112")


def test_assignments_and_bearer_tokens_hide_only_the_value():
    assert redact_text("password: hunter2hunter")[0] == "password: [SECRET]"
    assert redact_text("Authorization: Bearer abc.def-ghi_jkl0123")[0] == "Authorization: Bearer [SECRET]"


def test_examples_are_masked_or_dropped():
    example = {"messages": [{"role": "user", "content": "my mail is bo@example.org"},
                            {"role": "assistant", "content": "Noted."}], "correction": True}
    masked = redact_example(example)
    assert masked.example["messages"][0]["content"] == "my mail is [EMAIL]" and masked.example["correction"]
    assert example["messages"][0]["content"] == "my mail is bo@example.org"  # not modified
    assert redact_example(example, "drop").example is None
    clean = {"messages": [{"role": "user", "content": "2006-02-20"}, {"role": "assistant", "content": "February 20, 2006"}]}
    kept, report = redact_examples([example, clean], "drop")
    assert kept == [clean]
    assert report == {"secret": 0, "email": 1, "iban": 0, "card": 0, "ip": 0, "national_id": 0, "phone": 0,
                      "examples_changed": 1, "examples_dropped": 1}


def test_tool_call_arguments_reasoning_and_tool_results_are_redacted_and_calls_stay_calls():
    """Every text a message holds reaches the redaction, not only its content: a call's
    arguments (inside their JSON, an argument called `name` included) and a reasoning trace."""
    import json

    call = {"id": "call_1", "type": "function", "function": {
        "name": "send_mail", "arguments": json.dumps({"to": "bob@example.org", "name": "ann@example.org",
                                                      "card": ["4111 1111 1111 1111"], "n": 3})}}
    example = {"messages": [
        {"role": "user", "content": "Mail Bob, pay with my card"},
        {"role": "assistant", "content": None, "tool_calls": [call],
         "reasoning_content": "Ann's address is ann@example.org."},
        {"role": "tool", "tool_call_id": "call_1", "content": "sent to bob@example.org"},
        {"role": "assistant", "content": "Done."}],
        "tools": [{"type": "function", "function": {"name": "send_mail", "description": "Send an e-mail.",
                                                    "parameters": {"type": "object"}}}]}
    result = redact_example(example)
    messages = result.example["messages"]
    called = messages[1]["tool_calls"][0]
    assert json.loads(called["function"]["arguments"]) == {"to": "[EMAIL]", "name": "[EMAIL]", "card": ["[CARD]"], "n": 3}
    assert (called["id"], called["function"]["name"]) == ("call_1", "send_mail")
    assert messages[1]["reasoning_content"] == "Ann's address is [EMAIL]."
    assert messages[2] == {"role": "tool", "tool_call_id": "call_1", "content": "sent to [EMAIL]"}
    assert result.found == {"email": 4, "card": 1} and result.example["tools"] == example["tools"]
    assert redact_example(example, "drop").example is None


def test_a_speakers_name_is_redacted_and_a_tool_messages_function_name_is_kept():
    """A message's `name` says who speaks, any string a client sends: an e-mail address there
    reaches training like content would. A tool message's `name` is the function's."""
    example = {"messages": [
        {"role": "system", "content": "Be brief.", "name": "ops"},
        {"role": "user", "content": "What is the date?", "name": "ann.smith@example.org"},
        {"role": "tool", "tool_call_id": "c1", "name": "get_date", "content": "2006-02-20"},
        {"role": "assistant", "content": "February 20, 2006.", "name": "bot"}]}
    result = redact_example(example)
    assert [m.get("name") for m in result.example["messages"]] == ["ops", "[EMAIL]", "get_date", "bot"]
    assert result.found == {"email": 1}


def test_numbers_in_call_arguments_and_values_named_by_their_keys_are_redacted():
    """A card or phone number in a call's arguments may be a JSON number, and digits that alone
    are no phone number are one under the key `phone`: both reached training unmasked."""
    import json

    arguments = {"card": 4111111111111111, "phone": 14155550134, "mobile": "07700900123", "password": "hunter22",
                 "contact": {"tel": 4155550134, "phone_number": "4155550135", "mobileNumber": 4155550136},
                 "api_key": "abcdefghij", "city": "Oslo", "amount": 444, "express": True, "n": 3}
    call = {"id": "call_1", "type": "function", "function": {"name": "charge", "arguments": json.dumps(arguments)}}
    example = {"messages": [{"role": "user", "content": "Charge my card."},
                            {"role": "assistant", "content": None, "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "call_1", "content": "done"},
                            {"role": "assistant", "content": "Done."}]}
    result = redact_example(example)
    masked = json.loads(result.example["messages"][1]["tool_calls"][0]["function"]["arguments"])
    assert masked == {"card": "[CARD]", "phone": "[PHONE]", "mobile": "[PHONE]", "password": "[SECRET]",
                      "contact": {"tel": "[PHONE]", "phone_number": "[PHONE]", "mobileNumber": "[PHONE]"},
                      "api_key": "[SECRET]", "city": "Oslo", "amount": 444, "express": True, "n": 3}
    assert result.found == {"card": 1, "phone": 5, "secret": 2}


@pytest.mark.parametrize(("text", "masked"), [
    ("DB_PASSWORD=hunter22xx", "DB_PASSWORD=[SECRET]"),  # the name ends an environment variable's
    ("export OPENAI_API_KEY=abcdefghijkl", "export OPENAI_API_KEY=[SECRET]"),
    ("mail josé.garcía@example.es today", "mail [EMAIL] today"),  # an address in another script
    ("ann\uff20example.com", "[EMAIL]"),  # the full-width at sign
    ("ann\u200b@example.com", "[EMAIL]"),  # a zero-width space before it
    ("ann\uff20example\uff0ecom", "[EMAIL]"),  # and a full-width dot in the domain
    ("call me at \uff14\uff11\uff15\uff0d\uff15\uff15\uff15\uff0d\uff10\uff11\uff13\uff14", "call me at [PHONE]"),  # full-width
    ("call 415\u2013555\u20130134", "call [PHONE]"),  # typeset en dashes
    ("+44\u202f20\u202f7946\u202f0958 or 06\u202f12\u202f34\u202f56\u202f78", "[PHONE] or [PHONE]"),  # narrow no-break spaces
    ("call \u0660\u0665\u0665\u0661\u0662\u0663\u0664\u0665\u0666\u0667", "call [PHONE]"),  # Arabic-Indic digits
    ("card \uff14\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11 \uff11\uff11\uff11\uff11", "card [CARD]"),
    ("host \uff11\uff19\uff12\uff0e\uff11\uff16\uff18\uff0e\uff11\uff0e\uff12\uff10 and 10\u30020\u30020\u30021", "host [IP] and [IP]"),
    ("years 1990\u20132000, p.\u00a012\u201315", "years 1990\u20132000, p.\u00a012\u201315"),  # folded, still not personal
    ("token_count: 123456", "token_count: 123456"),  # no secret's name
    ("a_" * 32768, "a_" * 32768),  # the name's prefix is read once, not from every underscore (quadratic: 45 s)
])
def test_secrets_named_in_variables_and_addresses_written_to_slip_past_are_masked(text, masked):
    assert redact_text(text)[0] == masked


@pytest.mark.parametrize(("text", "masked"), [
    ("Tel. 030/1234567", "Tel. [PHONE]"),  # a German area code of three digits before the slash
    ("(0)20 7946 0958", "[PHONE]"),
    ("My number is 4155550134, contact me at 4155550135 or text me 4155550136",
     "My number is [PHONE], contact me at [PHONE] or text me [PHONE]"),
    ("Telefon: 01711234567", "Telefon: [PHONE]"),
    ("recipient +4915112345678", "recipient [PHONE]"),  # a phone number, not a card, though its digits pass the Luhn check
    ("the text field says 12345678 items", "the text field says 12345678 items"),
    # words that name a phone elsewhere, before digits that are none
    ("Rewrite the text 20160318 in words; a handy table of 10 000 000 values; our number of users 1234567",
     "Rewrite the text 20160318 in words; a handy table of 10 000 000 values; our number of users 1234567"),
    ("postgres://app:Hunter2pass@db.internal/prod", "postgres://app:[SECRET]@db.internal/prod"),
    ("my password is hunter2! and the old password was x7!kq", "my password is [SECRET]! and the old password was [SECRET]"),
    ("The password is correct. Your password is incorrect. Your password was reset successfully.",
     "The password is correct. Your password is incorrect. Your password was reset successfully."),
    ("post to https://hooks.slack.com/services/T0123ABCD/B0123ABCD/abcdefghijklmnopqrstuvwx", "post to [SECRET]"),
    ("IBAN DE89 3704 0044 0532 0130 00, or GB29NWBK60161331926819", "IBAN [IBAN], or [IBAN]"),
    ("IBAN DE89 3704 0044 0532 0130 01", "IBAN DE89 3704 0044 0532 0130 01"),  # its check digits fail
    # as people type them: lower case, grouped by dashes; a word after one is not its last group
    ("iban de89 3704 0044 0532 0130 00 or de89370400440532013000", "iban [IBAN] or [IBAN]"),
    ("refund to DE89-3704-0044-0532-0130-00), or gb29 nwbk 6016 1331 9268 19", "refund to [IBAN]), or [IBAN]"),
    ("an ES91 2100 0418 4502 0005 1332 und danke, AT61 1904 3002 3457 3201 to me, BE68 5390 0754 7034 thanks",
     "an [IBAN] und danke, [IBAN] to me, [IBAN] thanks"),
    ("Order AB13-1352-7818-2638 shipped, https://git.example.com/ts38/repo/blob/main/test",
     "Order AB13-1352-7818-2638 shipped, https://git.example.com/ts38/repo/blob/main/test"),
    # an international number glued to the word that says it is one; a sum, code or version is none
    ("Tel.+33 6 12 34 56 78 or phone:+33612345678", "Tel.[PHONE] or phone:[PHONE]"),
    ("v1.2+3 build, 3+4=7, node.+12345 pending, range(n+1000000), base+1048576, 2.0.0-beta+20240318120000",
     "v1.2+3 build, 3+4=7, node.+12345 pending, range(n+1000000), base+1048576, 2.0.0-beta+20240318120000"),
    ("card 4111.1111.1111.1111", "card [CARD]"),
    ("SSN 123-45-6789, my SSN: 123456789, NI number AB 12 34 56 C", "SSN [NATIONAL_ID], my SSN: [NATIONAL_ID], NI number [NATIONAL_ID]"),
    ("ISBN 978-3-16-148410-0, part 666-12-3456, order 123-45-6789x", "ISBN 978-3-16-148410-0, part 666-12-3456, order 123-45-6789x"),
])
def test_forms_people_write_bank_accounts_and_identity_numbers_are_masked(text, masked):
    assert redact_text(text)[0] == masked


def test_tool_descriptions_are_redacted_and_the_schemas_kept():
    """Any client of the service declares tools: a description may name a person; names, types
    and the rest of the schema stay, so calls still validate against it."""
    tools = [{"type": "function", "function": {
        "name": "escalate", "description": "Mail the case to joe.support@corp.example or call +1 415 555 0199.",
        "parameters": {"type": "object", "properties": {"case": {"type": "string", "title": "Case of ann@example.org",
                                                                 "pattern": "^[A-Z]{2}-[0-9]+$"}}}}}]
    example = {"messages": [{"role": "user", "content": "Escalate it."}, {"role": "assistant", "content": "Done."}],
               "tools": tools}
    result = redact_example(example)
    function = result.example["tools"][0]["function"]
    assert function["description"] == "Mail the case to [EMAIL] or call [PHONE]."
    assert function["parameters"]["properties"]["case"] == {"type": "string", "title": "Case of [EMAIL]",
                                                            "pattern": "^[A-Z]{2}-[0-9]+$"}
    assert function["name"] == "escalate" and result.found == {"email": 2, "phone": 1}
    assert example["tools"][0]["function"]["description"].startswith("Mail the case to joe")  # not modified


def test_values_a_tool_schema_holds_are_redacted_as_its_calls_are_so_calls_still_validate():
    from tasks.data.checks import check_tools

    tools = [{"type": "function", "function": {"name": "notify", "description": "Notify someone.", "parameters": {
        "type": "object", "properties": {
            "to": {"type": "string", "enum": ["jane.doe@example.com", "ops"], "default": "jane.doe@example.com"},
            "phone": {"type": "string", "examples": ["+44 20 7946 0958"]},
            "mobile": {"type": "string", "enum": ["4155550134"], "default": "4155550134"}},
        "required": ["to"]}}}]
    call = {"id": "call_1", "type": "function", "function": {"name": "notify", "arguments": '{"to": "jane.doe@example.com", "mobile": "4155550134"}'}}
    example = {"messages": [{"role": "user", "content": "Tell Jane."}, {"role": "assistant", "content": None, "tool_calls": [call]}],
               "tools": tools}
    result = redact_example(example)
    properties = result.example["tools"][0]["function"]["parameters"]["properties"]
    assert properties["to"] == {"type": "string", "enum": ["[EMAIL]", "ops"], "default": "[EMAIL]"}
    assert properties["phone"] == {"type": "string", "examples": ["[PHONE]"]}
    # digits a phone only by their property's name, as an argument of that name is read
    assert properties["mobile"] == {"type": "string", "enum": ["[PHONE]"], "default": "[PHONE]"}
    arguments = json.loads(result.example["messages"][1]["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"to": "[EMAIL]", "mobile": "[PHONE]"} and check_tools(result.example) == {}  # still valid
    assert result.found == {"email": 3, "phone": 4}


def test_json_the_user_wrote_is_redacted_by_its_keys_wherever_it_is():
    """A tool result or a message that is JSON, keys nested or plural, a key that is itself an
    address, a card number written as a float, an escaped `@`: all reached training unmasked."""
    import json

    result = '{"name": "Ann", "phone_number": "4155550136", "email": "bob\\u0040corp.example"}'
    arguments = {"phone": {"number": "4155550134"}, "phones": ["4155550135"], "cc": {"ann@example.org": "Ann"},
                 "card": 5555555555554444.0, "total": 12.5}
    call = {"id": "call_1", "type": "function", "function": {"name": "mail", "arguments": json.dumps(arguments)}}
    example = {"messages": [{"role": "user", "content": "Mail Ann."},
                            {"role": "assistant", "content": None, "tool_calls": [call]},
                            {"role": "tool", "tool_call_id": "call_1", "content": result},
                            {"role": "assistant", "content": "Done."}]}
    redacted = redact_example(example).example["messages"]
    assert json.loads(redacted[1]["tool_calls"][0]["function"]["arguments"]) == {
        "phone": {"number": "[PHONE]"}, "phones": ["[PHONE]"], "cc": {"[EMAIL]": "Ann"}, "card": "[CARD]", "total": 12.5}
    assert json.loads(redacted[2]["content"]) == {"name": "Ann", "phone_number": "[PHONE]", "email": "[EMAIL]"}
    plain = {"messages": [{"role": "user", "content": "{not json, 4155550136"}, {"role": "assistant", "content": "Ok."}]}
    assert redact_example(plain).example == plain  # text that only looks like JSON is text


@pytest.mark.parametrize(("arguments", "masked"), [
    ({"to": "4155550134", "channel": "sms"}, {"to": "[PHONE]", "channel": "sms"}),
    ({"recipient": "4155550134", "via": "WhatsApp"}, {"recipient": "[PHONE]", "via": "WhatsApp"}),
    ({"sms": True, "to": "4155550134"}, {"sms": True, "to": "[PHONE]"}),
    ({"contact": {"kind": "mobile", "value": "4155550134"}}, {"contact": {"kind": "mobile", "value": "[PHONE]"}}),
    # a JSON number beside them is a count, and an object with no such word is left alone
    ({"to": "4155550134", "channel": "sms", "count": 1234567}, {"to": "[PHONE]", "channel": "sms", "count": 1234567}),
    ({"sku": "4155550134", "qty": 3, "note": "gift"}, {"sku": "4155550134", "qty": 3, "note": "gift"}),
    # a key that says what its value is keeps it, whatever the others say
    ({"order_id": "4155550134", "notify": "sms"}, {"order_id": "4155550134", "notify": "sms"}),
    ({"amount": "4155550134", "method": "phone"}, {"amount": "4155550134", "method": "phone"}),
])
def test_a_value_is_read_with_what_the_other_entries_of_its_object_say(arguments, masked):
    """`{"to": "4155550134", "channel": "sms"}` kept the number: only the value's own key was read."""
    import json

    from tasks.feedback.redact import _redact_value

    assert json.loads(_redact_value(json.dumps(arguments), "arguments")[0]) == masked


@pytest.mark.parametrize(("text", "masked"), [
    ("PGPASSWORD=s3cretpass99 psql -h db", "PGPASSWORD=[SECRET] psql -h db"),
    ("DB_PASS=hunter22xx", "DB_PASS=[SECRET]"),
    ("my phone_number is 4155550137", "my phone_number is [PHONE]"),
    ("boarding pass: AB12CD34", "boarding pass: AB12CD34"),  # `pass` alone names no secret
    ("the cellar 4155550134", "the cellar 4155550134"),  # nor does a word that begins like one
])
def test_secret_and_phone_names_in_their_usual_compounds(text, masked):
    assert redact_text(text)[0] == masked


def test_key_context_is_the_values_own_key_and_plurals_in_prose_name_no_phone():
    """Every ancestor key as context made dates and counts under `call` or `phone` into phone
    numbers; "calls: 1234567" in a sentence is a count."""
    import json

    from tasks.feedback.redact import _redact_value

    kept = {"call": {"date": "2024-01-05", "started": 1700000000}, "phones": [{"sku": 1234567}],
            "phone": {"price_cents": 6990000}, "mobile": {"build": 20240105}}
    assert _redact_value(json.dumps(kept), "arguments") == (json.dumps(kept), {})
    for text in ("Total API calls: 1234567 this month", "phones sold: 2500000", "We logged 3 calls, ticket 12345678"):
        assert redact_text(text) == (text, {})
    # JSON arguments that are not an object are still read as JSON
    assert _redact_value('"ann\\u0040example.org"', "arguments")[0] == '"[EMAIL]"'


def test_json_nested_past_the_walk_is_redacted_as_text_not_a_crash():
    """The parser reads deeper than the walk over what it read can go: a message nested in
    between crashed the export and the review page. Every depth up to past the parser's is tried."""
    for depth in range(700, 1100, 5):
        example = {"messages": [{"role": "user", "content": "[" * depth + '"ann@example.org"' + "]" * depth},
                                {"role": "assistant", "content": "Ok."}]}
        result = redact_example(example)
        assert result.found == {"email": 1} and "[EMAIL]" in result.example["messages"][0]["content"], depth
