"""The DVC remote: where promoted checkpoints and their data go, and the retrying push.

Default remote: a local directory (`.dvc/config`). S3 through dvc-s3/s3fs with a configurable
endpoint (`configure_s3_remote`); credentials only from the environment or
`.dvc/config.local`, never written here or logged. `push` runs real `dvc push`, retrying
with exponential backoff: DVC uploads content-addressed objects and skips those already
there, so a failed push leaves the local cache and workspace untouched and a later push
sends exactly what is missing.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


class RemoteError(RuntimeError):
    """The remote could not be reached or written after every retry."""


@dataclass(frozen=True)
class PushSummary:
    remote: str
    attempts: int
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


def push(
    repo: Path,
    targets: list[str] | None = None,
    *,
    remote: str | None = None,
    attempts: int = 4,
    backoff_s: float = 2.0,
    timeout_s: float = 600,
) -> PushSummary:
    """`dvc push` with up to `attempts` tries, waiting backoff_s · 2^k between them."""
    args = ["push", *(["--remote", remote] if remote else []), *(targets or [])]
    last_line = ""
    for attempt in range(1, attempts + 1):
        try:
            out = dvc(repo, *args, timeout_s=timeout_s)
            if out.returncode == 0:
                return PushSummary(remote or "default", attempt, out.stdout.strip())
            tail = (out.stderr or out.stdout).strip().splitlines()
            last_line = tail[-1] if tail else "(no output)"
        except subprocess.TimeoutExpired:
            last_line = f"timed out after {timeout_s:.0f} s"
        if attempt < attempts:
            time.sleep(backoff_s * 2 ** (attempt - 1))
    raise RemoteError(
        f"dvc push to remote {remote or 'default'} failed {attempts} times; the local cache "
        f"is unchanged and a later push sends what is missing. Last error: {last_line}"
    )
