"""The whole feedback loop with simulated users: serve → rate → monitor → retrain → gate, round after round.

A copy of the project (its own git repo, DVC cache, MLflow, Prefect and BentoML state) gets
a weak champion: the default data trained for a fraction of the default steps
(`--weak-steps`). Then, per round and per arm:

1. `ftllm serve` serves the arm's champion (its bento, its own feedback log);
2. `--users` simulated users each send one prompt over HTTP to `/v1/chat/completions`, in
   phrasings the training data never uses (`HELD_OUT_PHRASINGS`, or a pool of your own with
   `--phrasings FILE`), about dates no split
   holds; each rates the answer against a hidden reference over HTTP (`/feedback`): 5 if
   right, 1 if wrong, a uniform 1-5 for a share of noisy raters (`--noise`); a share of the
   users who got a wrong answer (`--correct`) also posts the right one as a correction;
3. the `monitor` flow reads the log (its recommendation is recorded; every round retrains,
   so that the arms stay comparable);
4. `ftllm run` retrains with the arm's settings and a feedback source, and the gate decides;
5. the champion (promoted or not) is scored on a fixed held-out test (`--test-size` prompts
   in the held-out phrasings, never sent by users; also per phrasing, since the tiny model
   reads a date by its place in the prompt: benchmarks/results/README.md) and on the default
   data's original test split (prompt hash, as prepare splits it; feedback rows never enter it).

Arms (same users, same seeds):

- `today`: supervised on accepted answers and corrections, feedback weight 1 (whatever the
  setting's default), from the base, `train.max_steps` 300; preference tuning off
  (`preference.min_examples` out of reach);
- `item2`: `today` with `data.feedback_weight` (`--weight`), warm start from the champion
  (`train.init_from: champion`, `train.replay_fraction`) and steps scaled to the data
  (`train.epochs`, `--epochs`: 6.82 passes give 301 steps on the default data, the default 300 plus one);
- `preference`: `item2` plus preference tuning on all ratings (the `preference` stage's defaults);
- `ratings`: as `preference`, but the users write no corrections;
- `shipped`: the shipped settings as they are (`params.yaml`: feedback weight, from the base,
  the default steps, preference tuning on);
- `shipped-accepted`: `shipped` with no corrections and no preference tuning: supervised on
  the accepted answers only;
- `shipped-ratings`: `shipped` with no corrections: the accepted answers plus preference
  tuning on every rating.

The gate keeps its paired no-regression checks against the champion; its absolute floors
(`gate.min_exact_match`, `min_gain_over_prompting`, `max_perplexity`, latency) are opened,
since the weak champion is below them on purpose. The users' one key is let through the
trust settings (`SIMULATED_USERS_TRUSTED`: no review hold, no per-key cap or rate limit), so
that their feedback reaches training as a trusted front end's would. Small run (about an hour on a loaded
2-core machine):

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/bench_feedback_loop.py --rounds 2 --seeds 1 \\
        --users 100 --json benchmarks/results/bench_feedback_loop_cpu.json
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "Rewrite the ISO date in words."
# Phrasings no training example uses (scripts/make_data.py's are "{date}", "Convert this ISO date: {date}", "Date: {date}").
HELD_OUT_PHRASINGS = ["Please write {date} in words", "What is {date} spelled out?", "Spell out the date {date}.",
                      "{date} -> words"]
ARMS = ("today", "item2", "preference", "ratings", "shipped", "shipped-accepted", "shipped-ratings")
NO_CORRECTIONS = ("ratings", "shipped-accepted", "shipped-ratings")
OPEN_GATE = {"gate.min_exact_match": 0.0, "gate.min_gain_over_prompting": -1.0, "gate.max_perplexity": 1e9,
             "gate.max_p95_latency_ms": 1e9}
NO_PREFERENCE = {"preference.min_examples": 10**9}
# The simulated users post through one untrusted key, faster than the service lets one key post, and all of it is
# meant to reach training: no review hold, no per-key cap (docs/guides/trust.md).
SIMULATED_USERS_TRUSTED = {"feedback.per_key_per_minute": 1_000_000, "feedback.auto_approve": "all",
                           "feedback.max_key_share": 1.0}


def arm_overrides(arm: str, args: argparse.Namespace) -> dict:
    """The `--set` overrides of an arm's retraining runs (beyond the common ones)."""
    if arm == "today":
        return {**NO_PREFERENCE, "train.max_steps": args.steps, "data.feedback_weight": 1.0}
    if arm.startswith("shipped"):
        return NO_PREFERENCE if arm == "shipped-accepted" else {}
    item2 = {"data.feedback_weight": args.weight, "train.init_from": "champion",
             "train.replay_fraction": args.replay, "train.epochs": args.epochs}
    return {**item2, **(NO_PREFERENCE if arm == "item2" else {})}


# ---- data: references, prompts, splits -------------------------------------------------------------------------

def words(day: dt.date) -> str:
    return f"{calendar.month_name[day.month]} {day.day}, {day.year}"


def unused_dates(n: int, rng: random.Random, taken: set[str]) -> list[dt.date]:
    """`n` dates between 1900 and 2099 that are not in `taken` (ISO strings), which they join."""
    start, span = dt.date(1900, 1, 1).toordinal(), dt.date(2099, 12, 31).toordinal() - dt.date(1900, 1, 1).toordinal()
    out = []
    while len(out) < n:
        day = dt.date.fromordinal(start + rng.randrange(span + 1))
        if day.isoformat() not in taken:
            taken.add(day.isoformat())
            out.append(day)
    return out


def example(prompt: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def iso_dates(rows: list[dict]) -> set[str]:
    """The ISO dates the prompts of `rows` ask about."""
    return {m for r in rows for m in re.findall(r"\d{4}-\d{2}-\d{2}", r["messages"][-2]["content"])}


def training_dates() -> set[str]:
    return iso_dates([json.loads(x) for x in (ROOT / "data/dates.jsonl").read_text().splitlines()])


def held_out_prompts(days: list[dt.date], rng: random.Random, phrasings: list[str] = HELD_OUT_PHRASINGS) -> list[dict]:
    return [example(rng.choice(phrasings).format(date=d.isoformat()), words(d)) for d in days]


def phrasing_of(prompt: str, phrasings: list[str]) -> str:
    """The phrasing a held-out prompt was written in (the one whose text around `{date}` it matches)."""
    for phrasing in phrasings:
        head, tail = phrasing.split("{date}")
        if re.fullmatch(re.escape(head) + r"\d{4}-\d\d-\d\d" + re.escape(tail), prompt):
            return phrasing
    raise ValueError(f"{prompt!r} is in none of the phrasings")


def read_phrasings(path: Path) -> list[str]:
    """A pool of phrasings, one a line, each with one `{date}` and none the training data uses.

    Raises ValueError with the line at fault, so that a typo cannot quietly test another pool.
    """
    sys.path.insert(0, str(ROOT))
    from scripts.make_data import PROMPTS as training

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from None
    pool = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line.count("{date}") != 1 or "{" in line.replace("{date}", "") or "}" in line.replace("{date}", ""):
            raise ValueError(f"{path}:{number}: a phrasing holds `{{date}}` exactly once and no other brace: {line!r}")
        if line in training:
            raise ValueError(f"{path}:{number}: {line!r} is a phrasing of the training data, so not held out")
        pool.append(line)
    if not pool:
        raise ValueError(f"{path}: no phrasing in it (one a line, each with `{{date}}`)")
    return pool


def original_test_split(limit: int) -> list[dict]:
    """The default data's test rows, by prepare's own split of the prompt hash (default fractions)."""
    from tasks.config import DataParams
    from tasks.data.prepare import assign_split
    from tasks.data.sources import prompt_key

    data = DataParams()
    rows = [json.loads(x) for x in (ROOT / "data/dates.jsonl").read_text().splitlines()]
    test = [r for r in rows if assign_split(prompt_key(r["messages"]), data.val_fraction, data.test_fraction) == "test"]
    return test[:limit]


# ---- the workspace and its processes ---------------------------------------------------------------------------

def make_workspace(folder: Path) -> Path:
    """The project's files and data in `folder`, as a fresh git repo (DVC needs one)."""
    listing = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    for rel in subprocess.run(listing, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split():
        if (ROOT / rel).is_file():
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, folder / rel)
    shutil.copytree(ROOT / "data", folder / "data", dirs_exist_ok=True)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=folder, check=True)
    return folder


def env_for(ws: Path, db: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FTLLM_PARAMS", "FTLLM_BENTO_MODEL", "PREFECT_API_URL")}
    env.update(PYTHONPATH=str(ws), HF_HUB_OFFLINE="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", FTLLM_ROOT=str(ws),
               PREFECT_HOME=str(ws / ".prefect"),
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", MLFLOW_TRACKING_URI=f"sqlite:///{ws / 'mlflow.db'}",
               MLFLOW_REGISTRY_URI=f"sqlite:///{ws / 'mlflow.db'}", BENTOML_HOME=str(ws / ".bentoml"),
               BENTOML_DO_NOT_TRACK="true", DVC_NO_ANALYTICS="1", GX_ANALYTICS_ENABLED="false",
               TOKENIZERS_PARALLELISM="false", MPLBACKEND="Agg")
    if db is not None:
        env["FTLLM_FEEDBACK_DB"] = str(db)
    return env


def retrain(ws: Path, overrides: dict, db: Path, log: Path) -> dict:
    """`ftllm run --json` with the overrides; its JSON result."""
    cmd = [sys.executable, "-m", "ftllm.cli", "run", "--json"]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    with open(log, "a") as out:
        proc = subprocess.run(cmd, check=False, cwd=ws, env=env_for(ws, db), stdout=subprocess.PIPE, stderr=out, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if not lines:
        raise RuntimeError(f"ftllm run printed no JSON (exit {proc.returncode}); see {log}")
    return json.loads(lines[-1])


def arm_params_file(ws: Path, overrides: dict, name: str) -> Path:
    """The resolved settings of an arm as a file, for the service and the monitor (which read a settings file)."""
    from tasks.config import load_params

    path = ws / f"bench-{name}.yaml"
    path.write_text(yaml.safe_dump(load_params(ws / "params.yaml", overrides).model_dump(mode="json"), sort_keys=False))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_rate(ws: Path, bento: str, params_file: Path, db: Path, users: list[dict], rng: random.Random,
                   noise: float, correct: float, log: Path) -> dict:
    """Start `ftllm serve` on the bento; every user asks, rates and maybe corrects over HTTP; stop it."""
    import httpx

    port = free_port()
    env = {**env_for(ws, db), "FTLLM_PARAMS": str(params_file)}
    with open(log, "a") as out:
        server = subprocess.Popen([sys.executable, "-m", "ftllm.cli", "serve", "--port", str(port), "--bento", bento],
                                  cwd=ws, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    counts = {"asked": 0, "right": 0, "ratings": 0, "low": 0, "corrections": 0, "noisy": 0}
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not come up; see {log}")
            time.sleep(2)
        with httpx.Client(timeout=120) as client:
            for user in users:
                reference = user["messages"][-1]["content"]
                answer = client.post(f"{url}/v1/chat/completions", json={
                    "messages": user["messages"][:-1], "max_tokens": 16, "temperature": 0}).json()
                text = (answer["choices"][0]["message"]["content"] or "").strip()
                right = text == reference
                noisy = rng.random() < noise
                rating = rng.randint(1, 5) if noisy else (5 if right else 1)
                fix = reference if (not right and not noisy and rng.random() < correct) else None
                body = {"id": answer["id"], "rating": rating, **({"correction": fix} if fix else {})}
                client.post(f"{url}/feedback", json=body).raise_for_status()
                counts["asked"] += 1
                counts["right"] += right
                counts["ratings"] += 1
                counts["low"] += rating <= 2
                counts["corrections"] += fix is not None
                counts["noisy"] += noisy
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    return counts


def run_monitor(ws: Path, params_file: Path, db: Path, log: Path) -> dict:
    code = ("import json\nfrom flows.monitor import monitor\n"
            f"r = monitor(params_file={str(params_file)!r}, feedback_db={str(db)!r})\n"
            "print(json.dumps({k: r[k] for k in ('retrain_recommended', 'reasons')}))")
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ws, env=env_for(ws, db), stdout=subprocess.PIPE,
                              stderr=out, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": f"monitor exit {proc.returncode}"}


def score_champion(ws: Path, model_name: str, version: str, tests: dict[str, list[dict]], phrasings: list[str]) -> dict:
    """Exact match of a registered version on each fixed test set, scored in a process with the workspace's MLflow,
    and on the held-out test per phrasing (`held_out_by_phrasing`)."""
    code = (
        "import json, sys\nfrom pathlib import Path\nfrom tasks.config import EvalParams\n"
        "from tasks.evaluate.score import evaluate_model_dir\nfrom tasks.registry.versions import download_version\n"
        "name, version, tests = json.loads(sys.stdin.read())\n"
        "folder = download_version(name, version, Path('artifacts/bench') / f'{name}-v{version}')\n"
        "out = {k: evaluate_model_dir(folder, rows, EvalParams(max_examples=len(rows)))['per_example']['exact_match']"
        " for k, rows in tests.items()}\n"
        "print(json.dumps(out))"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=ws, env=env_for(ws), input=json.dumps([model_name, version, tests]),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scoring failed: {proc.stderr[-2000:]}")
    hits = json.loads(proc.stdout.strip().splitlines()[-1])
    scores = {key: statistics.mean(values) for key, values in hits.items()}
    by_phrasing: dict[str, list[float]] = {}
    for row, hit in zip(tests["held_out"], hits["held_out"]):
        by_phrasing.setdefault(phrasing_of(row["messages"][-2]["content"], phrasings), []).append(hit)
    scores["held_out_by_phrasing"] = {p: [round(statistics.mean(v), 4), len(v)] for p, v in by_phrasing.items()}
    return scores


# ---- the benchmark ---------------------------------------------------------------------------------------------

def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def seed_interval(values: list[float]) -> tuple[float, float] | None:
    """95% t-interval of the mean over seeds (None with one seed)."""
    if len(values) < 2:
        return None
    t = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}.get(len(values), 2.0)
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return (mean - t * sd / math.sqrt(len(values)), mean + t * sd / math.sqrt(len(values)))


@dataclass
class Arm:
    """One arm's state across rounds: its model name, feedback log, settings and current champion."""

    name: str
    arm: str
    db: Path
    log: Path
    overrides: dict
    params_file: Path
    champion: str
    bento: str


def run_seed(seed: int, args: argparse.Namespace, ws: Path, tests: dict, rows: list[dict], save) -> None:
    """Every arm's rounds for one seed, round by round (every arm gets round 1 before any gets round 2).

    `save()` runs after each row, so that a stopped run keeps its figures.
    """
    rng = random.Random(seed)
    taken = training_dates() | iso_dates(tests["held_out"])
    users_by_round = [held_out_prompts(unused_dates(args.users, rng, taken), rng, args.phrasings) for _ in range(args.rounds)]
    common = {"data.sources": [{"path": "data/dates.jsonl"}, {"feedback": True}], "eval.max_examples": args.eval_examples,
              "train.seed": seed, **SIMULATED_USERS_TRUSTED, **OPEN_GATE, **args.set}
    arms, weak_scores = [], None
    for arm in args.arms:
        name = f"bench-{arm}-s{seed}"
        db, log = ws / f"feedback-{name}.db", ws / f"{name}.log"
        # The weak champion: the same settings for every arm, so DVC trains it once and the other arms register it.
        weak = retrain(ws, {**common, **NO_PREFERENCE, "train.max_steps": args.weak_steps, "registry.model_name": name}, db, log)
        overrides = {**common, **arm_overrides(arm, args), "registry.model_name": name}
        state = Arm(name, arm, db, log, overrides, arm_params_file(ws, overrides, name), weak["champion_version"], weak["bento"])
        arms.append(state)
        weak_scores = weak_scores or score_champion(ws, name, state.champion, tests, args.phrasings)  # the same model in every arm
        rows.append({"seed": seed, "arm": arm, "round": 0, "status": weak["status"], "version": weak["version"],
                     "champion": state.champion, **weak_scores})
        print(json.dumps(rows[-1]), flush=True)
        save()
    for rnd in range(1, args.rounds + 1):
        for a in arms:
            rows.append({"seed": seed, "arm": a.arm, "round": rnd, **run_round(ws, a, users_by_round[rnd - 1],
                                                                               random.Random(seed * 1000 + rnd), args, tests)})
            print(json.dumps(rows[-1]), flush=True)
            save()


def run_round(ws: Path, a: Arm, users: list[dict], rng: random.Random, args: argparse.Namespace, tests: dict) -> dict:
    """Serve → rate → monitor → retrain → gate for one arm; the champion's scores after it."""
    t = time.perf_counter()
    rated = serve_and_rate(ws, a.bento, a.params_file, a.db, users, rng, args.noise,
                           0.0 if a.arm in NO_CORRECTIONS else args.correct, a.log)
    monitor = run_monitor(ws, a.params_file, a.db, a.log)
    result = retrain(ws, a.overrides, a.db, a.log)
    if result.get("status") == "failed":
        raise RuntimeError(f"{a.name}: {result.get('error')}")
    a.champion = result["champion_version"]
    a.bento = result["bento"] if result["status"] == "promoted" else a.bento
    metrics = result.get("metrics") or {}
    return {
        "users": rated, "monitor": monitor, "status": result["status"], "version": result["version"],
        "champion": a.champion, "failed_checks": [c["name"] for c in (result.get("gate") or {}).get("checks", [])
                                                  if not c["passed"]],
        "splits": (result.get("data") or {}).get("splits"),
        "candidate_feedback_em": (metrics.get("candidate_feedback") or {}).get("exact_match"),
        "candidate_test_em": (metrics.get("candidate") or {}).get("exact_match"),
        "candidate_preference": metrics.get("candidate_preference"),
        "stages_seconds": (result.get("durations") or {}).get("stages"), "seconds": round(time.perf_counter() - t, 1),
        **score_champion(ws, a.name, a.champion, tests, args.phrasings),
    }


def summarise(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    table = []
    for arm in args.arms:
        for rnd in range(args.rounds + 1):
            cell = [r for r in rows if r["arm"] == arm and r["round"] == rnd]
            if not cell:
                continue
            entry = {"arm": arm, "round": rnd, "seeds": len(cell)}
            for key, n in (("held_out", args.test_size), ("original_test", args.original_examples)):
                values = [r[key] for r in cell]
                entry[key] = round(statistics.mean(values), 4)
                interval = seed_interval(values) if len(values) > 1 else wilson(round(values[0] * n), n)
                entry[f"{key}_ci95"] = [round(v, 4) for v in interval]
            phrasings = [p for p in args.phrasings if all(p in r.get("held_out_by_phrasing", {}) for r in cell)]
            entry["held_out_by_phrasing"] = {p: round(statistics.mean(r["held_out_by_phrasing"][p][0] for r in cell), 4)
                                             for p in phrasings}
            entry["promoted"] = sum(r["status"] == "promoted" for r in cell)
            table.append(entry)
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from this one on (to add seeds to a run)")
    ap.add_argument("--users", type=int, default=300, help="users (one prompt each) per round")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--noise", type=float, default=0.1, help="share of raters who rate at random")
    ap.add_argument("--correct", type=float, default=0.3, help="share of users with a wrong answer who correct it")
    ap.add_argument("--weak-steps", type=int, default=150, help="steps of the weak champion (default run: 300)")
    ap.add_argument("--steps", type=int, default=300, help="train.max_steps of the today arm's retraining runs")
    ap.add_argument("--weight", type=float, default=None, help="data.feedback_weight of the item-2 arms (default: the setting's)")
    ap.add_argument("--replay", type=float, default=0.25, help="train.replay_fraction of the item-2 arms")
    ap.add_argument("--epochs", type=float, default=6.82, help="train.epochs of the item-2 arms (6.82: 301 steps on the default data)")
    ap.add_argument("--test-size", type=int, default=200, help="fixed held-out test prompts (held-out phrasings)")
    ap.add_argument("--phrasings", type=Path, default=None,
                    help="a file of held-out phrasings, one a line with `{date}`, for the users and the fixed test "
                         "(default: HELD_OUT_PHRASINGS)")
    ap.add_argument("--pool-seed", type=int, default=10_000, help="seed of the fixed held-out test's dates and phrasings")
    ap.add_argument("--original-examples", type=int, default=200, help="rows of the original test split scored")
    ap.add_argument("--eval-examples", type=int, default=None,
                    help="eval.max_examples of the runs (the gate's test split; default: the setting's). Fewer is faster, "
                         "and makes the gate's paired checks weaker than shipped")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the workspace here (default: a temporary folder)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting of every run of every arm, read as `ftllm run --set` reads it")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from tasks.config import parse_overrides
    from tasks.errors import ConfigError

    try:
        args.set = parse_overrides(args.set)
    except ConfigError as exc:
        ap.error(str(exc))
    try:
        args.phrasings = read_phrasings(args.phrasings) if args.phrasings else HELD_OUT_PHRASINGS
    except ValueError as exc:
        ap.error(str(exc))
    if args.weight is None:
        from tasks.config import DataParams

        args.weight = DataParams().feedback_weight
    if args.eval_examples is None:
        from tasks.config import EvalParams

        args.eval_examples = EvalParams().max_examples
    sys.path.insert(0, str(ROOT))
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ftllm-bench-loop-")
        args.workdir = Path(tmp.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ws = make_workspace(args.workdir / "project")
    test_rng = random.Random(args.pool_seed)
    taken = training_dates()
    tests = {"held_out": held_out_prompts(unused_dates(args.test_size, test_rng, taken), test_rng, args.phrasings),
             "original_test": original_test_split(args.original_examples)}
    rows: list[dict] = []
    started, load_before = time.time(), os.getloadavg()

    def save() -> list[dict]:
        summary = summarise(rows, args)
        out = {"date": dt.date.today().isoformat(), "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs", "command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
               "load_average_start": load_before, "load_average_now": os.getloadavg(),
               "minutes": round((time.time() - started) / 60, 1), "summary": summary, "rows": rows}
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(out, indent=2) + "\n")
        return summary

    try:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            run_seed(seed, args, ws, tests, rows, save)
    finally:
        summary = save()
        print(f"{'arm':11s} {'round':>5s} {'held-out EM':>12s} {'95% interval':>16s} {'original test EM':>17s} {'95% interval':>16s}")
        for e in summary:
            print(f"{e['arm']:11s} {e['round']:5d} {e['held_out']:12.3f} {e['held_out_ci95']!s:>16s} "
                  f"{e['original_test']:17.3f} {e['original_test_ci95']!s:>16s}")
        print("held-out EM per phrasing (mean over seeds):")
        for e in summary:
            print(f"{e['arm']:11s} {e['round']:5d}  " + "  ".join(f"{p!r}: {v:.3f}" for p, v in e["held_out_by_phrasing"].items()))
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
