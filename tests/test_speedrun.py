"""speedrun.sh end to end with the smoke preset: every stage, the report, the logs; a stage killed in a checkpoint save
that stops the script with its name and log line and runs no later stage; a re-run that resumes it and skips the
finished ones; and the setup of a fresh virtual environment that keeps the installed torch."""
import json, os, subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
STAGES = ['base_train', 'base_eval', 'mid_train', 'mid_eval', 'sft_train', 'sft_eval']


def speedrun(base: Path, timeout: int = 900, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, 'IMAGELM_BASE_DIR': str(base), 'IMAGELM_PRESET': 'smoke', 'IMAGELM_SETUP': '0', 'RUN': 'smoke',
           'OMP_NUM_THREADS': '1', **env}
    return subprocess.run(['bash', str(ROOT / 'speedrun.sh')], env=env, capture_output=True, text=True, timeout=timeout)


def test_smoke_speedrun_fails_clearly_then_resumes_and_reports(tmp_path):
    killed = speedrun(tmp_path, IMAGELM_KILL_IN_SAVE='39')        # the final save of base training (40 steps, saved at 20)
    assert killed.returncode != 0
    assert "FAILED: stage 'base_train'" in killed.stderr, killed.stderr[-2000:]
    assert 'last line of its log:' in killed.stderr and str(tmp_path / 'logs' / 'smoke' / 'base_train.log') in killed.stderr
    assert not (tmp_path / 'logs' / 'smoke' / 'base_eval.log').exists(), 'a later stage ran after a failure'
    assert (tmp_path / 'checkpoints' / 'base' / 'smoke' / 'step_000020').is_dir()

    done = speedrun(tmp_path)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    assert 'base_train: resuming from its last checkpoint' in done.stdout
    assert 'resumed from' in (tmp_path / 'logs' / 'smoke' / 'base_train.log').read_text()
    for stage in STAGES:
        log = (tmp_path / 'logs' / 'smoke' / f'{stage}.log').read_text()
        assert '\r' not in log, f'{stage}.log has carriage returns'
        assert (tmp_path / 'speedrun' / 'smoke' / f'{stage}.done').exists()
    report = (tmp_path / 'report' / 'report.md').read_text()
    for title in ('Base training', 'Midtraining', 'Supervised fine-tuning', 'Chat evals: sft'):
        assert title in report, title
    assert (tmp_path / 'report' / 'base_train_curves.png').exists()
    sections = {p.stem: json.loads(p.read_text()) for p in (tmp_path / 'report').glob('*_*.json')}
    assert sections['base_train']['metrics']['val_bpb'] > 0 and sections['sft_eval']['stage'] == 'sft'

    again = speedrun(tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(f'{stage}: done already' in again.stdout for stage in STAGES)


def test_a_later_stage_never_runs_on_a_missing_checkpoint(tmp_path):
    marks = tmp_path / 'speedrun' / 'smoke'
    marks.mkdir(parents=True)
    (marks / 'base_train.done').write_text('earlier\n')         # marked done, but its checkpoint is gone
    out = speedrun(tmp_path)
    assert out.returncode != 0
    assert "no 'base' checkpoint of run 'smoke'" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / 'logs' / 'smoke' / 'base_eval.log').exists()


def test_bad_preset_is_refused(tmp_path):
    out = speedrun(tmp_path, IMAGELM_PRESET='huge')
    assert out.returncode == 2 and 'IMAGELM_PRESET=huge: use gpu, cpu or smoke' in out.stderr


def test_setup_makes_a_virtual_environment_that_keeps_torch(tmp_path):
    import torch
    venv = tmp_path / 'venv'
    env = {k: v for k, v in os.environ.items() if k != 'VIRTUAL_ENV'}
    out = subprocess.run(['bash', str(ROOT / 'speedrun.sh')], capture_output=True, text=True, timeout=900,
                         env={**env, 'IMAGELM_BASE_DIR': str(tmp_path / 'base'), 'IMAGELM_VENV': str(venv),
                              'IMAGELM_PRESET': 'nonsense'})       # set up, then stop at the preset check
    assert 'creating the virtual environment' in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    assert 'nbdev_export' in out.stdout and out.returncode == 2, out.stderr[-2000:]
    probe = subprocess.run([str(venv / 'bin' / 'python'), '-c', 'import torch, imagelm; print(torch.__file__, torch.__version__)'],
                           capture_output=True, text=True)
    assert probe.stdout.split() == [torch.__file__, torch.__version__], probe.stderr
