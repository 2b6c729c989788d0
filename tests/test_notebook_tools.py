"""tools/notebooks.py: the output check fails notebooks that hide their results, and README.md is written from
nbs/index.ipynb."""
import importlib.util, json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location('notebook_tools', ROOT / 'tools' / 'notebooks.py')
tools = importlib.util.module_from_spec(spec); spec.loader.exec_module(tools)

PNG = {'output_type': 'display_data', 'data': {'image/png': 'iVBORw0KGgo=\n', 'text/plain': ['<Figure>']}, 'metadata': {}}
def shown(text): return {'output_type': 'execute_result', 'data': {'text/plain': [text]}, 'metadata': {}, 'execution_count': None}


def code(source, *outputs): return {'cell_type': 'code', 'id': 'x', 'metadata': {}, 'source': source, 'outputs': list(outputs),
                                   'execution_count': None}
def markdown(source): return {'cell_type': 'markdown', 'id': 'y', 'metadata': {}, 'source': source}


def write(path: Path, cells) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'cells': cells, 'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}))
    return path


def test_a_notebook_that_shows_its_values_passes(tmp_path):
    nb = write(tmp_path / 'nbs' / '01_x.ipynb', [code('#| export\ndef f(): return 1'), code('f()', shown('1')),
                                                   code('import os'), code('f() + 1', shown('2'))])
    assert tools.output_problems(nb) == []


def test_a_notebook_committed_without_outputs_fails(tmp_path):
    nb = write(tmp_path / 'nbs' / '01_x.ipynb', [code('#| export\ndef f(): return 1'), code('f()'), code('f() + 1'), code('x = 3')])
    assert any('only 0 of its 3 non-export code cells' in p for p in tools.output_problems(nb))


@pytest.mark.parametrize('folder, source', [('nbs/lessons', 'x = 1'), ('nbs', 'plt.plot([1, 2])')])
def test_a_lesson_or_a_drawing_notebook_needs_a_picture(tmp_path, folder, source):
    nb = write(tmp_path / folder / '01_x.ipynb', [code(source, shown('1'))])
    assert any('no picture' in p for p in tools.output_problems(nb))
    write(nb, [code(source, shown('1'), PNG)])
    assert tools.output_problems(nb) == []


def test_errors_and_long_logs_fail(tmp_path):
    error = {'output_type': 'error', 'ename': 'ValueError', 'evalue': 'boom', 'traceback': []}
    log = {'output_type': 'stream', 'name': 'stdout', 'text': ['step\n'] * (tools.MAX_STREAM_LINES + 1)}
    nb = write(tmp_path / 'nbs' / '01_x.ipynb', [code('f()', error), code('train()', log)])
    problems = tools.output_problems(nb)
    assert any('ValueError: boom' in p for p in problems) and any('no logs or progress bars' in p for p in problems)


def test_readme_is_written_from_the_index_notebook(tmp_path, monkeypatch):
    index = write(tmp_path / 'index.ipynb', [markdown('# Title\n\n> what it is'), code('#| hide\nassert 2.006 > 2'),
                                             code('render("hi").shape', shown('torch.Size([1, 1024])')), markdown('## More')])
    monkeypatch.setattr(tools, 'INDEX', index)
    text = tools.readme_text()
    assert text.startswith('<!-- Written from nbs/index.ipynb')
    assert '# Title\n\n> what it is' in text and '## More' in text and 'assert 2.006' not in text
    assert '```python\nrender("hi").shape\n```\n\n```\ntorch.Size([1, 1024])\n```' in text


def test_the_committed_readme_matches_the_index_notebook():
    assert (ROOT / 'README.md').read_text() == tools.readme_text()
