"""Prefect and DVC together on a real DVC repository holding the tiny world: a campaign run
through Prefect is recorded in dvc.lock, `dvc repro` after it is a no-op, a from-scratch
`dvc repro` of the rounds rebuilds the same checkpoint hash, the metrics and plots commands
work offline, and the nightly round extends the campaign with its lineage and a push that
survives a remote that is down."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client

import flows.publish
import tasks
from flows.campaign import changed_groups, due, xopd_campaign
from flows.cli import print_git_advice
from flows.nightly import xopd_nightly
from flows.publish import publish
from flows.round import xopd_round
from tasks.layout import PUSH_PENDING
from tasks.record import dvc_command, git_to_commit
from tasks.remote import RemoteError, dvc
from tasks.stages import pipeline_of
from tasks.validate import validate
from tests.flows.conftest import logs_of, run_flow
from xopd_core.config import CampaignParams, Params, load_params
from xopd_core.models.checkpoint import weights_sha256

REPO = Path(__file__).resolve().parents[2]


def _run(root: Path, *args: str) -> str:
    out = dvc(root, *args)
    assert out.returncode == 0, f"dvc {' '.join(args)}: {out.stderr}"
    return out.stdout


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def _lock_md5(root: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    (entry,) = [o for o in lock["stages"][stage]["outs"] if o["path"] == path]
    return str(entry["md5"])


def make_repo(root: Path, params: Params, tiny_world: Path, tiny_teacher, tiny_student) -> Path:
    """A git + DVC repository laid out like ours at `root`, holding the tiny world, its
    bootstrap recorded as built."""
    for name in ("tasks", "xopd_core", "flows", "infra"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_yaml_dict(), sort_keys=False))
    (root / ".gitignore").write_text("/.dvc-remote/\n/.xopd.lock\n/.xopd.push-pending\n")
    shutil.copytree(tiny_world, root / "data" / "mini")
    shutil.copytree(tiny_teacher.checkpoint, root / "models" / "teacher")
    shutil.copytree(tiny_student.summary.checkpoint, root / "models" / "student")
    (root / "reports" / "student").mkdir(parents=True)
    shutil.copy(tiny_student.summary.metrics_path, root / "reports" / "student" / "metrics.json")
    # The 40-step tiny teacher answers nothing right; Avg-Drop needs a non-zero reference.
    (root / "reports" / "teacher").mkdir(parents=True)
    tasks = ("navigate", "object_counting", "web_of_lies", "boolean_expressions")
    scores = {f"text_accuracy_{t}": 0.9 for t in tasks}
    (root / "reports" / "teacher" / "metrics.json").write_text(json.dumps(scores))
    validate(params, [root / "data" / "mini"], root / "reports" / "validate")

    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@localhost")
    _git(root, "config", "user.name", "test")
    _run(root, "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", root / ".dvc" / "config")  # analytics, plots, remote
    _run(root, "commit", "--force", "synth", "validate", "teacher", "student")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "tiny world, bootstrap recorded")
    return root


@pytest.fixture(scope="module")
def repo(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_world: Path,
    tiny_teacher,
    tiny_student,
    flow_params: Params,
    prefect_server,
) -> Iterator[tuple[Path, Params, dict]]:
    """The repository of `make_repo` after one campaign (one round) through Prefect."""
    params = flow_params.model_copy(update={"campaign": CampaignParams(rounds=1)})
    root = make_repo(
        tmp_path_factory.mktemp("repo"), params, tiny_world, tiny_teacher, tiny_student
    )
    with pytest.MonkeyPatch.context() as mp:  # stage commands find `xopd` in our venv
        mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        result = xopd_campaign(params, workdir=str(root))
        yield root, params, result


def test_campaign_is_recorded_and_dvc_repro_after_it_does_nothing(repo) -> None:
    root, _, result = repo
    assert result["ran"] == ["eval", "rounds", "report"]  # the bootstrap was up to date
    assert result["recorded"] and len(result["rounds"]) == 2  # gates of rounds 0 and 1
    # Round 0 became the first champion, so the run pushed to the default remote.
    assert result["rounds"][0] and result["push"].startswith("pushed to default")
    assert json.loads(_run(root, "status", "--cloud", "--json")) == {}
    assert json.loads(_run(root, "status", "--json")) == {}
    weights = root / "models" / "rounds" / "round1" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    out = _run(root, "repro")
    assert "Data and pipelines are up to date" in out and "Running stage" not in out
    assert weights.stat().st_mtime_ns == before


# A stage as a contributor adds it: its module (tasks/row_count.py), reading a params group.
ROW_COUNT = """
import json
from pathlib import Path

from tasks.layout import DATA
from xopd_core.config import Params


def run(params: Params, root: Path, progress: bool = False) -> str:
    n = len((root / DATA / "manifests" / "eval.jsonl").read_text().splitlines())
    out = root / "reports" / "row_count.json"
    out.write_text(json.dumps({"eval_rows": n, "max_new_tokens": params.eval.max_new_tokens}))
    return f"{n} eval rows -> {out}"
"""


def test_a_stage_added_to_dvc_yaml_and_tasks_is_run_and_recorded_by_the_campaign(
    repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The campaign's stages are dvc.yaml's: a stage added there (after `validate`, reading
    the `eval` group) with its tasks/<name>.py runs in its place, and only it (DVC says the
    rest are fresh), and the run records it in dvc.lock."""
    work = tmp_path / "repo"
    shutil.copytree(repo[0], work, symlinks=True)
    spec = yaml.safe_load((work / "dvc.yaml").read_text())
    stages = list(spec["stages"].items())
    added = {
        "cmd": "xopd stage row_count",
        "deps": ["data/mini/manifests"],
        "params": ["eval"],
        "outs": [{"reports/row_count.json": {"cache": False}}],
    }
    stages.insert(2, ("row_count", added))
    (work / "dvc.yaml").write_text(yaml.safe_dump({**spec, "stages": dict(stages)}))
    module = tmp_path / "added" / "row_count.py"
    module.parent.mkdir()
    module.write_text(ROW_COUNT)
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(module.parent)])
    params = load_params(work / "params.yaml")
    result = xopd_campaign(params, workdir=str(work))
    assert result["ran"] == ["row_count", "report"] and result["recorded"]
    eval_rows = (work / "data" / "mini" / "manifests" / "eval.jsonl").read_text().splitlines()
    written = json.loads((work / "reports" / "row_count.json").read_text())
    assert written == {"eval_rows": len(eval_rows), "max_new_tokens": params.eval.max_new_tokens}
    assert "row_count" in yaml.safe_load((work / "dvc.lock").read_text())["stages"]
    assert json.loads(_run(work, "status", "--json")) == {}


def test_an_up_to_date_run_still_pushes_what_is_owed_and_says_so(repo) -> None:
    """A push that failed leaves `.xopd.push-pending`: the next `xopd run` pushes, though
    nothing is stale; the temp file a killed push left in the remote is cleared."""
    root, params, _ = repo
    remote = root / ".dvc-remote"
    shutil.rmtree(remote)  # as if the run's push had failed: the remote lacks the data
    (root / PUSH_PENDING).touch()
    leftover = remote / "files" / "md5" / "00" / ".AAAAAAAAAAAAAAAAAAAAAA.tmp"
    leftover.parent.mkdir(parents=True)
    leftover.touch()
    os.utime(leftover, (1e9, 1e9))  # untouched for years: no push is writing it
    result = xopd_campaign(params, workdir=str(root))
    assert result["ran"] == []
    assert "owed since an earlier run (.xopd.push-pending)" in result["push"]
    assert not (root / PUSH_PENDING).exists() and not leftover.exists()
    assert json.loads(_run(root, "status", "--cloud", "--json")) == {}


def test_after_the_run_the_printed_git_line_commits_the_record(repo, capsys) -> None:
    """What `xopd run` prints after a recorded run: the git line for dvc.lock and
    champion.json (new after the campaign), which, run as printed, leaves nothing owed."""
    root = repo[0]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        print_git_advice(root)
    printed = capsys.readouterr().out
    (line,) = [x.strip() for x in printed.splitlines() if x.strip().startswith("git add ")]
    assert line.startswith("git add champion.json dvc.lock ") and "git commit -m" in line
    subprocess.run(["bash", "-c", line], cwd=root, check=True, capture_output=True)
    assert git_to_commit(root) == []
    print_git_advice(root)
    assert "committed as they are" in capsys.readouterr().out


def test_metrics_and_plots_follow_the_output_contract_offline(repo) -> None:
    root, _, result = repo
    # `dvc metrics show`: the headline only, in two groups (champion, latest round).
    shown = json.loads(_run(root, "metrics", "show", "--json"))
    (files,) = [rev["data"] for rev in shown.values()]
    assert list(files) == ["reports/metrics.json"]
    headline = files["reports/metrics.json"]["data"]
    keys = {"round", "avg_drop_speech", "avg_drop_text", "paralinguistic_accuracy"}
    assert set(headline) == {"champion", "latest"}
    assert keys <= set(headline["champion"]) and keys | {"promoted"} <= set(headline["latest"])
    assert headline["latest"]["round"] == 1
    assert headline["champion"]["round"] == (1 if result["rounds"][1] else 0)
    eval_wer = json.loads((root / "reports" / "eval" / "metrics.json").read_text()).get("asr_wer")
    if headline["champion"]["round"] == 0 and eval_wer is not None:
        assert headline["champion"]["asr_wer"] == eval_wer
    # A stage's own metrics, by path.
    rounds = json.loads(_run(root, "metrics", "show", "--json", "reports/rounds.json"))
    rounds = next(iter(rounds.values()))["data"]["reports/rounds.json"]["data"]
    assert set(rounds) == {"round0", "round1"}
    on_disk = json.loads((root / "reports" / "rounds.json").read_text())
    for name, r in rounds.items():
        assert {"avg_drop_speech", "avg_drop_text", "paralinguistic_accuracy", "promoted"} <= set(r)
        assert isinstance(r["promoted"], bool)
        # DVC shows numbers and booleans only; the reasons are in the same file.
        assert on_disk[name]["reasons"] and on_disk[name]["promoted"] == r["promoted"]

    # `dvc plots show`: the report's images and the latest round's per-step curves, read
    # from the TSV files dvclive wrote while it trained (x: step).
    plots = json.loads(_run(root, "plots", "show", "--json"))
    assert not plots.get("errors"), plots["errors"]
    live = "reports/rounds/round1/train/live/plots/metrics"
    steps = [str(s) for s in range(result_steps(root))]
    for title, fields in (
        ("training loss", ["loss"]),
        ("reverse KL estimate (nats per token)", ["reverse_kl_speech", "reverse_kl_text"]),
        ("response length (tokens)", ["response_length"]),
    ):
        (curve,) = plots["data"][title]
        assert curve["type"] == "vega" and curve["content"]["encoding"]["x"]["field"] == "step"
        values = curve["content"]["data"]["values"]
        for field in fields:
            rows = [v for v in values if field in v]
            assert [v["step"] for v in rows] == steps, (title, field)
            with open(root / live / f"{field}.tsv") as tsv:
                assert [v[field] for v in rows] == [line.split("\t")[1].strip()
                                                    for line in list(tsv)[1:]]  # fmt: skip
    assert {"reports/plots/rounds.png", "reports/plots/train_kl.png"} <= set(plots["data"])

    _run(root, "plots", "show", "-o", "plots_page")
    page = (root / "plots_page" / "index.html").read_text()
    # Nothing loaded from anywhere (the specs' "$schema" names a URL; nothing fetches it).
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script src" not in page and "<link" not in page
    assert page.count("<img") == 2 and page.count("vegaEmbed('#") == 3
    assert "function vegaEmbed" in page  # drawn by the page's own script (infra/dvc_plots.html)


def result_steps(root: Path) -> int:
    """How many steps the newest round trained (its training metrics)."""
    rounds = load_params(root / "params.yaml").campaign.rounds
    metrics = root / "reports" / "rounds" / f"round{rounds}" / "train" / "metrics.json"
    return int(json.loads(metrics.read_text())["steps"])


def test_dvc_repro_from_scratch_rebuilds_the_recorded_checkpoint_hash(repo) -> None:
    root, _, _ = repo
    recorded = _lock_md5(root, "rounds", "models/rounds")
    weights = weights_sha256(root / "models" / "rounds" / "round1")
    champion = (root / "champion.json").read_bytes()
    for _ in range(2):  # twice from scratch: DVC deletes the outputs and runs `xopd rounds`
        out = _run(root, "repro", "--force", "--single-item", "rounds")
        assert "Running stage 'rounds'" in out
        assert _lock_md5(root, "rounds", "models/rounds") == recorded
        assert weights_sha256(root / "models" / "rounds" / "round1") == weights
        assert (root / "champion.json").read_bytes() == champion


def test_nightly_extends_the_campaign_records_lineage_and_pushes_what_is_owed(
    repo, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, params, _ = repo
    _run(root, "repro")  # the report after the from-scratch rebuild
    head = _git(root, "rev-parse", "HEAD")
    result = xopd_nightly(params, workdir=str(root))
    assert result["round"] == 2 and result["recorded"]
    name = f"round-2-nightly-{date.today().isoformat()}"  # named after the round it trained
    with get_client(sync_client=True) as client:
        tagged = [set(r.tags) for r in client.read_flow_runs() if r.name == name]
    assert any({"nightly", "round-2", "method-xopd"} <= tags for tags in tagged), tagged
    # params.yaml now describes the two rounds on disk, so DVC agrees with the folder.
    assert load_params(root / "params.yaml").campaign.rounds == 2
    assert json.loads(_run(root, "status", "--json")) == {}
    assert _git(root, "rev-parse", "HEAD") == head  # the user's branch never moves

    # The end of a run that promoted (publish), with the remote down: retried, then a clear
    # failure; nothing lost.
    _run(root, "remote", "add", "-f", "local", "/dev/null/remote")
    fast = flows.publish.dvc_push.with_options(retry_delay_seconds=[0.1, 0.1, 0.1])
    monkeypatch.setattr(flows.publish, "dvc_push", fast)
    ran_with = params.model_copy(update={"campaign": CampaignParams(rounds=2)})
    lock_before = (root / "dvc.lock").read_text()
    with pytest.raises(RemoteError, match=r"local cache is unchanged.*after 4 attempts"):
        publish(ran_with, root, True, lineage_round=2)
    assert (root / PUSH_PENDING).exists()
    assert (root / "dvc.lock").read_text() == lock_before
    assert json.loads(_run(root, "status", "--json")) == {}
    # Its lineage: the code that ran + this round's params.yaml, dvc.lock and champion.
    tip = _git(root, "rev-parse", "xopd/lineage")
    assert head in _git(root, "log", "--format=%P", "-1", tip).split()
    lineage_params = yaml.safe_load(_git(root, "show", f"{tip}:params.yaml"))
    assert lineage_params["campaign"]["rounds"] == 2
    assert _git(root, "show", f"{tip}:dvc.lock") == lock_before.strip()
    # The remote is back: the next run pushes what was owed, though it promoted nothing.
    remote = root.parent / f"{root.name}-remote"
    _run(root, "remote", "add", "-f", "local", str(remote))
    publish(ran_with, root, False)
    assert not (root / PUSH_PENDING).exists()
    cloud = json.loads(_run(root, "status", "--cloud", "--json"))
    assert cloud == {}, cloud


def test_a_run_with_edited_params_reruns_the_stages_that_read_them(repo) -> None:
    root = repo[0]
    params = load_params(root / "params.yaml")
    stage = {s.name: s for s in pipeline_of(root)}
    assert not due(root, stage["rounds"], [], params, changed_groups(root, params))  # DVC: fresh
    edited = params.model_copy(update={"train": params.train.model_copy(update={"steps": 2})})
    changed = changed_groups(root, edited)
    assert changed == {"train"}
    assert due(root, stage["rounds"], [], edited, changed)
    assert not due(root, stage["teacher"], [], edited, changed)


def test_a_round_started_on_its_own_leaves_dvc_consistent_and_says_what_to_commit(repo) -> None:
    """What a deployment run of `xopd-round` does with its defaults: the next round, with
    params.yaml's settings. DVC agrees with the folder afterwards (`dvc repro` would keep the
    round), and the git line in its log, run as printed, commits dvc.lock and the rest."""
    root = repo[0]
    rounds_before = load_params(root / "params.yaml").campaign.rounds
    result, run_id = run_flow(xopd_round, workdir=str(root))
    k = result["round"]
    assert k == rounds_before + 1 and result["recorded"]
    assert load_params(root / "params.yaml").campaign.rounds == k
    assert json.loads(_run(root, "status", "--json")) == {}
    said = "to keep it in git: "
    logs = logs_of(run_id, f"round {k}: recorded in DVC")
    (line,) = [m.split(said, 1)[1] for m in logs if said in m]
    assert "dvc.lock" in line and "params.yaml" in line, line
    subprocess.run(["bash", "-c", line], check=True, capture_output=True)
    assert git_to_commit(root) == []


def test_a_round_with_other_settings_says_what_to_run_to_make_dvc_consistent(repo) -> None:
    """The form's `train` settings differ from params.yaml: dvc.lock stays as it was (it would
    claim a round params.yaml did not make), and the log names the setting, why DVC is now
    stale, and the exact `dvc repro` command. (Last in this module: it leaves DVC stale.)"""
    root = repo[0]
    on_disk = load_params(root / "params.yaml")
    lock_before = (root / "dvc.lock").read_text()
    steps = on_disk.train.steps + 1
    train = on_disk.train.model_copy(update={"steps": steps})
    result, run_id = run_flow(xopd_round, workdir=str(root), train=train)
    assert not result["recorded"]
    assert (root / "dvc.lock").read_text() == lock_before
    assert "rounds" in json.loads(_run(root, "status", "--json"))
    logs = logs_of(run_id, "dvc.lock left as it was")
    (advice,) = [m for m in logs if m.startswith("dvc.lock left as it was")]
    assert f"train.steps: {steps} (params.yaml: {on_disk.train.steps})" in advice
    assert dvc_command(root, "repro") in advice


@pytest.mark.slow
def test_a_run_on_the_vllm_engine_is_recorded_and_dvc_repro_rebuilds_its_hashes(
    tmp_path: Path,
    tiny_world: Path,
    tiny_teacher,
    tiny_student,
    flow_params: Params,
    prefect_server,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The engine is a parameter (`train.engine`), so dvc.lock records which one made the
    weights: after a campaign on vLLM engines, `dvc repro --force` of the rounds runs vLLM
    again and rebuilds the recorded hashes."""
    train = flow_params.train.model_copy(update={"engine": "vllm", "loss": "sampled"})
    params = flow_params.model_copy(update={"campaign": CampaignParams(rounds=1), "train": train})
    root = make_repo(tmp_path / "repo", params, tiny_world, tiny_teacher, tiny_student)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = xopd_campaign(params, workdir=str(root))
    assert result["ran"] == ["eval", "rounds", "report"] and result["recorded"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["rounds"]["params"]["params.yaml"]["train"]["engine"] == "vllm"
    metrics = root / "reports" / "rounds" / "round1" / "train" / "metrics.json"
    assert json.loads(metrics.read_text())["engine"] == "vllm"
    recorded = _lock_md5(root, "rounds", "models/rounds")
    weights = weights_sha256(root / "models" / "rounds" / "round1")
    out = _run(root, "repro", "--force", "--single-item", "rounds")
    assert "Running stage 'rounds'" in out
    assert weights_sha256(root / "models" / "rounds" / "round1") == weights
    assert _lock_md5(root, "rounds", "models/rounds") == recorded
