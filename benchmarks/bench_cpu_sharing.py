"""Two CPU training jobs on one machine: each one's time alone and when both run at once.

Each configuration is a set of thread variables given to the `finetune` stage process
(`python -m tasks.stages.finetune`, the process `ftllm run` starts through DVC), with every
other variable as it is here:

- current: torch's own thread count (one per usable CPU), fixed, and OpenMP's default wait
  (idle workers spin a while before they sleep): what the stage did before any thread
  policy. `OMP_NUM_THREADS` names the count, so the project's adaptation stays out;
- policy: the project's policy now (`tasks.environment.thread_defaults`, no variable set):
  the stage starts with one thread per usable CPU and `ThreadShare` lowers the count to
  the CPUs that other processes leave free, looking again every two seconds;
- passive: the earlier policy, `OMP_WAIT_POLICY=PASSIVE` with the fixed count;
- one-thread: `OMP_NUM_THREADS=1` (the usual advice on a shared machine);
- spin-10k, spin-100k: the fixed count with a shorter spin before an idle worker sleeps
  (libgomp's default is 300,000 iterations).

Per repeat and configuration (configurations alternate, so a change in the machine's other
load reaches all of them alike): one training run alone, then two started at once. Reported
per configuration as medians over the repeats: the training time alone (the stage's own
`seconds`, model loading excluded), the time of each of the two at once, their ratio, and
the time alone against `current`. The load average before each trial is recorded as well,
since on a machine shared with other work the figures move with it.

    python benchmarks/bench_cpu_sharing.py                          # 100 steps, 3 repeats
    python benchmarks/bench_cpu_sharing.py --configs policy,current,passive,one-thread
    python benchmarks/bench_cpu_sharing.py --repeats 5 --json benchmarks/results/cpu_sharing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Every variable that changes how many compute threads torch runs or how they wait.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "FTLLM_TORCH_THREADS")


def configurations() -> dict[str, dict[str, str]]:
    """The thread variables of each configuration, by name."""
    from tasks.environment import thread_defaults, usable_cpus

    fixed = {"OMP_NUM_THREADS": str(usable_cpus())}
    return {
        "current": fixed,
        "policy": thread_defaults(),
        "passive": {**fixed, "OMP_WAIT_POLICY": "PASSIVE"},
        "one-thread": {"OMP_NUM_THREADS": "1"},
        "spin-10k": {**fixed, "GOMP_SPINCOUNT": "10000"},
        "spin-100k": {**fixed, "GOMP_SPINCOUNT": "100000"},
    }


@dataclass
class Trial:
    config: str
    repeat: int
    jobs: int
    load_before: float
    seconds: list[float]  # the stage's training time, per job
    wall: list[float]  # the whole process, per job (imports and model loading too)


@dataclass
class Summary:
    config: str
    variables: dict[str, str]
    alone_s: float
    together_s: float | None  # None: --jobs 1, no run in pairs
    ratio: float | None  # together / alone
    alone_vs_current: float | None
    alone_runs: list[float] = field(default_factory=list)
    together_runs: list[float] = field(default_factory=list)


def prepare(work: Path, steps: int) -> Path:
    """Resolved settings with `train.max_steps=steps` and the prepared splits, under `work`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FTLLM_OVERRIDES": json.dumps({"train.max_steps": steps})}
    params = work / "params.yaml"
    for stage, extra in (("resolve", ["--params", str(ROOT / "params.yaml"), "--out", str(params)]),
                         ("prepare", ["--params", str(params), "--out", str(work / "prepared")])):
        subprocess.run([sys.executable, "-m", f"tasks.stages.{stage}", *extra], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return params


def stage_env(variables: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    return {**env, "PYTHONPATH": str(ROOT), **variables}


def run_jobs(work: Path, params: Path, variables: dict[str, str], jobs: int) -> tuple[list[float], list[float]]:
    """Start `jobs` training runs at once; each one's training seconds and wall seconds."""
    outs = [Path(tempfile.mkdtemp(dir=work)) / "model" for _ in range(jobs)]
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "tasks.stages.finetune", "--params", str(params), "--data",
                               str(work / "prepared"), "--out", str(out)], cwd=ROOT, env=stage_env(variables),
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for out in outs]
    seconds, wall = [], []
    for proc in procs:
        stdout, _ = proc.communicate()
        wall.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"error: a training run exited {proc.returncode}")
        seconds.append(json.loads(stdout.strip().splitlines()[-1])["seconds"])
    for out in outs:
        shutil.rmtree(out.parent)  # a fresh folder per run: a checkpoint left behind would be resumed
    return seconds, wall


def summarise(trials: list[Trial], variables: dict[str, dict[str, str]]) -> list[Summary]:
    def runs(config: str, jobs: int) -> list[float]:
        return [s for t in trials if t.config == config and t.jobs == jobs for s in t.seconds]

    current = statistics.median(runs("current", 1)) if runs("current", 1) else None
    out = []
    for config, values in variables.items():
        alone, together = runs(config, 1), runs(config, 2)
        if not alone:
            continue
        a = statistics.median(alone)
        b = statistics.median(together) if together else None
        out.append(Summary(config, values, round(a, 2), round(b, 2) if b else None, round(b / a, 2) if b else None,
                           round(a / current, 3) if current else None, alone, together))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="Optimizer steps per training run.")
    ap.add_argument("--repeats", type=int, default=3, help="Alternating repeats of every configuration.")
    ap.add_argument("--configs", default="policy,current,one-thread",
                    help="Comma-separated configurations to compare.")
    ap.add_argument("--jobs", default="1,2",
                    help="Jobs at once per trial, comma-separated: 1 measures the time alone only, with more "
                         "repeats in the same time.")
    ap.add_argument("--json", type=Path, help="Write the trials and the summary here.")
    args = ap.parse_args()
    job_counts = [int(j) for j in args.jobs.split(",")]
    if not job_counts or any(j not in (1, 2) for j in job_counts):
        raise SystemExit(f"error: --jobs takes 1, 2 or 1,2, not {args.jobs!r}")
    everything = configurations()
    chosen = {name: everything[name] for name in args.configs.split(",")}
    trials: list[Trial] = []
    with tempfile.TemporaryDirectory(prefix="cpu-sharing-") as tmp:
        work = Path(tmp)
        params = prepare(work, args.steps)
        for repeat in range(args.repeats):
            for config, variables in chosen.items():
                for jobs in job_counts:
                    load = os.getloadavg()[0]
                    seconds, wall = run_jobs(work, params, variables, jobs)
                    trials.append(Trial(config, repeat, jobs, load, seconds, [round(w, 2) for w in wall]))
                    print(f"repeat {repeat} {config:<10} jobs {jobs}: training s {[round(s, 2) for s in seconds]} "
                          f"(load before {load:.2f})", flush=True)
                    if args.json:  # after every trial: a run cut short keeps what it measured
                        write_json(args, trials, chosen)
    summary = summarise(trials, chosen)
    print(f"\n{'config':<11}{'alone s':>9}{'two at once s':>15}{'ratio':>7}{'alone vs current':>18}")
    for s in summary:
        vs = f"{s.alone_vs_current:.3f}" if s.alone_vs_current is not None else "-"
        together = f"{s.together_s:.2f}" if s.together_s is not None else "-"
        ratio = f"{s.ratio:.2f}" if s.ratio is not None else "-"
        print(f"{s.config:<11}{s.alone_s:>9.2f}{together:>15}{ratio:>7}{vs:>18}")


def write_json(args: argparse.Namespace, trials: list[Trial], chosen: dict[str, dict[str, str]]) -> None:
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version()},
        "command": " ".join(["python", *sys.argv]),
        "steps": args.steps, "repeats": args.repeats, "jobs": args.jobs, "completed_trials": len(trials),
        "summary": [asdict(s) for s in summarise(trials, chosen)], "trials": [asdict(t) for t in trials],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.json)


if __name__ == "__main__":
    main()
