"""The chat and attention widgets where their users use them: in JupyterLab, in headless Chromium. A notebook loads a
tiny checkpoint made here; the test types a message, clicks Send, sees the reply stream in, clicks Stop, then runs a
new cell that opens the attention widget on that reply and sees its heatmap drawn. Screenshots go to tests/artifacts/."""
import pytest

from browser import screenshot
from lab import jupyter_lab, notebook, open_notebook, run_all_cells, wait_for
from tiny import tiny_checkpoint

pytestmark = pytest.mark.slow


def test_chat_then_attention_in_jupyterlab(page, tmp_path):
    tiny_checkpoint(tmp_path / 'base')
    notebook(tmp_path / 'chat.ipynb', f"""import os
os.environ['IMAGELM_BASE_DIR'] = {str(tmp_path / 'base')!r}
from imagelm.chat_widget import ChatWidget
chat = ChatWidget.from_checkpoint('base', temperature=0.0, max_tokens=100_000)
chat""")
    with jupyter_lab(tmp_path) as lab:
        open_notebook(page, lab, 'chat.ipynb')
        run_all_cells(page)
        wait_for(page, '.widget-textarea textarea').fill('Hello from JupyterLab')
        page.locator('.widget-button', has_text='Send').click()
        writing = wait_for(page, '.widget-html', 'writing…', timeout=60_000)   # the reply is streaming in
        first = writing.inner_text()
        page.wait_for_function("""first => [...document.querySelectorAll('.widget-html')].some(
                                       e => e.innerText.includes('writing…') && e.innerText.length > first.length + 5)""",
                               arg=first, timeout=30_000)
        screenshot(page, 'chat_widget_streaming')
        page.locator('.widget-button', has_text='Stop').click()
        wait_for(page, '.widget-html', '[stopped]', timeout=30_000)
        wait_for(page, '.widget-html', 'bytes written: stopped', timeout=30_000)
        assert page.locator('.widget-html details img').count() >= 1   # the page the model read, as a thumbnail

        page.evaluate('''async () => {   // a new cell below, written and run as a user would
            const app = window.jupyterapp;
            await app.commands.execute('notebook:insert-cell-below');
            app.shell.currentWidget.content.activeCell.model.sharedModel.setSource('eyes = chat.attention(dpi=60); eyes');
            await app.commands.execute('notebook:run-cell');
        }''')
        heatmap = wait_for(page, '.widget-output img', timeout=60_000)   # the heatmap, drawn into the widget
        heatmap.scroll_into_view_if_needed()
        assert page.locator('.widget-slider').count() >= 1 and page.locator('.widget-dropdown').count() >= 2
        screenshot(page, 'chat_widget_attention')
