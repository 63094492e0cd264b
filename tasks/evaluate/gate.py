"""The metric gate: decide whether a candidate may replace the champion.

Every check is reported with its name, the measured value, the threshold and the verdict,
so a rejected run says exactly which check failed. Checks:

- the candidate's metrics must rest on something: `min_scored_tokens` refuses metrics
  that scored no assistant token (a perplexity of 1.0 over nothing passes any ceiling);
- absolute floors and ceilings on the candidate (`gate.min_exact_match`,
  `gate.max_perplexity`, `gate.max_p95_latency_ms`);
- fine-tuning must be worth it: exact match above the best prompting baseline of the base
  model (zero-shot or few-shot) by `gate.min_gain_over_prompting`;
- no regression against the champion by more than `gate.max_regression` on each gated
  metric (absolute for scores in [0, 1], relative for perplexity);
- where the test split has tool-call examples, no regression against the champion of the
  function-name accuracy, the argument exact match and the share of valid calls
  (`no_regression_tool_name_match`, `no_regression_tool_arguments_match`,
  `no_regression_tool_valid_call`; scores of `tasks.evaluate.tools`);
- where prepare held corrected answers out as a feedback split, no regression of exact
  match against the champion on it (`no_regression_feedback_exact_match`): a model must
  not get worse on the cases users corrected.

The champion is scored on the same test examples as the candidate, so with per-example
scores (`per_example`, from `tasks.evaluate.score`) the regression checks are paired
tests (`tasks/evaluate/paired.py`): a `no_regression_*` check fails when the candidate is
worse than the champion by more than `gate.max_regression` *and* significantly worse: the
estimate of the change lies beyond the margin and its confidence interval (at
`gate.confidence`) excludes no change (for 0/1 scores McNemar's exact test must agree). A
drop within the margin passes however significant (retrains that differ only in their seed
differ by that much), and so does a larger drop the data cannot tell from noise. The check's
`value` is the estimate (candidate - champion for scores; the relative perplexity change)
and `threshold` the margin; `estimate`, `low`, `high`, `p_value` (McNemar's exact test for
exact match and accuracy) and `n` come with it. A check whose interval is wider than the
margin *and* passed although its interval reaches beyond the margin says so
(`underpowered`, `examples_needed`, a `note`): the test split cannot tell a drop of
`max_regression` from noise, so the pass is the benefit of the doubt. A failed
check is significant, never underpowered. Without per-example
scores (a champion scored before they existed) a check falls back to the fixed margin on
the aggregate values, and says so.

Floors and ceilings still decide on the candidate's point value; their confidence
interval is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from tasks.config import GateParams
from tasks.evaluate.paired import (
    Interval,
    bootstrap_difference,
    bootstrap_mean,
    discordant_pairs,
    examples_needed,
    mcnemar_p_value,
)

# Scores in [0, 1] where higher is better; compared against the champion.
HIGHER_IS_BETTER = ("exact_match", "rouge_l", "f1")
# Tool-call scores (tasks.evaluate.tools): per example over the tool-call examples (`tool_ids`),
# and the aggregate each is the mean of (the invalid rate is 1 - the mean of valid calls).
TOOL_CHECKS = {"tool_name_match": "tool_name_accuracy", "tool_arguments_match": "tool_arguments_match",
               "tool_valid_call": "tool_invalid_rate"}
# Per-example scores the paired checks read; bleu is sentence BLEU (0-100), compared on a 0-1 scale.
PAIRED_SCORES = ("exact_match", "accuracy", "rouge_l", "bleu")
BINARY_SCORES = ("exact_match", "accuracy", *TOOL_CHECKS)
SCALE = {"bleu": 0.01}


@dataclass(frozen=True)
class Check:
    """One check; `name, value, threshold, passed` always, the statistics where there are some."""

    name: str
    value: float
    threshold: float
    passed: bool
    estimate: float | None = None  # point estimate: the candidate's value, or its change from the champion
    low: float | None = None  # confidence interval of `estimate` at gate.confidence
    high: float | None = None
    p_value: float | None = None  # McNemar's exact test (0/1 scores against the champion)
    n: int | None = None  # examples the estimate rests on
    method: str = "threshold"  # threshold | paired bootstrap | paired bootstrap + McNemar | fixed margin
    underpowered: bool = False  # the interval is wider than the margin the check enforces
    examples_needed: int | None = None  # test examples that would narrow it to that margin
    note: str | None = None


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: list[Check]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks], "notes": self.notes}

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]


def _at_least(name: str, value: float, threshold: float) -> Check:
    return Check(name, round(value, 6), round(threshold, 6), value >= threshold)


def _at_most(name: str, value: float, threshold: float) -> Check:
    return Check(name, round(value, 6), round(threshold, 6), value <= threshold)


def apply_gate(
    metrics: dict[str, dict[str, float]], gate: GateParams, per_example: dict[str, dict[str, list]] | None = None,
) -> Verdict:
    """Judge `metrics["candidate"]` against thresholds, prompting baselines and `metrics["champion"]`.

    Args:
        metrics: per model ("candidate", "base_zero_shot", "base_few_shot", "champion"), its metrics.
        gate: the thresholds.
        per_example: per model, its per-example scores on the same test examples
            (`tasks.evaluate.score.per_example_scores`); with them the champion checks are paired
            tests and every check reports its confidence interval.
    """
    per_example = per_example or {}
    cand = metrics["candidate"]
    # Metrics written before `scored_tokens` existed lack it: they are judged on the rest.
    scored = [_at_least("min_scored_tokens", cand["scored_tokens"], 1)] if "scored_tokens" in cand else []
    checks = [
        *scored,
        _at_least("min_exact_match", cand["exact_match"], gate.min_exact_match),
        _at_most("max_perplexity", cand["perplexity"], gate.max_perplexity),
        _at_most("max_p95_latency_ms", cand["latency_p95_ms"], gate.max_p95_latency_ms),
    ]
    baselines = [metrics[k]["exact_match"] for k in ("base_zero_shot", "base_few_shot") if k in metrics]
    if baselines:
        checks.append(
            _at_least("min_gain_over_prompting", cand["exact_match"] - max(baselines), gate.min_gain_over_prompting)
        )
    checks = [_with_interval(c, metrics, per_example, gate) for c in checks]
    champion = metrics.get("champion")
    if champion:
        paired = _pairable(per_example.get("candidate"), per_example.get("champion"))
        checks += _champion_checks(cand, champion, paired, gate)
        checks += _tool_checks(cand, champion, per_example.get("candidate"), per_example.get("champion"), gate)
    if metrics.get("candidate_feedback") and metrics.get("champion_feedback"):
        checks.append(_feedback_check(metrics, per_example, gate))
    if metrics.get("candidate_preference") and metrics.get("champion_preference"):
        checks += _preference_checks(metrics, per_example, gate)
    notes = [f"{c.name}: {c.note}" for c in checks if c.note]
    return Verdict(all(c.passed for c in checks), checks, notes)


def no_regression_checks(candidate: dict, reference: dict, gate: GateParams) -> list[Check]:
    """The gate's no-regression checks of one model against another, as it runs them against the
    champion: every paired score, perplexity, macro-F1 by a fixed margin, and the tool checks.

    Args:
        candidate, reference: `tasks.evaluate.score.evaluate_model` results on the same examples.
        gate: the margins (`require_improvement` does not apply: this is no-regression only).
    """
    gate = gate.model_copy(update={"require_improvement": False})
    cand, ref = candidate["metrics"], reference["metrics"]
    a, b = candidate["per_example"], reference["per_example"]
    return [*_champion_checks(cand, ref, _pairable(a, b), gate), *_tool_checks(cand, ref, a, b, gate)]


def _pairable(candidate: dict | None, champion: dict | None) -> tuple[dict, dict] | None:
    """Both models' per-example scores when they cover the same examples in the same order."""
    if not candidate or not champion or candidate.get("ids") != champion.get("ids") or not candidate.get("ids"):
        return None
    return candidate, champion


def _champion_checks(cand: dict, champion: dict, paired: tuple[dict, dict] | None, gate: GateParams) -> list[Check]:
    """`no_regression_*` on every metric both models have, and `improvement_over_champion` if required."""
    checks = []
    if paired is None:
        fallback = "no per-example scores of both models on the same examples: fixed margin on the aggregate values"
        for key in HIGHER_IS_BETTER:
            if key in cand and key in champion:
                check = _at_least(f"no_regression_{key}", cand[key], champion[key] - gate.max_regression)
                checks.append(replace(check, method="fixed margin", note=fallback))
        check = _at_most("no_regression_perplexity", cand["perplexity"], champion["perplexity"] * (1 + gate.max_regression))
        checks.append(replace(check, method="fixed margin", note=fallback))
        if gate.require_improvement:
            check = _at_least("improvement_over_champion", cand["exact_match"] - champion["exact_match"], 0.0)
            checks.append(replace(check, passed=check.value > 0, method="fixed margin", note=fallback))
        return checks
    a, b = paired
    for key in PAIRED_SCORES:
        if key in a and key in b:
            checks.append(no_regression_paired(key, a[key], b[key], gate))
    for key in HIGHER_IS_BETTER:  # e.g. macro-F1: no per-example score, so a fixed margin
        if key not in PAIRED_SCORES and key in cand and key in champion:
            check = _at_least(f"no_regression_{key}", cand[key], champion[key] - gate.max_regression)
            checks.append(replace(check, method="fixed margin", note="not an average over examples: fixed margin"))
    checks.append(_no_regression_perplexity(a, b, gate))
    if gate.require_improvement:
        checks.append(_improvement(a["exact_match"], b["exact_match"], gate))
    return checks


def _tool_checks(cand: dict, champion: dict, cand_scores: dict | None, champion_scores: dict | None,
                 gate: GateParams) -> list[Check]:
    """`no_regression_tool_*` when both models were scored on tool-call examples: paired on the
    same examples (McNemar's exact test beside the bootstrap), else a fixed margin on the aggregates."""
    if not cand.get("tool_calls") or not champion.get("tool_calls"):
        return []  # the test split has no tool-call examples (or the champion was scored before they existed)
    a, b = cand_scores or {}, champion_scores or {}
    if a.get("tool_ids") and a.get("tool_ids") == b.get("tool_ids"):
        return [no_regression_paired(key, a[key], b[key], gate) for key in TOOL_CHECKS]
    note = "no per-example tool scores of both models on the same examples: fixed margin on the aggregate values"
    checks = []
    for key, metric in TOOL_CHECKS.items():
        if metric == "tool_invalid_rate":
            check = _at_most(f"no_regression_{key}", cand[metric], champion[metric] + gate.max_regression)
        else:
            check = _at_least(f"no_regression_{key}", cand[metric], champion[metric] - gate.max_regression)
        checks.append(replace(check, method="fixed margin", note=note))
    return checks


def _feedback_check(metrics: dict, per_example: dict, gate: GateParams) -> Check:
    """`no_regression_feedback_exact_match`: the candidate against the champion on the corrected answers held out."""
    name = "no_regression_feedback_exact_match"
    paired = _pairable(per_example.get("candidate_feedback"), per_example.get("champion_feedback"))
    if paired is None:
        cand, champion = metrics["candidate_feedback"]["exact_match"], metrics["champion_feedback"]["exact_match"]
        check = _at_least(name, cand, champion - gate.max_regression)
        return replace(check, method="fixed margin", note="no per-example scores of both models: fixed margin")
    check = no_regression_paired("exact_match", paired[0]["exact_match"], paired[1]["exact_match"], gate)
    note = check.note and check.note.replace("(raise data.test_fraction and eval.max_examples)",
                                             "(more corrections, or a higher data.feedback_fraction)")
    return replace(check, name=name, note=note)


def _preference_checks(metrics: dict, per_example: dict, gate: GateParams) -> list[Check]:
    """On the held-out preference split, against the champion: reward accuracy, and not repeating rated-down answers.

    `no_regression_reward_accuracy`: the candidate prefers what users preferred at least as
    often as the champion (paired over the same rows). `no_regression_avoids_rated_down`:
    the candidate, greedy, reproduces the answers users rated down no more often.
    """
    cand, champ = per_example.get("candidate_preference"), per_example.get("champion_preference")
    checks = []
    for name, key, ids, metric, sign in (
        ("no_regression_reward_accuracy", "reward_accuracy", "ids", "reward_accuracy", 1.0),
        ("no_regression_avoids_rated_down", "avoids_rated_down", "rated_down_ids", "rated_down_repeat_rate", -1.0),
    ):
        c_m, h_m = metrics["candidate_preference"].get(metric), metrics["champion_preference"].get(metric)
        if c_m is None or h_m is None:
            continue
        if cand and champ and cand.get(ids) and cand.get(ids) == champ.get(ids):
            check = no_regression_paired("exact_match", cand[key], champ[key], gate)  # binary scores: bootstrap + McNemar
            checks.append(replace(check, name=name, note=check.note and check.note.replace(
                "(raise data.test_fraction and eval.max_examples)", "(more ratings, or a higher preference.heldout_fraction)")))
        else:
            check = _at_least(name, sign * c_m, sign * h_m - gate.max_regression)
            checks.append(replace(check, method="fixed margin", note="no per-example scores of both models: fixed margin"))
    return checks


# Beyond this many times the split's examples, a count of "examples needed" is no advice.
MAX_EXAMPLES_FACTOR = 20


def _power(check: Check, interval: Interval, margin: float, confidence: float, what: str, decided: bool) -> Check:
    """Mark a passed check that the data cannot decide: its interval is wider than its margin and
    reaches beyond it. A failed check is significant, and a check whose whole interval lies on
    the passing side is clear, however wide: neither is underpowered. The examples that would
    narrow it are given while they are a practical number (MAX_EXAMPLES_FACTOR times the split).
    """
    if decided or interval.half_width <= margin:
        return check
    needed = examples_needed(interval.n, interval.half_width, margin)
    if needed is None:
        more = "no test split narrows it to 0"
    elif needed > MAX_EXAMPLES_FACTOR * interval.n:
        needed, more = None, f"more than {MAX_EXAMPLES_FACTOR} times as many test examples would be needed to narrow it"
    else:
        more = f"about {needed} test examples would narrow it to ±{margin:g}"
    note = (
        f"underpowered: on {interval.n} examples the {confidence:.0%} interval is ±{interval.half_width:.3f}, wider "
        f"than the margin {margin:g}, so only {what} beyond {margin + interval.half_width:.3f} can be told from noise; "
        f"{more} (raise data.test_fraction and eval.max_examples)"
    )
    return replace(check, underpowered=True, examples_needed=needed, note=note)


def no_regression_paired(key: str, candidate: list, champion: list, gate: GateParams) -> Check:
    """Fails when (candidate - champion) is below -max_regression and significantly below 0."""
    scale = SCALE.get(key, 1.0)
    ci = bootstrap_difference([v * scale for v in candidate], [v * scale for v in champion],
                              gate.confidence, gate.bootstrap_resamples)
    p_value, method = None, "paired bootstrap"
    significant = ci.high < 0
    if key in BINARY_SCORES:
        gains, losses = discordant_pairs(candidate, champion)
        p_value, method = mcnemar_p_value(gains, losses), "paired bootstrap + McNemar"
        # The exact test guards the bootstrap where discordant pairs are few.
        significant = significant and p_value < 1 - gate.confidence
    passed = not (ci.estimate < -gate.max_regression and significant)
    check = Check(
        f"no_regression_{key}", round(ci.estimate, 6), round(-gate.max_regression, 6), passed,
        estimate=round(ci.estimate, 6), low=round(ci.low, 6), high=round(ci.high, 6),
        p_value=None if p_value is None else round(p_value, 6), n=ci.n, method=method,
    )
    decided = not passed or ci.low >= -gate.max_regression  # a significant drop, or no drop of the margin inside
    return _power(check, ci, gate.max_regression, gate.confidence, "drops", decided)


def _no_regression_perplexity(candidate: dict, champion: dict, gate: GateParams) -> Check:
    """Relative change of perplexity, exp(mean NLL difference) - 1; fails when it is above the margin and
    significantly above 0."""
    ci = bootstrap_difference(candidate["nll"], champion["nll"], gate.confidence, gate.bootstrap_resamples,
                              candidate_weights=candidate["tokens"], champion_weights=champion["tokens"])
    rel = Interval(math.expm1(ci.estimate), math.expm1(ci.low), math.expm1(ci.high), ci.n)
    check = Check(
        "no_regression_perplexity", round(rel.estimate, 6), round(gate.max_regression, 6),
        not (rel.estimate > gate.max_regression and rel.low > 0),
        estimate=round(rel.estimate, 6), low=round(rel.low, 6), high=round(rel.high, 6), n=rel.n,
        method="paired bootstrap",
    )
    decided = not check.passed or rel.high <= gate.max_regression
    return _power(check, rel, gate.max_regression, gate.confidence, "relative rises", decided)


def _improvement(candidate: list, champion: list, gate: GateParams) -> Check:
    """`gate.require_improvement`: the lower bound of the exact-match gain must lie above 0."""
    ci = bootstrap_difference(candidate, champion, gate.confidence, gate.bootstrap_resamples)
    gains, losses = discordant_pairs(candidate, champion)
    return Check(
        "improvement_over_champion", round(ci.low, 6), 0.0, ci.low > 0,
        estimate=round(ci.estimate, 6), low=round(ci.low, 6), high=round(ci.high, 6),
        p_value=round(mcnemar_p_value(gains, losses), 6), n=ci.n, method="paired bootstrap + McNemar",
    )


def _with_interval(check: Check, metrics: dict, per_example: dict, gate: GateParams) -> Check:
    """Attach the confidence interval of a floor or ceiling check's value; the decision is unchanged."""
    cand = per_example.get("candidate")
    if not cand:
        return check
    if check.name == "min_exact_match":
        ci = bootstrap_mean(cand["exact_match"], gate.confidence, gate.bootstrap_resamples)
    elif check.name == "max_perplexity":
        nll = bootstrap_mean(cand["nll"], gate.confidence, gate.bootstrap_resamples, weights=cand["tokens"])
        ci = Interval(math.exp(nll.estimate), math.exp(nll.low), math.exp(nll.high), nll.n)
    elif check.name == "min_gain_over_prompting":
        best = max((k for k in ("base_zero_shot", "base_few_shot") if k in metrics and k in per_example),
                   key=lambda k: metrics[k]["exact_match"], default=None)
        if best is None or per_example[best].get("ids") != cand.get("ids"):
            return check
        ci = bootstrap_difference(cand["exact_match"], per_example[best]["exact_match"],
                                  gate.confidence, gate.bootstrap_resamples)
    else:
        return check
    return replace(check, estimate=round(ci.estimate, 6), low=round(ci.low, 6), high=round(ci.high, 6), n=ci.n)


GATE_EVIDENCE = ("value", "threshold", "estimate", "interval", "p-value", "n")


def gate_evidence(check: dict) -> list[str]:
    """One check's decision and evidence as text, in `GATE_EVIDENCE`'s order (blank where it has none)."""
    def fmt(x: Any) -> str:
        return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    interval = f"[{fmt(check['low'])}, {fmt(check['high'])}]" if check.get("low") is not None else ""
    return [fmt(check["value"]), fmt(check["threshold"]), fmt(check.get("estimate")), interval,
            fmt(check.get("p_value")), fmt(check.get("n"))]


def gate_qualifier(check: dict) -> str:
    """"underpowered" where the check says the data cannot decide it (a passed check only), else ""."""
    return "underpowered" if check.get("underpowered") else ""


def gate_table(checks: list[dict]) -> list[str]:
    """The gate's checks as a markdown table: the decision (value against threshold) and its evidence.

    A paired check's interval and p-value are what tell a regression from noise, so the
    operator sees them beside the verdict, not only in the JSON result. The run dashboard
    shows the same cells (`gate_evidence`, `gate_qualifier`) as HTML.
    """
    columns = ("check", *GATE_EVIDENCE, "passed")
    rows = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for c in checks:
        flag = f" ({gate_qualifier(c)})" if gate_qualifier(c) else ""
        rows.append(f"| {' | '.join([c['name'], *gate_evidence(c)])} | {c['passed']}{flag} |")
    return rows
