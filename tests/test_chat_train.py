"""The chat stages end to end in subprocesses: base -> mid -> SFT, 2 gloo processes against 1 with accumulation, a
SIGKILL followed by --resume, and the error when there is nothing to start from."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # every test here trains in subprocesses

TINY = ['--max_seq_len=192', '--device_batch_size=2', '--eval_batches=1', '--eval_every=0', '--sample_every=0', '--log_every=1']


def env(base: Path) -> dict:
    return {**os.environ, 'IMAGELM_BASE_DIR': str(base), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def run(base: Path, module: str, *args, timeout=300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, '-m', f'imagelm.{module}', *args], env=env(base), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def losses(base: Path, stage: str, run_name: str) -> list:
    steps = sorted(p for p in (base / 'checkpoints' / stage / run_name).glob('step_*') if not p.name.endswith('.partial'))
    return [loss for _, loss in json.loads((steps[-1] / 'meta.json').read_text())['history']['loss']]


@pytest.fixture(scope='module')
def based(tmp_path_factory):
    base = tmp_path_factory.mktemp('chat')
    run(base, 'base_train', '--run=tiny', '--depth=1', '--num_iterations=3', '--pixel_chars=96', '--byte_chars=48', *TINY)
    return base


def test_base_then_mid_then_sft(based):
    run(based, 'mid_train', '--run=tiny', '--num_iterations=4', *TINY)
    out = run(based, 'chat_sft', '--run=tiny', '--num_iterations=4', '--sample_every=2', *TINY)
    assert 'Supervised fine-tuning of ImageLM' in out.stdout and '  sample | Read this back:' in out.stdout
    meta = json.loads(sorted((based / 'checkpoints' / 'sft' / 'tiny').glob('step_*'))[-1].joinpath('meta.json').read_text())
    assert meta['stage'] == 'sft' and meta['args']['source'].endswith('step_000003') and meta['args']['depth'] == 1
    run(based, 'report', 'generate')
    text = (based / 'report' / 'report.md').read_text()
    assert text.index('## Base training') < text.index('## Midtraining') < text.index('## Supervised fine-tuning') < text.index('## Summary')


def test_two_gloo_processes_match_one_process_with_accumulation(based):
    run(based, 'mid_train', '--run=tiny', '--num_iterations=2', *TINY)
    common = ['--num_iterations=4', '--total_batch_size=768', '--prefetch=0', *TINY]
    run(based, 'chat_sft', '--run=single', '--source_run=tiny', *common)
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'imagelm.chat_sft', '--',
                '--run=double', '--source_run=tiny', *common]
    double = subprocess.run(torchrun, env=env(based), capture_output=True, text=True, timeout=300)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = losses(based, 'sft', 'single'), losses(based, 'sft', 'double')
    assert len(one) == len(two) == 4
    for a, b in zip(one, two): assert abs(a - b) <= 1e-4 * abs(a), (one, two)


def test_sigkill_then_resume_repeats_the_same_losses(based):
    run(based, 'mid_train', '--run=tiny', '--num_iterations=2', *TINY)
    common = ['--source_run=tiny', '--num_iterations=10', '--save_every=3', '--prefetch=1', *TINY]
    run(based, 'chat_sft', '--run=reference', *common)
    proc = subprocess.Popen([sys.executable, '-m', 'imagelm.chat_sft', '--run=killed', *common], env=env(based),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    for line in proc.stdout:
        if line.startswith('step 00005/') or time.time() > deadline: break
    proc.send_signal(signal.SIGKILL); proc.wait(timeout=30)
    resumed = run(based, 'chat_sft', '--run=killed', '--resume=1', *common)
    assert 'resumed from' in resumed.stdout and 'step_000003' in resumed.stdout
    assert losses(based, 'sft', 'killed') == losses(based, 'sft', 'reference')


def test_a_stage_with_nothing_to_start_from_says_what_to_run(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'imagelm.chat_sft', '--run=x', '--num_iterations=1'], env=env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and 'python -m imagelm.mid_train --run=<name>' in out.stderr


RL = ['--mix=arithmetic=1', '--num_samples=4', '--max_tokens=8', '--device_batch_size=2', '--prefetch=0']


def test_rl_from_sft_logs_rewards_and_resumes_to_the_same_losses(based):
    run(based, 'mid_train', '--run=tiny', '--num_iterations=2', *TINY)
    run(based, 'chat_sft', '--run=tiny', '--num_iterations=2', *TINY)
    common = ['--source_run=tiny', '--num_iterations=6', '--save_every=2', *TINY, *RL]
    out = run(based, 'chat_rl', '--run=rl_reference', *common)
    assert 'Reinforcement learning of ImageLM' in out.stdout and out.stdout.count('| reward ') == 6
    meta = json.loads(sorted((based / 'checkpoints' / 'rl' / 'rl_reference').glob('step_*'))[-1].joinpath('meta.json').read_text())
    assert meta['args']['source'].rstrip('/').split('/')[-3:-1] == ['sft', 'tiny'] and meta['args']['num_samples'] == 4
    assert [r['step'] for r in meta['history']['log']] == list(range(6)) and all(0 <= r['reward'] <= 1 for r in meta['history']['log'])
    killed = subprocess.run([sys.executable, '-m', 'imagelm.chat_rl', '--run=rl_killed', *common], capture_output=True, text=True,
                            env={**env(based), 'IMAGELM_KILL_IN_SAVE': '4'}, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    resumed = run(based, 'chat_rl', '--run=rl_killed', '--resume=1', *common)
    assert 'step_000002' in resumed.stdout
    assert losses(based, 'rl', 'rl_killed') == losses(based, 'rl', 'rl_reference')


def test_rl_refuses_a_group_of_one(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'imagelm.chat_rl', '--run=x', '--num_iterations=1', *TINY, *RL,
                          '--num_samples=1'], env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and 'argument --num_samples: must be >= 2: an advantage needs a group' in out.stderr
