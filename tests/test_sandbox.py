"""The sandbox of generated code (`imagelm.chat_datasets.run_python`): each attack is contained and reported, by the
default layers and by the layer meant to stop it alone; a correct HumanEval-style program passes; nothing is left
behind. The attacks are kept small, so that the machine survives a layer that fails: six doublings of a fork bomb,
a few hundred MB, one-second limits."""
import os, socket, time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagelm.chat_datasets import LAYERS, HumanEvalTask, dataset_file, run_python, sandbox_layers

pytestmark = pytest.mark.slow

FORK_BOMB = "import os, time\nfor _ in range(6): os.fork()\ntime.sleep(0.3)"      # 64 processes at most, for 0.3 s


def needs(layer: str):
    if layer not in sandbox_layers(): pytest.skip(f"the {layer} layer does not work on this machine")


def gone(pid: int) -> bool:
    "Whether process `pid` has ended (a zombie waiting for its parent to reap it has ended)."
    try: return Path(f'/proc/{pid}/status').read_text().split('State:')[1].split()[0] in ('Z', 'X')
    except FileNotFoundError: return True


@pytest.fixture
def outside(tmp_path):
    "A folder outside the sandbox's working folder, where an attack would leave its files."
    return tmp_path


class Server:
    "A TCP server listening on 127.0.0.1 that never answers; `accepted()` counts the connections that reached it since last asked."
    def __init__(self):
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]

    def accepted(self) -> int:
        n = 0
        while True:
            try: self.listener.accept()[0].close()
            except BlockingIOError: return n
            n += 1


@pytest.fixture
def server():
    s = Server()
    yield s
    s.listener.close()


def test_a_correct_program_passes_and_its_folder_is_removed():
    result = run_python("import os\nprint(os.getcwd())\nassert sorted([3, 1, 2]) == [1, 2, 3]")
    assert result.passed and result.status == 'passed' and result.detail == ''
    folder = Path(result.output.strip())
    assert folder.name == 'work' and folder.parent.name.startswith('imagelm-run-')
    assert not folder.exists() and not folder.parent.exists()
    assert result.layers == sandbox_layers() and {'rlimits', 'audit'} <= set(result.layers)


def test_a_humaneval_program_passes_with_its_imports_and_fails_a_wrong_answer(tmp_path, monkeypatch):
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path))
    row = {'task_id': 'HumanEval/9', 'prompt': 'from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    """Sum of xs."""\n',
           'canonical_solution': '    return sum(xs)\n', 'test': 'def check(f):\n    assert f([1, 2, 3]) == 6\n    assert f([]) == 0\n',
           'entry_point': 'total'}
    path = dataset_file('humaneval', 'test')
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row]), path)
    task = HumanEvalTask()
    example = task[0]
    assert task.run(example, example['answer']).status == 'passed'
    whole = '```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```'    # rewrites the function without its import
    assert task.run(example, whole).status == 'passed'
    assert task.run(example, '    return sum(xs)\n').status == 'passed'            # the body only
    wrong = task.run(example, '    return len(xs)\n')
    assert wrong.status == 'failed' and wrong.detail.startswith('AssertionError')


def test_writing_outside_the_folder_is_blocked(outside):
    target = outside / 'note.txt'
    for program in (f"open({str(target)!r}, 'w').write('x')",
                    f"import os; os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                    f"import os; os.symlink({str(target)!r}, 'link'); open('link', 'w').write('x')",
                    f"import os; fd = os.open({str(outside)!r}, os.O_RDONLY); os.open('note.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd)",
                    f"import os; os.chdir({str(outside)!r}); open('note.txt', 'a')"):
        result = run_python(program)
        assert result.status == 'blocked', (program, result)
    assert not target.exists()
    assert run_python("open('note.txt', 'w').write('inside'); print(open('note.txt').read())").output == 'inside\n'


def test_a_shell_command_is_blocked(outside):
    result = run_python(f"import os; os.system('touch {outside / 'x'}')")
    assert (result.status, result.detail.split()[0]) == ('blocked', 'os.system')
    result = run_python(f"import subprocess; subprocess.run(['touch', '{outside / 'y'}'])")
    assert (result.status, result.detail.split()[0]) == ('blocked', 'subprocess.Popen')
    assert list(outside.iterdir()) == []


def test_a_fork_bomb_is_blocked():
    result = run_python(FORK_BOMB)
    assert (result.status, result.detail) == ('blocked', 'os.fork ()')


@pytest.mark.skipif(os.geteuid() == 0, reason='the kernel exempts root from RLIMIT_NPROC')
def test_rlimits_alone_stop_a_fork_bomb():
    result = run_python(FORK_BOMB, layers=('rlimits',))
    assert result.status == 'failed' and 'Resource temporarily unavailable' in result.detail


def test_seccomp_alone_stops_new_processes_programs_sockets_signals_and_ctypes(server, outside):
    needs('seccomp')
    for program in (FORK_BOMB, f"import os; os.system('touch {outside / 'x'}')",
                    f"import socket; socket.create_connection(('127.0.0.1', {server.port}))",
                    f"import ctypes; ctypes.CDLL(None).system(b'touch {outside / 'y'}')",
                    "import os; os.kill(1, 0)", "import resource; resource.setrlimit(resource.RLIMIT_CPU, (60, 60))"):
        result = run_python(program, layers=('seccomp',))
        assert (result.status, result.detail) == ('blocked', 'a system call the seccomp filter refuses'), program
    assert server.accepted() == 0 and list(outside.iterdir()) == []
    threads = "import threading; t = threading.Thread(target=print, args=('from a thread',)); t.start(); t.join()"
    assert run_python(threads, layers=('seccomp',)).output == 'from a thread\n'      # threads are not processes


def test_exhausting_memory_is_out_of_memory():
    result = run_python("hog = [bytearray(64 << 20) for _ in range(100)]", memory_mb=256)
    assert (result.status, result.detail) == ('out of memory', 'over 256 MB')
    assert run_python("hog = bytearray(300 << 20)", memory_mb=256, layers=('rlimits',)).status == 'out of memory'


def test_an_endless_loop_is_stopped_by_the_cpu_limit_and_the_wall_clock():
    start = time.perf_counter()
    cpu = run_python("while True: pass", timeout=30, cpu_s=1)
    assert (cpu.status, cpu.detail) == ('timed out', 'CPU time over 1 s') and time.perf_counter() - start < 10
    wall = run_python("import time; time.sleep(60)", timeout=1)
    assert (wall.status, wall.detail) == ('timed out', 'wall clock over 1 s')


def test_the_whole_process_group_is_killed_at_the_time_limit():
    program = "import os, time\nchild = os.fork()\nif child: print(child, flush=True)\ntime.sleep(60)"
    result = run_python(program, timeout=1, layers=())                  # no layer that would refuse the fork
    assert result.status == 'timed out'
    child = int(result.output.split()[0])
    deadline = time.monotonic() + 5
    while not gone(child) and time.monotonic() < deadline: time.sleep(0.05)
    assert gone(child)


def test_a_network_connection_is_blocked(server):
    result = run_python(f"import socket; socket.socket().connect(('127.0.0.1', {server.port}))")
    assert (result.status, result.detail.split()[0]) == ('blocked', 'socket.__new__')
    assert server.accepted() == 0


def test_the_network_namespace_alone_has_no_network(server):
    needs('namespace')
    result = run_python(f"import socket; socket.create_connection(('127.0.0.1', {server.port}), timeout=2)", layers=('namespace',))
    assert result.status == 'failed' and 'Network is unreachable' in result.detail
    assert server.accepted() == 0


def test_with_no_layer_the_attacks_get_through(server):
    "The control: the same connection, unsandboxed but for the process, reaches the server (so the tests above can fail)."
    assert run_python(f"import socket; socket.create_connection(('127.0.0.1', {server.port}), timeout=2)", layers=()).passed
    assert server.accepted() == 1


def test_exiting_early_crashing_and_oversized_output_fail():
    early = run_python("import sys; sys.exit(0)\nassert False")
    assert (early.status, early.detail) == ('failed', 'exited before its end, with code 0')
    crash = run_python("def f(): return 1 / 0\nf()")
    assert crash.status == 'failed' and crash.detail == 'ZeroDivisionError: division by zero'
    assert 'line 1, in f' in crash.output and '<string>' not in crash.output      # the launcher's own frame is left out
    flood = run_python("print('x' * (8 << 20))", file_mb=1)
    assert flood.status == 'failed' and 'File too large' in flood.detail and len(flood.output) <= 2000
    layers = ('seccomp',) if 'seccomp' in sandbox_layers() else ()             # the audit hook would refuse any os.kill
    suicide = run_python("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", layers=layers)
    assert (suicide.status, suicide.detail) == ('failed', 'killed by SIGTERM')


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"unknown sandbox layers \['docker'\]"): run_python('pass', layers=('docker',))
    with pytest.raises(ValueError, match='timeout must be a number of seconds > 0'): run_python('pass', timeout=0)
    assert set(sandbox_layers()) <= set(LAYERS)


def test_a_program_that_ignores_sigxcpu_is_killed_at_the_hard_cpu_limit():
    program = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass"
    result = run_python(program, timeout=30, cpu_s=1)
    assert (result.status, result.detail) == ('timed out', 'CPU time over 1 s')
