"""The Prefect UI as a user drives it, in a real browser: headless Chromium from Debian's
package, driven by Playwright (never Playwright's own browser downloads). `xopd serve` runs on a
tiny work folder; the test opens the deployments page, fills the round's form with tiny
settings, presses Submit, follows the run to Completed and opens its artifact. Screenshots go
to $XOPD_UI_SHOTS (default /tmp/ui_shots). Runs in `make test-ui` only (marker `ui`)."""

from __future__ import annotations

import re
import time
from datetime import date

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.browser import SHOTS
from tests.flows.conftest import Served

pytestmark = pytest.mark.ui
RUN_TIMEOUT_S = 420  # a 1-step round on the tiny world: ~20 s alone, minutes on a busy machine


def form_input(page, label: str):
    """The input of the form property whose label reads `label` (e.g. "Steps (Optional)")."""
    prop = "contains(concat(' ', @class, ' '), ' schema-form-property ')"
    return page.locator(
        f"xpath=//span[contains(@class, 'schema-form-property__label')"
        f" and normalize-space()='{label}']/ancestor::div[{prop}][1]//input"
    ).first


def shot(page, name: str, height: int = 900) -> None:
    """A screenshot `height` pixels tall: the UI scrolls inside its own pane, so a full-page
    screenshot stops at the window; a taller window shows the whole form or log."""
    page.set_viewport_size({"width": 1400, "height": height})
    page.wait_for_timeout(500)  # the layout settles
    page.screenshot(path=str(SHOTS / f"{name}.png"))
    page.set_viewport_size({"width": 1400, "height": 900})


def test_a_round_started_from_the_ui_form_completes_with_its_artifact(served: Served, page) -> None:
    ui = served.api.removesuffix("/api")
    page.goto(f"{ui}/deployments")
    round_link = page.get_by_role("link", name="round", exact=True)
    round_link.wait_for()
    for name in ("nightly", "campaign", "study"):
        assert page.get_by_role("link", name=name, exact=True).is_visible(), name
    shot(page, "1-deployments")

    # The round's form: Run → Custom run, then the round number and tiny train settings.
    round_link.click()
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Custom run", exact=True).click()
    submit = page.get_by_role("button", name="Submit")
    submit.wait_for()
    page.get_by_role("button", name="int", exact=True).click()
    form_input(page, "round (Optional)").fill("1")
    page.get_by_role("button", name="TrainParams", exact=True).click()
    for label, value in (
        ("Steps (Optional)", "1"),
        ("Prompts Per Step (Optional)", "2"),
        ("Rollouts Per Prompt (Optional)", "2"),
        ("Max New Tokens (Optional)", "8"),
    ):
        form_input(page, label).fill(value)
    # What the round needs is on the form; the rest of params.yaml stays behind `params`.
    for label in ("gate (Optional)", "params (Optional)"):
        assert page.get_by_text(label, exact=True).is_visible(), label
    assert page.get_by_text("Lmbda (Optional)", exact=True).is_visible()
    assert not page.get_by_text("Pretrain Utterances (Optional)", exact=True).is_visible()
    shot(page, "2-round-form", height=4600)

    submit.click()
    # The toast's "View run" button (re-rendered as its timer runs: clicked from the page).
    view = page.locator(".toast-flow-run-create__button").first
    view.wait_for()
    view.evaluate("button => button.click()")
    page.wait_for_url(re.compile(r".*/runs/flow-run/[0-9a-f-]+$"))
    run_id = page.url.rsplit("/", 1)[1]
    badge = page.locator("header.page-heading-flow-run .state-badge").first
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (state := badge.inner_text().strip()) != "Completed":
        assert state not in ("Failed", "Crashed", "Cancelled"), (state, served.tail())
        assert time.monotonic() < deadline, (state, served.tail())
        time.sleep(2)
    name = f"round-1-{date.today().isoformat()}"
    page.get_by_text(name, exact=True).first.wait_for()  # renamed after the round it trained
    page.get_by_text("round 1: gate: ", exact=False).first.wait_for()  # its progress log
    shot(page, "3-run-completed", height=2000)

    page.get_by_text("Artifacts", exact=True).first.click()
    card = page.locator(".artifact-card__title", has_text="round-1").first
    card.click()
    page.get_by_text("speech Avg-Drop (%)", exact=True).first.wait_for()
    page.get_by_text("student tokens trained", exact=True).first.wait_for()
    shot(page, "4-artifact")

    # What the browser showed is what the server and the folder hold.
    with (
        temporary_settings(updates={PREFECT_API_URL: served.api}),
        get_client(sync_client=True) as client,
    ):
        run = client.read_flow_run(run_id)
        keys = {a.key for a in client.read_artifacts() if a.flow_run_id == run.id}
    assert run.state is not None and run.state.is_completed()
    assert run.name == name and run.parameters["round"] == 1
    assert run.parameters["train"]["steps"] == 1
    assert "round-1" in keys
    assert (served.work / "models" / "rounds" / "round1" / "model.safetensors").is_file()
