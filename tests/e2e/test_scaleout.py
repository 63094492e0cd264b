"""Scale-out on loopback: the same code against real services, configured only by environment and settings.

Starts a private PostgreSQL cluster, an S3 server (moto), an `mlflow server` with its
backend in PostgreSQL and its artifacts in S3, and a `prefect server start` on PostgreSQL.
The project copy gets a DVC S3 remote in `.dvc/config.local` (the committed config keeps
its in-repo remote). A second checkout of the same commit stands for the GPU machine: it
registers the training step (`ftllm deploy --train-pool ftllm-gpu`) and runs that pool's
worker. Then `ftllm deploy`, a triggered `retrain` with overrides (one of them routes
training to `finetune/ftllm-gpu`), and one `process` worker run; the checks read
everything back from the services: the flow runs' states and pools from Prefect, the run
and its model version from the tracking server, the run's and the model's artifacts from
the bucket, and the DVC outputs from the S3 remote.

Needs the PostgreSQL server binaries (`apt-get install postgresql`); it fails, naming
them, where they are missing.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.project import FAST, free_port

pytestmark = pytest.mark.slow
# Its own registered model, a short training and a short evaluation: this test is about
# where things land, not about the model.
OVERRIDES = {**FAST, "train.max_steps": 30, "eval.max_examples": 20, "registry.model_name": "ftllm-scaleout",
             "workers.train_deployment": "finetune/ftllm-gpu"}
BIN = Path(sys.executable).parent
BUCKET = "ftllm"
# Dummy credentials: the S3 server on loopback accepts any; real ones come from the environment too.
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
STARTUP_S = 240


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} not written)"


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a process started in its own session, with everything it spawned."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run(cmd: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own session; on timeout kill it and its children and say so."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ran past {timeout:.0f}s\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _require(module: str, package: str):
    """Import a client library of the services, or fail naming the package that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        pytest.fail(f"the scale-out test needs {package} (`pip install {package}`): {module} is not importable")


def _postgres_bin() -> Path:
    """The folder of initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which("pg_ctl")
    folders = [Path(found).resolve().parent] if found else []
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    folders += sorted(versions, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0, reverse=True)
    for folder in folders:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    pytest.fail(
        "PostgreSQL server binaries (initdb, pg_ctl) are not on PATH nor under /usr/lib/postgresql/*/bin; "
        "install them with `apt-get install postgresql` (Debian/Ubuntu) or put their folder on PATH"
    )


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL cluster on a free loopback port (trust auth), with databases `prefect` and `mlflow`."""
    psycopg2 = _require("psycopg2", "psycopg2-binary")
    _require("asyncpg", "asyncpg")
    pg = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="ftllm-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: the cluster belongs to the `postgres` user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root needs a `postgres` user to own the test cluster (apt-get install postgresql creates it)")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, log, port = folder / "data", folder / "server.log", free_port()
    init = subprocess.run([*as_user, str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
                          capture_output=True, text=True, timeout=120)
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.fail(f"initdb failed:\n{init.stdout[-2000:]}\n{init.stderr[-2000:]}")
    # A throwaway cluster: no fsync, so the servers' migrations do not wait on the disk.
    options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    start = subprocess.run([*as_user, str(pg / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
                           capture_output=True, text=True, timeout=90)
    try:
        if start.returncode != 0:
            pytest.fail(f"pg_ctl start failed:\n{start.stdout[-1000:]}\n{start.stderr[-1000:]}\n{_tail(log)}")
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in ("prefect", "mlflow"):
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()
        yield {"port": port, "log": log}
    finally:
        stop = [*as_user, str(pg / "pg_ctl"), "-D", str(data), "-w", "-t", "30", "stop"]
        if subprocess.run([*stop, "-m", "fast"], capture_output=True, timeout=60).returncode != 0:
            subprocess.run([*stop, "-m", "immediate"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def s3():
    """An S3 server on a free loopback port with one bucket; yields its endpoint URL."""
    boto3 = _require("boto3", "boto3")
    _require("dvc_s3", "dvc-s3")
    port = free_port()
    server = _require("moto.server", "moto[server]").ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, **_boto_credentials()).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


def _boto_credentials() -> dict:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }


def _wait_healthy(servers: dict[str, tuple[subprocess.Popen, str, Path]], timeout: float) -> None:
    """Poll each server's health URL until all answer; fail with the log of one that died or stayed silent."""
    pending = dict(servers)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, (proc, url, log) in list(pending.items()):
            if proc.poll() is not None:
                pytest.fail(f"{name} exited with {proc.returncode} before answering {url}:\n{_tail(log)}")
            try:
                urllib.request.urlopen(url, timeout=2)
                del pending[name]
            except OSError:
                pass
        time.sleep(1)
    if pending:
        logs = "\n\n".join(f"--- {name} ---\n{_tail(log)}" for name, (_, _, log) in pending.items())
        pytest.fail(f"{', '.join(pending)} did not answer within {timeout:.0f}s:\n{logs}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, project, postgres, s3):
    """The tracking server (PostgreSQL + S3 artifacts) and the Prefect server (PostgreSQL), started side by side.

    Yields the environment of a client machine: only URLs and credentials, nothing local.
    """
    state = tmp_path_factory.mktemp("scaleout")
    pg = f"postgres@127.0.0.1:{postgres['port']}"
    mlflow_port, prefect_port = free_port(), free_port()
    prefect_home = state / "prefect-home"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    specs = {
        "mlflow server": (
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"postgresql+psycopg2://{pg}/mlflow", "--artifacts-destination", f"s3://{BUCKET}/mlflow"],
            {**base, **AWS, "MLFLOW_S3_ENDPOINT_URL": s3},
            f"http://127.0.0.1:{mlflow_port}/health",
        ),
        "prefect server": (
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
            {**base, "PREFECT_HOME": str(prefect_home), "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{pg}/prefect",
             "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"},
            f"http://127.0.0.1:{prefect_port}/api/health",
        ),
    }
    with ExitStack() as cleanup:
        servers = {}
        for name, (cmd, env, health) in specs.items():
            log = state / f"{name.split()[0]}.log"
            handle = cleanup.enter_context(open(log, "w"))
            proc = subprocess.Popen(cmd, env=env, cwd=state, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
            cleanup.callback(_stop, proc)
            servers[name] = (proc, health, log)
        _wait_healthy(servers, STARTUP_S)
        client = {
            **base, **AWS,
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "PREFECT_HOME": str(state / "client-prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            # Only the tracking URI: the registry follows it (tasks/environment.py sets no registry URI).
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "FTLLM_ROOT": str(project),
        }
        logs = {name: log for name, (_, _, log) in servers.items()} | {"postgres": postgres["log"]}
        yield {"env": client, "s3": s3, "mlflow": client["MLFLOW_TRACKING_URI"], "logs": logs}


def _server_logs(stack: dict) -> str:
    return "\n\n".join(f"--- {name} log ---\n{_tail(path, 2000)}" for name, path in stack["logs"].items())


def _s3_keys(endpoint: str, prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **_boto_credentials())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def _s3_remote(root: Path, env: dict, endpoint: str) -> None:
    """The S3 remote in this checkout's config.local; the committed config keeps its in-repo remote."""
    dvc = [sys.executable, "-m", "dvc"]
    for args in (["remote", "add", "--local", "-d", "s3", f"s3://{BUCKET}/dvc"],
                 ["remote", "modify", "--local", "s3", "endpointurl", endpoint]):
        out = _run([*dvc, *args], env, root, timeout=120)
        assert out.returncode == 0, (args, out.stdout[-1000:], out.stderr[-1000:])


def test_retrain_on_scaled_out_services(stack, project, tmp_path):
    env, dvc = stack["env"], [sys.executable, "-m", "dvc"]

    _s3_remote(project, env, stack["s3"])
    fetch = _run([*dvc, "fetch", "-q", "-r", "local", "data.dvc"], env, project, timeout=120)  # as after a `dvc pull`
    assert fetch.returncode == 0, fetch.stderr[-1000:]
    committed = _run(["git", "diff", "--exit-code", "--", ".dvc/config"], env, project, timeout=30)
    assert committed.returncode == 0, f".dvc/config must not change:\n{committed.stdout}"

    # The GPU machine: a checkout of the same commit, with the same remote, registering the training step.
    trainer = tmp_path / "trainer"
    assert _run(["git", "clone", "-q", str(project), str(trainer)], env, tmp_path, timeout=60).returncode == 0
    trainer_env = {**env, "FTLLM_ROOT": str(trainer), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    _s3_remote(trainer, trainer_env, stack["s3"])
    out = _run([str(BIN / "ftllm"), "deploy", "--json", "--train-pool", "ftllm-gpu", "--params", str(trainer / "params.yaml")],
               trainer_env, trainer, timeout=300)
    assert out.returncode == 0, f"ftllm deploy --train-pool failed:\n{out.stderr[-3000:]}\n{_server_logs(stack)}"
    assert json.loads(out.stdout)["train_deployment"] == "finetune/ftllm-gpu"

    out = _run([str(BIN / "ftllm"), "deploy", "--json", "--params", str(project / "params.yaml")], env, project, timeout=300)
    assert out.returncode == 0, f"ftllm deploy failed:\n{out.stderr[-3000:]}\n{_server_logs(stack)}"

    trigger = """
import json, sys
from prefect.deployments import run_deployment
run = run_deployment("retrain/scheduled", parameters={"overrides": json.loads(sys.argv[1])}, timeout=0)
print(run.id)
"""
    out = _run([sys.executable, "-c", trigger, json.dumps(OVERRIDES)], env, project, timeout=120)
    assert out.returncode == 0, f"triggering retrain failed:\n{out.stderr[-3000:]}\n{_server_logs(stack)}"
    flow_run_id = out.stdout.strip().splitlines()[-1]

    gpu_log = tmp_path / "gpu-worker.log"
    with open(gpu_log, "w") as handle:
        gpu_worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "ftllm-gpu"], env=trainer_env,
                                      cwd=trainer, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        worker = _run([str(BIN / "prefect"), "worker", "start", "--pool", "ftllm-process", "--run-once"], env, project, timeout=900)
    finally:
        _stop(gpu_worker)
    check = f"""
import json
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.utilities.asyncutils import run_coro_as_sync
async def runs():
    async with get_client() as c:
        parent = await c.read_flow_run("{flow_run_id}")
        children = await c.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=["{flow_run_id}"])))
        return [{{"id": str(r.id), "flow": (await c.read_flow(r.flow_id)).name, "pool": r.work_pool_name,
                  "state": r.state.type.value, "message": r.state.message}} for r in [parent, *children]]
print(json.dumps(run_coro_as_sync(runs())))
"""
    state = _run([sys.executable, "-c", check], env, project, timeout=60)
    runs = json.loads(state.stdout.strip().splitlines()[-1]) if state.returncode == 0 else []
    if not runs or runs[0]["state"] != "COMPLETED":
        pytest.fail(
            f"flow run {flow_run_id}: {runs or state.stderr[-2000:]}\n"
            f"--- worker stdout ---\n{worker.stdout[-4000:]}\n--- worker stderr ---\n{worker.stderr[-4000:]}\n"
            f"--- gpu worker ---\n{_tail(gpu_log)}\n{_server_logs(stack)}"
        )
    # The training step ran as its own flow run on the GPU pool, in the trainer's checkout.
    assert [(r["flow"], r["pool"], r["state"]) for r in runs] == [
        ("retrain", "ftllm-process", "COMPLETED"), ("finetune", "ftllm-gpu", "COMPLETED")], runs
    assert (trainer / "artifacts" / "model.checkpoints").is_dir() and not (project / "artifacts" / "model.checkpoints").exists()

    # Tracking and registry, read back through the tracking server.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack["mlflow"], registry_uri=stack["mlflow"])
    experiment = client.get_experiment_by_name("retrain")
    assert experiment is not None and experiment.artifact_location.startswith("mlflow-artifacts:"), experiment
    runs = client.search_runs([experiment.experiment_id], filter_string="params.`registry.model_name` = 'ftllm-scaleout'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "30" and run.data.params["train.learning_rate"] == "0.004"
    assert json.loads(run.data.tags["overrides"]) == OVERRIDES
    version = client.get_model_version("ftllm-scaleout", run.data.tags["model_version"])
    assert version.run_id == run.info.run_id
    assert client.get_model_version_by_alias("ftllm-scaleout", "challenger").version == version.version

    # Artifacts: in the bucket behind the tracking server, none in the project folder.
    keys = _s3_keys(stack["s3"], f"mlflow/{experiment.experiment_id}/")
    run_prefix = f"mlflow/{experiment.experiment_id}/{run.info.run_id}/artifacts/"
    assert f"{run_prefix}gate_verdict.json" in keys and f"{run_prefix}dvc.lock" in keys, keys[:20]
    # The model evaluated and registered here is the one the trainer pushed: same DVC hash.
    import yaml

    from tasks.pipeline.dvc import stage_out_md5

    sent = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "dvc/finetune.lock.yaml", str(tmp_path))).read_text())
    assert [out["md5"] for out in sent["outs"] if out["path"] == "artifacts/model"] == [stage_out_md5(project, "finetune", "artifacts/model")] == [
        stage_out_md5(trainer, "finetune", "artifacts/model")]
    assert any(k.startswith(f"mlflow/{experiment.experiment_id}/models/") and k.endswith("/MLmodel") for k in keys), keys[:20]
    assert not (project / "mlartifacts").exists() and not (project / "mlflow.db").exists()

    # DVC: the data and the stages' outputs are in the S3 remote.
    assert _s3_keys(stack["s3"], "dvc/files/md5/"), "nothing was pushed to the DVC remote"
    status = _run([*dvc, "status", "--cloud", "--remote", "s3", "--json"], env, project, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    assert json.loads(status.stdout or "{}") == {}, f"not in the S3 remote: {status.stdout[-2000:]}"
