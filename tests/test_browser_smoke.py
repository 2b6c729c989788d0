"""Smoke test of the browser setup: Playwright drives Debian's headless Chromium against a local `http.server`."""
import pytest

from browser import PHONE, new_page, screenshot, serve

pytestmark = pytest.mark.slow

HTML = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>smoke</title><style>body { font-family: sans-serif; margin: 1em; } button { font-size: 1.2em; }</style></head>
<body><h1>Browser smoke test</h1>
<button id="go" onclick="document.getElementById('out').textContent = 'Hello from JavaScript ' + (1 + 1)">Go</button>
<div id="out"></div></body></html>
"""

@pytest.fixture
def site(tmp_path):
    (tmp_path / 'index.html').write_text(HTML)
    with serve(tmp_path) as url: yield url

def click_and_check(page, url):
    page.goto(url + 'index.html')
    assert page.title() == 'smoke'
    assert page.locator('#out').text_content() == ''
    page.click('#go')
    page.wait_for_function("document.getElementById('out').textContent.includes('Hello from JavaScript 2')", timeout=10_000)

def test_click_writes_text(page, site):
    click_and_check(page, site)
    assert page.locator('#out').inner_text() == 'Hello from JavaScript 2'
    assert screenshot(page, 'browser_smoke_desktop').stat().st_size > 0

def test_phone_width(browser, site):
    with new_page(browser, PHONE) as phone:
        click_and_check(phone, site)
        assert phone.evaluate('window.innerWidth') == PHONE['width']
        assert phone.evaluate('document.documentElement.scrollWidth') <= PHONE['width']  # no sideways scrolling
        assert phone.locator('#go').is_visible()
        screenshot(phone, 'browser_smoke_phone')
