"""Smoke test of JupyterLab in headless Chromium: run a notebook's cells, then click an ipywidgets button in the page."""
import pytest

from browser import screenshot
from lab import jupyter_lab, notebook, open_notebook, run_all_cells, wait_for

pytestmark = pytest.mark.slow

WIDGETS = """\
import ipywidgets as widgets
name = widgets.Text(value='world', description='Name')
button = widgets.Button(description='Greet')
label = widgets.Label(value='not clicked yet')
out = widgets.Output()
def greet(_):
    label.value = f'Hello, {name.value}!'
    with out: print('clicked')
button.on_click(greet)
widgets.VBox([name, button, label, out])"""

def test_widgets_in_jupyterlab(page, tmp_path):
    notebook(tmp_path / 'widgets.ipynb', 'print(6 * 7)', WIDGETS)
    with jupyter_lab(tmp_path) as lab:
        open_notebook(page, lab, 'widgets.ipynb')
        run_all_cells(page)
        wait_for(page, '.jp-OutputArea-output', '42')
        wait_for(page, '.widget-label', 'not clicked yet')  # the widget manager rendered the widgets
        page.locator('.widget-text input').fill('Playwright')  # sent to the kernel before the click
        page.locator('.widget-button', has_text='Greet').click()
        wait_for(page, '.widget-label', 'Hello, Playwright!')  # the kernel's callback changed the label
        wait_for(page, '.widget-output', 'clicked')
        screenshot(page, 'jupyter_widgets')
