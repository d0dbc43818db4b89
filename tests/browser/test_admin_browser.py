"""A real headless Chromium: log in, open a dead run, read its traceback, click Retry."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

import django_events
from django_events.models import Run, RunStatus
from django_events.testing import run_all

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Debian's Chromium, headless, driven by its chromedriver (installed by .ci/run)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]
    assert not missing, f"{missing} missing: apt-get install chromium chromium-driver (.ci/run does this)"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium'}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


def test_log_in_open_dead_run_read_traceback_and_retry(browser, live_server, django_user_model):
    # Given a superuser and a run that died after its retries
    django_user_model.objects.create_superuser("ops", "ops@example.com", "correct horse")
    django_events.send("test/always-fails", {"user_id": 42})
    run_all()
    run = Run.objects.get()
    assert run.status == RunStatus.DEAD
    wait = WebDriverWait(browser, 20)

    # When the operator logs in
    browser.get(f"{live_server.url}/admin/login/?next=/admin/django_events/run/")
    browser.find_element(By.NAME, "username").send_keys("ops")
    browser.find_element(By.NAME, "password").send_keys("correct horse")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "result_list")))

    # and opens the dead run from the list
    browser.find_element(By.ID, "result_list").find_element(By.LINK_TEXT, "tests.always_fails").click()
    wait.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".de-attempts")))

    # Then the traceback of each attempt is there, as text (the HTML in the error is not rendered)
    tracebacks = browser.find_elements(By.CSS_SELECTOR, ".de-traceback pre")
    assert len(tracebacks) == 3
    assert "Traceback (most recent call last)" in tracebacks[0].text
    assert "ValueError: <b>broken</b> on attempt 1" in tracebacks[0].text
    assert not browser.find_elements(By.CSS_SELECTOR, ".de-traceback b")

    # When the operator clicks Retry
    browser.find_element(By.ID, "de-retry").click()

    # Then the page says so and shows the run back in pending
    wait.until(
        expected_conditions.text_to_be_present_in_element((By.CSS_SELECTOR, ".messagelist"), "1 run retried")
    )
    assert browser.find_element(By.CSS_SELECTOR, ".de-badge-pending").text == "pending"
    run.refresh_from_db()
    assert run.status == RunStatus.PENDING
    assert run.attempts == 3
