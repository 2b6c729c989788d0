"""Reliability of `python -m imagelm.chat_web` (issue 14): its API fuzzed from its own OpenAPI schema (schemathesis) and
with arbitrary JSON (hypothesis), a bounded load of concurrent clients (httpx and the official `openai` client, some
leaving mid-stream), and two security properties: it listens on 127.0.0.1 by default, and no request makes it read a
file or fetch a URL."""
import concurrent.futures, json, os, socket, subprocess, sys, threading, time
from pathlib import Path

import httpx, openai, pytest, torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from browser import free_port, stop, wait_for_http
from reliability import LONG, examples, record
from test_chat_web import CHAT, start, user
from tiny import env, tiny_checkpoint

pytestmark = pytest.mark.slow   # servers, in threads and in subprocesses

# 5xx answers to bad input that this session's fixes to nbs/25_chat_web.ipynb removed, found by probing the server with the
# kinds of body the fuzzing below generates (huge and long integers, deep nesting, lone surrogates):
FIXED_5XX = [
    'an integer too large for a float (max_tokens or top_k of 400 digits): OverflowError',
    'an integer of over 4,300 digits anywhere in the body: ValueError from json.loads',
    'JSON nested 100,000 deep: RecursionError from json.loads',
    'a seed outside the 64 bits torch.Generator takes: the model failed',
    'a lone surrogate (\\ud800) quoted in an error message: UnicodeEncodeError while sending the 4xx',
    'a role that is a list or an object: TypeError (unhashable) looking it up; found by the schemathesis and hypothesis runs here',
]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('web')
    tiny_checkpoint(folder)
    return folder


@pytest.fixture(scope='module')
def fuzz_server(folder):
    """The app in this process over the tiny model, with 2 workers: its schema is built from Limits whose replies are at most
    16 bytes long, so that thousands of generated requests stay quick; every other limit is the default."""
    from imagelm.chat_web import BackgroundServer, Limits, make_app
    from imagelm.checkpoints import load_model
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('IMAGELM_BASE_DIR', str(folder))
        torch.set_num_threads(1)
        model, _ = load_model('base', device='cpu')
        app = make_app([model, model], 'imagelm-base', Limits(max_tokens=16), defaults={'temperature': 0.0, 'max_tokens': 8},
                       timeout=60)
        try:
            with BackgroundServer(app) as url: yield url, app
        finally: torch.set_num_threads(threads)


def is_api_error(response) -> bool:
    "A 4xx with OpenAI's error body: {'error': {'message', 'type', 'param', 'code'}}."
    try: error = json.loads(response.content)['error']
    except (ValueError, KeyError, TypeError): return False
    return (400 <= response.status_code < 500 and isinstance(error, dict) and isinstance(error.get('message'), str) and error['message']
            and error.get('type') == 'invalid_request_error' and {'param', 'code'} <= set(error))


def answered_well(response) -> bool:
    return response.status_code == 200 or is_api_error(response)


def serves_normally(url) -> bool:
    r = httpx.post(url + '/v1/chat/completions', json={**CHAT, 'max_tokens': 8}, timeout=60)
    return r.status_code == 200 and r.json()['choices'][0]['message']['role'] == 'assistant'


def settle(app):
    "Wait until no reply is being written: a fuzzed request the client timed out on still ends."
    deadline = time.time() + 30
    while (app.state.pool.active or app.state.pool.waiting) and time.time() < deadline: time.sleep(0.05)


SCHEMA_FUZZ = {'tried': 0, 'bad': []}
JSON_FUZZ = {'tried': 0, 'bad': []}


def record_fuzzing():
    "The counts of both fuzzing tests so far, for bench/reliability.py (recorded before their asserts, so a failing run counts too)."
    record('bad_inputs_web_api', tried=SCHEMA_FUZZ['tried'] + JSON_FUZZ['tried'], failures_found=len(FIXED_5XX),
           failures_left=len(SCHEMA_FUZZ['bad']) + len(JSON_FUZZ['bad']))


def test_fuzzing_from_the_openapi_schema_finds_no_5xx(fuzz_server):
    import schemathesis
    from schemathesis import GenerationMode
    url, app = fuzz_server
    schema = schemathesis.openapi.from_url(url + '/openapi.json')
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {(op.method.upper(), op.path) for op in operations} >= {('POST', '/v1/chat/completions'), ('POST', '/v1/render'),
                                                                   ('GET', '/health'), ('GET', '/stats'), ('GET', '/v1/models')}
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in GenerationMode])

    @settings(max_examples=examples(300, 3000), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case):
        SCHEMA_FUZZ['tried'] += 1
        response = case.call(base_url=url, timeout=60)
        if not answered_well(response): SCHEMA_FUZZ['bad'].append((case.method, case.path, repr(case.body)[:200], response.status_code,
                                                                   response.text[:300]))

    fuzz()
    record_fuzzing()
    settle(app)
    assert SCHEMA_FUZZ['bad'] == [] and serves_normally(url)
    assert app.state.stats.failed == 0


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**80, max_value=2**80) | st.floats()
                    | st.text(max_size=40),
                    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=20)
FIELDS = ['model', 'messages', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_k', 'seed', 'stream', 'stream_options',
          'truncate', 'n', 'top_p', 'stop', 'tools', 'logprobs']
PART = st.one_of(st.fixed_dictionaries({'type': st.just('text'), 'text': JSON | st.text(max_size=60)}),
                 st.fixed_dictionaries({'type': st.just('image_url'), 'image_url': st.fixed_dictionaries({'url': JSON | st.sampled_from(
                     ['data:image/png;base64,', 'data:image/png;base64,iVBORw0KGgo=', 'data:,', '/etc/passwd', 'file:///etc/passwd'])})}),
                 JSON)
MESSAGE = st.fixed_dictionaries({'role': st.sampled_from(['system', 'developer', 'user', 'assistant', 'tool']) | JSON,
                                 'content': st.text(max_size=60) | st.lists(PART, max_size=3) | JSON})
BODY = st.one_of(JSON,   # anything at all
                 st.builds(lambda changes: {**CHAT, 'max_tokens': 8, **changes},   # a good request, some fields replaced by anything
                           st.dictionaries(st.sampled_from(FIELDS), JSON | st.integers(), max_size=4)),
                 st.builds(lambda messages, extra: {**CHAT, 'max_tokens': 8, 'messages': messages, **extra},
                           st.lists(MESSAGE, max_size=4), st.dictionaries(st.sampled_from(FIELDS[2:]), JSON, max_size=2)))


def test_arbitrary_json_bodies_get_200_or_a_4xx_that_says_why(fuzz_server):
    url, app = fuzz_server

    @settings(max_examples=examples(300, 3000), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=BODY, path=st.sampled_from(['/v1/chat/completions', '/v1/render']), raw=st.booleans())
    def fuzz(body, path, raw):
        JSON_FUZZ['tried'] += 1
        content = json.dumps(body, allow_nan=True).encode('utf-8', 'surrogatepass')   # NaN, and lone surrogates, as Python writes them
        if raw: content = content[:len(content) // 2]   # cut off: not JSON
        response = httpx.post(url + path, content=content, headers={'content-type': 'application/json'}, timeout=60)
        if not answered_well(response): JSON_FUZZ['bad'].append((path, content[:200], response.status_code, response.text[:300]))

    fuzz()
    record_fuzzing()
    settle(app)
    assert JSON_FUZZ['bad'] == [] and serves_normally(url)
    assert app.state.stats.failed == 0


FIXED_BODIES = {
    'a 400-digit max_tokens': b'{"model": "imagelm-base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b'9' * 400 + b'}',
    'a 5,000-digit number': b'{"model": "imagelm-base", "seed": ' + b'9' * 5000 + b'}',
    'JSON nested 100,000 deep': b'[' * 100_000 + b']' * 100_000,
    'a seed of 2**70': json.dumps({**CHAT, 'seed': 2**70}).encode(),
    'a role that is an object': json.dumps({**CHAT, 'messages': [{'role': {'name': 'user'}, 'content': 'hi'}]}).encode(),
    'a lone surrogate in a flag': b'{"model": "imagelm-base", "messages": [{"role": "user", "content": "hi"}], "stream": "\\ud800"}'}


@pytest.mark.parametrize('what', FIXED_BODIES)
def test_each_fixed_5xx_is_a_4xx_now(fuzz_server, what):
    url, content = fuzz_server[0], FIXED_BODIES[what]
    response = httpx.post(url + '/v1/chat/completions', content=content, timeout=60)
    assert response.status_code == 400 and is_api_error(response), response.text[:300]


# --- load ---

def rss_mb(pid: int) -> float:
    "Resident memory of process `pid`, from /proc/<pid>/status (VmRSS), in MiB."
    line = next(l for l in Path(f'/proc/{pid}/status').read_text().splitlines() if l.startswith('VmRSS:'))
    return round(int(line.split()[1]) / 1024, 1)


def percentile(values, q): return sorted(values)[min(len(values) - 1, int(q * len(values)))]


LOAD_REQUESTS, LOAD_CLIENTS = (1000, 40) if LONG else (200, 20)
LOAD_SECONDS = 300   # the load stops taking new requests after this, whatever is left


def one_request(url: str, i: int) -> tuple:
    "Request `i` of the load, by one of five kinds of client: (outcome, detail, seconds)."
    kind, question = i % 5, [user(f'Question number {i}: what comes next?')]
    leaves = i % 10 == 9   # 10%: a streamed reply left in the middle
    started = time.perf_counter()
    try:
        if leaves and kind % 2:
            client = openai.OpenAI(base_url=url + '/v1', api_key='unused', max_retries=0, timeout=60)
            stream = client.chat.completions.create(model='imagelm-base', messages=question, max_tokens=4096, stream=True)
            pieces = [chunk for chunk, _ in zip(stream, range(3))]
            stream.close()
            return ('disconnected', len(pieces), time.perf_counter() - started)
        if leaves:
            with httpx.stream('POST', url + '/v1/chat/completions', json={**CHAT, 'messages': question, 'max_tokens': 4096, 'stream': True},
                              timeout=60) as r:
                if r.status_code != 200: r.read(); return outcome_of(r, started)
                lines = [line for line, _ in zip(r.iter_lines(), range(6))]
            return ('disconnected', len(lines), time.perf_counter() - started)
        if kind == 0:
            r = httpx.post(url + '/v1/chat/completions', json={**CHAT, 'messages': question, 'max_tokens': 24}, timeout=60)
            return outcome_of(r, started)
        if kind == 1:
            with httpx.stream('POST', url + '/v1/chat/completions', json={**CHAT, 'messages': question, 'max_tokens': 24, 'stream': True},
                              timeout=60) as r:
                r.read()
            ok = r.status_code == 200 and r.text.rstrip().endswith('data: [DONE]')
            return ('completed', 200, time.perf_counter() - started) if ok else outcome_of(r, started)
        client = openai.OpenAI(base_url=url + '/v1', api_key='unused', max_retries=0, timeout=60)
        if kind == 2:
            reply = client.chat.completions.create(model='imagelm-base', messages=question, max_tokens=24)
            assert reply.choices[0].finish_reason in ('stop', 'length')
        else:
            chunks = list(client.chat.completions.create(model='imagelm-base', messages=question, max_tokens=24, stream=True))
            assert chunks and chunks[-1].choices[0].finish_reason in ('stop', 'length')
        return ('completed', 200, time.perf_counter() - started)
    except openai.APIStatusError as error:
        code = (error.body or {}).get('code') if isinstance(error.body, dict) else None
        return ('refused' if error.status_code == 503 else 'lost', code or error.status_code, time.perf_counter() - started)
    except Exception as error:
        return ('lost', f'{type(error).__name__}: {error}'[:200], time.perf_counter() - started)


def outcome_of(r, started) -> tuple:
    seconds = time.perf_counter() - started
    if r.status_code == 200: return ('completed', 200, seconds)
    code = r.json().get('error', {}).get('code') if r.headers.get('content-type', '').startswith('application/json') else None
    return ('refused' if r.status_code == 503 else 'lost', code or r.status_code, seconds)


def watch_stats(url, slots, workers, stop_event, seen: list, problems: list):
    "Poll /stats through the load: every snapshot consistent, and the counters never going back."
    last = None
    while not stop_event.is_set():
        try: s = httpx.get(url + '/stats', timeout=30).json()
        except httpx.HTTPError as error: problems.append(f'/stats failed: {error}'); continue
        seen.append(s)
        if not (0 <= s['active_replies'] <= slots and 0 <= s['idle_workers'] <= workers and s['waiting'] >= 0 and s['failed'] == 0):
            problems.append(f'inconsistent: {s}')
        if last and any(s[k] < last[k] for k in ('requests', 'completed', 'disconnected', 'decode_steps', 'bytes_out')):
            problems.append(f'a counter went back: {last} -> {s}')
        last = s
        stop_event.wait(0.25)


def test_a_bounded_load_of_concurrent_clients(folder):
    proc, url = start(folder, '--num_workers=2', '--queue_timeout=60', '--temperature=0')
    try:
        assert httpx.post(url + '/v1/chat/completions', json=CHAT, timeout=60).status_code == 200   # warmed up
        memory_before, before = rss_mb(proc.pid), httpx.get(url + '/stats').json()
        slots, workers = before['workers'] * before['max_batch'], before['workers']
        stop_event, seen, problems = threading.Event(), [], []
        watcher = threading.Thread(target=watch_stats, args=(url, slots, workers, stop_event, seen, problems), daemon=True)
        watcher.start()
        deadline, started = time.time() + LOAD_SECONDS, time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(LOAD_CLIENTS) as clients:
            def bounded(i): return one_request(url, i) if time.time() < deadline else ('not started', None, 0.0)
            results = list(clients.map(bounded, range(LOAD_REQUESTS), timeout=LOAD_SECONDS + 120))
        wall = time.perf_counter() - started
        settle_until = time.time() + 10   # a client that left is noticed within the server's poll of its connection
        while time.time() < settle_until:
            after = httpx.get(url + '/stats').json()
            if after['active_replies'] == 0 and after['waiting'] == 0 and after['idle_workers'] == workers: break
            time.sleep(0.1)
        stop_event.set(); watcher.join(35)
        memory_after = rss_mb(proc.pid)
    finally: stop(proc)

    outcomes = {k: [r for r in results if r[0] == k] for k in ('completed', 'refused', 'disconnected', 'lost', 'not started')}
    times_ms = [r[2] * 1000 for r in outcomes['completed']]
    refusal_reasons = {str(code): sum(r[1] == code for r in outcomes['refused']) for code in {r[1] for r in outcomes['refused']}}
    record('load', requests=LOAD_REQUESTS, clients=LOAD_CLIENTS, completed=len(outcomes['completed']), refused=len(outcomes['refused']),
           refusal_reasons=refusal_reasons, disconnected=len(outcomes['disconnected']), lost=len(outcomes['lost']),
           p50_ms=round(percentile(times_ms, 0.5)), p99_ms=round(percentile(times_ms, 0.99)), wall_s=round(wall, 1),
           memory_before_mb=memory_before, memory_after_mb=memory_after, stats_snapshots=len(seen))
    print(f"load: {len(outcomes['completed'])} completed, {len(outcomes['refused'])} refused, {len(outcomes['disconnected'])} left, "
          f"{len(outcomes['lost'])} lost in {wall:.1f} s; p50 {percentile(times_ms, 0.5):.0f} ms, p99 {percentile(times_ms, 0.99):.0f} ms; "
          f"RSS {memory_before} -> {memory_after} MiB")
    assert outcomes['lost'] == [] and outcomes['not started'] == []
    assert len(outcomes['disconnected']) == LOAD_REQUESTS // 10
    assert problems == [] and len(seen) >= 3
    assert after['active_replies'] == 0 and after['waiting'] == 0 and after['idle_workers'] == workers   # no slot leaked
    assert after['requests'] - before['requests'] == LOAD_REQUESTS
    assert after['completed'] - before['completed'] == len(outcomes['completed'])
    assert after['disconnected'] - before['disconnected'] == len(outcomes['disconnected'])
    assert sum(after['refused'].values()) - sum(before['refused'].values()) == len(outcomes['refused'])
    assert after['failed'] == 0


# --- security ---

def listening_addresses(port: int) -> set:
    "The local addresses (hex, as /proc/net/tcp{,6} write them) that listen on `port`."
    found = set()
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        if not os.path.exists(table): continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(':')
            if state == '0A' and int(hex_port, 16) == port: found.add(address)
    return found


def test_the_server_listens_on_loopback_only_by_default(folder):
    from imagelm.chat_web import make_parser
    assert make_parser().parse_args([]).host == '127.0.0.1'
    proc, url = start(folder)   # no --host
    try: addresses = listening_addresses(int(url.rsplit(':', 1)[1]))
    finally: stop(proc)
    assert addresses == {'0100007F'}   # 127.0.0.1, and nothing else (not 0.0.0.0, not ::)
    assert 'anyone who can reach this port' not in proc.stderr.read()


@pytest.fixture
def sentinel(tmp_path):
    "A PNG that a request names by path: were it ever read, the request would succeed. Its access time is set in the past."
    path = tmp_path / 'sentinel.png'
    Image.new('RGB', (20, 20), (0, 200, 0)).save(path)
    os.utime(path, (time.time() - 10_000, time.time() - 5_000))   # atime before mtime: a read updates it even under relatime
    return path


class Listener:
    "A TCP socket on 127.0.0.1 that counts the connections made to it: any fetch of a URL naming it."
    def __init__(self):
        self.sock = socket.socket(); self.sock.bind(('127.0.0.1', 0)); self.sock.listen(8); self.sock.settimeout(0.1)
        self.port, self.connections, self.done = self.sock.getsockname()[1], 0, threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True); self.thread.start()

    def _accept(self):
        while not self.done.is_set():
            try: conn, _ = self.sock.accept()
            except OSError: continue
            self.connections += 1; conn.close()

    def close(self): self.done.set(); self.thread.join(2); self.sock.close()


def tree(folder: Path) -> dict:
    "Every file under `folder` with its size and modification time."
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob('*') if p.is_file()}


def test_no_request_reads_a_file_or_fetches_a_url(folder, sentinel, tmp_path):
    atime = sentinel.stat().st_atime_ns
    with open(sentinel, 'rb') as f: f.read()   # a read moves the access time on this filesystem, or the check below could not see one
    if sentinel.stat().st_atime_ns == atime: pytest.skip('this filesystem does not update access times')
    os.utime(sentinel, ns=(atime, sentinel.stat().st_mtime_ns))
    cwd = tmp_path / 'cwd'; cwd.mkdir()
    port = free_port()
    proc = subprocess.Popen([sys.executable, '-m', 'imagelm.chat_web', '--stage=base', f'--port={port}', '--max_tokens=8'], env=env(folder),
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url, listener = f'http://127.0.0.1:{port}', Listener()
    named = [f'file://{sentinel}', str(sentinel), f'file://localhost{sentinel}', '../' * 8 + str(sentinel)[1:], sentinel.name,
             f'http://127.0.0.1:{listener.port}/sentinel.png', f'https://127.0.0.1:{listener.port}/x.png',
             f'data:image/png;base64,{sentinel}', f'ftp://127.0.0.1:{listener.port}/x.png']
    try:
        wait_for_http(url + '/health', 120, proc)
        before_cwd, before_base = tree(cwd), tree(Path(folder))
        answers = []
        for target in named:
            for path in ('/v1/chat/completions', '/v1/render'):
                for part in ({'type': 'image_url', 'image_url': {'url': target}}, {'type': 'image_url', 'image_url': target}):
                    answers.append(httpx.post(url + path, json={**CHAT, 'messages': [{'role': 'user', 'content': [part]}]}, timeout=60))
        for path in (str(sentinel), f'/..{sentinel}', '/static/../../etc/passwd', f'/{sentinel.name}'):
            answers.append(httpx.get(url + path, timeout=60))
        time.sleep(0.3)
        after_cwd, after_base = tree(cwd), tree(Path(folder))
    finally: listener.close(); stop(proc)
    assert [(r.status_code, r.text[:200]) for r in answers if not is_api_error(r)] == []   # each a 4xx that says why
    assert listener.connections == 0                       # no URL fetched
    assert sentinel.stat().st_atime_ns == atime            # the file never read
    assert after_cwd == before_cwd == {} and after_base == before_base   # nothing written
