"""Settings: params.yaml is the user's file (it validates and names every key, whatever its values),
errors and contradictions name the key and its line, `params --check/--write` work on a user's
file, and dvc.yaml only uses real keys. Tests read the models' defaults, never the committed values."""

from __future__ import annotations

import pytest
import yaml

from tasks.config import (
    RESOLVED_ONLY,
    RUN_FILLED,
    Params,
    check_params,
    key_lines,
    load_params,
    parse_overrides,
    render_params,
    write_params,
    write_resolved,
)
from tasks.errors import ConfigError
from tests.support.project import REPO


def test_the_committed_params_yaml_validates_and_names_every_key():
    """Whatever values the user gave it: only unknown keys, bad values or a missing key fail here."""
    load_params(REPO / "params.yaml")
    found = check_params(REPO / "params.yaml")
    assert not found.errors, found.errors
    assert not found.missing, f"params.yaml lacks keys; run `ftllm params --write params.yaml`: {found.missing}"


def test_overrides_apply_and_parse_yaml_scalars():
    params = load_params(None, parse_overrides(["train.max_steps=7", "train.packing=false"]))
    assert params.train.max_steps == 7 and params.train.packing is False


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"train.max_steps": 0}, "train.max_steps"),
        ({"train.method": "dora"}, "train.method"),
        ({"train.learnin_rate": 0.1}, "train.learnin_rate: unknown key"),
        ({"gate.min_exact_match": "high"}, "gate.min_exact_match"),
        ({"train.trainable_precision": "bf16", "train.method": "full"}, "train.trainable_precision=bf16 is for train.method=lora"),
        ({"train.trainable_precision": "bf16", "train.precision": "fp32"}, "needs train.precision bf16"),
        ({"train.compile": True, "train.distributed": "fsdp", "train.num_processes": 2}, "train.compile is not supported"),
        # true is no number: pydantic would read it as 1 (a one-step run)
        ({"train.max_steps": True}, "train.max_steps: true is a boolean; give a number"),
        ({"gate.min_exact_match": False}, "gate.min_exact_match: false is a boolean"),
        ({"train.warmup_steps": 5000, "train.max_steps": 10}, r"warmup_steps \(5000\) is more than train.max_steps \(10\)"),
        ({"schedule.cron": "not a cron"}, "schedule.cron: Invalid cron string: \"not a cron\""),
        ({"monitor.cron": "99 99 * * *"}, "monitor.cron: Invalid cron string"),
        ({"schedule.cron": "*/0 * * * *"}, "schedule.cron: Invalid cron string"),
        ({"schedule.timezone": "Mars/Olympus"}, "schedule.timezone: 'Mars/Olympus' is not an IANA time zone"),
    ],
)
def test_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_params(None, override)


def test_a_contradiction_a_set_gave_is_said_of_the_set_not_of_the_file():
    with pytest.raises(ConfigError, match=r"^--set model.tiny_hidden_size: model.tiny_hidden_size \(130\) must be a multiple"):
        load_params(REPO / "params.yaml", {"model.tiny_hidden_size": 130})


@pytest.mark.parametrize("cron", ["0 3 * * 1", "@daily", "*/15 * * * *", "0 3 * * mon-fri", "0 3 1-31/2 JAN,FEB *",
                                  "0 0 L * *", "0 3 * * 1#2", "0-30/5 9-17 * * *", "0 3 * * * *"])
def test_cron_expressions_prefect_reads_are_accepted(cron):
    from prefect.client.schemas.schedules import CronSchedule

    CronSchedule(cron=cron, timezone="Europe/Oslo")  # what `ftllm deploy` builds from the setting
    assert load_params(None, {"schedule.cron": cron, "monitor.cron": cron, "schedule.timezone": "Europe/Oslo"})


def test_unknown_section_and_malformed_set_are_refused():
    with pytest.raises(ConfigError, match="section.key"):
        load_params(None, {"nosuch.key": 1})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["train.max_steps"])


def test_the_service_reads_its_sections_and_ignores_settings_it_does_not_know(tmp_path):
    """A bento built from older code serves a project whose params.yaml has newer pipeline settings.

    In a process of its own: the service module binds its settings and model when imported,
    and the serving tests import it in this session with theirs.
    """
    import json
    import os
    import subprocess
    import sys

    settings = yaml.safe_load(render_params())
    settings["workers"]["added_after_the_bento_was_built"] = 1
    settings["serving"]["max_tokens"] = 77
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(settings))
    with pytest.raises(ConfigError, match="workers.added_after_the_bento_was_built"):
        load_params(path)  # the pipeline still refuses a key it does not know
    typo = tmp_path / "typo.yaml"
    settings["serving"]["max_tokenz"] = 5  # a typo in what the service does read is still refused
    typo.write_text(yaml.safe_dump(settings))
    code = (
        "import json, os, serving.service as s\n"
        "from tasks.errors import ConfigError\n"
        "read = s.load_settings().serving.max_tokens\n"
        "overridden = s.load_settings().serving.max_concurrency\n"
        f"os.environ['FTLLM_PARAMS'] = {str(typo)!r}\n"
        "try:\n    s.load_settings()\n    refused = ''\nexcept ConfigError as e:\n    refused = str(e)\n"
        "print(json.dumps({'read': read, 'overridden': overridden, 'refused': refused}))\n"
    )
    # `ftllm serve --set` hands its overrides to the service in FTLLM_OVERRIDES.
    env = {**os.environ, "FTLLM_PARAMS": str(path), "PYTHONPATH": str(REPO),
           "FTLLM_OVERRIDES": json.dumps({"serving.max_concurrency": 9})}
    env.pop("FTLLM_BENTO_MODEL", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["read"] == 77 and result["overridden"] == 9
    assert "serving.max_tokenz" in result["refused"]


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    """The parser's message spans six lines with carets; the error names the file's line and column."""
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  max_steps: 10\n  lora_target_modules: [q_proj, v_proj\nmodel:\n  base: tiny\n")
    with pytest.raises(ConfigError) as err:
        load_params(bad)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{bad}:4:6: not valid YAML: expected ',' or ']'")
    assert "opened on line 3" in message
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model:\n  base: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_params(latin)


def test_a_section_or_key_given_twice_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys: a second `train:` at the end of the file dropped
    every setting of the first (`max_steps: 50` ran 300 steps), and `params --write` saved that."""
    twice = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    twice.write_text(text + "train:\n  lora_r: 4\n")
    first = key_lines(text)[("train",)]
    last = len(text.splitlines()) + 1
    with pytest.raises(ConfigError, match=rf"params.yaml:{last}: train is given twice \(lines {first} and {last}\)"):
        load_params(twice)
    twice.write_text("data:\n  path: a.jsonl\n  path: b.jsonl\n")
    with pytest.raises(ConfigError, match=r"params.yaml:3: data.path is given twice \(lines 2 and 3\)"):
        load_params(twice)
    with pytest.raises(ConfigError, match="given twice"):
        write_params(twice)


def test_resolved_params_carry_data_md5_and_reload(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("{}\n")
    out = write_resolved(load_params(None, {"data.path": "d.jsonl"}), tmp_path / "p.yaml")
    resolved = load_params(out)
    assert resolved.data.md5 and len(resolved.data.md5) == 32


def all_fields():
    for section, info in Params.model_fields.items():
        for key, field in info.annotation.model_fields.items():
            yield section, key, field


def test_every_setting_has_a_description():
    missing = [f"{section}.{key}" for section, key, field in all_fields() if not (field.description or "").strip()]
    assert not missing, f"add a description to these fields in tasks/config.py: {missing}"


def comments_by_key(text: str) -> dict[tuple[str, str], str]:
    """Each setting's comment in a params.yaml, continuation lines joined."""
    out: dict[tuple[str, str], str] = {}
    section = key = ""
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.rstrip(":")
            continue
        body, _, comment = line.partition(" # ")
        if body.strip():
            key = body.split(":")[0].strip()
            out[(section, key)] = comment.strip()
        else:
            out[(section, key)] += " " + comment.strip()
    return out


def test_the_rendered_file_holds_every_default_and_description():
    text = render_params()
    raw, comments = yaml.safe_load(text), comments_by_key(text)
    assert Params.model_validate(raw) == Params()
    for section, key, field in all_fields():
        if (section, key) in RESOLVED_ONLY | RUN_FILLED:
            assert key not in raw[section], f"{section}.{key} is filled in by the run or its resolve stage"
            continue
        assert raw[section][key] == field.default, f"{section}.{key}"
        assert comments[(section, key)] == field.description, f"{section}.{key}"


def test_a_bad_value_an_unknown_key_and_a_contradiction_are_named_with_their_lines(tmp_path):
    path = tmp_path / "params.yaml"
    text = render_params().replace("  learning_rate: 0.004 ", "  learning_rate: 7     ")
    text = text.replace("  lora_r: 16 ", "  lora_rr: 16")
    path.write_text(text)
    number = {}  # the first line of each key: preference.learning_rate comes after train's
    for n, line in reversed(list(enumerate(text.splitlines(), 1))):
        number.update({key: n for key in ("learning_rate", "lora_rr") if line.startswith(f"  {key}:")})
    found = check_params(path)
    assert f"{path}:{number['learning_rate']}: train.learning_rate: Input should be less than or equal to 1" in found.errors
    assert any(e.startswith(f"{path}:{number['lora_rr']}: train.lora_rr: unknown key") for e in found.errors)
    assert "train.lora_r (default: 16)" in found.missing
    with pytest.raises(ConfigError, match=rf"params.yaml:{number['learning_rate']}: train.learning_rate"):
        load_params(path)

    contradiction = tmp_path / "short.yaml"
    contradiction.write_text(render_params().replace("  seq_len: 256 ", "  seq_len: 64  "))
    line = key_lines(contradiction.read_text())[("data", "max_tokens")]
    (error,) = check_params(contradiction).errors
    assert error.startswith(f"{contradiction}:{line}: data.max_tokens: data.max_tokens=128 is longer than "
                            "train.seq_len=64")
    with pytest.raises(ConfigError, match="--set data.max_tokens: data.max_tokens=999 is longer"):
        load_params(None, {"data.max_tokens": 999})
    scalar = tmp_path / "scalar.yaml"  # a section written as a value: said without the code's class names
    scalar.write_text("train: 5\n")
    assert check_params(scalar).errors == [f"{scalar}:1: train: a section of keys (indented `key: value` lines under it), not 5"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"train.seq_len": 64}, "data.max_tokens=128 is longer than train.seq_len=64"),
        ({"monitor.min_ratings": 300}, "monitor.min_ratings=300 is more than monitor.window=200"),
        ({"data.sources": [{"path": "other.jsonl"}]}, "data.path 'data/dates.jsonl' and data.sources"),
    ],
)
def test_contradictions_are_validators_of_the_settings(override, fragment, tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(render_params())
    with pytest.raises(ConfigError, match=fragment):
        load_params(path, override)
    assert Params.model_validate({}) == Params()  # the defaults agree with each other


def test_the_check_lists_what_differs_from_the_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    text = render_params().replace("  max_steps: 300 ", "  max_steps: 100 ").replace("  active: false", "  active: true ", 1)
    path.write_text(text)
    lines = key_lines(text)
    found = check_params(path)
    assert not found.errors and not found.missing
    assert found.differences == [f"{path}:{lines[('train', 'max_steps')]}: train.max_steps: 100 (default: 300)",
                                 f"{path}:{lines[('schedule', 'active')]}: schedule.active: true (default: false)"]


def test_write_keeps_the_users_values_adds_new_keys_and_refreshes_comments(tmp_path):
    path = tmp_path / "params.yaml"
    text = render_params().replace("  max_steps: 300 ", "  max_steps: 100 ")
    text = text.replace("Peak learning rate", "my old comment")
    text = "\n".join(line for line in text.splitlines() if not line.startswith("  lora_r:")) + "\n"
    text = text.replace("  sources: []", "  sources:\n  - {path: data/dates.jsonl}\n  - feedback: true")
    path.write_text(text)
    write_params(path)
    written = path.read_text()
    assert load_params(path).train.max_steps == 100
    assert [s.feedback for s in load_params(path).data.sources] == [False, True]
    assert "  lora_r: 16 " in written and "my old comment" not in written and "Peak learning rate" in written
    assert not check_params(path).missing
    expected = render_params({"train": {"max_steps": 100},
                              "data": {"sources": [{"path": "data/dates.jsonl"}, {"feedback": True}]}})
    assert written == expected
    path.write_text(written.replace("\nworkers:\n", "\nworkers:\n  gpu_pool: a100\n", 1))
    with pytest.raises(ConfigError, match=r"unknown keys would be lost .*workers.gpu_pool"):
        write_params(path)
    fresh = tmp_path / "new.yaml"
    write_params(fresh)
    assert fresh.read_text() == render_params()


def test_every_dvc_param_names_a_real_key():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    fields = Params.model_fields
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            for keys in entry.values():
                for key in keys:
                    section, _, field = key.partition(".")
                    assert section in fields, f"{name}: {key}"
                    if field:
                        assert field in fields[section].annotation.model_fields, f"{name}: {key}"


def test_every_dvc_param_exists_in_the_resolved_settings_and_validates(tmp_path, monkeypatch):
    """The stages read artifacts/params.yaml (written by resolve): every key they name is there."""
    monkeypatch.chdir(REPO)
    resolved = write_resolved(load_params(None), tmp_path / "params.yaml")
    load_params(resolved)  # what the stages will validate
    doc = yaml.safe_load(resolved.read_text())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    named = [key for stage in stages.values() for entry in stage.get("params", []) for keys in entry.values()
             for key in keys]
    assert named, "dvc.yaml names no params"
    for key in named:
        node = doc
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml names {key}; the resolved settings lack it"
            node = node[part]


def test_resolved_params_carry_the_chat_template_files_md5(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    params = load_params(None, {"model.chat_template": str(template)})
    first = load_params(write_resolved(params, tmp_path / "p.yaml")).model.chat_template_md5
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    second = load_params(write_resolved(params, tmp_path / "p.yaml")).model.chat_template_md5
    assert first and second and first != second  # same path, new file: the model section changes for DVC
    assert load_params(write_resolved(load_params(None), tmp_path / "q.yaml")).model.chat_template_md5 is None


def test_a_runs_settings_handed_to_the_stages_survive_params_yaml(tmp_path):
    """The overrides a run gives its DVC stages rebuild its settings from any other file (`--params FILE`)."""
    from tasks.config import as_overrides, render_params

    (tmp_path / "params.yaml").write_text(render_params())
    other = yaml.safe_load(render_params())
    other["train"]["max_steps"], other["train"]["seed"] = 37, 5
    other["data"]["sources"] = [{"path": "data/dates.jsonl"}, {"path": "extra.jsonl", "weight": 2}]
    (tmp_path / "file.yaml").write_text(yaml.safe_dump(other))
    run = load_params(tmp_path / "file.yaml", {"eval.max_examples": 9})
    resolved = load_params(tmp_path / "params.yaml", as_overrides(run))
    assert resolved == run and resolved.digest() == run.digest()
    assert (resolved.train.max_steps, resolved.eval.max_examples, resolved.data.sources[1].path) == (37, 9, "extra.jsonl")


def test_a_warm_starts_champion_folder_reaches_the_stages_and_its_md5_is_the_resolve_stages(tmp_path):
    from tasks.config import TrainParams, as_overrides
    from tasks.files import file_md5

    adapter = tmp_path / "champion" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    params = Params(train=TrainParams(init_from="champion", init_path=str(tmp_path / "champion"), init_md5="stale"))
    overrides = as_overrides(params)
    assert overrides["train.init_path"] == str(tmp_path / "champion") and "train.init_md5" not in overrides
    resolved = yaml.safe_load(write_resolved(load_params(REPO / "params.yaml", overrides), tmp_path / "p.yaml").read_text())
    assert resolved["train"]["init_md5"] == file_md5(adapter / "adapter_model.safetensors")
    assert load_params(REPO / "params.yaml").train.init_path is None  # never in params.yaml


def test_the_model_digest_leaves_out_the_sections_around_the_model_and_keeps_what_scores_and_gates_it():
    """A run that changed only `schedule.timezone` registered a new version of the same model."""
    base = load_params(None)
    around = {"schedule.timezone": "Europe/Oslo", "monitor.window": 50, "workers.train_start_timeout_seconds": 60}
    for key, value in around.items():
        changed = load_params(None, {key: value})
        assert changed.model_digest() == base.model_digest(), key
        assert changed.digest() != base.digest(), key  # still recorded whole with the version
    for key, value in {"gate.min_exact_match": 0.5, "eval.max_examples": 12, "train.seed": 7,
                       "registry.auto_promote": False, "preference.beta": 0.2,
                       "serving.max_batch": 4, "feedback.retention_days": 30}.items():  # in the bento's params.yaml
        assert load_params(None, {key: value}).model_digest() != base.model_digest(), key
