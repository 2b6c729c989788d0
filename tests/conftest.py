"""Shared pytest fixtures: a headless Chromium `browser` (one per test module) and a fresh `page` per test.

A test that fails while using `page` leaves tests/artifacts/FAILED-<test>.png behind."""
import re, sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules (browser.py, lab.py), whatever the import mode
import browser as _browser

@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    "Keep each phase's report on the test item, so fixtures can see whether the test failed."
    report = yield
    setattr(item, f'rep_{report.when}', report)
    return report

@pytest.fixture(scope='module')
def browser():
    "Headless Chromium (Debian's /usr/bin/chromium) driven by Playwright, shared by the tests of one module."
    with _browser.chromium() as b: yield b

@pytest.fixture
def page(browser, request):
    "A desktop-sized page in a fresh context; screenshotted into tests/artifacts/ if the test fails."
    with _browser.new_page(browser) as p:
        yield p
        report = getattr(request.node, 'rep_call', None)
        if report is not None and report.failed: _browser.screenshot(p, 'FAILED-' + re.sub(r'[^\w.-]', '_', request.node.name))
