"""The DVC remote: where promoted checkpoints and their data go, and the push.

Default remote: a local directory (`.dvc/config`). S3 through dvc-s3/s3fs with a configurable
endpoint (`configure_s3_remote`); credentials only from the environment or
`.dvc/config.local`, never written here or logged. `push` runs real `dvc push` once (the
flows retry it with Prefect's task retries, flows/publish.py): DVC uploads content-addressed
objects and skips those already there, so a failed push leaves the local cache and workspace
untouched and a later push sends exactly what is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# What DVC prints after every error; it says nothing about this one.
_SUPPORT = "dvc.org/support"
# dvc-objects writes an object to `.<token_urlsafe(16)>.tmp` beside it, then renames it.
_TEMP_OBJECT = re.compile(r"^\.[A-Za-z0-9_-]{22}\.tmp$")
TEMP_GRACE_S = 60.0  # a live upload keeps writing its temp file; a killed one stops


class RemoteError(RuntimeError):
    """The remote could not be reached or written."""


@dataclass(frozen=True)
class PushSummary:
    remote: str
    output: str


def dvc(repo: Path, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def configure_s3_remote(repo: Path, name: str, url: str, endpoint: str | None = None) -> None:
    """Add (or replace) an S3 remote in `.dvc/config`: URL and endpoint only, no keys."""
    if not url.startswith("s3://"):
        raise ValueError(f"an S3 remote URL starts with s3://, got {url!r}")
    for args in (
        ("remote", "add", "--force", name, url),
        *((("remote", "modify", name, "endpointurl", endpoint),) if endpoint else ()),
    ):
        out = dvc(repo, *args)
        if out.returncode != 0:
            raise RemoteError(f"dvc {' '.join(args[:3])} failed: {out.stderr.strip()}")


def failure_cause(output: str) -> str:
    """The real cause of a failed DVC command, from its output: its ERROR lines, the specific
    ones before DVC's summary ("failed to push data to the cloud"), without DVC's support
    footer or its "unexpected error - " prefix."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    lines = [line for line in lines if _SUPPORT not in line]
    errors = [
        line.removeprefix("ERROR:").strip().removeprefix("unexpected error - ")
        for line in lines
        if line.startswith("ERROR")
    ]
    specific = [e for e in errors if not e.startswith("failed to push data to the cloud")]
    causes = list(dict.fromkeys(specific or errors))
    if causes:
        return "; ".join(causes)
    return lines[-1] if lines else "(no output)"


def local_remote_path(repo: Path, remote: str | None = None) -> Path | None:
    """The folder of `remote` (default: the default remote) when it is a local one."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        name = remote or r.config["core"].get("remote")
        url = r.config["remote"].get(name, {}).get("url") if name else None
    if not url or "://" in str(url):
        return None
    return Path(url)


def clear_stale_temp_objects(folder: Path, grace_s: float = TEMP_GRACE_S) -> list[Path]:
    """Remove the temp files a killed push left in a local remote (never renamed into
    objects, often empty); ones written to in the last `grace_s` may be a live push's."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for parent, _, files in os.walk(folder):
        for name in files:
            path = Path(parent) / name
            if _TEMP_OBJECT.match(name):
                try:
                    if now - path.stat().st_mtime > grace_s:
                        path.unlink()
                        removed.append(path)
                except FileNotFoundError:
                    pass  # a live push renamed it meanwhile
    return removed


def push(
    repo: Path,
    targets: list[str] | None = None,
    *,
    remote: str | None = None,
    timeout_s: float = 600,
) -> PushSummary:
    """One `dvc push`; a failure raises RemoteError with the remote's real cause."""
    args = ["push", *(["--remote", remote] if remote else []), *(targets or [])]
    local = local_remote_path(repo, remote)
    if local is not None:
        clear_stale_temp_objects(local)
    try:
        out = dvc(repo, *args, timeout_s=timeout_s)
    except subprocess.TimeoutExpired:
        cause = f"timed out after {timeout_s:.0f} s"
    else:
        if out.returncode == 0:
            return PushSummary(remote or "default", out.stdout.strip())
        cause = failure_cause(f"{out.stdout}\n{out.stderr}")
    raise RemoteError(
        f"dvc push to remote {remote or 'default'} failed; the local cache is unchanged and "
        f"a later push sends what is missing. Cause: {cause}"
    )
