"""The downloader against a local HTTP server with faults: a file that fails twice then succeeds, one cut short and
resumed with a Range request, one that 404s, and one that is never valid."""
import http.server, threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagelm.download import DownloadError, download, download_all, hf_url


class FaultyHub(http.server.BaseHTTPRequestHandler):
    "Serves `files` under /datasets/<repo>/resolve/main/; the path's first word picks a fault."
    files: dict = {}
    requests: list = []

    def log_message(self, *args): pass

    def do_GET(self):
        FaultyHub.requests.append((self.path, self.headers.get('Range')))
        name = self.path.rsplit('/', 1)[-1]
        data = FaultyHub.files.get(name)
        if data is None: return self.send_error(404)
        fault = name.split('_')[0]
        if fault == 'flaky' and sum(p == self.path for p, _ in FaultyHub.requests) <= 2: return self.send_error(503)
        start = int(self.headers['Range'].split('=')[1].rstrip('-')) if self.headers.get('Range') else 0
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header('Content-Length', str(len(body)))
        if start: self.send_header('Content-Range', f'bytes {start}-{len(data) - 1}/{len(data)}')
        self.end_headers()
        if fault == 'truncated' and not start:
            self.wfile.write(body[:len(body) // 2]); self.wfile.flush()
            self.connection.shutdown(2)                            # the connection drops halfway
            return
        self.wfile.write(body)


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    folder = tmp_path_factory.mktemp('hub')
    pq.write_table(pa.table({'text': [f'row {i} ' * 50 for i in range(400)]}), folder / 'x.parquet')
    data = (folder / 'x.parquet').read_bytes()
    FaultyHub.files = {'ok_a.parquet': data, 'flaky_b.parquet': data, 'truncated_c.parquet': data,
                       'broken_d.parquet': b'PAR1' + b'\0' * 100 + b'PAR1', 'ok_e.jsonl': b'{"a": 1}\n{"a": 2}\n'}
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), FaultyHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_address[1]}', data
    server.shutdown()


def url(endpoint, name): return hf_url('test/repo', name, endpoint=endpoint)


def test_a_file_that_fails_twice_then_succeeds(hub, tmp_path):
    endpoint, data = hub
    got = download(url(endpoint, 'flaky_b.parquet'), tmp_path / 'b.parquet', backoff=0.01)
    assert got.read_bytes() == data and not (tmp_path / 'b.parquet.partial').exists()
    assert [p for p, _ in FaultyHub.requests].count('/datasets/test/repo/resolve/main/flaky_b.parquet') == 3


def test_a_file_cut_short_is_resumed_with_a_range_request(hub, tmp_path):
    endpoint, data = hub
    got = download(url(endpoint, 'truncated_c.parquet'), tmp_path / 'c.parquet', backoff=0.01)
    assert got.read_bytes() == data
    ranges = [r for p, r in FaultyHub.requests if p.endswith('truncated_c.parquet')]
    assert ranges[0] is None and ranges[-1] is not None and ranges[-1] != 'bytes=0-'


def test_a_missing_file_fails_at_once_naming_it(hub, tmp_path):
    endpoint, _ = hub
    before = len(FaultyHub.requests)
    with pytest.raises(DownloadError, match='missing.parquet.*HTTP 404'): download(url(endpoint, 'missing.parquet'), tmp_path / 'm.parquet')
    assert len(FaultyHub.requests) == before + 1 and not list(tmp_path.iterdir())


def test_an_invalid_file_is_refetched_then_refused(hub, tmp_path):
    endpoint, _ = hub
    with pytest.raises(DownloadError, match='could not download d.parquet .* in 3 tries: .*not a readable parquet file'):
        download(url(endpoint, 'broken_d.parquet'), tmp_path / 'd.parquet', retries=3, backoff=0.01)
    assert not (tmp_path / 'd.parquet').exists()


def test_download_all_in_parallel_and_the_first_error(hub, tmp_path):
    endpoint, data = hub
    files = [(url(endpoint, 'ok_a.parquet'), tmp_path / 'a.parquet'), (url(endpoint, 'ok_e.jsonl'), tmp_path / 'e.jsonl')]
    assert [p.name for p in download_all(files, workers=2)] == ['a.parquet', 'e.jsonl']
    with pytest.raises(DownloadError, match='nothere.parquet'):
        download_all(files + [(url(endpoint, 'nothere.parquet'), tmp_path / 'n.parquet')], workers=3)
    assert (tmp_path / 'a.parquet').read_bytes() == data


def test_an_unreachable_server_is_retried_then_named(tmp_path):
    with pytest.raises(DownloadError, match=r'could not download z.parquet from http://127.0.0.1:9/.* in 2 tries'):
        download('http://127.0.0.1:9/z.parquet', tmp_path / 'z.parquet', retries=2, backoff=0.01, timeout=2)
