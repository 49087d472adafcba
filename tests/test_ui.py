"""The Prefect UI in a real browser (Debian's Chromium, headless, driven by Playwright).

The `prefect_server` fixture is `prefect server start`, which serves the UI. The test
creates an xm-slurm pool, runs a small experiment, then checks that (1) the pool's edit
form shows our job variables with their titles and (2) the experiment's run page lists
its work-unit subflows. Screenshots go to docs/ (shown in the README and the documentation site).

Chromium comes from `scripts/chromium.sh` (apt); Playwright's own browser download
(`playwright install`) is never used.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from conftest import REPO, require_service

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
# The documentation's screenshots are refreshed only on request, so a test run leaves the
# tree clean: PREFECT_XM_UPDATE_SCREENSHOTS=1 bash scripts/test.sh -k ui
DOCS = (REPO / "docs") if os.environ.get("PREFECT_XM_UPDATE_SCREENSHOTS") == "1" else Path(tempfile.mkdtemp(prefix="pxm-ui-"))
SLURM_TITLES = ["Partition", "Time limit", "CPUs per task", "Memory", "GPUs", "GPU type", "Modules",
                "Setup commands"]


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require_service("playwright", sync_playwright is not None, "pip install -e .[test] (the playwright wheel)")
    require_service("chromium", shutil.which("chromium") is not None, "bash scripts/chromium.sh")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    return prefect_server


def _label(title: str) -> "re.Pattern[str]":
    return re.compile(rf"^{re.escape(title)}( \(Optional\))?$")


def _page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, color_scheme="light")
    return context, context.new_page()


def test_xm_slurm_pool_form_shows_our_variables(api, browser):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from prefect_xm.workers.slurm import SlurmWorker

    pool = "xm-slurm-ui"
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except Exception:
            client.create_work_pool(WorkPoolCreate(
                name=pool, type="xm-slurm", base_job_template=SlurmWorker.get_default_base_job_template()))
    context, page = _page(browser)
    try:
        page.goto(f"http://127.0.0.1:{api.port}/work-pools/work-pool/{pool}/edit", wait_until="networkidle")
        for title in SLURM_TITLES:  # optional fields are labelled "<title> (Optional)"
            page.get_by_text(_label(title)).first.wait_for(timeout=30_000)
        page.set_viewport_size({"width": 1400, "height": 2000})
        page.get_by_text(_label("Partition")).first.evaluate("e => e.scrollIntoView({block: 'start'})")
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / "ui-xm-slurm-pool.png"), full_page=False)
        lines = {line.strip() for line in page.inner_text("body").splitlines()}
        missing = [t for t in SLURM_TITLES if t not in lines and f"{t} (Optional)" not in lines]
        assert not missing, missing
    finally:
        context.close()


def test_experiment_run_page_shows_work_unit_subflows(api, browser):
    from prefect_xm import xm, xm_local

    title = f"ui-sweep-{uuid.uuid4().hex[:4]}"

    def run_experiment():
        with xm_local.create_experiment(experiment_title=title) as experiment:
            [exe] = experiment.package([xm.Packageable(
                xm.Command([sys.executable, "-c", "import sys; print('trial', *sys.argv[1:])"]),
                xm_local.Local.Spec())])
            for lr in (0.1, 0.01, 0.001):
                experiment.add(xm.Job(exe, xm_local.Local(), args={"learning_rate": lr}))
        statuses = {wid: wu.get_status() for wid, wu in experiment.work_units.items()}
        assert all(s.is_completed for s in statuses.values()), statuses
        return experiment

    # Playwright's sync API runs an event loop on this thread: launch from another one.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        experiment = pool.submit(run_experiment).result(timeout=300)
    names = [f"{title}-wu{i}" for i in (1, 2, 3)]

    context, page = _page(browser)
    try:
        page.goto(f"http://127.0.0.1:{api.port}/runs/flow-run/{experiment.flow_run_id}", wait_until="networkidle")
        page.get_by_text(title).first.wait_for(timeout=30_000)
        page.get_by_text(re.compile(r"^Subflow runs$", re.IGNORECASE)).first.click()
        for name in names:
            page.get_by_text(name).first.wait_for(timeout=30_000)
        DOCS.mkdir(exist_ok=True)
        page.screenshot(path=str(DOCS / "ui-experiment-run.png"), full_page=False)
        body = page.inner_text("body")
        assert all(n in body for n in names), body[:2000]
    finally:
        context.close()
