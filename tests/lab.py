"""Drive JupyterLab 4 in headless Chromium: start a private `jupyter lab` server, open a notebook, run all its cells.

Named lab.py, not jupyter.py: jupyter_core installs a top-level `jupyter` module that a tests/jupyter.py would shadow."""
import contextlib, dataclasses, json, os, secrets, subprocess, sys, tempfile
from pathlib import Path

from browser import free_port, stop, wait_for_http

# User settings for a quiet, deterministic JupyterLab: no "receive official Jupyter news?" toast, no update check.
SETTINGS = {'@jupyterlab/apputils-extension/notification': {'fetchNews': 'false', 'checkForUpdates': False}}

@dataclasses.dataclass
class Lab:
    "A running JupyterLab server: base `url` (ending in /), its `token`, the `root_dir` it serves and its `log` file."
    url: str
    token: str
    root_dir: Path
    log: Path

    def notebook_url(self, name):
        "URL opening notebook `name` (a path relative to `root_dir`) in JupyterLab, token included."
        return f'{self.url}lab/tree/{name}?token={self.token}'

    def log_tail(self, n=40):
        "The last `n` lines the server logged."
        return '\n'.join(self.log.read_text(errors='replace').splitlines()[-n:])

def notebook(path, *sources):
    "Write a notebook of code cells `sources` to `path`, its metadata naming the python3 kernel (no kernel dialog)."
    cells = [{'cell_type': 'code', 'execution_count': None, 'id': f'cell{i}', 'metadata': {}, 'outputs': [], 'source': s}
             for i, s in enumerate(sources)]
    meta = {'kernelspec': {'display_name': 'Python 3 (ipykernel)', 'language': 'python', 'name': 'python3'},
            'language_info': {'name': 'python'}}
    Path(path).write_text(json.dumps({'cells': cells, 'metadata': meta, 'nbformat': 4, 'nbformat_minor': 5}, indent=1))
    return Path(path)

@contextlib.contextmanager
def jupyter_lab(root_dir, timeout=60):
    """Start `jupyter lab` on 127.0.0.1 at a free port with a random token, serving `root_dir`; yield a `Lab` once it
    answers; stop it (SIGTERM to its process group, which shuts its kernels down; SIGKILL if that hangs) afterwards.
    Config, runtime, IPython and settings folders are private temporary ones, so ~/.jupyter cannot change the result."""
    port, token = free_port(), secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix='jupyterlab-') as tmp:
        home = Path(tmp)
        for plugin, values in SETTINGS.items():
            f = home / 'user-settings' / f'{plugin}.jupyterlab-settings'
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(values))
        env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(home / 'config'), 'JUPYTER_RUNTIME_DIR': str(home / 'runtime'),
               'IPYTHONDIR': str(home / 'ipython')}
        cmd = [sys.executable, '-m', 'jupyterlab', '--no-browser', '--allow-root',  # root refuses to start without it
               '--ServerApp.ip=127.0.0.1', f'--ServerApp.port={port}', '--ServerApp.port_retries=0',
               f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root_dir}',
               '--LabApp.expose_app_in_browser=True',  # window.jupyterapp: run JupyterLab commands from tests
               f'--LabApp.user_settings_dir={home / "user-settings"}', f'--LabApp.workspaces_dir={home / "workspaces"}']
        log = home / 'jupyterlab.log'
        with open(log, 'wb') as out:
            proc = subprocess.Popen(cmd, cwd=root_dir, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        lab = Lab(f'http://127.0.0.1:{port}/', token, Path(root_dir), log)
        try:
            try: wait_for_http(lab.url + 'api', timeout, proc)
            except Exception as e: raise RuntimeError(f'{e}\n--- jupyter lab log ---\n{lab.log_tail()}') from None
            yield lab
        finally: stop(proc)

KERNEL_IDLE = "() => window.jupyterapp?.shell.currentWidget?.sessionContext?.session?.kernel?.status === 'idle'"

def wait_kernel_idle(page, timeout=60_000):
    "Wait until the kernel of the notebook shown in `page` is started and idle."
    page.wait_for_function(KERNEL_IDLE, timeout=timeout)

def open_notebook(page, lab, name, timeout=60_000):
    "Open notebook `name` of `lab` in `page` and wait until its kernel is idle."
    page.goto(lab.notebook_url(name))
    page.locator('.jp-NotebookPanel .jp-Cell').first.wait_for(timeout=timeout)
    wait_kernel_idle(page, timeout)

def run_all_cells(page, timeout=60_000):
    """Run all cells of the current notebook (command 'notebook:run-all-cells', as Run > Run All Cells) and wait until
    they finished; raise AssertionError, with the error outputs, if one of them raised."""
    page.evaluate("""() => { window.__runAll = 'running';
        window.jupyterapp.commands.execute('notebook:run-all-cells')
            .then(ok => { window.__runAll = ok ? 'ok' : 'failed'; }, e => { window.__runAll = 'error: ' + e; }); }""")
    page.wait_for_function("() => window.__runAll !== 'running'", timeout=timeout)
    result = page.evaluate('window.__runAll')
    if result != 'ok':
        errors = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]').all_inner_texts()
        raise AssertionError(f'run all cells: {result}\n' + '\n'.join(errors))
    wait_kernel_idle(page, timeout)

def wait_for(page, selector, text=None, timeout=30_000):
    "Wait until an element matching `selector` (containing `text`, if given) is visible; return its locator."
    loc = page.locator(selector)
    if text is not None: loc = loc.filter(has_text=text)
    loc.first.wait_for(state='visible', timeout=timeout)
    return loc.first
