"""The offline `dvc plots show` page (infra/dvc_plots.html) in a real browser: DVC fills it with
the vega specs of dvc.yaml's `plots:`, and its own small script draws them, a line per curve
and a point per step, with no script or style loaded from anywhere. Marker `ui` (it needs the
browser of `make test-ui`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.browser import SHOTS

pytestmark = pytest.mark.ui
REPO = Path(__file__).resolve().parents[1]

DVC_YAML = """
stages:
  noop:
    cmd: "true"
plots:
  - training loss:
      x: step
      y:
        live/loss.tsv: loss
  - reverse KL estimate:
      x: step
      y:
        live/reverse_kl_speech.tsv: reverse_kl_speech
        live/reverse_kl_text.tsv: reverse_kl_text
"""


def test_the_plots_page_draws_every_curve_offline(tmp_path: Path, page) -> None:
    root = tmp_path / "repo"
    (root / "live").mkdir(parents=True)
    curves = {"loss": [2.0, 1.5, 1.2], "reverse_kl_speech": [0.9, 0.7, 0.4]}
    curves["reverse_kl_text"] = [0.5, 0.3, 0.2]
    for name, ys in curves.items():
        rows = "".join(f"{step}\t{y}\n" for step, y in enumerate(ys))
        (root / "live" / f"{name}.tsv").write_text(f"step\t{name}\n{rows}")
    (root / "dvc.yaml").write_text(DVC_YAML)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "-q"], cwd=root, check=True)
    shutil.copy(REPO / "infra" / "dvc_plots.html", root / "page.html")
    subprocess.run(
        [*dvc, "plots", "show", "--html-template", "page.html", "-o", "out"],
        cwd=root,
        check=True,
        capture_output=True,
    )
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((root / "out" / "index.html").as_uri())
    page.wait_for_load_state("load")
    page.screenshot(path=str(SHOTS / "5-dvc-plots-page.png"), full_page=True)
    assert not errors
    assert [u for u in requests if not u.startswith("file://")] == []
    assert page.locator("svg polyline").count() == 3  # loss; speech and text KL
    assert page.locator("svg circle").count() == 9  # a point per step and curve
    legend = page.locator("svg text").evaluate_all("texts => texts.map(t => t.textContent)")
    assert {"loss", "reverse_kl_speech", "reverse_kl_text"} <= set(legend)
