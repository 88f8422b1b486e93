"""The `xopd` command: every stage command of `tasks/cli.py`, plus the commands that run
flows — `run` (the campaign through Prefect, what `make run` calls) and `serve` (the
deployments) — which live here because tasks never import flows."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import layout
from tasks.cli import add_params
from tasks.cli import main as tasks_main
from xopd_core.runtime import apply_offline_env

if TYPE_CHECKING:
    from flows.server import EarlyServer


def cmd_serve(args: argparse.Namespace) -> int:
    """The deployments, served against the API decided (and its server started) before
    prefect is imported; the flows import while that server boots."""
    from flows.server import ServeApi
    from xopd_core.config import load_params

    params = load_params(args.params)
    api = ServeApi(port=args.port)
    try:
        from flows.serve import serve
    except BaseException:
        api.stop()
        raise
    serve(params, str(args.workdir), api, pool=args.pool)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The campaign flow on the work folder, then the table, the paths and the share of the
    wall time spent outside the stage functions (Prefect, DVC, validation)."""
    from flows.server import EarlyServer

    server = _early_server or EarlyServer()
    # What calling the stage functions directly imports too (torch, transformers, the stages)
    # while the Prefect server boots. Not counted as overhead; everything after it is,
    # importing Prefect and any wait for its server included.
    imports = time.perf_counter()
    for stage in ("synth", "validate", "teacher", "student", "eval", "rounds"):
        importlib.import_module(f"tasks.{stage}")
    start = time.perf_counter()
    from flows.campaign import xopd_campaign
    from xopd_core.atomic import write_json_atomic
    from xopd_core.config import load_params

    params = load_params(args.params)
    with server.serving():
        result = xopd_campaign(params, workdir=str(args.workdir))
    wall = time.perf_counter() - start
    root = args.workdir
    print("\n" + result["table"])
    if not result["ran"]:
        print("Everything was up to date (dvc status): nothing ran.")
        if "push" in result:
            print(f"Remote: {result['push']}")
    else:
        work = sum(v for k, v in result["seconds"].items() if k != "validate")
        write_json_atomic(
            root / layout.RUN_SUMMARY,
            {
                "ran": result["ran"],
                "wall_seconds": round(wall, 1),
                "stage_import_seconds": round(start - imports, 1),  # before the wall
                "stage_function_seconds": {k: round(v, 1) for k, v in result["seconds"].items()},
                "orchestration_share": round((wall - work) / max(wall, 1e-9), 4),
            },
        )
        print(
            f"Ran {', '.join(result['ran'])} in {wall:.0f} s; the stage functions took "
            f"{work:.0f} s, so Prefect + DVC + validation cost {wall - work:.0f} s "
            f"({100 * (wall - work) / max(wall, 1e-9):.1f} % of the wall time)."
        )
        print(f"Recorded in dvc.lock: {'yes' if result['recorded'] else 'no'}")
        if "push" in result:
            print(f"Remote: {result['push']}")
    if result.get("recorded"):
        print_git_advice(root)
    print("\nResults:")
    for name, path in (
        ("campaign table", layout.CAMPAIGN_TABLE),
        ("run timings", layout.RUN_SUMMARY),
        ("rounds metrics", layout.ROUNDS_METRICS),
        ("plots", layout.PLOTS),
        ("champion pointer", layout.CHAMPION),
        ("round checkpoints", layout.ROUNDS),
        ("round reports", layout.ROUND_REPORTS),
        ("round-0 eval", layout.EVAL),
        ("teacher", Path(params.inputs.teacher)),
        ("student (round 0)", Path(params.inputs.student)),
        ("validation report", layout.VALIDATE / "validation.html"),
        ("data", Path(params.inputs.data)),
    ):
        print(f"  {name:<18} {root / path}")
    print("  plots page         `dvc plots show` (offline), headline metrics: `dvc metrics show`")
    return 0


def print_git_advice(root: Path) -> None:
    """What of the recorded run belongs in git and is not committed, as the line to run."""
    from tasks.record import git_commit_line, git_to_commit

    files = git_to_commit(root)
    if files:
        message = f"xopd run: record the pipeline's results ({', '.join(files)})"
        print(f"To keep the record in git (DVC tracks the data, git these files):\n  "
              f"{git_commit_line(root, files, message)}")  # fmt: skip
    elif files is not None:
        print("git: dvc.lock and champion.json are committed as they are.")


def add_flow_commands(sub: Any) -> None:
    p = sub.add_parser("run", help="the mini-world campaign through Prefect (what make run runs)")
    add_params(p)
    p.add_argument("--workdir", type=Path, default=Path("."), help="the work folder")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "serve",
        help="serve the Prefect deployments against the configured Prefect API "
        "(PREFECT_API_URL, a profile or prefect.toml), else a server it starts on 127.0.0.1",
    )
    add_params(p)
    p.add_argument("--workdir", type=Path, default=Path("."), help="the work folder")
    p.add_argument(
        "--port", type=int, default=4200, help="port of the local server when none is configured"
    )
    p.add_argument(
        "--pool",
        help="register the deployments on this Prefect work pool (a process pool is created "
        "if none has the name) instead of running them here: `prefect worker start --pool "
        "NAME` on a machine with the repository runs their flow runs",
    )
    p.set_defaults(func=cmd_serve)


_early_server: EarlyServer | None = None  # `xopd run`'s Prefect server, started with the process


def main(argv: list[str] | None = None) -> int:
    global _early_server
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        from flows.server import EarlyServer

        apply_offline_env()  # before the server inherits the environment
        _early_server = EarlyServer()
    return tasks_main(argv, extra=add_flow_commands)


if __name__ == "__main__":
    sys.exit(main())
