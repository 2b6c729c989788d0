"""imagelm.dataset: shard names, the data arithmetic (parameters x ratio x characters per position / characters per
shard), character counts of shards, the repeat warning, and the shard downloader and its command line against a local
server that answers Range requests as the hub does."""
import functools, http.server, math, os, subprocess, sys, threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagelm.base_train import model_config, parse_args
from imagelm.dataloader import DataConfig, ShardError, list_parquet_files, make_source
from imagelm.dataset import (NUM_SHARDS, VAL_SHARD, chars_per_position, download_shards, repeat_warning, shard_characters,
                             shard_indices, shard_name, shard_plan, shard_url, training_characters)
from imagelm.download import DownloadError
from imagelm.model import ImageLM
from imagelm.render import RenderConfig

ROOT = Path(__file__).resolve().parent.parent
PROSE = ['Rain falls on the hills and runs down to the rivers, which carry it back to the sea. ' * (i % 4 + 1) +
         f'Note {i}: the sun lifts water into the air again.\nCafé, naïve, 水, 🌊.' for i in range(60)]


def write_shard(path, texts, row_group_size=8):
    pq.write_table(pa.table({'text': texts}), path, row_group_size=row_group_size)
    return path


# ---- names, indices and addresses

def test_a_download_of_n_takes_the_first_n_minus_1_and_the_val_shard():
    assert shard_indices(2) == [0, VAL_SHARD] and shard_indices(4) == [0, 1, 2, VAL_SHARD]
    assert shard_indices(-1) == list(range(NUM_SHARDS)) == shard_indices(NUM_SHARDS + 10)
    assert sorted(map(shard_name, shard_indices(50)))[-1] == shard_name(VAL_SHARD) == 'shard_01822.parquet'
    for bad in (0, 1, -2, 2.5, True, '3'):
        with pytest.raises(ValueError, match='must be -1 .* or at least 2'): shard_indices(bad)
    with pytest.raises(ValueError, match=r'in \[0, 1822\]'): shard_name(NUM_SHARDS)


def test_shard_addresses_follow_IMAGELM_DATA_URL_then_HF_ENDPOINT(monkeypatch):
    monkeypatch.delenv('IMAGELM_DATA_URL', raising=False)
    monkeypatch.delenv('HF_ENDPOINT', raising=False)
    assert shard_url(7) == 'https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00007.parquet'
    monkeypatch.setenv('HF_ENDPOINT', 'http://mirror:9/')
    assert shard_url(7) == 'http://mirror:9/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00007.parquet'
    monkeypatch.setenv('IMAGELM_DATA_URL', 'http://127.0.0.1:8/fineweb/')
    assert shard_url(VAL_SHARD) == 'http://127.0.0.1:8/fineweb/shard_01822.parquet'


# ---- the arithmetic

def test_the_plan_counts_parameters_as_base_train_does_and_rounds_shards_up():
    plan = shard_plan(2, max_seq_len=256, per_position=2.5, chars_per_shard=1_000_000)
    model = ImageLM(model_config(parse_args(['--preset=gpu', '--depth=2', '--max_seq_len=256'])))
    assert plan['params'] == sum(p.numel() for p in model.parameters())
    assert plan['positions'] == 20 * plan['params'] and plan['characters'] == round(2.5 * plan['positions'])
    assert plan['shards_train'] == math.ceil(plan['characters'] / 1_000_000) and plan['shards_total'] == plan['shards_train'] + 1
    with pytest.raises(ValueError, match='ratio'): shard_plan(2, ratio=-1, per_position=1.0)
    with pytest.raises(ValueError, match='depth must be an int >= 1'): shard_plan(0, per_position=1.0)


def test_shards_grow_with_depth_and_ratio():
    shards = [shard_plan(d, per_position=2.36)['shards_total'] for d in (8, 12, 20, 26)]
    assert shards == sorted(shards) and len(set(shards)) == 4
    assert shard_plan(20, ratio=40, per_position=2.36)['shards_train'] >= 2 * shard_plan(20, per_position=2.36)['shards_train'] - 1


def test_characters_per_position_is_measured_between_bytes_and_full_patches():
    measured = {k: chars_per_position(DataConfig(source=PROSE, seq_len=256, render=RenderConfig.for_chars_per_patch(k)), rows=32)
                for k in (4, 8)}
    assert all(1 < measured[k] < k for k in measured), measured
    assert measured[8] > measured[4]                        # wider patches carry more text per position
    bytes_only = DataConfig(source=PROSE, seq_len=256, pixel_chars=1, byte_chars=4096, jitter=0.0)
    assert chars_per_position(bytes_only, rows=8) < 1        # nearly all bytes: at most one character a position


# ---- characters on disk and the repeat warning

def test_shard_characters_counts_code_points_of_the_text_column(tmp_path):
    texts = PROSE + [None, '']
    assert shard_characters(write_shard(tmp_path / 'a.parquet', texts)) == sum(len(t or '') for t in texts)
    pq.write_table(pa.table({'body': ['x']}), tmp_path / 'b.parquet')
    with pytest.raises(ShardError, match="b.parquet has no 'text' column"): shard_characters(tmp_path / 'b.parquet')


def test_repeat_warning_fires_when_the_training_shards_are_too_few(tmp_path):
    for i in range(3): write_shard(tmp_path / shard_name(i), PROSE[i::3])
    write_shard(tmp_path / shard_name(VAL_SHARD), PROSE * 10)          # the val shard is big, and never counted
    have = sum(len(t) for t in PROSE)
    assert training_characters(tmp_path) == (3, have)
    assert repeat_warning(have, tmp_path) is None and repeat_warning({'characters': have - 1}, tmp_path) is None
    warning = repeat_warning(have + 1, tmp_path)
    assert warning.startswith(f'warning: the 3 training shard(s) in {tmp_path} hold {have:,} characters') and '\n' not in warning
    assert '-n 5` downloads enough' in repeat_warning({'characters': 1.2 * have}, tmp_path)
    assert 'no training shards' in repeat_warning(1, tmp_path / 'missing')
    (tmp_path / shard_name(1)).unlink(); (tmp_path / shard_name(2)).unlink()
    assert repeat_warning(have, tmp_path) is not None


# ---- downloads from a local server (slow: HTTP and subprocesses)

class RangeHub(http.server.SimpleHTTPRequestHandler):
    "Serves a folder, answering `Range: bytes=N-` with 206 as the hub does; records each request's (path, Range)."
    requests = []

    def log_message(self, *args): pass

    def do_GET(self):
        RangeHub.requests.append((self.path, self.headers.get('Range')))
        path = Path(self.translate_path(self.path))
        if not self.headers.get('Range') or not path.is_file(): return super().do_GET()
        data = path.read_bytes()
        body = data[int(self.headers['Range'].split('=')[1].rstrip('-')):]
        self.send_response(206)
        self.send_header('Content-Length', str(len(body)))
        self.send_header('Content-Range', f'bytes {len(data) - len(body)}-{len(data) - 1}/{len(data)}')
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    "Shards 0-5 and the val shard on a local server; IMAGELM_DATA_URL points at it. Yields the served folder."
    served = tmp_path / 'hub'
    served.mkdir()
    for i in (*range(6), VAL_SHARD): write_shard(served / shard_name(i), [f'shard {i}: {t}' for t in PROSE])
    RangeHub.requests = []
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(RangeHub, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv('IMAGELM_DATA_URL', f'http://127.0.0.1:{server.server_address[1]}')
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path / 'base'))
    yield served
    server.shutdown()


@pytest.mark.slow
def test_n_shards_come_down_with_the_val_shard_last(hub, tmp_path):
    lines = []
    paths = download_shards(4, workers=2, log=lines.append)
    assert [p.name for p in paths] == [shard_name(i) for i in (0, 1, 2, VAL_SHARD)] == [p.name for p in list_parquet_files()]
    assert all(p.read_bytes() == (hub / p.name).read_bytes() for p in paths)
    assert lines[0].startswith('4 shards (3 training + the val shard shard_01822.parquet)') and len(lines) == 5
    assert make_source('parquet', 'val').files == [paths[-1]]
    before = len(RangeHub.requests)
    assert download_shards(4, log=lines.append) == paths and len(RangeHub.requests) == before   # all there: nothing fetched
    assert lines[-1].endswith('4 there, 0 to download, 4 at a time')


@pytest.mark.slow
def test_a_partial_shard_is_resumed_with_a_range_request(hub):
    data = (hub / shard_name(0)).read_bytes()
    folder = Path(os.environ['IMAGELM_BASE_DIR']) / 'base_data'
    folder.mkdir(parents=True)
    (folder / (shard_name(0) + '.partial')).write_bytes(data[:len(data) // 2])
    download_shards(2, log=lambda line: None)
    assert (folder / shard_name(0)).read_bytes() == data and not (folder / (shard_name(0) + '.partial')).exists()
    assert (f'/{shard_name(0)}', f'bytes={len(data) // 2}-') in RangeHub.requests


@pytest.mark.slow
def test_a_corrupt_shard_is_named_and_never_kept_under_its_name(hub):
    (hub / shard_name(1)).write_bytes(b'PAR1' + b'\0' * 64 + b'PAR1')
    with pytest.raises(DownloadError, match=r'could not download shard_00001\.parquet .* in 2 tries: .*not a readable parquet'):
        download_shards(4, retries=2, backoff=0.01, log=lambda line: None)
    folder = Path(os.environ['IMAGELM_BASE_DIR']) / 'base_data'
    assert sorted(p.name for p in folder.iterdir()) == [shard_name(0), shard_name(2), shard_name(VAL_SHARD)]
    (folder / shard_name(2)).write_bytes(b'half a file')         # a broken shard on disk is fetched again, not trusted
    write_shard(hub / shard_name(1), PROSE)
    assert all(p.stat().st_size > 100 for p in download_shards(4, log=lambda line: None))


def cli(*args):
    return subprocess.run([sys.executable, '-m', 'imagelm.dataset', *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ), timeout=300)


@pytest.mark.slow
def test_the_command_line_downloads_and_fails_with_status_1_naming_the_shard(hub):
    done = cli('-n', '3', '-w', '2')
    assert done.returncode == 0, done.stderr
    assert [p.name for p in list_parquet_files()] == [shard_name(0), shard_name(1), shard_name(VAL_SHARD)]
    failed = cli('-n', '9')                                      # shards 6 and 7 are not on the server
    assert failed.returncode == 1 and 'shard_00006.parquet: HTTP 404' in failed.stderr and 'Traceback' not in failed.stderr
    assert not (Path(os.environ['IMAGELM_BASE_DIR']) / 'base_data' / shard_name(6)).exists()
    for bad in (['-n', '1'], ['-n', '0'], [], ['--shards_for_depth', '0'], ['-n', '3', '--plan', '20'], ['-n', '3', '-w', '0']):
        assert cli(*bad).returncode == 2, bad


@pytest.mark.slow
def test_shards_for_depth_prints_only_a_count_that_grows_with_depth():
    counts = {}
    for depth in (20, 26):
        done = cli('--shards_for_depth', str(depth))
        assert done.returncode == 0, done.stderr
        counts[depth] = int(done.stdout)                       # the whole of stdout is one int
    assert 2 < counts[20] < counts[26] <= 2 * NUM_SHARDS
    plan = cli('--plan', '20')
    assert plan.returncode == 0 and f'= {counts[20]} shards.' in plan.stdout and f'-n {counts[20]}' in plan.stdout


@pytest.mark.slow
def test_base_training_on_too_few_shards_warns_that_it_repeats_data(tmp_path):
    shards = tmp_path / 'shards'
    shards.mkdir()
    for i in range(2): write_shard(shards / f'shard_{i:05d}.parquet', [f'Document {i}.{j}: the quick brown fox.' * 4 for j in range(16)])
    out = subprocess.run([sys.executable, '-m', 'imagelm.base_train', '--depth=1', '--max_seq_len=128', '--device_batch_size=2',
                          '--num_iterations=12', '--eval_batches=1', '--sample_every=0', f'--data={shards}'],
                         env={**os.environ, 'IMAGELM_BASE_DIR': str(tmp_path / 'base'), 'OMP_NUM_THREADS': '1'},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    warning = [line for line in out.stdout.splitlines() if line.startswith('warning:')]
    assert len(warning) == 1 and 'go over the same text' in warning[0], out.stdout[:2000]
