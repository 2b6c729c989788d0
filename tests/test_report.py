"""The report: reset clears a run's sections, generate orders them, sums their time and cost, and tabulates their
metrics by stage; git facts degrade to 'unknown'; the command line's exit statuses."""
import json, re, shutil, subprocess, sys

import pytest
from PIL import Image

from imagelm.report import HEADER_NAME, SECTION_ORDER, generate, git_info, load_sections, reset, summary_table, time_lines
from imagelm.train import append_report
from tiny import env

CPU_FACTS = {'git': {'commit': 'abc1234', 'dirty': False},
             'hardware': {'cpu': 'Test CPU', 'cores': 4, 'ram_gib': 16.0, 'cuda': None, 'gpus': []},
             'versions': {'Python': '3.11.0', 'imagelm': '0.1.0'}}
GPU_FACTS = {**CPU_FACTS, 'hardware': {**CPU_FACTS['hardware'], 'cuda': '12.8',
                                       'gpus': [{'name': 'NVIDIA H100 80GB HBM3', 'memory_gib': 79.2}] * 8}}


def set_written(folder, key, written):
    "Pretend section `key` was written at unix time `written`."
    record = json.loads((folder / f'{key}.json').read_text())
    (folder / f'{key}.json').write_text(json.dumps({**record, 'written': written}))


def titles(report: str) -> list:
    return [line[3:] for line in report.splitlines() if line.startswith('## ')]


def test_reset_removes_old_sections_and_figures(tmp_path):
    folder = tmp_path / 'report'
    figure = tmp_path / 'curves.png'
    Image.new('RGB', (4, 4)).save(figure)
    append_report('base_train', 'Base training', ['- old'], metrics={'val_bpb': 2.0}, stage='base', figures=[figure], folder=folder)
    append_report('bench', 'Bench', ['- old'], figures=[figure], folder=folder)
    (folder / 'notes.txt').write_text('not a section')
    generate(folder)
    assert (folder / 'report.md').exists() and (folder / 'base_train_curves.png').exists()
    reset(folder, facts=CPU_FACTS)
    assert sorted(p.name for p in folder.iterdir()) == sorted([HEADER_NAME, 'notes.txt'])
    header = json.loads((folder / HEADER_NAME).read_text())
    assert header['git'] == CPU_FACTS['git'] and header['started'] > 0
    assert load_sections(folder) == []
    report = generate(folder).read_text()
    assert 'No stage has written a section since the reset.' in report and 'No section has metrics yet.' in report


def test_generate_orders_sections(tmp_path):
    folder = tmp_path / 'report'
    extra = ['zeta', 'alpha']                 # not in the pipeline: after it, by time written (zeta first)
    for key in [*reversed(SECTION_ORDER[::2]), 'alpha', *SECTION_ORDER[1::2], 'zeta']:
        append_report(key, f'title {key}', [f'- {key}'], stage=key.split('_')[0] if key in SECTION_ORDER else None, folder=folder)
    set_written(folder, 'zeta', 100.0); set_written(folder, 'alpha', 200.0)
    report = generate(folder).read_text()
    assert titles(report) == ['Environment', *(f'title {k}' for k in [*SECTION_ORDER, *extra]), 'Summary']
    assert SECTION_ORDER == ('base_train', 'base_eval', 'mid_train', 'mid_eval', 'sft_train', 'sft_eval', 'rl_train', 'rl_eval')


def test_summary_table_of_known_metrics(tmp_path):
    folder = tmp_path / 'report'
    append_report('sft_eval', 'SFT evals', [], metrics={'reading': 0.5, 'val_bpb': 1.25}, stage='sft', folder=folder)
    append_report('base_train', 'Base', [], metrics={'val_bpb': 2, 'mfu': 0.123456}, stage='base', folder=folder)
    append_report('sft_train', 'SFT', [], metrics={'val_bpb': 1.3, 'mfu': None}, stage='sft', folder=folder)
    append_report('other', 'No stage', [], metrics={'ignored': 1.0}, folder=folder)
    table = summary_table(load_sections(folder))
    assert table == ['| metric          |   BASE |    SFT |',
                     '| --------------- | -----: | -----: |',
                     '| val_bpb (train) | 2.0000 | 1.3000 |',
                     '| mfu             | 0.1235 |      - |',
                     '| reading         |      - | 0.5000 |',
                     '| val_bpb (eval)  |      - | 1.2500 |']
    report = generate(folder).read_text()
    assert report.rstrip().endswith('\n'.join(table))


def test_rerun_replaces_its_section(tmp_path):
    folder = tmp_path / 'report'
    append_report('mid_train', 'Midtraining', ['- first run'], metrics={'val_bpb': 1.5}, stage='mid', wall_s=10, folder=folder)
    append_report('mid_train', 'Midtraining', ['- second run'], metrics={'val_bpb': 1.4}, stage='mid', wall_s=30, folder=folder)
    report = generate(folder).read_text()
    assert titles(report).count('Midtraining') == 1
    assert '- second run' in report and '- first run' not in report
    assert '| val_bpb | 1.4000 |' in report
    assert '- wall time: 30s in the section that reports it' in report
    assert '- run started: unknown' in report     # no reset before the stages


def test_figure_links_resolve(tmp_path):
    folder = tmp_path / 'report'
    figure = tmp_path / 'loss.png'
    Image.new('RGB', (4, 4)).save(figure)
    append_report('base_train', 'Base', ['- x'], stage='base', figures=[figure], folder=folder)
    report_path = generate(folder)
    links = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', report_path.read_text())
    assert links == ['base_train_loss.png'] and (report_path.parent / links[0]).is_file()


def test_time_and_cost(tmp_path):
    sections = [{'wall_s': 1800.0}, {'wall_s': None}, {'wall_s': 1800}]
    assert time_lines(sections, started=0.0, generated=7200.0, gpu_count=8, gpu_hour_cost=3.0) == [
        '- wall time: 1h 00m in the 2 sections that report it; 2h 00m from reset to this report',
        '- cost: $24.00 in the 2 sections that report it; $48.00 from reset to this report (8 GPUs at $3.00 per GPU-hour)']
    assert time_lines(sections, None, 0.0, 0)[1] == '- cost: no GPU: no cost figure'
    folder = tmp_path / 'report'
    reset(folder, facts=GPU_FACTS)
    header = json.loads((folder / HEADER_NAME).read_text())
    (folder / HEADER_NAME).write_text(json.dumps({**header, 'started': header['started'] - 3600}))
    append_report('base_train', 'Base', [], stage='base', wall_s=3000, folder=folder)
    report = generate(folder, gpu_hour_cost=2.5).read_text()
    assert '- GPUs: 8 x NVIDIA H100 80GB HBM3 (79.2 GiB each), CUDA 12.8' in report
    assert '- cost: $16.67 in the section that reports it; $20.00 from reset' in report
    assert '- code: commit abc1234, no uncommitted changes' in report
    with pytest.raises(ValueError, match='>= 0'): generate(folder, gpu_hour_cost=float('nan'))


def test_missing_folder_and_clashing_key(tmp_path):
    with pytest.raises(FileNotFoundError, match='no stage has written a section yet'): generate(tmp_path / 'report')
    append_report('report', 'Clash', [], folder=tmp_path / 'clash')
    with pytest.raises(ValueError, match="named 'report'"): generate(tmp_path / 'clash')


def test_git_unknown_without_git_or_checkout(tmp_path, monkeypatch):
    assert git_info(tmp_path) == {'commit': 'unknown', 'dirty': None}
    monkeypatch.setenv('PATH', str(tmp_path))          # no git on the PATH
    assert git_info() == {'commit': 'unknown', 'dirty': None}
    report = generate(append_report('base_train', 'Base', [], stage='base', folder=tmp_path / 'report').parent).read_text()
    assert '- code: commit unknown\n' in report


@pytest.mark.skipif(shutil.which('git') is None, reason='needs git')
def test_git_commit_and_dirty(tmp_path):
    git = lambda *args: subprocess.run(['git', '-C', str(tmp_path), '-c', 'user.name=t', '-c', 'user.email=t@t', *args],
                                       check=True, capture_output=True, text=True).stdout.strip()
    package = tmp_path / 'pkg'; package.mkdir()
    (package / '__init__.py').write_text('')
    git('init', '-q'); git('add', 'pkg/__init__.py'); git('commit', '-q', '-m', 'one')
    assert git_info(package) == {'commit': git('rev-parse', '--short', 'HEAD'), 'dirty': False}
    (package / 'new.py').write_text('x = 1\n')
    assert git_info(package)['dirty'] is True
    untracked = tmp_path / 'venv'; untracked.mkdir(); (untracked / '__init__.py').write_text('')
    assert git_info(untracked)['commit'] == 'unknown'   # a package the repository does not track is not its code


def cli(folder, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'imagelm.report', *args], env=env(folder), capture_output=True, text=True,
                          timeout=120)


@pytest.mark.slow
def test_cli_exit_statuses(tmp_path):
    for bad in [(), ('publish',), ('generate', '--gpu_hour_cost=-1'), ('generate', '--gpu_hour_cost=abc'),
                ('reset', '--gpu_hour_cost=1')]:
        out = cli(tmp_path, *bad)
        assert out.returncode == 2 and 'usage: python -m imagelm.report' in out.stderr, (bad, out.stderr)
    out = cli(tmp_path, 'generate')
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and 'no stage has written a section yet' in out.stderr
    out = cli(tmp_path, 'reset')
    assert out.returncode == 0 and (tmp_path / 'report' / HEADER_NAME).exists(), out.stderr
    append_report('sft_eval', 'SFT evals', [], metrics={'reading': 0.75}, stage='sft', folder=tmp_path / 'report')
    out = cli(tmp_path, 'generate', '--gpu_hour_cost', '2')
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / 'report' / 'report.md')
    assert '| reading |' in (tmp_path / 'report' / 'report.md').read_text()
