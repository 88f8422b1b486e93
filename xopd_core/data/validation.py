"""Dataset validation: a Great Expectations suite over manifests plus probes of the audio.

The audio is probed in Python (exists, inside the data root, decodes, rate, channels,
duration, sha256) into columns of one pandas frame covering every manifest of a dataset; GX
then checks each rule on that frame. Every rule names the rows that break it (manifest file,
line, id). This is not the place that fixes data: it only reports and fails.
"""

from __future__ import annotations

import html
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf

from xopd_core.config import ValidateParams
from xopd_core.data.manifest import (
    AUDIO_FIELDS,
    MANIFEST_FIELDS,
    SPLITS,
    TEXT_FIELDS,
    TEXT_SPLITS,
    TRAIN_SPLITS,
    ManifestRow,
    manifest_path,
    read_manifest,
    read_rows,
)
from xopd_core.data.speech import sha256_file
from xopd_core.data.tasks import KINDS, task_table

REPORT_JSON = "validation.json"
REPORT_HTML = "validation.html"
MAX_ROWS_IN_REPORT = 200  # per rule; the counts are always complete


class DataValidationError(RuntimeError):
    """The dataset broke at least one rule; `report` holds the details."""

    def __init__(self, message: str, report: ValidationReport):
        super().__init__(message)
        self.report = report


@dataclass
class RuleOutcome:
    rule: str
    description: str
    expectation: str
    success: bool
    unexpected_count: int
    failures: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


@dataclass
class ValidationReport:
    success: bool
    data_root: str
    manifests: list[str]
    n_rows: int
    rules: list[RuleOutcome]
    seconds: float
    great_expectations: dict[str, Any] | None = None  # GX's own result

    @property
    def failed_rules(self) -> list[RuleOutcome]:
        return [r for r in self.rules if not r.success]

    def summary_line(self) -> str:
        if self.success:
            return f"validation passed: {self.n_rows} rows, {len(self.rules)} rules"
        parts = [f"{r.rule} ({r.unexpected_count} rows)" for r in self.failed_rules]
        return f"validation FAILED: {len(self.failed_rules)} rule(s) broken: " + ", ".join(parts)

    def failure_lines(self, per_rule: int = 5) -> list[str]:
        """Human-readable lines naming the row and the rule, for logs and exceptions."""
        lines = []
        for r in self.failed_rules:
            if r.error:
                lines.append(f"[{r.rule}] {r.description}: {r.error}")
            for f in r.failures[:per_rule]:
                lines.append(
                    f"{f['manifest']}:{f['line']} (id {f['id']!r}) breaks [{r.rule}] "
                    f"{r.description}; found {f['value']!r}"
                )
            if r.unexpected_count > per_rule:
                lines.append(f"[{r.rule}] … and {r.unexpected_count - per_rule} more rows")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- probing ----------------------------------------------------------------------------


def probe_audio(audio_path: Any, data_root: Path) -> dict[str, Any]:
    """Facts about one row's audio; None where a fact cannot be known (e.g. file missing)."""
    out: dict[str, Any] = {
        "audio_inside_root": None,
        "audio_exists": None,
        "audio_decodable": None,
        "audio_sample_rate": None,
        "audio_channels": None,
        "audio_duration_s": None,
        "audio_sha256": None,
        "audio_decode_error": None,
    }
    if not isinstance(audio_path, str) or not audio_path.strip():
        return out
    root = data_root.resolve()
    # resolve() follows symlinks too, so a link pointing outside the root is caught.
    resolved = (root / audio_path).resolve()
    out["audio_inside_root"] = not os.path.isabs(audio_path) and resolved.is_relative_to(root)
    if not out["audio_inside_root"]:
        return out  # never read files outside the data root
    out["audio_exists"] = resolved.is_file()
    if not out["audio_exists"]:
        return out
    out["audio_sha256"] = sha256_file(resolved)
    try:
        info = sf.info(str(resolved))
        data, rate = sf.read(str(resolved), dtype="float32", always_2d=True)
        if data.shape[0] != info.frames:
            raise ValueError(f"header says {info.frames} frames, decoded {data.shape[0]}")
        if data.size and not np.isfinite(data).all():
            raise ValueError("non-finite samples")
    except (RuntimeError, ValueError, TypeError, sf.LibsndfileError) as err:
        out["audio_decodable"] = False
        out["audio_decode_error"] = str(err)[:200]
        return out
    out["audio_decodable"] = True
    out["audio_sample_rate"] = int(rate)
    out["audio_channels"] = int(data.shape[1])
    out["audio_duration_s"] = data.shape[0] / rate if rate else 0.0
    return out


def _prompt_key(text: Any) -> str | None:
    return " ".join(text.lower().split()) if isinstance(text, str) else None


def build_frame(manifests: Sequence[Path], data_root: Path) -> pd.DataFrame:
    """One row per manifest row, with the manifest's fields and the audio probe's facts."""
    records = []
    for m in manifests:
        for row in read_manifest(m):
            rec = {k: row.get(k) for k in MANIFEST_FIELDS}
            rec["manifest"] = str(m)
            rec["line"] = row["_line"]
            rec.update(probe_audio(row.get("audio_path"), data_root))
            records.append(rec)
    df = pd.DataFrame.from_records(records)
    df["row_ref"] = df["manifest"] + ":" + df["line"].astype(str)
    df["prompt_key"] = [_prompt_key(t) for t in df["transcript"]]
    declared = pd.to_numeric(df["duration_s"], errors="coerce")
    df["duration_mismatch_s"] = (declared - df["audio_duration_s"].astype(float)).abs()
    df["prompt_also_in"] = _cross_split_overlap(df)
    absent = {f: df[f].isna().to_numpy() for f in AUDIO_FIELDS}
    speech = (~df["split"].isin(TEXT_SPLITS)).to_numpy()
    df["missing_audio_fields"] = [
        ",".join(f for f in AUDIO_FIELDS if absent[f][i]) if speech[i] else ""
        for i in range(len(df))
    ]
    return df


def _cross_split_overlap(df: pd.DataFrame) -> list[str]:
    """For each row, the other side (training vs. evaluation splits) holding the same prompt."""
    is_train = df["split"].isin(TRAIN_SPLITS)
    known = df["prompt_key"].notna() & df["split"].notna()
    splits_of: dict[tuple[bool, str], set[str]] = {}
    for key, split, train in zip(
        df.loc[known, "prompt_key"], df.loc[known, "split"], is_train[known], strict=True
    ):
        splits_of.setdefault((bool(train), key), set()).add(str(split))
    return [
        "" if key is None else ",".join(sorted(splits_of.get((not train, key), set())))
        for key, train in zip(df["prompt_key"], is_train, strict=True)
    ]


# --- the suite --------------------------------------------------------------------------


def _import_gx() -> Any:
    """Great Expectations, imported on first use (~2 s) with its logging quietened."""
    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    import great_expectations as gx

    return gx


def _rule(
    name: str, description: str, expectation: type[Any], show: str | None = None, **kwargs: Any
) -> Any:
    """A GX expectation carrying its rule's name, what it requires and the column a report
    shows as "found" (default: the one it checks) in its `meta`."""
    return expectation(**kwargs, meta={"rule": name, "description": description, "show": show})


def build_rules(p: ValidateParams) -> list[Any]:
    """The suite's expectations (GX objects), one per rule."""
    _import_gx()
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    def in_set(name: str, description: str, column: str, values: list[Any], **kwargs: Any) -> Any:
        return _rule(
            name,
            description,
            gxe.ExpectColumnValuesToBeInSet,
            column=column,
            value_set=values,
            **kwargs,
        )

    tasks = task_table(p)
    return [
        *(
            _rule(
                f"field_present:{f}",
                f"every row has a '{f}' value",
                gxe.ExpectColumnValuesToNotBeNull,
                column=f,
            )
            for f in TEXT_FIELDS
        ),
        in_set(
            "audio_fields_present",
            f"rows of speech splits have {list(AUDIO_FIELDS)}",
            "missing_audio_fields",
            [""],
        ),
        _rule(
            "id_unique",
            "ids are unique across the dataset",
            gxe.ExpectColumnValuesToBeUnique,
            column="id",
        ),
        in_set("split_known", f"split is one of {list(SPLITS)}", "split", list(SPLITS)),
        in_set("kind_known", f"kind is one of {list(KINDS)}", "kind", list(KINDS)),
        in_set("task_known", f"task is one of {sorted(tasks)}", "task", sorted(tasks)),
        *(
            in_set(
                f"task_of_kind:{kind}",
                f"a {kind} row's task is one of {of_kind}",
                "task",
                of_kind,
                row_condition=Column("kind") == kind,
            )
            for kind in KINDS
            for of_kind in [[t for t, d in tasks.items() if d.kind == kind]]
        ),
        *(
            in_set(
                f"answer_in_set:{task}",
                f"a {task} row's answer is one of {sorted(d.answers)}",
                "answer",
                sorted(d.answers),
                row_condition=Column("task") == task,
            )
            for task, d in sorted(tasks.items())
        ),
        _rule(
            "transcript_not_blank",
            "transcript has visible text",
            gxe.ExpectColumnValuesToMatchRegex,
            column="transcript",
            regex=r"\S",
        ),
        _rule(
            "answer_not_blank",
            "answer has visible text",
            gxe.ExpectColumnValuesToMatchRegex,
            column="answer",
            regex=r"\S",
        ),
        in_set(
            "no_train_eval_overlap",
            "no prompt appears in both a training and an eval split",
            "prompt_also_in",
            [""],
        ),
        in_set(
            "audio_inside_root",
            "audio_path stays inside the data root",
            "audio_inside_root",
            [True],
            show="audio_path",
        ),
        in_set("audio_exists", "the audio file exists", "audio_exists", [True], show="audio_path"),
        in_set(
            "audio_decodable",
            "the audio decodes completely",
            "audio_decodable",
            [True],
            show="audio_decode_error",
        ),
        _rule(
            "audio_sha256_matches",
            "the audio's sha256 equals the manifest's",
            gxe.ExpectColumnPairValuesToBeEqual,
            column_A="sha256",
            column_B="audio_sha256",
            ignore_row_if="either_value_is_missing",
        ),
        in_set(
            "audio_sample_rate",
            f"the audio is {p.sample_rate} Hz",
            "audio_sample_rate",
            [p.sample_rate],
        ),
        in_set(
            "manifest_sample_rate",
            f"the manifest declares {p.sample_rate} Hz",
            "sample_rate",
            [p.sample_rate],
        ),
        in_set(
            "audio_channels",
            f"the audio has {p.channels} channel(s)",
            "audio_channels",
            [p.channels],
        ),
        _rule(
            "audio_duration",
            f"duration within {p.min_duration_s}–{p.max_duration_s} s",
            gxe.ExpectColumnValuesToBeBetween,
            column="audio_duration_s",
            min_value=p.min_duration_s,
            max_value=p.max_duration_s,
        ),
        _rule(
            "manifest_duration_matches",
            f"declared duration within {p.duration_tolerance_s} s of the audio's",
            gxe.ExpectColumnValuesToBeBetween,
            column="duration_mismatch_s",
            min_value=0.0,
            max_value=p.duration_tolerance_s,
        ),
    ]


def _value_column(rule: Any) -> str:
    show = rule.meta["show"]
    return str(show or getattr(rule, "column", None) or rule.column_B)


def _run_gx(df: pd.DataFrame, rules: list[Any]) -> tuple[list[Any], dict[str, Any]]:
    """Run the rules as one GX checkpoint on an ephemeral context (no files, no network)."""
    gx = _import_gx()
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # In memory only: no Data Docs site (its pages load assets from CDNs; we render our own
    # offline page), no progress bars in logs, no usage statistics.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        progress_bars=ProgressBarsConfig(globally=False),
        analytics_enabled=False,
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    source = context.data_sources.add_pandas("xopd")
    asset = source.add_dataframe_asset(name="manifests")
    batch = asset.add_batch_definition_whole_dataframe("dataset")
    suite = context.suites.add(gx.ExpectationSuite(name="xopd-dataset"))
    for rule in rules:
        suite.add_expectation(rule)
    vd = context.validation_definitions.add(
        gx.ValidationDefinition(name="xopd-dataset", data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add(
        gx.Checkpoint(
            name="xopd-validate",
            validation_definitions=[vd],
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": ["row_ref", "id"],
                "return_unexpected_index_query": False,
            },
        )
    )
    result = checkpoint.run(batch_parameters={"dataframe": df})
    (vres,) = result.run_results.values()
    return list(vres.results), dict(result.describe_dict())


def _outcome(rule: Any, res: Any, df: pd.DataFrame) -> RuleOutcome:
    """GX's result of one expectation, with each failing row named by manifest and line."""
    r = res.result or {}
    error = None
    if res.exception_info and res.exception_info.get("raised_exception"):
        error = str(res.exception_info.get("exception_message"))
    failures = []
    col = _value_column(rule)
    for idx in (r.get("unexpected_index_list") or [])[:MAX_ROWS_IN_REPORT]:
        ref = idx.get("row_ref", "") if isinstance(idx, dict) else ""
        manifest, _, line = ref.rpartition(":")
        hit = df.loc[df["row_ref"] == ref]
        value = hit.iloc[0][col] if len(hit) else None
        failures.append(
            {
                "manifest": manifest,
                "line": int(line) if line.isdigit() else None,
                "id": idx.get("id") if isinstance(idx, dict) else None,
                "value": _jsonable(value),
            }
        )
    count = int(r.get("unexpected_count") or len(failures))
    return RuleOutcome(
        rule.meta["rule"],
        rule.meta["description"],
        type(rule).__name__,
        bool(res.success),
        count,
        failures,
        error,
    )


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (str, bool, int)):
        return v
    if isinstance(v, float):
        return None if np.isnan(v) else v
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return str(v)


def validate_dataset(
    manifests: Sequence[Path], data_root: Path, params: ValidateParams
) -> ValidationReport:
    """Check every rule on every row. Raises ManifestError for unparsable manifests."""
    start = time.perf_counter()
    manifests = [Path(m) for m in manifests]
    df = build_frame(manifests, Path(data_root))
    rules = build_rules(params)
    results, gx_dict = _run_gx(df, rules)
    by_rule = {res.expectation_config.meta["rule"]: res for res in results}
    outcomes = [_outcome(rule, by_rule[rule.meta["rule"]], df) for rule in rules]
    return ValidationReport(
        success=all(o.success for o in outcomes),
        data_root=str(data_root),
        manifests=[str(m) for m in manifests],
        n_rows=len(df),
        rules=outcomes,
        seconds=round(time.perf_counter() - start, 3),
        great_expectations=gx_dict,
    )


def read_validated_manifests(
    data_root: Path,
    splits: Sequence[str],
    params: ValidateParams,
    optional: Sequence[str] = (),
) -> dict[str, list[ManifestRow]]:
    """The typed rows of `data_root`'s manifests for `splits` (and those of `optional` whose
    file exists: a dataset without paralinguistic items has no `para_eval`), after the
    validate stage's suite passed on them (audio probed too). Every stage that reads a
    manifest calls this before its first step, so bad data stops a run before anything is
    trained or written. Raises DataValidationError with one line naming the manifest, line
    and rule."""
    root = Path(data_root)
    splits = [*splits, *(s for s in optional if manifest_path(root, s).is_file())]
    manifests = [manifest_path(root, split) for split in splits]
    report = validate_dataset(manifests, root, params)
    if not report.success:
        lines = report.failure_lines(per_rule=1)
        first = lines[0] if lines else ""
        more = sum(r.unexpected_count for r in report.failed_rules) - 1
        tail = f" (and {more} more; `xopd validate {root}` reports them all)" if more > 0 else ""
        raise DataValidationError(f"{report.summary_line()}: {first}{tail}", report)
    return {split: read_rows(m) for split, m in zip(splits, manifests, strict=True)}


# --- the offline HTML page --------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
h1{font-size:1.4rem}table{border-collapse:collapse;margin:.5rem 0 1.5rem}
td,th{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;font-size:.9rem}
.ok{color:#176c2b;font-weight:600}.bad{color:#a31515;font-weight:600}
code{background:#f3f3f3;padding:0 .2rem}
"""


def render_html(report: ValidationReport) -> str:
    """A self-contained page (inline CSS, no scripts): opens offline, unlike GX Data Docs."""
    e = html.escape
    status = (
        '<span class="ok">PASSED</span>' if report.success else '<span class="bad">FAILED</span>'
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        "<title>xopd validation</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Dataset validation: {status}</h1>",
        f"<p>Data root <code>{e(report.data_root)}</code>; {report.n_rows} rows from "
        f"{len(report.manifests)} manifest(s); {len(report.rules)} rules; "
        f"{report.seconds:.2f} s.</p>",
        "<table><tr><th>rule</th><th>what it requires</th><th>GX expectation</th>"
        "<th>result</th><th>rows breaking it</th></tr>",
    ]
    for r in report.rules:
        mark = '<span class="ok">pass</span>' if r.success else '<span class="bad">FAIL</span>'
        parts.append(
            f"<tr><td>{e(r.rule)}</td><td>{e(r.description)}</td>"
            f"<td>{e(r.expectation)}</td><td>{mark}</td><td>{r.unexpected_count}</td></tr>"
        )
    parts.append("</table>")
    for r in report.failed_rules:
        parts.append(f"<h2>{e(r.rule)}: {e(r.description)}</h2>")
        if r.error:
            parts.append(f"<p class='bad'>{e(r.error)}</p>")
        parts.append("<table><tr><th>manifest</th><th>line</th><th>id</th><th>found</th></tr>")
        for f in r.failures:
            parts.append(
                f"<tr><td>{e(str(f['manifest']))}</td><td>{f['line']}</td>"
                f"<td>{e(str(f['id']))}</td><td>{e(repr(f['value']))}</td></tr>"
            )
        parts.append("</table>")
        if r.unexpected_count > len(r.failures):
            parts.append(
                f"<p>… {r.unexpected_count - len(r.failures)} more rows (see the JSON result).</p>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
