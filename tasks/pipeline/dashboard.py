"""The run dashboard: one offline HTML page per retraining run.

It shows what the gate saw and why it decided: the candidate against the baselines and the
champion (a table and a bar chart), every gate check with its threshold and verdict, the
training loss curve, the data statistics and the lineage (data md5, git commit, params
digest, dvc.lock md5, MLflow run, Prefect flow run). The page is built from plain data
(`RunView`), so it is testable without a flow; the retrain flow writes it to
`artifacts/reports/dashboard.html`, logs it to the MLflow run and links it from its
Prefect artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.files import write_atomic
from tasks.pipeline.html import Raw, badge, bar_chart, cards, line_chart, page, table, text

# Metrics in the order the gate reads them; "lower is better" ones are marked in the table.
METRICS = ["exact_match", "bleu", "rouge_l", "perplexity", "latency_p95_ms", "tokens_per_second",
           # Where the test split has tool-call examples (tasks.evaluate.tools).
           "tool_name_accuracy", "tool_arguments_match", "tool_invalid_rate"]
PREFERENCE_METRICS = ["reward_accuracy", "reward_margin", "rated_down_repeat_rate", "examples"]
LOWER_IS_BETTER = {"perplexity", "latency_p95_ms", "rated_down_repeat_rate", "tool_invalid_rate"}
ROLE_ORDER = ["candidate", "champion", "base_few_shot", "base_zero_shot"]


@dataclass(frozen=True)
class RunView:
    """Everything the dashboard shows, as plain data.

    Attributes:
        model_name, version, status, champion_version: the outcome (`status` is promoted,
            rejected or failed).
        metrics: role (candidate, champion, base_zero_shot, base_few_shot) to metric values.
        verdict: the gate's verdict, `{"passed": bool, "checks": [{name, value, threshold, passed}]}`.
        history: training steps, `[{"step": int, "loss": float}, ...]` (history.json).
        validation: the validation report's dict (its counts and token statistics).
        prepared: the prepare stage's stats.json.
        lineage: name to value (data_md5, git_commit, params_digest, dvc_lock_md5, ...).
        links: label to URL (MLflow run, model version, Prefect flow run, data report).
        feedback: the feedback export (`RunResult.feedback`): examples per key, held, capped,
            and `redacted` (findings per category, examples changed or dropped).
    """

    model_name: str
    version: str | None
    status: str
    champion_version: str | None
    metrics: dict[str, dict[str, float]]
    verdict: dict[str, Any] | None
    history: list[dict[str, float]] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    prepared: dict[str, Any] | None = None
    lineage: dict[str, str] = field(default_factory=dict)
    links: dict[str, str | None] = field(default_factory=dict)
    feedback: dict[str, Any] | None = None


def _roles(metrics: dict[str, dict[str, float]]) -> list[str]:
    return [r for r in ROLE_ORDER if r in metrics] + sorted(r for r in metrics if r not in ROLE_ORDER)


def _metrics_section(metrics: dict[str, dict[str, float]]) -> str:
    roles = [r for r in _roles(metrics) if not r.endswith("_preference")]
    keys = [k for k in METRICS if any(k in metrics[r] for r in roles)]
    if not keys:
        return '<p class="empty">no metrics: the run ended before evaluation</p>'
    headers = ["model", *(f"{k} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in keys)]
    rows = [[Raw(f'<code data-role="{text(r)}">{text(r)}</code>'), *(metrics[r].get(k, "–") for k in keys)] for r in roles]
    chart = bar_chart(keys, {r: [metrics[r].get(k) for k in keys] for r in roles}, "Candidate against baselines and champion")
    return table(headers, rows) + chart


def _preference_section(metrics: dict[str, dict[str, float]]) -> str:
    """The candidate and the champion on the held-out preference split (a run with preference data only)."""
    roles = [r for r in ("candidate_preference", "champion_preference") if metrics.get(r)]
    if not roles:
        return '<p class="empty">no held-out preference split: no ratings in this run\'s data</p>'
    headers = ["model", *(f"{k} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in PREFERENCE_METRICS)]
    rows = [[Raw(f'<code data-role="{text(r)}">{text(r)}</code>'), *(metrics[r].get(k, "–") for k in PREFERENCE_METRICS)]
            for r in roles]
    return table(headers, rows)


def _gate_section(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return '<p class="empty">the gate did not run</p>'
    rows = [[Raw(f"<code>{text(c['name'])}</code>"), c["value"], c["threshold"],
             Raw(badge("pass", "ok") if c["passed"] else badge("FAIL", "bad"))] for c in verdict.get("checks", [])]
    head = badge("gate passed", "ok") if verdict.get("passed") else badge("gate REJECTED", "bad")
    return f"<p>{head}</p>" + table(["check", "value", "threshold", "verdict"], rows, empty="no checks recorded")


def _loss_section(history: list[dict[str, float]]) -> str:
    points = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    if not points:
        return '<p class="empty">no training history (the finetune stage was skipped or trained elsewhere)</p>'
    first, last = points[0][1], points[-1][1]
    chart = line_chart([p[0] for p in points], [p[1] for p in points], "Training loss", "step", "loss")
    return chart + f"<p>loss {first:.4g} at step {points[0][0]} → {last:.4g} at step {points[-1][0]}</p>"


def _data_section(validation: dict[str, Any] | None, prepared: dict[str, Any] | None) -> str:
    parts = []
    if validation:
        parts.append(cards([("examples", validation["examples"]), ("errors", sum(validation["errors"].values())),
                            ("warnings", sum(validation["warnings"].values())), ("dropped", validation["dropped"])]))
        counts = {**validation["errors"], **validation["warnings"]}
        parts.append(table(["category", "examples"], sorted(counts.items(), key=lambda kv: -kv[1]), empty="no errors or warnings"))
    if prepared:
        split = prepared.get("counts", {})
        parts.append(table(["split", "examples"], list(split.items()), empty="no splits"))
        tokens = prepared.get("token_stats", {})
        parts.append(table(["split", "tokens min", "median", "p95", "max"],
                           [[s, t["min"], t["median"], t["p95"], t["max"]] for s, t in tokens.items() if t]))
        parts.append(f"<p>train/test overlap: {text(prepared.get('train_test_overlap'))}, "
                     f"deduplicated: {text(prepared.get('deduplicated'))}</p>")
    return "".join(parts) or '<p class="empty">no data statistics</p>'


def _feedback_section(feedback: dict[str, Any] | None) -> str:
    if not feedback:
        return '<p class="empty">no feedback source in this run</p>'
    redacted = feedback.get("redacted", {})
    parts = [cards([("examples", feedback.get("examples", 0)), ("held for approval", feedback.get("held", 0)),
                    ("capped", feedback.get("capped", 0)), ("end users", feedback.get("users", 0)),
                    ("redacted examples", redacted.get("examples_changed", 0)),
                    ("dropped by redaction", redacted.get("examples_dropped", 0))])]
    parts.append(table(["key", "examples"], sorted(feedback.get("by_key", {}).items()), empty="no feedback exported"))
    parts.append(table(["redacted", "found"], [(c, n) for c, n in redacted.items() if not c.startswith("examples_")],
                       empty="nothing redacted"))
    return "".join(parts)


def _lineage_section(lineage: dict[str, str], links: dict[str, str | None]) -> str:
    rows = [[k, Raw(f"<code>{text(v)}</code>")] for k, v in lineage.items()]
    for label, url in links.items():
        is_url = bool(url) and url.startswith(("http://", "https://"))
        cell = f'<a href="{text(url)}">{text(url)}</a>' if is_url else f"<code>{text(url or 'none')}</code>"
        rows.append([label, Raw(cell)])
    return table(["", "value"], rows, empty="no lineage recorded")


def render_dashboard(view: RunView) -> str:
    """The HTML page of a run."""
    kind = {"promoted": "ok", "rejected": "bad"}.get(view.status, "warn")
    title = f"{view.model_name} v{view.version or '–'}"
    body = [
        f'<h1>{text(title)} {badge(view.status, kind)}</h1>',
        f'<p class="sub">champion: v{text(view.champion_version)}</p>',
        '<h2 id="metrics">Candidate, baselines and champion</h2>', _metrics_section(view.metrics),
        '<h2 id="preference">Held-out preferences</h2>', _preference_section(view.metrics),
        '<h2 id="gate">Gate</h2>', _gate_section(view.verdict),
        '<h2 id="loss">Training loss</h2>', _loss_section(view.history),
        '<h2 id="data">Data</h2>', _data_section(view.validation, view.prepared),
        '<h2 id="feedback">Feedback: who taught it, what was redacted</h2>', _feedback_section(view.feedback),
        '<h2 id="lineage">Lineage</h2>', _lineage_section(view.lineage, view.links),
    ]
    return page(f"Run dashboard: {title}", "\n".join(body))


def load_run_files(root: Path) -> dict[str, Any]:
    """The training history and prepared-data statistics a run left under `root/artifacts` (empty when absent)."""
    def read(rel: str, default: Any) -> Any:
        path = root / rel
        return json.loads(path.read_text()) if path.is_file() else default

    return {"history": read("artifacts/model/history.json", []), "prepared": read("artifacts/prepared/stats.json", None)}


def write_dashboard(view: RunView, path: Path) -> Path:
    """Write the page to `path` (atomically) and return it."""
    write_atomic(Path(path), render_dashboard(view))
    return Path(path)
