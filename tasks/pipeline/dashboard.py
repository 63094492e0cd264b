"""The run dashboard: one offline HTML page per retraining run.

It shows what the gate saw and why it decided: the candidate against the baselines and the
champion (a table and a bar chart), every gate check with its threshold, its evidence
(estimate, confidence interval, p-value) and verdict, sample predictions of the candidate
beside the champion's on the same examples (those that differ first), the training loss
curve, the data per source (corrections included, each source's validation report linked)
and the lineage (data md5, git commit, params digest, dvc.lock md5, MLflow run and dataset,
Prefect flow run). The page is built from plain data
(`RunView`), so it is testable without a flow; the retrain flow writes it to
`artifacts/reports/dashboard.html`, logs it to the MLflow run and links it from its
Prefect artifacts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.evaluate.gate import GATE_EVIDENCE, gate_evidence, gate_qualifier
from tasks.files import write_atomic
from tasks.pipeline.html import Raw, badge, bar_chart, cards, line_chart, page, table, text

# Metrics in the order the gate reads them; "lower is better" ones are marked in the table.
METRICS = ["exact_match", "bleu", "rouge_l", "perplexity", "latency_p95_ms", "tokens_per_second",
           # Where the test split has tool-call examples (tasks.evaluate.tools).
           "tool_name_accuracy", "tool_arguments_match", "tool_invalid_rate"]
PREFERENCE_METRICS = ["reward_accuracy", "reward_margin", "rated_down_repeat_rate", "examples"]
LOWER_IS_BETTER = {"perplexity", "latency_p95_ms", "rated_down_repeat_rate", "tool_invalid_rate"}
COUNTS = {"examples"}  # neither better higher nor lower: no arrow
ROLE_ORDER = ["candidate", "champion", "base_few_shot", "base_zero_shot"]
# Sample predictions shown side by side: (candidate role, champion role, the split they came from).
SAMPLE_PAIRS = [("candidate", "champion", "test split"),
                ("candidate_feedback", "champion_feedback", "feedback split: corrected answers held out of training")]


@dataclass(frozen=True)
class RunView:
    """Everything the dashboard shows, as plain data.

    Attributes:
        model_name, version, status, champion_version: the outcome (`status` is promoted,
            rejected or failed).
        metrics: role (candidate, champion, base_zero_shot, base_few_shot) to metric values.
        verdict: the gate's verdict, `{"passed": bool, "checks": [{name, value, threshold, passed,
            estimate, low, high, p_value, n, underpowered}], "notes": [...]}`.
        history: training steps, `[{"step": int, "loss": float}, ...]` (history.json).
        validation: the validation counts of all sources together (`merge_validation`).
        prepared: the prepare stage's stats.json (its `sources` give the per-source counts).
        lineage: name to value (data_md5, git_commit, params_digest, dvc_lock_md5, ...).
        links: label to URL (MLflow run, model version, Prefect flow run, data report).
        feedback: the feedback export (`RunResult.feedback`): examples per key, held, capped,
            and `redacted` (findings per category, examples changed or dropped).
        samples: role (candidate, champion, candidate_feedback, champion_feedback) to its first
            predictions, `[{"prompt", "reference", "prediction"}]`, in the split's order.
        source_reports: each source's validation report (a URL or a path), by source index;
            None for a source that was not validated (an empty feedback export).
        dataset: the name of the run's dataset in MLflow (`tasks.registry.tracking.dataset_name`).
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
    samples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    source_reports: list[str | None] = field(default_factory=list)
    dataset: str | None = None


def merge_validation(reports: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The validation counts of every source together (None for a source not validated)."""
    reports = [r for r in reports if r is not None]
    if not reports:
        return None
    merged: dict[str, Any] = {"examples": 0, "errors": {}, "warnings": {}, "dropped": 0}
    for report in reports:
        merged["examples"] += report["examples"]
        merged["dropped"] += report.get("dropped", 0)
        for key in ("errors", "warnings"):
            for category, n in report[key].items():
                merged[key][category] = merged[key].get(category, 0) + n
    return merged


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
    headers = ["model", *(k if k in COUNTS else f"{k} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in PREFERENCE_METRICS)]
    rows = [[Raw(f'<code data-role="{text(r)}">{text(r)}</code>'), *(metrics[r].get(k, "–") for k in PREFERENCE_METRICS)]
            for r in roles]
    return table(headers, rows)


def _gate_section(verdict: dict[str, Any] | None) -> str:
    """Every check: the decision (value against threshold), its evidence, and the verdict (tasks.evaluate.gate)."""
    if verdict is None:
        return '<p class="empty">the gate did not run</p>'
    rows = []
    for c in verdict.get("checks", []):
        qualifier = gate_qualifier(c)
        mark = badge("pass", "ok") if c["passed"] else badge("FAIL", "bad")
        rows.append([Raw(f"<code>{text(c['name'])}</code>"), *gate_evidence(c),
                     Raw(mark + (" " + badge(qualifier, "warn") if qualifier else ""))])
    head = badge("gate passed", "ok") if verdict.get("passed") else badge("gate REJECTED", "bad")
    notes = "".join(f"<li>{text(note)}</li>" for note in verdict.get("notes", []))
    return (f"<p>{head}</p>" + table(["check", *GATE_EVIDENCE, "verdict"], rows, empty="no checks recorded")
            + (f'<ul class="notes">{notes}</ul>' if notes else ""))


def _samples_section(samples: dict[str, list[dict[str, str]]]) -> str:
    """The candidate's predictions beside the champion's on the same examples, those that differ first."""
    parts = []
    for candidate, champion, split in SAMPLE_PAIRS:
        mine, theirs = samples.get(candidate) or [], samples.get(champion) or []
        if not mine:
            continue
        if not theirs:
            rows = [[s["prompt"], s["reference"], s["prediction"]] for s in mine]
            parts.append(f"<h3>{text(split)}</h3><p>no champion predictions to compare with (no champion before this run)</p>"
                         + table(["prompt", "reference", candidate], rows))
            continue
        pairs = _pair_samples(mine, theirs)
        rows = [[Raw(badge("differs", "warn") if _differs(s, t) else badge("same", "ok") if t else "–"),
                 s["prompt"], s["reference"], s["prediction"], t["prediction"] if t else "–"] for s, t in pairs]
        differ = sum(_differs(s, t) for s, t in pairs)
        parts.append(f"<h3>{text(split)}</h3><p>{differ} of {len(pairs)} predictions differ from the champion's</p>"
                     + table(["", "prompt", "reference", candidate, champion], rows))
    return "".join(parts) or '<p class="empty">no sample predictions: the run ended before evaluation</p>'


def _pair_samples(mine: list[dict], theirs: list[dict]) -> list[tuple[dict, dict | None]]:
    """Each candidate sample with the champion's on the same example, those that differ first.

    Both are the first examples of the same split in its order (`tasks.evaluate.score`), so
    they pair by position; the prompt and reference confirm it (None where they do not).
    """
    def same_example(s: dict, t: dict | None) -> bool:
        return t is not None and t["prompt"] == s["prompt"] and t["reference"] == s["reference"]

    pairs = [(s, theirs[i] if i < len(theirs) and same_example(s, theirs[i]) else None) for i, s in enumerate(mine)]
    return sorted(pairs, key=lambda pair: not _differs(*pair))  # stable: the split's order within each group


def _differs(mine: dict, theirs: dict | None) -> bool:
    return theirs is not None and theirs["prediction"] != mine["prediction"]


def _loss_section(history: list[dict[str, float]]) -> str:
    points = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    if not points:
        return '<p class="empty">no training history (the finetune stage was skipped or trained elsewhere)</p>'
    first, last = points[0][1], points[-1][1]
    chart = line_chart([p[0] for p in points], [p[1] for p in points], "Training loss", "step", "loss")
    return chart + f"<p>loss {first:.4g} at step {points[0][0]} → {last:.4g} at step {points[-1][0]}</p>"


def _data_section(validation: dict[str, Any] | None, prepared: dict[str, Any] | None,
                  source_reports: list[str | None]) -> str:
    parts = []
    if validation:
        parts.append(cards([("examples (all sources)", validation["examples"]),
                            ("errors", sum(validation["errors"].values())),
                            ("warnings", sum(validation["warnings"].values())), ("dropped", validation["dropped"]),
                            *([("kept after prepare", prepared["examples"])] if prepared and "examples" in prepared else [])]))
        counts = {**validation["errors"], **validation["warnings"]}
        parts.append(table(["category", "examples"], sorted(counts.items(), key=lambda kv: -kv[1]), empty="no errors or warnings"))
    parts.append(_sources_table((prepared or {}).get("sources") or [], source_reports))
    corrections = (prepared or {}).get("corrections")
    if corrections and corrections.get("examples"):  # a run without corrections says nothing of them
        parts.append(f"<p>corrections from feedback: {corrections['examples']:,} corrected answers, which replaced "
                     f"{corrections['replaced']:,} earlier answers to the same prompts</p>")
    if prepared:
        split = prepared.get("counts", {})
        parts.append(table(["split", "examples"], list(split.items()), empty="no splits"))
        tokens = prepared.get("token_stats", {})
        parts.append(table(["split", "tokens min", "median", "p95", "max"],
                           [[s, t["min"], t["median"], t["p95"], t["max"]] for s, t in tokens.items() if t]))
        parts.append(f"<p>train/test overlap: {text(prepared.get('train_test_overlap'))}, "
                     f"deduplicated: {text(prepared.get('deduplicated'))}</p>")
    return "".join(parts) or '<p class="empty">no data statistics</p>'


def _sources_table(sources: list[dict[str, Any]], reports: list[str | None]) -> str:
    """One row per source: what was read, invalid, corrected, replaced, deduplicated, dropped for length and kept;
    its validation report."""
    rows = []
    for i in range(max(len(sources), len(reports))):
        s = sources[i] if i < len(sources) else {}
        report = reports[i] if i < len(reports) else None
        rows.append([
            Raw(f"<code>{text(s.get('key', f'source {i}'))}</code>"), Raw(f"<code>{text(s.get('path'))}</code>"),
            "feedback" if s.get("feedback") else "data", s.get("rows", "–"), s.get("invalid", "–"),
            s.get("corrections", "–"), s.get("replaced_by_corrections", "–"),
            sum(s["deduplicated"].values()) if "deduplicated" in s else "–", s.get("length_dropped", "–"),
            s.get("kept", "–"), Raw(_link(report, label=_artifact_label(report))),
        ])
    return table(["source", "file", "kind", "read", "invalid", "corrections", "replaced by corrections", "duplicates",
                  "over data.max_tokens", "kept", "validation report"], rows,
                 empty="no per-source counts (prepare did not run)")


def _link(url: str | None, missing: str = "none: not validated (nothing to read)", label: str | None = None) -> str:
    """A link to follow when `url` is a web address (shown as `label`, or itself), else the path (or `missing`) as code."""
    if url and url.startswith(("http://", "https://")):
        return f'<a href="{text(url)}">{text(label or url)}</a>'
    return f"<code>{text(url or missing)}</code>"


def _artifact_label(url: str | None) -> str | None:
    """The artifact path of an MLflow UI link (`.../artifacts/reports/x.html?...` → `reports/x.html`)."""
    if not url or "/artifacts/" not in url:
        return None
    return url.split("/artifacts/", 1)[1].split("?", 1)[0]


def _feedback_section(feedback: dict[str, Any] | None) -> str:
    if not feedback:
        return '<p class="empty">no feedback source in this run</p>'
    redacted = feedback.get("redacted", {})
    parts = [cards([("examples", feedback.get("examples", 0)), ("held for approval", feedback.get("held", 0)), ("rejected", feedback.get("rejected", 0)),
                    ("superseded", feedback.get("superseded", 0)), ("rated low", feedback.get("rated_low", 0)),
                    ("stopped by the client", feedback.get("stopped", 0)),
                    ("forced by tool_choice", feedback.get("forced", 0)),
                    ("on another model's answers", feedback.get("other_model", 0)),
                    ("capped", feedback.get("capped", 0)), ("repeats merged", feedback.get("repeats", 0)),
                    ("invalid tools or calls", feedback.get("invalid_calls", 0)),
                    ("made no example", feedback.get("not_a_chat", 0)),
                    ("end users", feedback.get("users", 0)),
                    ("redacted examples", redacted.get("examples_changed", 0)),
                    ("dropped by redaction", redacted.get("examples_dropped", 0))])]
    preference = feedback.get("preference") or {}
    if preference:  # what the ratings became (KTO rows, DPO pairs), and what the per-key cap left out of them
        parts.append(cards([("preference rows", preference.get("examples", 0)),
                            ("rated well", preference.get("desirable", 0)), ("rated down", preference.get("undesirable", 0)),
                            ("pairs", preference.get("pairs_from_corrections", 0) + preference.get("pairs_from_ratings", 0)),
                            ("middle ratings left out", preference.get("middle", 0)),
                            ("broken calls left out", preference.get("broken_calls", 0)),
                            ("stopped answers left out", preference.get("stopped", 0)),
                            ("forced answers left out", preference.get("forced", 0)),
                            ("rows validation refuses", preference.get("invalid", 0)),
                            ("unchanged corrections", preference.get("unchanged_corrections", 0)),
                            ("no answer to learn", preference.get("not_a_chat", 0)),
                            ("preference rows capped", preference.get("capped", 0))]))
    parts.append(table(["key", "examples"], sorted(feedback.get("by_key", {}).items()), empty="no feedback exported"))
    parts.append(table(["redacted", "found"], [(c, n) for c, n in redacted.items() if not c.startswith("examples_")],
                       empty="nothing redacted"))
    return "".join(parts)


def _lineage_section(lineage: dict[str, str], links: dict[str, str | None], dataset: str | None) -> str:
    rows = [[k, Raw(f"<code>{text(v)}</code>")] for k, v in lineage.items()]
    if dataset:
        rows.append(["MLflow dataset", Raw(f"<code>{text(dataset)}</code>")])
    rows += [[label, Raw(_link(url, "none"))] for label, url in links.items()]
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
        '<h2 id="samples">Sample predictions: candidate and champion</h2>', _samples_section(view.samples),
        '<h2 id="loss">Training loss</h2>', _loss_section(view.history),
        '<h2 id="data">Data</h2>', _data_section(view.validation, view.prepared, view.source_reports),
        '<h2 id="feedback">Feedback: who taught it, what was redacted</h2>', _feedback_section(view.feedback),
        '<h2 id="lineage">Lineage</h2>', _lineage_section(view.lineage, view.links, view.dataset),
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
