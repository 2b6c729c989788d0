"""A tiny checkpoint for tests of the chat surfaces: two steps of base training, made in a folder of the test's own."""
import os, subprocess, sys


def env(folder) -> dict:
    "The environment of a command that reads and writes checkpoints under `folder`."
    return {**os.environ, 'IMAGELM_BASE_DIR': str(folder), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def tiny_checkpoint(folder, seq_len: int = 2048) -> None:
    "Train a depth-1 base model for 2 steps into `folder` (run 'tiny'); a context of `seq_len` leaves room for long replies."
    out = subprocess.run([sys.executable, '-m', 'imagelm.base_train', '--run=tiny', '--depth=1', '--num_iterations=2', f'--max_seq_len={seq_len}',
                          '--pixel_chars=96', '--byte_chars=48', '--device_batch_size=1', '--eval_batches=1', '--sample_every=0'],
                         env=env(folder), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
