"""The command line's contract: exit codes and the JSON last line."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid

import pytest
import yaml
from typer.testing import CliRunner

from ftllm.cli import app
from tasks.config import key_lines, render_params
from tests.support.project import REPO


@pytest.fixture()
def params(tmp_path, monkeypatch):
    """A settings file with a registered-model name of its own."""
    monkeypatch.setenv("FTLLM_ROOT", str(tmp_path))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    text = render_params().replace("model_name: ftllm-chat", f"model_name: cli-{uuid.uuid4().hex[:8]}")
    (tmp_path / "params.yaml").write_text(text)
    return tmp_path / "params.yaml"


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def test_models_of_an_empty_registry(params):
    result = CliRunner().invoke(app, ["models", "--json", "--params", str(params)])
    assert result.exit_code == 0
    assert last_json(result.stdout)["versions"] == []


def test_promote_and_rollback_refuse_with_reason(params):
    promote = CliRunner().invoke(app, ["promote", "99", "--json", "--params", str(params)])
    assert promote.exit_code == 1
    assert "no version '99'" in last_json(promote.stdout)["error"]
    rollback = CliRunner().invoke(app, ["rollback", "--json", "--params", str(params)])
    assert rollback.exit_code == 1
    assert "no champion" in last_json(rollback.stdout)["error"]


@pytest.mark.parametrize("bad", ["train.max_steps=0", "train.nosuchkey=1", "nokeyvalue"])
def test_run_with_bad_settings_is_a_usage_error_with_a_result_on_stdout(params, bad):
    """A failed run still ends stdout with a RunResult; the error itself is one line on stderr."""
    import jsonschema

    from tasks.pipeline.result import RunResult

    result = CliRunner().invoke(app, ["run", "--params", str(params), "--set", bad, "--json"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr and "error:" not in result.stdout
    doc = last_json(result.stdout)
    jsonschema.validate(doc, RunResult.model_json_schema(mode="serialization"))
    assert doc["status"] == "failed" and doc["error"] in result.stderr and doc["version"] is None
    assert doc["exit_code"] == 2  # what the process exits with, in the result too


def test_run_with_a_settings_file_outside_a_project_says_so_and_writes_nothing_there(tmp_path):
    """The file's folder is the project a run works in: one elsewhere read its data paths from
    there ("data file not found") after making artifacts/ and .dvc/ beside it."""
    settings = tmp_path / "good.yaml"
    settings.write_text((REPO / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["run", "--params", str(settings)])
    assert result.exit_code == 2 and "its folder has no dvc.yaml" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.yaml"]


def test_run_with_a_missing_settings_file_names_it(tmp_path):
    result = CliRunner().invoke(app, ["run", "--params", str(tmp_path / "absent.yaml"), "--json"])
    assert result.exit_code == 2
    assert "absent.yaml: settings file not found" in result.stderr
    from tasks.pipeline.result import RunResult

    assert RunResult.model_validate_json(result.stdout.strip().splitlines()[-1]).status == "failed"


def test_params_check_names_each_error_with_its_line_and_lists_the_differences(tmp_path):
    path = tmp_path / "params.yaml"
    text = render_params().replace("  max_steps: 300 ", "  max_steps: 100 ")
    path.write_text(text)
    lines = key_lines(text)
    ok = CliRunner().invoke(app, ["params", "--check", str(path)])
    assert ok.exit_code == 0 and ok.stdout == ""
    assert f"{path}:{lines[('train', 'max_steps')]}: train.max_steps: 100 (default: 300)" in ok.stderr
    assert "valid (1 value differs from the defaults)" in ok.stderr

    path.write_text(text.replace("  lora_r: 16 ", "  lora_r: 0  ").replace("  seed: 42 ", "  sead: 42 "))
    bad = CliRunner().invoke(app, ["params", "--check", str(path)])
    assert bad.exit_code == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert f"error: {path}:{lines[('train', 'lora_r')]}: train.lora_r: Input should be greater than or equal to 1" in bad.stderr
    assert f"{path}:{lines[('train', 'seed')]}: train.sead: unknown key" in bad.stderr
    assert "train.seed (default: 42)" in bad.stderr  # the key the typo left out, as information

    path.write_text(text.replace("  seq_len: 256 ", "  seq_len: 64  "))
    contradiction = CliRunner().invoke(app, ["params", "--check", str(path)])
    assert contradiction.exit_code == 2
    assert f"{path}:{lines[('data', 'max_tokens')]}: data.max_tokens: data.max_tokens=128 is longer than train.seq_len=64" \
        in contradiction.stderr


def test_params_write_keeps_the_values_and_adds_the_missing_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  max_steps: 100  # mine\nschedule:\n  active: true\n")
    assert CliRunner().invoke(app, ["params", "--write", str(path)]).exit_code == 0
    assert path.read_text() == render_params({"train": {"max_steps": 100}, "schedule": {"active": True}})
    checked = CliRunner().invoke(app, ["params", "--check", str(path)])
    assert checked.exit_code == 0 and "not in the file" not in checked.stderr
    assert "(2 values differ from the defaults)" in checked.stderr
    # a wrong value is kept as it was, and said: `wrote` and exit 0 left the user thinking it was fine
    path.write_text("train:\n  max_steps: lots\n")
    written = CliRunner().invoke(app, ["params", "--write", str(path)])
    assert written.exit_code == 2 and f"{path}: written with its values kept, but they do not validate" in written.stderr
    assert "train.max_steps: Input should be a valid integer" in written.stderr and "max_steps: lots" in path.read_text()


def test_params_prints_the_defaults():
    result = CliRunner().invoke(app, ["params"])
    assert result.exit_code == 0 and result.stdout == render_params()


# Every command that reads settings takes --set the same way; a contradiction it makes is exit 2, named.
SETTINGS_COMMANDS = [["run"], ["validate", "data.jsonl"], ["models"], ["promote", "1"], ["rollback"], ["deploy"],
                     ["serve"]]


@pytest.mark.parametrize("command", SETTINGS_COMMANDS, ids=lambda c: c[0])
def test_every_command_that_reads_settings_takes_set(command, params, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # deploy reads its settings first
    monkeypatch.delenv("FTLLM_PARAMS", raising=False)
    monkeypatch.chdir(params.parent)
    (params.parent / "data.jsonl").write_text("")
    result = CliRunner().invoke(app, [*command, "--set", "train.seq_len=64"])
    assert result.exit_code == 2, result.output
    assert "error: --set train.seq_len: data.max_tokens=128 is longer than train.seq_len=64" in result.stderr
    assert "Traceback" not in result.stderr
    typo = CliRunner().invoke(app, [*command, "--set", "train.max_stepz=1"])
    assert typo.exit_code == 2 and "--set train.max_stepz: unknown key" in typo.stderr


def test_set_changes_what_the_command_reads(params):
    name = f"cli-{uuid.uuid4().hex[:8]}"
    result = CliRunner().invoke(app, ["models", "--json", "--params", str(params), "--set", f"registry.model_name={name}"])
    assert result.exit_code == 0 and last_json(result.stdout)["model_name"] == name


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["deploy"], 2, "PREFECT_API_URL"),
        (["models", "--params", "absent.yaml"], 2, "absent.yaml: settings file not found"),
        (["validate", "absent.jsonl"], 2, "absent.jsonl"),
        (["serve", "--port", "0"], 2, "--port 0"),
        (["serve", "--params", "absent.yaml"], 2, "--params absent.yaml: no such settings file"),
        (["bench", "serve", "--requests", "0"], 2, "must be positive"),
        (["feedback", "approve", "--all", "--up-to", "-5"], 2, "--up-to -5: expected a feedback id"),
    ],
)
def test_expected_failures_are_one_line_on_stderr(args, code, fragment, monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and fragment in lines[-1]
    assert "Traceback" not in result.stderr and "error" not in result.stdout


def test_output_paths_it_cannot_write_are_one_line_and_leave_no_temporary_file(monkeypatch, tmp_path):
    """A folder or an unwritable place for --report, --fix or an export, and --fix onto the file
    being validated (which would keep only its valid lines), fail in one line, exit 2."""
    import json as _json

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text(_json.dumps({"messages": [{"role": "user", "content": "2006-02-20"},
                                               {"role": "assistant", "content": "February 20, 2006"}]}) + "\n")
    (tmp_path / "out").mkdir()
    cases = [(["validate", "d.jsonl", "--report", "out"], "out: a folder; give the path of a file to write"),
             (["validate", "d.jsonl", "--fix", "out"], "out: a folder"),
             (["validate", "d.jsonl", "--fix", "/proc/nope/x.jsonl"], "/proc/nope/x.jsonl: cannot be written"),
             (["validate", "d.jsonl", "--fix", "./d.jsonl"], "that is the file being validated"),
             (["validate", "d.jsonl", "--report", "d.jsonl"], "would overwrite the data it is about"),
             (["validate", "d.jsonl", "--fix", "d.jsonl/x.jsonl"], "d.jsonl/x.jsonl: cannot be written"),
             (["validate", "d.jsonl", "--report", "d.jsonl/r.json"], "d.jsonl/r.json: cannot be written")]
    for args, fragment in cases:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and fragment in result.stderr.strip().splitlines()[-1], (args, result.output)
        assert "Traceback" not in result.stderr
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name] and list((tmp_path / "out").iterdir()) == []
    assert len(data.read_text().splitlines()) == 1


def test_a_hangup_during_a_run_stops_it_as_ctrl_c_does(params, monkeypatch):
    """A closed terminal sends SIGHUP, whose default killed `ftllm run` at once, its temporary
    Prefect server left behind (tests/e2e/test_interrupt.py stops a real run with SIGTERM, the
    same handler)."""
    from types import SimpleNamespace

    import flows.retrain

    def hung_up(**_):
        os.kill(os.getpid(), signal.SIGHUP)  # as the terminal closes mid-run
        pytest.fail("the run went on after the hangup")

    monkeypatch.setattr(flows.retrain, "retrain", lambda **kw: SimpleNamespace(result=lambda **_: hung_up()))
    before = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM)}
    try:
        result = CliRunner().invoke(app, ["run", "--params", str(params), "--json"])
    finally:
        for stop, handler in before.items():
            signal.signal(stop, handler)
    assert result.exit_code == 130 and "interrupted" in result.stderr, result.output
    assert last_json(result.stdout) == {"error": "interrupted", "exit_code": 130}


@pytest.mark.parametrize(("status", "code"), [("promoted", 0), ("rejected", 3)])
def test_a_finished_runs_json_carries_the_exit_code_the_process_exits_with(params, monkeypatch, status, code):
    """A rejected `ftllm run --json` exited 3 and printed `exit_code: null`."""
    from types import SimpleNamespace

    import flows.retrain
    from tasks.pipeline.result import RunResult

    finished = RunResult(status=status, model_name="m", version="2", champion_version="1")
    monkeypatch.setattr(flows.retrain, "retrain", lambda **_: SimpleNamespace(result=lambda **_: finished))
    result = CliRunner().invoke(app, ["run", "--params", str(params), "--json"])
    assert result.exit_code == code, result.output
    assert last_json(result.stdout)["exit_code"] == code


def test_models_shows_every_alias_whole_when_its_output_is_piped(params):
    """Piped, the table is 80 columns wide, and the aliases were cut: "champion,previous-cha…"."""
    from mlflow import MlflowClient

    from tasks.environment import apply_defaults
    from tasks.registry.tracking import EXPERIMENT

    apply_defaults(params.parent)
    name = yaml.safe_load(params.read_text())["registry"]["model_name"]
    client = MlflowClient()
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT))
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    aliases = ["champion", "previous-champion-before-the-rollback", "canary-for-the-eu-west-region"]
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    result = CliRunner().invoke(app, ["models", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert ",".join(sorted(aliases)) in result.stdout and "…" not in result.stdout, result.stdout


def test_models_data_md5_lists_the_runs_without_json_too_and_rollback_force_needs_to(params):
    """`models --data-md5 X` printed the same table whatever X was, and `rollback --force` without
    `--to` was taken without a word."""
    result = CliRunner().invoke(app, ["models", "--params", str(params), "--data-md5", "0123abcd"])
    assert result.exit_code == 0 and "no run used data 0123abcd" in result.stdout, result.output
    assert "no registered versions (registry.model_name;" in result.stderr  # the fixture's model: none yet
    from mlflow import MlflowClient

    from tasks.environment import apply_defaults
    from tasks.registry.tracking import EXPERIMENT

    apply_defaults(params.parent)
    md5 = "0123abcd" + uuid.uuid4().hex[:24]
    client = MlflowClient()  # no active experiment or run set: other tests of this process start their own
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT),
                            tags={"data_md5": md5})
    client.set_terminated(run.info.run_id)
    # the table shows 12 digits of it: those find the run too
    result = CliRunner().invoke(app, ["models", "--params", str(params), "--data-md5", md5[:12], "--json"])
    assert [r["run_id"] for r in last_json(result.stdout)["runs_for_data"]] == [run.info.run_id], result.output
    result = CliRunner().invoke(app, ["models", "--params", str(params), "--data-md5", "x' OR '1"])
    assert result.exit_code == 2 and "expected the md5's hexadecimal digits" in result.stderr, result.output
    result = CliRunner().invoke(app, ["rollback", "--params", str(params), "--force", "--reason", "x"])
    assert result.exit_code == 2 and "--force applies to --to VERSION" in result.stderr, result.output


def test_with_json_a_failed_command_still_ends_stdout_with_one_json_object(tmp_path, monkeypatch):
    """`ftllm validate missing.jsonl --json` printed nothing on stdout (exit 2), where `run --json`
    prints its result with the error: a script reading the last line got nothing to parse."""
    monkeypatch.chdir(tmp_path)
    for args, fragment in ((["validate", "missing.jsonl", "--json"], "missing.jsonl: data file not found"),
                           (["models", "--json", "--params", str(REPO / "params.yaml"), "--set", "registry.nope=1"],
                            "--set registry.nope: unknown key")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        last = json.loads(result.stdout.strip().splitlines()[-1])
        assert last["exit_code"] == 2 and fragment in last["error"], last
        assert fragment in result.stderr and "Traceback" not in result.stderr
    without = CliRunner().invoke(app, ["validate", "missing.jsonl"])
    assert without.exit_code == 2 and without.stdout == ""  # errors reach stdout only as --json asks


def test_serve_refuses_a_port_in_use_before_it_announces_the_service(params, monkeypatch):
    import socket

    import ftllm.commands.serve as serve

    monkeypatch.setattr(serve, "latest_bento", lambda name: f"ftllm_chat:{name}-v1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port), "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert f"--port {port}: cannot listen there (Address already in use)" in result.stderr
    assert "serving" not in result.stderr and "Traceback" not in result.stderr


def test_serve_before_any_run_or_with_an_unknown_bento_says_what_to_do(params, monkeypatch):
    """Both were BentoML's messages after the service was announced ("failed to fetch from remote
    because No cloud context default found"); the fixture's model was never packaged."""
    import ftllm.commands.serve as serve

    monkeypatch.setattr(serve.subprocess, "Popen", lambda *a, **k: pytest.fail("the server was started"))
    result = CliRunner().invoke(app, ["serve", "--params", str(params)])
    assert result.exit_code == 2, result.output
    model = serve.project_params(params.parent, None, params).registry.model_name
    assert f"no model packaged for registry.model_name={model} yet: run `ftllm run` first" in result.stderr
    result = CliRunner().invoke(app, ["serve", "--params", str(params), "--bento", "ftllm_chat:nope-v1"])
    assert result.exit_code == 2, result.output
    assert "--bento ftllm_chat:nope-v1: no such bento in " in result.stderr and "leave --bento out" in result.stderr
    assert "serving" not in result.stderr and "Traceback" not in result.stderr


def test_a_bento_whose_code_reads_an_older_feedback_log_is_passed_over_or_refused(params, monkeypatch, tmp_path):
    """After an update of the log's schema, the newest bento (built before it) stopped at start-up
    with a traceback on the log this checkout had migrated."""
    from types import SimpleNamespace

    import bentoml

    import ftllm.commands.serve as serve
    from tasks.errors import UsageError
    from tasks.feedback.schema import SCHEMA_VERSION

    folders = {}
    for version, module, text in (("old", "store.py", "SCHEMA_VERSION = 3\n"), ("new", "schema.py", f"SCHEMA_VERSION = {SCHEMA_VERSION}\n")):
        code = tmp_path / version / "src" / "tasks" / "feedback"
        code.mkdir(parents=True)
        (code / module).write_text(text)
        folders[f"ftllm_chat:m-{version}"] = tmp_path / version
    monkeypatch.setattr(bentoml, "get", lambda tag: SimpleNamespace(path=str(folders[tag])))
    monkeypatch.setattr(bentoml.models, "get", lambda tag: SimpleNamespace(tag=tag))  # the champion's model is stored
    assert serve.log_version_read_by("ftllm_chat:m-old") == 3  # older code kept the version in store.py
    monkeypatch.setattr(serve, "latest_bento", lambda name: "ftllm_chat:m-new")
    assert serve._serving_target(None, "m") == "ftllm_chat:m-new"
    monkeypatch.setattr(serve, "latest_bento", lambda name: "ftllm_chat:m-old")
    assert serve._serving_target(None, "m") == serve.SOURCE_SERVICE
    with pytest.raises(UsageError, match=f"reads feedback logs up to version 3, and this checkout writes version {SCHEMA_VERSION}"):
        serve._serving_target("ftllm_chat:m-old", "m")


def test_bench_serve_without_a_service_says_so():
    from tests.support.project import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(app, ["bench", "serve", "--url", url, "--requests", "2"])
    assert result.exit_code == 2
    assert "is the service running" in result.stderr and "Traceback" not in result.stderr


def test_serve_picks_the_newest_bento_of_the_projects_model(params, monkeypatch):
    """One BentoML store holds the bentos of every registered model; `ftllm serve` takes its own model's newest."""
    from types import SimpleNamespace

    import bentoml

    from ftllm.commands.serve import latest_bento, project_params

    def bento(version: str, built: int, name: str = "ftllm_chat"):
        return SimpleNamespace(tag=bentoml.Tag(name, version), info=SimpleNamespace(creation_time=built))

    model = project_params(params.parent).registry.model_name
    assert model.startswith("cli-")  # the fixture's settings file, not the repository's
    store = [bento(f"{model}-v1", 1), bento(f"{model}-v2", 2), bento("other-model-v7", 3),
             bento(f"{model}x-v9", 4), bento(f"{model}-v3", 5, name="another_service"), bento(f"{model}-v2-v1", 6)]
    monkeypatch.setattr(bentoml, "list", lambda: store)
    assert latest_bento(model) == f"ftllm_chat:{model}-v2"
    assert latest_bento("unknown") is None
    assert latest_bento(model.upper()) == f"ftllm_chat:{model}-v2"  # BentoML lower-cases tag versions


def test_serve_takes_the_settings_file_it_is_given(params, monkeypatch, tmp_path):
    """`ftllm serve --params params.tools.yaml` serves the tools task's model, as `ftllm run --params` trained it:
    its newest bento, and the service reads that file (FTLLM_PARAMS)."""
    import yaml

    import ftllm.commands.serve as serve

    started = {}

    class Server:
        def __init__(self, cmd, cwd, env, preexec_fn, start_new_session):
            started.update(cmd=cmd, env=env)

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(serve.subprocess, "Popen", Server)
    monkeypatch.setattr(serve.signal, "signal", lambda *_args: None)
    monkeypatch.setattr(serve, "latest_bento", lambda name: f"ftllm_chat:{name}-v1")
    monkeypatch.delenv("FTLLM_PARAMS", raising=False)
    monkeypatch.chdir(params.parent)
    tools = tmp_path / "tools.yaml"
    tools.write_text(yaml.safe_dump({"registry": {"model_name": "tools-task"}}))
    result = CliRunner().invoke(app, ["serve", "--params", str(tools)])
    assert result.exit_code == 0, result.output
    assert "ftllm_chat:tools-task-v1" in started["cmd"] and started["env"]["FTLLM_PARAMS"] == str(tools.resolve())
    assert "FTLLM_PARAMS" not in os.environ


def test_a_server_that_does_not_act_on_the_stop_is_killed_with_its_workers(capsys):
    """A stop passed on to a server that did not act on it (BentoML's arbiter, now and then, under
    load) left `ftllm serve` waiting on it for good, Ctrl-C after Ctrl-C."""
    import time

    import psutil

    from ftllm.commands.serve import wait_for_server

    deaf = ("import signal, subprocess, sys, time\n"
            "for s in (signal.SIGINT, signal.SIGTERM): signal.signal(s, signal.SIG_IGN)\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"  # a worker: it ignores them too
            "print('up', flush=True); time.sleep(120)")
    server = subprocess.Popen([sys.executable, "-c", deaf], start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert server.stdout.readline().strip() == "up"
    worker = psutil.Process(server.pid).children()[0]
    server.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert wait_for_server(server, [started], timeout_s=1.0) == -signal.SIGKILL
    assert 1.0 <= time.monotonic() - started < 30
    worker.wait(10)  # gone with it (its session killed): a worker left would keep the port
    assert "did not stop within 1 s of the stop signal: killing it and its workers" in capsys.readouterr().err
    # with no stop passed on, it waits as long as the server runs
    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"], start_new_session=True)
    assert wait_for_server(quick, [], timeout_s=0.1) == 0


def test_serve_refuses_a_feedback_log_it_could_not_write_before_the_server_starts(params, monkeypatch, tmp_path):
    """Else the server starts, and its worker dies on the log with a traceback, or answers
    feedback it cannot store."""
    import ftllm.commands.serve as serve

    monkeypatch.setattr(serve.subprocess, "Popen", lambda *a, **k: pytest.fail("the server was started"))
    monkeypatch.setattr(serve, "latest_bento", lambda name: f"ftllm_chat:{name}-v1")
    monkeypatch.chdir(params.parent)
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("FTLLM_FEEDBACK_DB", str(tmp_path / "a-file" / "feedback.db"))
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2, result.output
    assert f"{tmp_path / 'a-file' / 'feedback.db'}: cannot open the feedback log" in result.stderr
    assert "Traceback" not in result.stderr
