"""The Great Expectations suite over a dataframe of the examples, and its Data Docs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

# One dataframe column per per-example check (one row per example).
COLUMNS = (
    "line", "parsed", "n_messages", "fields_ok", "keys_ok", "roles_ok", "content_ok", "has_assistant",
    "last_role", "alternating", "system_first", "is_duplicate", "is_near_duplicate", "total_tokens",
    "assistant_tokens", "kept_by_length_policy",
)  # fmt: skip


def build_suite(max_tokens: int | None, max_drop_fraction: float, length_policy: str):
    """The expectation suite of the per-example checks (columns of the examples dataframe)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="chat_examples")
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column="line"))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="parsed", value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="n_messages", min_value=1))
    for flag in ("fields_ok", "keys_ok", "roles_ok", "content_ok", "has_assistant", "alternating", "system_first"):
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=flag, value_set=[True]))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="last_role", value_set=["assistant"]))
    for flag in ("is_duplicate", "is_near_duplicate"):
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=flag, value_set=[False]))
    # Trained tokens under the run's template (null where not counted): none means nothing to learn.
    suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="assistant_tokens", min_value=1))
    if max_tokens is not None:
        mostly = 1.0 - max_drop_fraction
        if length_policy == "drop":
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column="total_tokens", max_value=max_tokens, mostly=mostly))
        else:
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column="kept_by_length_policy", value_set=[True], mostly=mostly))
    return suite


def examples_frame(rows: list[dict[str, Any]]):
    """A pandas dataframe with one row per example and the columns the suite checks."""
    import pandas as pd

    frame = pd.DataFrame.from_records(rows, columns=list(COLUMNS))
    return frame.astype({"line": "int64"})


def run_gx_suite(
    rows: list[dict[str, Any]], context_dir: Path, max_tokens: int | None, max_drop_fraction: float, length_policy: str
) -> tuple[dict[str, Any], str | None]:
    """Run the suite as one GX checkpoint (file context under `context_dir`) and build Data Docs.

    Returns:
        (summary: success and per-expectation unexpected counts, path of the Data Docs index.html).
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import logging

    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context_dir.mkdir(parents=True, exist_ok=True)
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="file", project_root_dir=str(context_dir))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_or_update_pandas("training_data")
    asset = source.add_dataframe_asset("examples")
    batch = asset.add_batch_definition_whole_dataframe("all_examples")
    suite = context.suites.add_or_update(build_suite(max_tokens, max_drop_fraction, length_policy))
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name="validate_examples", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(
            name="training_data",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "SUMMARY"},
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": examples_frame(rows)})
    expectations = []
    for run in result.run_results.values():
        for r in run.results:
            expectations.append(
                {
                    "expectation": r.expectation_config.type,
                    "column": r.expectation_config.kwargs.get("column"),
                    "success": bool(r.success),
                    "unexpected_count": r.result.get("unexpected_count"),
                }
            )
    docs = None
    for site in context.get_docs_sites_urls():
        url = site.get("site_url") or ""
        docs = url.removeprefix("file://") or None
    return {"success": bool(result.success), "expectations": expectations}, docs
