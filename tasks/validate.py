"""The `validate` stage: check a dataset with the GX suite; write JSON + HTML; fail on violation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tasks.layout import VALIDATE, data_root
from xopd_core.atomic import write_json_atomic, write_text_atomic
from xopd_core.config import Params
from xopd_core.data.manifest import MANIFEST_DIR, default_data_root
from xopd_core.data.validation import (
    REPORT_HTML,
    REPORT_JSON,
    DataValidationError,
    render_html,
    validate_dataset,
)

METRICS_JSON = "metrics.json"  # small and flat, for `dvc metrics show`


@dataclass(frozen=True)
class ValidateSummary:
    success: bool
    n_rows: int
    report_json: Path
    report_html: Path
    seconds: float


def find_manifests(targets: Sequence[Path]) -> list[Path]:
    """Expand dataset folders (`<root>/manifests/*.jsonl`) and keep manifest files as given."""
    found: list[Path] = []
    for t in map(Path, targets):
        if t.is_dir():
            mdir = t / MANIFEST_DIR if (t / MANIFEST_DIR).is_dir() else t
            files = sorted(mdir.glob("*.jsonl"))
            if not files:
                raise FileNotFoundError(f"{t}: no *.jsonl manifests found")
            found.extend(files)
        else:
            found.append(t)
    return found


def validate(
    params: Params,
    targets: Sequence[Path],
    out_dir: Path,
    data_root: Path | None = None,
) -> ValidateSummary:
    """Validate every manifest in `targets` together (ids and train/eval overlap are checked
    across them). Always writes the report; raises DataValidationError if any rule broke."""
    manifests = find_manifests(targets)
    root = Path(data_root) if data_root is not None else default_data_root(manifests[0])
    report = validate_dataset(manifests, root, params.validate_)
    out_dir = Path(out_dir)
    json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    write_json_atomic(json_path, report.to_dict())
    write_json_atomic(
        out_dir / METRICS_JSON,
        {
            "success": report.success,
            "n_rows": report.n_rows,
            "n_rules": len(report.rules),
            "n_failed_rules": len(report.failed_rules),
            "n_failed_rows": sum(r.unexpected_count for r in report.failed_rules),
        },
    )
    write_text_atomic(html_path, render_html(report))
    if not report.success:
        detail = "\n".join(report.failure_lines())
        raise DataValidationError(
            f"{report.summary_line()}\n{detail}\nfull report: {html_path}", report
        )
    return ValidateSummary(True, report.n_rows, json_path, html_path, report.seconds)


def run(params: Params, root: Path, progress: bool = False) -> str:
    """The stage on the work folder `root` (dvc.yaml's paths)."""
    s = validate(params, [data_root(params, root)], root / VALIDATE)
    return f"passed, {s.n_rows} rows in {s.seconds:.1f} s → {s.report_html}"
