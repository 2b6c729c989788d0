"""Headless browser helpers for tests: Debian's Chromium driven by Playwright's sync API, plus small server helpers.

Playwright's own browser downloads are not used (`playwright install` is never run): Playwright launches the Chromium
that `apt-get install -y chromium` puts at /usr/bin/chromium."""
import contextlib, os, shutil, signal, socket, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path

ARTIFACTS = Path(__file__).parent / 'artifacts'
# Root in a container: no user namespaces for the sandbox, a small /dev/shm, no GPU.
CHROMIUM_ARGS = ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu']
PHONE = {'width': 390, 'height': 844}
DESKTOP = {'width': 1280, 'height': 800}

def chromium_path():
    "Path of Debian's Chromium binary; a RuntimeError saying how to install it if there is none."
    path = '/usr/bin/chromium' if os.access('/usr/bin/chromium', os.X_OK) else shutil.which('chromium')
    if not path:
        raise RuntimeError("Chromium not found: install Debian's package with "
                           "`apt-get update && apt-get install -y chromium` (as root); Playwright's downloads are not used.")
    return path

@contextlib.contextmanager
def chromium(**kwargs):
    "Launch headless Chromium through Playwright's sync API; yields the `Browser` and closes it afterwards."
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS, **kwargs)
        try: yield browser
        finally: browser.close()

@contextlib.contextmanager
def new_page(browser, viewport=DESKTOP, **kwargs):
    "A page in a fresh browser context (own cookies and storage) of size `viewport`; closed afterwards."
    context = browser.new_context(viewport=viewport, **kwargs)
    try: yield context.new_page()
    finally: context.close()

def screenshot(page, name):
    "Save a full-page PNG of `page` as tests/artifacts/`name`.png and return its path."
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f'{name}.png'
    page.screenshot(path=path, full_page=True)
    return path

def free_port():
    "A TCP port on 127.0.0.1 that nothing listens on right now."
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 through a proxy

def wait_for_http(url, timeout=30, proc=None):
    "Poll `url` until the server answers (any HTTP status) and return the status; fail if `proc` exits or time runs out."
    deadline = time.monotonic() + timeout
    while True:
        try:
            with _no_proxy.open(url, timeout=5) as r: return r.status
        except urllib.error.HTTPError as e: return e.code
        except (urllib.error.URLError, OSError): pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f'server exited with code {proc.returncode} before {url} answered')
        if time.monotonic() > deadline: raise TimeoutError(f'{url} did not answer within {timeout} s')
        time.sleep(0.1)

def stop(proc, timeout=10):
    "Stop `proc` and its process group (start it with `start_new_session=True`): SIGTERM, then SIGKILL."
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError): os.killpg(proc.pid, sig)
        try: return proc.wait(timeout)
        except subprocess.TimeoutExpired: pass

@contextlib.contextmanager
def serve(folder, timeout=30):
    "Serve `folder` with `python -m http.server` on 127.0.0.1 at a free port; yields the base URL (ending in /)."
    port = free_port()
    proc = subprocess.Popen([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1', '--directory', str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f'http://127.0.0.1:{port}/'
        wait_for_http(url, timeout, proc)
        yield url
    finally: stop(proc)
