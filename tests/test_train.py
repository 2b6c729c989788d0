"""Base training end to end in subprocesses: torchrun with 2 gloo processes against 1 process with accumulation,
SIGKILL during training and during a checkpoint save followed by --resume, and the loss going down."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

TINY = ['--depth=1', '--max_seq_len=128', '--device_batch_size=2', '--eval_batches=1', '--eval_every=0',
        '--sample_every=0', '--pixel_chars=96', '--byte_chars=48', '--log_every=1']


def run_env(base: Path) -> dict:
    return {**os.environ, 'IMAGELM_BASE_DIR': str(base), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def final_meta(base: Path, run: str) -> dict:
    steps = sorted((base / 'checkpoints' / 'base' / run).glob('step_*'))
    steps = [s for s in steps if not s.name.endswith('.partial')]
    return json.loads((steps[-1] / 'meta.json').read_text())


def losses(base: Path, run: str) -> list:
    return [loss for _, loss in final_meta(base, run)['history']['loss']]


def train(base: Path, run: str, *args, timeout=240, env_extra=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'imagelm.base_train', f'--run={run}', *TINY, *args]
    return subprocess.run(cmd, env={**run_env(base), **(env_extra or {})}, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_accumulation(tmp_path):
    common = ['--num_iterations=6', '--total_batch_size=512', '--prefetch=0']
    single = train(tmp_path, 'single', *common)
    assert single.returncode == 0, single.stderr[-3000:]
    assert '2 micro-batches' in single.stdout
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                '-m', 'imagelm.base_train', '--', '--run=double', *TINY, *common]
    double = subprocess.run(torchrun, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    assert '(2 x 1 micro-batches' in double.stdout
    one, two = losses(tmp_path, 'single'), losses(tmp_path, 'double')
    assert len(one) == len(two) == 6
    for a, b in zip(one, two): assert abs(a - b) <= 1e-4 * abs(a), (one, two)
    assert (tmp_path / 'checkpoints' / 'base' / 'double' / 'step_000005' / 'rank_001.pt').exists()


@pytest.mark.slow
def test_sigkill_during_training_then_resume_repeats_the_same_losses(tmp_path):
    common = ['--num_iterations=12', '--save_every=4', '--prefetch=1']
    reference = train(tmp_path, 'reference', *common)
    assert reference.returncode == 0, reference.stderr[-3000:]
    cmd = [sys.executable, '-m', 'imagelm.base_train', '--run=killed', *TINY, *common]
    proc = subprocess.Popen(cmd, env=run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    for line in proc.stdout:
        if line.startswith('step 00006/') or time.time() > deadline: break
    proc.send_signal(signal.SIGKILL); proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = sorted(p.name for p in (tmp_path / 'checkpoints' / 'base' / 'killed').iterdir())
    assert 'step_000004' in saved and 'step_000011' not in saved
    resumed = train(tmp_path, 'killed', *common, '--resume=1')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed from' in resumed.stdout and 'step_000004' in resumed.stdout
    assert losses(tmp_path, 'killed') == losses(tmp_path, 'reference')        # bitwise, on CPU with fixed seeds


@pytest.mark.slow
def test_sigkill_during_checkpoint_save_never_leaves_a_corrupt_checkpoint(tmp_path):
    common = ['--num_iterations=10', '--save_every=3', '--prefetch=0']
    reference = train(tmp_path, 'reference', *common)
    assert reference.returncode == 0, reference.stderr[-3000:]
    crashed = train(tmp_path, 'crashed', *common, env_extra={'IMAGELM_KILL_IN_SAVE': '6'})
    assert crashed.returncode == -signal.SIGKILL
    root = tmp_path / 'checkpoints' / 'base' / 'crashed'
    names = sorted(p.name for p in root.iterdir())
    assert 'step_000003' in names and 'step_000006' not in names and 'step_000006.partial' in names
    resumed = train(tmp_path, 'crashed', *common, '--resume=1')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'step_000003' in resumed.stdout
    assert not list(root.glob('*.partial'))
    assert losses(tmp_path, 'crashed') == losses(tmp_path, 'reference')


@pytest.mark.slow
def test_loss_goes_down_on_the_embedded_corpus(tmp_path):
    result = train(tmp_path, 'learn', '--num_iterations=40', '--depth=2', '--device_batch_size=4', '--max_seq_len=256',
                   '--prefetch=1', '--eval_batches=2')
    assert result.returncode == 0, result.stderr[-3000:]
    history = final_meta(tmp_path, 'learn')['history']
    first, last = history['loss'][0][1], sum(l for _, l in history['loss'][-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert history['val_bpb'][-1][1] < 6.0
    assert (tmp_path / 'checkpoints' / 'base' / 'learn' / 'curves.png').stat().st_size > 10_000
    assert (tmp_path / 'report' / 'base_train.md').read_text().startswith('## Base training')
    assert json.loads((tmp_path / 'report' / 'base_train.json').read_text())['metrics']['val_bpb'] == history['val_bpb'][-1][1]


@pytest.mark.slow
def test_help_explains_every_flag():
    from imagelm.base_train import make_parser
    actions = [a for a in make_parser()._actions if a.dest != 'help']
    assert [a.dest for a in actions if not (a.help or '').strip()] == []
    out = subprocess.run([sys.executable, '-m', 'imagelm.base_train', '--help'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    shown = ' '.join(out.stdout.split())
    for action in actions: assert ' '.join(action.help.split()[:4]) in shown, action.dest


FAKE_WANDB = """
import json, os
_log = os.environ['FAKE_WANDB_LOG']
def _write(kind, data):
    with open(_log, 'a') as f: f.write(json.dumps({'kind': kind, **data}) + '\\n')
class _Run:
    def log(self, data): _write('log', data)
    def finish(self): _write('finish', {})
def init(project, name, config):
    _write('init', {'project': project, 'name': name, 'depth': config['depth']})
    return _Run()
"""


@pytest.mark.slow
@pytest.mark.parametrize('run_name', ['logged', 'dummy'])
def test_wandb_is_optional_and_logs_steps_and_evaluations(tmp_path, run_name):
    (tmp_path / 'fake' / 'wandb').mkdir(parents=True)
    (tmp_path / 'fake' / 'wandb' / '__init__.py').write_text(FAKE_WANDB)
    log = tmp_path / 'wandb.jsonl'
    extra = {'PYTHONPATH': str(tmp_path / 'fake'), 'FAKE_WANDB_LOG': str(log)}
    result = train(tmp_path, run_name, '--num_iterations=4', '--eval_every=2', '--prefetch=0', env_extra=extra)
    assert result.returncode == 0, result.stderr[-3000:]
    if run_name == 'dummy':
        assert not log.exists()
        return
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0] == {'kind': 'init', 'project': 'imagelm', 'name': 'logged', 'depth': 1}
    steps = [r['step'] for r in records if r['kind'] == 'log' and 'loss' in r]
    assert steps == [0, 1, 2, 3] and all(0 < r['mfu'] <= 1 for r in records if 'mfu' in r)
    assert [r['step'] for r in records if 'val_bpb' in r] == [0, 2, 3]
    assert records[-1]['kind'] == 'finish'


@pytest.mark.slow
def test_without_wandb_a_named_run_says_so(tmp_path):
    blocker = tmp_path / 'block'
    blocker.mkdir()
    (blocker / 'wandb.py').write_text("raise ImportError('wandb is blocked for this test')")
    result = train(tmp_path, 'named', '--num_iterations=2', '--prefetch=0', env_extra={'PYTHONPATH': str(blocker)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb is not installed: run 'named'" in result.stdout


def test_the_cpu_preset_is_what_speedrun_runs():
    from imagelm.base_train import PRESETS, parse_args
    args = parse_args(['--preset=cpu'])
    assert {k: getattr(args, k) for k in PRESETS['cpu']} == PRESETS['cpu']
    assert '--preset="$PRESET"' in (Path(__file__).parent.parent / 'speedrun.sh').read_text()
