"""`python -m imagelm.chat_cli` as users run it, on a tiny checkpoint made here: one question, a session through a pipe,
Ctrl-C in the middle of a reply, a picture, a missing checkpoint and a bad flag."""
import os, select, signal, subprocess, sys, time

import pytest
from PIL import Image

from tiny import env, tiny_checkpoint

pytestmark = pytest.mark.slow   # every test here runs the CLI in a subprocess


@pytest.fixture(scope='module')
def base(tmp_path_factory):
    "A base folder with a 2-step checkpoint whose context (2,048 positions) leaves room for a long reply."
    folder = tmp_path_factory.mktemp('cli')
    tiny_checkpoint(folder)
    return folder


def cli(folder, *args, stdin=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'imagelm.chat_cli', '--stage=base', *args], input=stdin, env=env(folder),
                          capture_output=True, text=True, timeout=timeout)


def test_one_question(base):
    out = cli(base, '-p', 'What is 2 plus 2?', '--max_tokens=12', '--temperature=0')
    assert out.returncode == 0, out.stderr
    assert len(out.stdout) >= 2 and out.stdout.endswith('\n') and 'you>' not in out.stdout


def test_a_session_through_a_pipe(base):
    out = cli(base, '--max_tokens=6', '--temperature=0', stdin='Hi\nclear\nhelp\n\nAgain\nquit\nnot read\n')
    assert out.returncode == 0, out.stderr
    assert out.stdout.count('imagelm> ') == 2 and '(a new conversation)' in out.stdout and 'clear: start a new conversation' in out.stdout
    assert 'checkpoint' in out.stdout.splitlines()[0]


def test_ctrl_c_stops_the_reply_not_the_program(base):
    proc = subprocess.Popen([sys.executable, '-m', 'imagelm.chat_cli', '--stage=base', '--temperature=0', '--max_tokens=100000'],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(base))
    proc.stdin.write(b'Tell me a long story\n'); proc.stdin.flush()
    seen, deadline = b'', time.time() + 120
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1)
        if ready: seen += os.read(proc.stdout.fileno(), 4096)
        if b'imagelm> ' in seen and len(seen.split(b'imagelm> ', 1)[1]) >= 4: break
    proc.send_signal(signal.SIGINT)
    rest, errors = proc.communicate(b'quit\n', timeout=60)
    transcript = (seen + rest).decode('utf-8', 'replace')
    assert proc.returncode == 0, errors.decode()[-2000:]
    assert ' [stopped]' in transcript and transcript.rstrip().endswith('you>'), transcript[-300:]


def test_a_picture_with_the_first_message(base, tmp_path):
    Image.new('RGB', (48, 48), (220, 40, 40)).save(tmp_path / 'red.png')
    out = cli(base, '--image', str(tmp_path / 'red.png'), '-p', 'What colour is it?', '--max_tokens=4')
    assert out.returncode == 0, out.stderr
    (tmp_path / 'broken.png').write_bytes(b'not a picture')
    out = cli(base, '--image', str(tmp_path / 'broken.png'), '-p', 'And this?')
    assert out.returncode == 1 and 'broken.png cannot be read' in out.stderr


def test_a_missing_checkpoint_says_where_it_looked_and_what_to_run(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'imagelm.chat_cli', '-p', 'hi'], env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and str(tmp_path / 'checkpoints' / 'sft') in out.stderr and 'python -m imagelm.chat_sft' in out.stderr


def test_a_bad_flag_is_refused_with_its_range(tmp_path):
    out = subprocess.run([sys.executable, '-m', 'imagelm.chat_cli', '--top_k=0'], env=env(tmp_path), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and 'argument --top_k: must be >= 1, got 0' in out.stderr
