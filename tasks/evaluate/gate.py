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
  metric (absolute for scores in [0, 1], relative for perplexity).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tasks.config import GateParams

# Scores in [0, 1] where higher is better; compared against the champion.
HIGHER_IS_BETTER = ("exact_match", "rouge_l", "f1")


@dataclass(frozen=True)
class Check:
    name: str
    value: float
    threshold: float
    passed: bool


@dataclass(frozen=True)
class Verdict:
    passed: bool
    checks: list[Check]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.passed]


def _at_least(name: str, value: float, threshold: float) -> Check:
    return Check(name, round(value, 6), round(threshold, 6), value >= threshold)


def _at_most(name: str, value: float, threshold: float) -> Check:
    return Check(name, round(value, 6), round(threshold, 6), value <= threshold)


def apply_gate(metrics: dict[str, dict[str, float]], gate: GateParams) -> Verdict:
    """Judge `metrics["candidate"]` against thresholds, prompting baselines and `metrics["champion"]`.

    Args:
        metrics: per model ("candidate", "base_zero_shot", "base_few_shot", "champion"), its metrics.
        gate: the thresholds.
    """
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
    champion = metrics.get("champion")
    if champion:
        for key in HIGHER_IS_BETTER:
            if key in cand and key in champion:
                checks.append(_at_least(f"no_regression_{key}", cand[key], champion[key] - gate.max_regression))
        checks.append(
            _at_most("no_regression_perplexity", cand["perplexity"], champion["perplexity"] * (1 + gate.max_regression))
        )
    return Verdict(all(c.passed for c in checks), checks)
