"""Faults injected into training and downloads (issue 14): SIGKILL at random points of a run followed by --resume, one rank of
a torchrun run killed, a disk that fills or a folder that becomes unwritable at save time, and a download server that drops,
truncates, garbles and stalls. After every fault no corrupt checkpoint and no invalid download sits under a final name."""
import http.server, os, random, resource, signal, subprocess, sys, threading, time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from reliability import examples, record
from test_train import TINY, run_env
from test_chat_train import TINY as CHAT_TINY
from imagelm.dataset import download_shards, shard_name, VAL_SHARD
from imagelm.download import DownloadError, download, download_all, valid_parquet
from imagelm.train import Process, latest_checkpoint, load_checkpoint, read_meta

pytestmark = pytest.mark.slow   # every test here trains in subprocesses or serves files

SEED = 14                       # the number: the random kill points of every mode are the same from run to run


# Checkpoints: every complete folder validates, and two runs end with the same weights.

def complete_checkpoints(root: Path) -> list:
    "The step folders under `root` that carry a final name (not `.partial`)."
    return sorted(p for p in root.glob('step_*') if p.is_dir() and not p.name.endswith('.partial')) if root.is_dir() else []


def validate_all(root: Path) -> int:
    "Load every rank's part of every complete checkpoint under `root` (sha256 checked); a CheckpointError if any is corrupt."
    for path in complete_checkpoints(root):
        meta = read_meta(path)
        for rank in range(meta['world_size']): load_checkpoint(path, Process(rank=rank, world_size=meta['world_size']))
    return len(complete_checkpoints(root))


def final_model(root: Path) -> dict:
    return torch.load(latest_checkpoint(root) / 'model.pt', map_location='cpu', weights_only=True)


def bitwise_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def step_of(path) -> int: return int(Path(path).name.split('_')[1])


def command(module: str, run: str, args: list) -> list:
    return [sys.executable, '-m', f'imagelm.{module}', f'--run={run}', *args]


WINDOW = 3   # each kill lands within this many steps of where the run starts, so that every cycle is killed before the end


def kill_once(cmd: list, env: dict, mode: str, rng: random.Random, start: int, saves: list) -> dict:
    """Run `cmd` and SIGKILL it once: during a step (after the line of a random step past the next save), after a random delay from its first
    step, or inside a random checkpoint save (IMAGELM_KILL_IN_SAVE). What happened, with its output."""
    if mode == 'save':
        at = rng.choice([s for s in saves if start <= s < start + WINDOW + 1])
        out = subprocess.run(cmd, env={**env, 'IMAGELM_KILL_IN_SAVE': str(at)}, capture_output=True, text=True, timeout=300)
        return dict(mode=mode, at=at, returncode=out.returncode, output=out.stdout + out.stderr)
    at = rng.randrange(start + SAVE_EVERY + 1, start + SAVE_EVERY + WINDOW + 1) if mode == 'step' else round(rng.uniform(0.0, 0.08), 3)   # a tiny step (with its save) takes 10-30 ms
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, timer = [], None
    for line in proc.stdout:
        lines.append(line)
        if mode == 'step' and line.startswith(f'step {at:05d}/'): proc.kill(); break
        if mode == 'delay' and line.startswith('step ') and timer is None:
            timer = threading.Timer(at, proc.kill); timer.start()
    if timer: timer.join()
    lines += proc.stdout.readlines() if proc.poll() is not None else []
    proc.wait(timeout=60)
    return dict(mode=mode, at=at, returncode=proc.returncode, output=''.join(lines))


def kill_resume_cycles(module: str, run: str, args: list, env: dict, root: Path, cycles: int, rng: random.Random) -> dict:
    "`cycles` SIGKILLs of `run` (of `args`), each followed by `--resume=1`; every checkpoint validated after every kill."
    saves = list(range(SAVE_EVERY, steps_for(cycles) - 1, SAVE_EVERY))
    kills, resumed_from, killed = [], [], 0
    for cycle in range(cycles):
        latest = latest_checkpoint(root) if root.is_dir() else None
        start = step_of(latest) + 1 if latest else 0
        modes = ['step', 'delay'] + (['save'] if any(start <= s < start + WINDOW + 1 for s in saves) else [])
        out = kill_once(command(module, run, [*args, f'--resume={int(cycle > 0)}']), env, rng.choice(modes), rng, start, saves)
        if cycle and latest: assert f'resumed from {latest}' in out['output'], out['output'][-3000:]
        resumed_from.append(step_of(latest) if latest else None)
        killed += out['returncode'] == -signal.SIGKILL
        assert out['returncode'] in (-signal.SIGKILL, 0), out['output'][-3000:]
        validate_all(root)                                        # never a corrupt checkpoint under a final name
        kills.append({k: out[k] for k in ('mode', 'at', 'returncode')})
    latest = latest_checkpoint(root)
    done = subprocess.run(command(module, run, [*args, '--resume=1']), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    if latest: assert f'resumed from {latest}' in done.stdout
    return dict(kills=kills, killed=killed, resumed_from=resumed_from + [step_of(latest) if latest else None],
                checkpoints_validated=validate_all(root))


KILL_RESUME = {}   # stage -> its figures, summed into the part 'kill_resume' after each stage


def record_kill_resume(stage: str, figures: dict):
    KILL_RESUME[stage] = figures
    stages = KILL_RESUME.values()
    record('kill_resume', **KILL_RESUME, cycles=sum(s['cycles'] for s in stages), survived=sum(s['survived'] for s in stages),
           bitwise_equal=all(s['bitwise_equal'] for s in stages))


SAVE_EVERY = 2


def steps_for(cycles: int) -> int:
    "Steps enough for `cycles` kills that each land within WINDOW steps of the last checkpoint."
    return (SAVE_EVERY + WINDOW + 1) * cycles + 6


def base_args(cycles: int) -> list: return [*TINY, f'--num_iterations={steps_for(cycles)}', f'--save_every={SAVE_EVERY}', '--prefetch=0']


def kill_resume_against_reference(stage: str, module: str, base: Path, args: list, cycles: int, seed: int):
    "An uninterrupted run and one killed `cycles` times then resumed, of `module` under `base`: their final models bitwise equal."
    env, rng = run_env(base), random.Random(seed)
    reference = subprocess.run(command(module, 'reference', args), env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    root = base / 'checkpoints' / stage / 'killed'
    start = time.time()
    figures = kill_resume_cycles(module, 'killed', args, env, root, cycles, rng)
    equal = bitwise_equal(final_model(root), final_model(base / 'checkpoints' / stage / 'reference'))
    record_kill_resume(stage, {'cycles': cycles, 'survived': figures['killed'], 'bitwise_equal': equal,
                               'seconds': round(time.time() - start, 1), **figures})
    assert figures['killed'] >= 1 and equal, figures


def test_sigkill_at_random_points_of_base_training_then_resume_is_bitwise_equal(tmp_path):
    cycles = examples(5, 20)
    kill_resume_against_reference('base', 'base_train', tmp_path, base_args(cycles), cycles, SEED)


@pytest.fixture(scope='module')
def mid_model(tmp_path_factory):
    "A base model (3 steps) and a midtrained one (2 steps) to fine-tune from."
    base = tmp_path_factory.mktemp('faults_chat')
    for module, steps in (('base_train', 3), ('mid_train', 2)):
        extra = ['--depth=1', '--pixel_chars=96', '--byte_chars=48'] if module == 'base_train' else []
        out = subprocess.run(command(module, 'tiny', [*extra, f'--num_iterations={steps}', *CHAT_TINY, '--prefetch=0']),
                             env=run_env(base), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
    return base


def sft_args(cycles: int) -> list:
    return ['--source_run=tiny', f'--num_iterations={steps_for(cycles)}', f'--save_every={SAVE_EVERY}', *CHAT_TINY, '--prefetch=0']


def test_sigkill_at_random_points_of_sft_then_resume_is_bitwise_equal(mid_model):
    cycles = examples(3, 10)
    kill_resume_against_reference('sft', 'chat_sft', mid_model, sft_args(cycles), cycles, SEED + 1)


# Distributed: one rank of a 2-process gloo run dies.

def children(pid: int) -> list:
    "The ids of the processes whose parent is `pid` (from /proc)."
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try: fields = stat.read_text().rsplit(')', 1)[1].split()
        except OSError: continue
        if int(fields[1]) == pid: out.append(int(stat.parent.name))
    return out


def rank_of(pid: int) -> int | None:
    try: environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
    except OSError: return None
    return next((int(v[5:]) for v in environ if v.startswith(b'RANK=')), None)


def alive(pid: int) -> bool:
    try: return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError: return False


DIST_TIMEOUT_S = 120


def test_a_killed_rank_stops_the_whole_torchrun_run_with_an_error_and_leaves_valid_checkpoints(tmp_path):
    rng = random.Random(SEED + 2)
    victim = rng.choice([0, 1])
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'imagelm.base_train', '--',
                '--run=dist', *TINY, '--num_iterations=100000', '--save_every=2', '--prefetch=0']
    env = {**run_env(tmp_path), 'IMAGELM_DIST_TIMEOUT': '30'}
    proc = subprocess.Popen(torchrun, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    at = rng.randrange(3, 12)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f'step {at:05d}/'): break
    workers = {rank_of(pid): pid for pid in children(proc.pid)}
    assert set(workers) == {0, 1}, (workers, ''.join(lines)[-3000:])
    os.kill(workers[victim], signal.SIGKILL)
    killed = time.time()
    try: rest, _ = proc.communicate(timeout=DIST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill(); proc.communicate()
        for pid in workers.values():
            if alive(pid): os.kill(pid, signal.SIGKILL)
        pytest.fail(f'torchrun still ran {DIST_TIMEOUT_S} s after rank {victim} was killed: a hang')
    seconds = time.time() - killed
    output = ''.join(lines) + rest
    survivor = workers[1 - victim]
    assert proc.returncode != 0 and not alive(survivor), output[-3000:]
    assert 'imagelm.base_train FAILED' in output or 'ChildFailedError' in output, output[-3000:]
    root = tmp_path / 'checkpoints' / 'base' / 'dist'
    validated = validate_all(root)
    assert validated >= 1 and read_meta(latest_checkpoint(root))['world_size'] == 2
    record('distributed_kill', killed_rank=victim, killed_after_step=at, exit_seconds=round(seconds, 1),
           torchrun_returncode=proc.returncode, hang=False, checkpoints_validated=validated,
           last_checkpoint_step=step_of(latest_checkpoint(root)))


# A full disk, and a checkpoint folder that becomes unwritable, at save time.

def one_error_line(out: str) -> str:
    assert 'Traceback' not in out, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith('error:')]
    assert len(errors) == 1, out[-3000:]
    return errors[0]


FILE_SIZE_LIMIT = 256 * 1024    # bytes: smaller than model.pt (about 1.1 MB at depth 1), larger than anything else the run writes


def test_a_full_disk_at_save_time_is_one_error_line_and_the_previous_checkpoint_stays(tmp_path):
    env, root = run_env(tmp_path), tmp_path / 'checkpoints' / 'base' / 'full'
    first = subprocess.run(command('base_train', 'full', [*TINY, '--num_iterations=4', '--save_every=2', '--prefetch=0']),
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    before = validate_all(root)
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))   # writes past it fail with EFBIG
    full = subprocess.run(command('base_train', 'full', [*TINY, '--num_iterations=8', '--save_every=2', '--prefetch=0', '--resume=1']),
                          env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert full.returncode == 1, full.stdout[-2000:] + full.stderr[-3000:]
    line = one_error_line(full.stderr)
    assert str(root / 'step_000004') in line and 'File too large' in line, line
    assert [p.name for p in complete_checkpoints(root)] == ['step_000002', 'step_000003'] and not list(root.glob('*.partial'))
    assert validate_all(root) == before
    unwritable = unwritable_mid_run(tmp_path)
    record('disk_full', full_disk={'mechanism': f'RLIMIT_FSIZE={FILE_SIZE_LIMIT} in the child', 'returncode': full.returncode,
                                   'error': line, 'previous_checkpoint_valid': True}, unwritable=unwritable)


def unwritable_mid_run(tmp_path) -> dict:
    """A run whose checkpoint folder becomes unwritable after its first save: chmod 0o500 for a user; for root, whom chmod
    does not bind, the folder is moved aside and a regular file put in its place."""
    root = tmp_path / 'checkpoints' / 'base' / 'unwritable'
    proc = subprocess.Popen(command('base_train', 'unwritable', [*TINY, '--num_iterations=400', '--save_every=4', '--prefetch=0']),
                            env=run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (root / 'step_000004').exists() and time.time() < deadline and proc.poll() is None: time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)
    assert [p.name for p in complete_checkpoints(root)] == ['step_000004'] and not list(root.glob('*.partial'))
    as_root = os.geteuid() == 0
    if as_root:
        kept = root.with_name('unwritable.moved')
        root.rename(kept); root.write_text('not a folder')
    else: kept = root; root.chmod(0o500)
    proc.send_signal(signal.SIGCONT)
    try: out, err = proc.communicate(timeout=120)
    finally:
        if not as_root: root.chmod(0o755)
    assert proc.returncode == 1, out[-2000:] + err[-3000:]
    line = one_error_line(err)
    assert str(root / 'step_000008') in line, line
    assert validate_all(kept) == 1
    return {'mechanism': 'folder replaced by a regular file (root)' if as_root else 'chmod 0o500', 'returncode': proc.returncode,
            'error': line, 'previous_checkpoint_valid': True}


# Downloads from a server that drops, truncates, garbles and stalls.

class FaultyServer(http.server.BaseHTTPRequestHandler):
    "Serves `files` by name; the first `times` requests of a file get its fault `kind` (of `faults`). `check` runs before each."
    files: dict = {}
    faults: dict = {}
    requests: dict = {}
    ranges: dict = {}
    injected: dict = {}
    check = None

    def log_message(self, *args): pass

    def do_GET(self):
        name = self.path.rsplit('/', 1)[-1]
        if FaultyServer.check: FaultyServer.check()             # the previous attempt has ended: nothing bad may sit under a final name
        count = FaultyServer.requests[name] = FaultyServer.requests.get(name, 0) + 1
        FaultyServer.ranges.setdefault(name, []).append(self.headers.get('Range'))
        data = FaultyServer.files.get(name)
        if data is None: return self.send_error(404)
        kind, times = FaultyServer.faults.get(name, (None, 0))
        fault = kind if count <= times else None
        if fault: FaultyServer.injected[kind] = FaultyServer.injected.get(kind, 0) + 1
        start = int(self.headers['Range'].split('=')[1].rstrip('-')) if self.headers.get('Range') else 0
        if start >= len(data): return self.send_error(416)
        body = random.Random(f'{name}{count}').randbytes(len(data) - start) if fault == 'garbage' else data[start:]
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(body) + (1000 if fault == 'truncate' else 0)))   # truncate: promises more
        if start: self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.end_headers()
        try:
            if fault == 'drop':
                self.wfile.write(body[:len(body) // 2]); self.wfile.flush()
                self.connection.shutdown(2)                    # the connection drops mid-body
                return
            for at in range(0, len(body), 8192):
                self.wfile.write(body[at:at + 8192]); self.wfile.flush()
                if fault == 'slow': time.sleep(1.0)               # stalls past the downloader's timeout
            self.close_connection = fault == 'truncate'
        except (BrokenPipeError, ConnectionResetError): pass


def parquet_bytes(folder: Path, n: int) -> bytes:
    pq.write_table(pa.table({'text': [f'file {n} row {i} ' * 20 for i in range(300)]}), folder / f'src{n}.parquet')
    return (folder / f'src{n}.parquet').read_bytes()


@pytest.fixture
def server(tmp_path):
    FaultyServer.files, FaultyServer.faults, FaultyServer.requests, FaultyServer.ranges, FaultyServer.injected = {}, {}, {}, {}, {}
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), FaultyServer)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown(); FaultyServer.check = None


def final_name_checker(folder: Path, expected: dict, bad: list):
    "A check that every file under a final name in `folder` is whole and valid; what is not goes into `bad`."
    def check():
        for path in (p for p in folder.glob('*') if p.is_file() and not p.name.endswith('.partial') and not p.name.startswith('.')):
            if path.read_bytes() != expected.get(path.name): bad.append(path.name)
    return check


KINDS = ('drop', 'truncate', 'garbage', 'slow')


def test_downloads_survive_drops_truncation_garbage_and_stalls(server, tmp_path):
    n, sources, dest = examples(2, 8), tmp_path / 'sources', tmp_path / 'downloads'
    sources.mkdir()
    files, expected, bad = [], {}, []
    for i in range(n * len(KINDS)):
        kind, name = KINDS[i % len(KINDS)], f'{KINDS[i % len(KINDS)]}_{i}' + ('.jsonl' if i % 3 == 2 else '.parquet')
        data = parquet_bytes(sources, i) if name.endswith('.parquet') else b''.join(b'{"n": %d}\n' % j for j in range(2000))
        FaultyServer.files[name], FaultyServer.faults[name] = data, (kind, 1 + i % 2)
        files.append((f'{server}/{name}', dest / name)); expected[name] = data
    FaultyServer.check = final_name_checker(dest, expected, bad)
    got = download_all(files, workers=4, backoff=0.01, timeout=0.3)
    FaultyServer.check()
    survived = {kind: sum(p.read_bytes() == expected[p.name] for p in got if p.name.startswith(kind)) for kind in KINDS}
    assert bad == [] and survived == {kind: n for kind in KINDS} and not list(dest.glob('*.partial'))
    assert all(FaultyServer.injected.get(kind, 0) >= n for kind in KINDS), FaultyServer.injected
    resumed = [name for name, (kind, _) in FaultyServer.faults.items() if kind in ('drop', 'truncate')]
    record('download_faults', by_kind={kind: {'files': n, 'injected': FaultyServer.injected[kind], 'survived': survived[kind]}
                                       for kind in KINDS}, requests=sum(FaultyServer.requests.values()),
           resumed_files=len(resumed), bad_files_under_final_names=len(bad))
    DOWNLOAD_FIGURES.update(injected=sum(FaultyServer.injected.values()), files=len(files), survived=sum(survived.values()))


DOWNLOAD_FIGURES = {}


def test_a_file_that_is_always_garbage_is_named_and_never_sits_under_its_name(server, tmp_path):
    dest, bad = tmp_path / 'downloads', []
    FaultyServer.files = {'bad.parquet': parquet_bytes(tmp_path, 0), 'bad.jsonl': b'{"a": 1}\n' * 500}
    FaultyServer.faults = {name: ('garbage', 99) for name in FaultyServer.files}
    FaultyServer.check = final_name_checker(dest, {}, bad)
    for name in FaultyServer.files:
        with pytest.raises(DownloadError, match=f'could not download {name} .* in 3 tries'):
            download(f'{server}/{name}', dest / name, retries=3, backoff=0.01, timeout=2)
    FaultyServer.check()
    assert bad == [] and not [p for p in dest.iterdir() if not p.name.endswith('.partial')]
    DOWNLOAD_FIGURES.update(injected=DOWNLOAD_FIGURES.get('injected', 0) + FaultyServer.injected['garbage'],
                            refused_by_name=2, files=DOWNLOAD_FIGURES.get('files', 0) + 2,
                            survived=DOWNLOAD_FIGURES.get('survived', 0) + 2)
    record('download_faults', **DOWNLOAD_FIGURES)


def test_download_shards_redoes_an_invalid_shard_resumes_a_partial_one_and_survives_faults(server, tmp_path, monkeypatch):
    monkeypatch.setenv('IMAGELM_DATA_URL', server)
    folder, bad, log = tmp_path / 'shards', [], []
    names = [shard_name(0), shard_name(1), shard_name(VAL_SHARD)]
    expected = {name: parquet_bytes(tmp_path, i) for i, name in enumerate(names)}
    FaultyServer.files = dict(expected)
    FaultyServer.faults = {names[0]: ('drop', 1), names[1]: ('slow', 1), names[2]: ('garbage', 1)}
    folder.mkdir()
    (folder / names[0]).write_bytes(expected[names[0]][:1000])                       # an old invalid file under the final name
    (folder / f'{names[1]}.partial').write_bytes(expected[names[1]][:5000])          # a partial download left by a crash
    FaultyServer.check = final_name_checker(folder, expected, bad)
    paths = download_shards(3, workers=3, data_dir=folder, log=log.append, backoff=0.01, timeout=0.3)
    FaultyServer.check()
    assert bad == [] and [p.read_bytes() for p in paths] == [expected[n] for n in names]
    assert any(f'{names[0]} is not a parquet file' in line and 'downloading it again' in line for line in log), log
    for path in paths: valid_parquet(path)
    assert not list(folder.glob('*.partial')) and FaultyServer.ranges[names[1]][0] == 'bytes=5000-'
    record('download_faults', download_shards={'shards': 3, 'injected': sum(FaultyServer.injected.values()),
                                               'invalid_redone': 1, 'partial_resumed': 1, 'survived': 3})
