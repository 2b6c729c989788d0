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
    steps = sorted((base / 'checkpoints' / run).glob('step_*'))
    steps = [s for s in steps if not s.name.endswith('.partial')]
    return json.loads((steps[-1] / 'meta.json').read_text())


def losses(base: Path, run: str) -> list:
    return [loss for _, loss in final_meta(base, run)['history']['loss']]


def train(base: Path, run: str, *args, timeout=240, env_extra=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, '-m', 'imagelm.base_train', f'--run={run}', *TINY, *args]
    return subprocess.run(cmd, env={**run_env(base), **(env_extra or {})}, capture_output=True, text=True, timeout=timeout)


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
    assert (tmp_path / 'checkpoints' / 'double' / 'step_000005' / 'rank_001.pt').exists()


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
    saved = sorted(p.name for p in (tmp_path / 'checkpoints' / 'killed').iterdir())
    assert 'step_000004' in saved and 'step_000011' not in saved
    resumed = train(tmp_path, 'killed', *common, '--resume=1')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resumed from' in resumed.stdout and 'step_000004' in resumed.stdout
    assert losses(tmp_path, 'killed') == losses(tmp_path, 'reference')        # bitwise, on CPU with fixed seeds


def test_sigkill_during_checkpoint_save_never_leaves_a_corrupt_checkpoint(tmp_path):
    common = ['--num_iterations=10', '--save_every=3', '--prefetch=0']
    reference = train(tmp_path, 'reference', *common)
    assert reference.returncode == 0, reference.stderr[-3000:]
    crashed = train(tmp_path, 'crashed', *common, env_extra={'IMAGELM_KILL_IN_SAVE': '6'})
    assert crashed.returncode == -signal.SIGKILL
    root = tmp_path / 'checkpoints' / 'crashed'
    names = sorted(p.name for p in root.iterdir())
    assert 'step_000003' in names and 'step_000006' not in names and 'step_000006.partial' in names
    resumed = train(tmp_path, 'crashed', *common, '--resume=1')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'step_000003' in resumed.stdout
    assert not list(root.glob('*.partial'))
    assert losses(tmp_path, 'crashed') == losses(tmp_path, 'reference')


def test_loss_goes_down_on_the_embedded_corpus(tmp_path):
    result = train(tmp_path, 'learn', '--num_iterations=40', '--depth=2', '--device_batch_size=4', '--max_seq_len=256',
                   '--prefetch=1', '--eval_batches=2')
    assert result.returncode == 0, result.stderr[-3000:]
    history = final_meta(tmp_path, 'learn')['history']
    first, last = history['loss'][0][1], sum(l for _, l in history['loss'][-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert history['val_bpb'][-1][1] < 6.0
    assert (tmp_path / 'checkpoints' / 'learn' / 'curves.png').stat().st_size > 10_000
    assert 'Base training' in (tmp_path / 'report.md').read_text()


def test_help_explains_every_flag():
    out = subprocess.run([sys.executable, '-m', 'imagelm.base_train', '--help'], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ('--depth', '--device_batch_size', '--total_batch_size', '--num_iterations', '--max_seq_len', '--data',
                 '--run', '--eval_every', '--sample_every', '--save_every', '--resume', '--compile', '--dtype'):
        assert flag in out.stdout
