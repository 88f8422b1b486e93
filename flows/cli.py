"""The `xopd` command: every stage command of `tasks/cli.py`, plus `serve` (the Prefect
deployments), which lives here because tasks never import flows."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tasks.cli import add_params
from tasks.cli import main as tasks_main


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.serve import serve
    from xopd_core.config import load_params

    serve(load_params(args.params), str(args.workdir))
    return 0


def add_flow_commands(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the Prefect deployments (starts a local server)")
    add_params(p)
    p.add_argument("--workdir", type=Path, default=Path("."), help="the work folder")
    p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    return tasks_main(argv, extra=add_flow_commands)


if __name__ == "__main__":
    sys.exit(main())
