"""The `report` stage: the campaign's per-round table and its plots.

Reads `reports/rounds.json` (each gated round's metrics and decision), the champion pointer
and each round's dvclive series; writes `reports/campaign.md`, the headline metrics
`reports/metrics.json` (the champion and the latest round: what `dvc metrics show` prints) and
PNG plots under `reports/plots/`.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.layout import (
    CAMPAIGN_TABLE,
    CHAMPION,
    EVAL_METRICS,
    HEADLINE,
    PLOTS,
    ROUNDS_METRICS,
    round_eval,
    round_reports,
)
from xopd_core.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from xopd_core.config import Params
from xopd_core.gate import read_champion


class ReportInputError(ValueError):
    """The rounds' metrics are missing or unreadable; the message names the file."""


@dataclass(frozen=True)
class ReportSummary:
    table_path: Path
    plots: list[Path]
    table: str


def _para(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"  # none: the data has no such items


def campaign_table(rounds: dict[str, Any], champion_line: str) -> str:
    lines = [
        "| round | speech Avg-Drop (%) | text Avg-Drop (%) | paralinguistic | promoted |",
        "|---|---|---|---|---|",
    ]
    for name, r in sorted(rounds.items(), key=lambda kv: int(kv[0].removeprefix("round"))):
        lines.append(
            f"| {name.removeprefix('round')} | {r['avg_drop_speech']:.2f} | "
            f"{r['avg_drop_text']:.2f} | {_para(r.get('paralinguistic_accuracy'))} | "
            f"{'yes' if r['promoted'] else 'no'} |"
        )
    return "\n".join(lines) + f"\n\n{champion_line}\n"


HEADLINE_KEYS = ("avg_drop_speech", "avg_drop_text", "paralinguistic_accuracy")


def headline_metrics(root: Path, rounds: dict[str, Any], champion_round: int | None) -> dict:
    """Two groups, so `dvc metrics show` reads at a glance: `champion` and `latest` (the
    newest gated round, with the gate's decision), each its round, Avg-Drops, paralinguistic
    accuracy and `asr_wer` (the student's transcription WER, where its eval measured it)."""

    def group(k: int) -> dict[str, Any]:
        r = rounds[f"round{k}"]
        out: dict[str, Any] = {
            "round": k,
            **{key: r[key] for key in HEADLINE_KEYS if r.get(key) is not None},
        }
        path = round_eval(root, k) / EVAL_METRICS
        wer = json.loads(path.read_text()).get("asr_wer") if path.is_file() else None
        if isinstance(wer, (int, float)):
            out["asr_wer"] = wer
        return out

    latest = max(int(name.removeprefix("round")) for name in rounds)
    headline: dict[str, Any] = {}
    if champion_round is not None and f"round{champion_round}" in rounds:
        headline["champion"] = group(champion_round)
    headline["latest"] = {**group(latest), "promoted": rounds[f"round{latest}"]["promoted"]}
    return headline


def _series(live: Path, name: str) -> list[float]:
    path = live / "plots" / "metrics" / f"{name}.tsv"
    if not path.is_file():
        return []
    with path.open() as f:
        return [float(row[name]) for row in csv.DictReader(f, delimiter="\t")]


def png_bytes(fig: Any) -> bytes:
    import io

    buf = io.BytesIO()
    # No timestamp or version in the file: the same numbers give the same bytes.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _plots(root: Path, rounds: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(n.removeprefix("round")) for n in rounds)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("avg_drop_speech", "speech"), ("avg_drop_text", "text")):
        left.plot(ks, [rounds[f"round{k}"][key] for k in ks], marker="o", label=label)
    left.set(xlabel="round", ylabel="Avg-Drop (%)", title="Avg-Drop vs the text teacher")
    left.legend()
    para = [rounds[f"round{k}"].get("paralinguistic_accuracy") for k in ks]
    if all(v is not None for v in para):
        right.plot(ks, para, marker="o")
    right.set(xlabel="round", ylabel="accuracy", title="paralinguistic accuracy")
    for ax in (left, right):
        ax.set_xticks(ks)
    fig.tight_layout()
    out = [root / PLOTS / "rounds.png"]
    write_bytes_atomic(out[0], png_bytes(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3.6))
    offset = 0
    for k in ks[1:] if ks and ks[0] == 0 else ks:
        live = round_reports(root, k) / "train" / "live"
        for name, style in (("reverse_kl_speech", "-"), ("reverse_kl_text", "--")):
            ys = _series(live, name)
            ax.plot(range(offset, offset + len(ys)), ys, style, label=f"round {k}, {name[11:]}")
        offset += len(_series(live, "loss"))
    ax.set(xlabel="step (rounds in sequence)", ylabel="nats / token", title="reverse KL estimate")
    if offset:
        ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    out.append(root / PLOTS / "train_kl.png")
    write_bytes_atomic(out[1], png_bytes(fig))
    plt.close(fig)
    return out


def report(root: Path) -> ReportSummary:
    path = root / ROUNDS_METRICS
    try:
        rounds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ReportInputError(f"{path}: cannot read the rounds' metrics ({err})") from err
    if not rounds:
        raise ReportInputError(f"{path}: no gated round to report")
    champion = read_champion(root / CHAMPION)
    line = (
        f"Champion: round {champion.round}, `{champion.checkpoint}` "
        f"(weights sha256 {champion.weights_sha256[:12]}…)"
        if champion
        else "No champion yet."
    )
    table = campaign_table(rounds, line)
    write_text_atomic(root / CAMPAIGN_TABLE, table)
    write_json_atomic(root / HEADLINE, headline_metrics(root, rounds, champion and champion.round))
    return ReportSummary(root / CAMPAIGN_TABLE, _plots(root, rounds), table)


def run(params: Params, root: Path, progress: bool = False) -> str:
    """The stage on the work folder `root` (it reads no params)."""
    s = report(root)
    return f"{s.table}\n→ {s.table_path}, plots {', '.join(map(str, s.plots))}"
