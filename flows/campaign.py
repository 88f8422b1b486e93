"""Prefect flow `xopd-campaign`: bootstrap the mini world if needed, then N rounds, then a
report. Orchestration only: the bootstrap steps are the same stage functions as `make run`
and `dvc repro`; each round is the `xopd-round` flow (a subflow, so the UI shows it whole).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from flows.round import (
    CHAMPION,
    DATA,
    LOCK,
    TEACHER,
    TEACHER_METRICS,
    round_checkpoint,
    xopd_round,
)
from tasks.student import student
from tasks.synth import synth
from tasks.teacher import teacher
from xopd_core.atomic import write_text_atomic
from xopd_core.config import Params
from xopd_core.gate import read_champion
from xopd_core.lock import exclusive


@task(name="bootstrap")
def bootstrap_step(params: Params, workdir: Path) -> list[str]:
    """Build whatever of the mini world, teacher and round-0 student is missing."""
    done = []
    if not (workdir / DATA / "manifests").is_dir():
        synth(params, workdir / DATA)
        done.append("synth")
    if not (workdir / TEACHER / "model.safetensors").is_file():
        teacher(params, workdir / DATA, workdir / TEACHER, workdir / TEACHER_METRICS)
        done.append("teacher")
    if not (round_checkpoint(workdir, 0) / "model.safetensors").is_file():
        student(
            params,
            workdir / DATA,
            workdir / TEACHER,
            round_checkpoint(workdir, 0),
            workdir / "reports/student/metrics.json",
        )
        done.append("student")
    return done


def campaign_table(workdir: Path, rounds: int) -> str:
    lines = [
        "| round | speech Avg-Drop (%) | text Avg-Drop (%) | paralinguistic | promoted |",
        "|---|---|---|---|---|",
    ]
    for k in range(rounds + 1):
        base = workdir / ("reports" if k == 0 else f"reports/round{k}")
        gate_file = base / "gate" / "metrics.json"
        if not gate_file.is_file():
            continue
        g = json.loads(gate_file.read_text())
        lines.append(
            f"| {k} | {g['avg_drop_speech']:.2f} | {g['avg_drop_text']:.2f} | "
            f"{g['paralinguistic_accuracy']:.3f} | {'yes' if g['promoted'] else 'no'} |"
        )
    champion = read_champion(workdir / CHAMPION)
    if champion is not None:
        lines.append(f"\nChampion: round {champion.round}, `{champion.checkpoint}`")
    return "\n".join(lines) + "\n"


@flow(name="xopd-campaign")
def xopd_campaign(
    params: Params,
    rounds: int | None = None,
    workdir: str = ".",
    engine: Literal["hf", "vllm"] = "hf",
) -> dict[str, Any]:
    """Bootstrap if needed, then `rounds` rounds (default: `campaign.rounds` in params), each
    starting from the previous; writes `reports/campaign.md` and a markdown artifact."""
    root = Path(workdir)
    n = params.campaign.rounds if rounds is None else rounds
    with exclusive(root / LOCK, what="xopd run"):
        built = bootstrap_step(params, root)
        results = [
            xopd_round(params, round=k, workdir=workdir, engine=engine, lock=False)
            for k in range(1, n + 1)
        ]
        table = campaign_table(root, n)
        write_text_atomic(root / "reports" / "campaign.md", table)
    create_markdown_artifact(key="campaign", markdown=table, description="xopd campaign rounds")
    return {"bootstrapped": built, "rounds": [r["promoted"] for r in results], "table": table}
