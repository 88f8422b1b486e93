"""The round, campaign and nightly flows end to end on the tiny world, through a real
Prefect server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.campaign import xopd_campaign
from flows.nightly import next_round, xopd_nightly
from flows.round import xopd_round
from tasks.layout import round_checkpoint, round_gate
from tests.flows.conftest import logs_of, run_flow
from xopd_core.config import CampaignParams, Params
from xopd_core.gate import read_champion
from xopd_core.lock import Busy
from xopd_core.models.checkpoint import RESOLVED_CONFIG, weights_sha256


def test_round_flow_trains_evaluates_gates_and_publishes_artifacts(
    prefect_server, flow_params: Params, work: Path
) -> None:
    result = xopd_round(params=flow_params, round=1, workdir=str(work))
    assert result["round"] == 1 and isinstance(result["promoted"], bool)
    for k in (0, 1):  # the starting student was evaluated and gated first (no champion yet)
        assert json.loads(round_gate(work, k).read_text())["round"] == k
    champion = read_champion(work / "champion.json")
    assert champion is not None
    assert champion.round == (1 if result["promoted"] else 0)
    assert (work / "models" / "rounds" / "round1" / "model.safetensors").is_file()
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"round-1", "validation-report"} <= keys


def test_campaign_runs_rounds_that_chain_and_reports_them(
    prefect_server, flow_params: Params, work: Path
) -> None:
    params = flow_params.model_copy(update={"campaign": CampaignParams(rounds=2)})
    result, run_id = run_flow(xopd_campaign, params=params, workdir=str(work))
    # Its log says which stages ran and which were skipped.
    logs = logs_of(run_id, "synth: up to date, skipped", "rounds: running")
    assert "teacher: up to date, skipped" in logs and "eval: running" in logs
    # The bootstrap's outputs were all there (no DVC here: presence decides).
    assert result["ran"] == ["validate", "eval", "rounds", "report"]
    assert len(result["rounds"]) == 3 and not result["recorded"]  # not a DVC repository
    # Round 2 started from round 1's weights, with the next seed.
    r2 = json.loads((round_checkpoint(params, work, 2) / RESOLVED_CONFIG).read_text())
    assert r2["from_weights_sha256"] == weights_sha256(round_checkpoint(params, work, 1))
    assert r2["params"]["seed"] == params.train.seed + 1
    table = (work / "reports" / "campaign.md").read_text()
    assert all(f"| {k} |" in table for k in (0, 1, 2)) and "Champion: round" in table
    assert (work / "reports" / "plots" / "rounds.png").read_bytes()[:4] == b"\x89PNG"


HOLD = """
import sys, time
from xopd_core.lock import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_nightly_never_writes_beside_a_run_in_progress(
    prefect_server, flow_params: Params, work: Path
) -> None:
    holder = subprocess.Popen(  # another run holding the work folder
        [sys.executable, "-c", HOLD, str(work / ".xopd.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match="another xopd run holds"):
            xopd_nightly(flow_params, workdir=str(work), wait_s=1.0)
        assert not (work / "models" / "rounds").exists() and not (work / "champion.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert next_round(work) == 1  # the nightly that ran: tests/flows/test_pipeline.py


def test_a_round_whose_start_is_missing_says_which_round_to_run(
    prefect_server, flow_params: Params, work: Path
) -> None:
    """Round 3 from the form with no round 2 on disk: a message naming the missing student
    and the round that can run, not the loader's error about a hub repo id."""
    with pytest.raises(ValueError, match=r"round 3 starts from round 2's student, which is not"):
        xopd_round(params=flow_params, round=3, workdir=str(work))
    assert not (work / "models" / "rounds").exists()
