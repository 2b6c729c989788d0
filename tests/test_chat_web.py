"""`python -m imagelm.chat_web` as users run it: a live server on 127.0.0.1 over a tiny checkpoint made here, driven with
httpx, with the official `openai` client and in headless Chromium (desktop and phone width)."""
import base64, concurrent.futures, contextlib, io, json, subprocess, sys, time

import httpx, openai, pytest
from PIL import Image

from browser import PHONE, free_port, new_page, screenshot, stop, wait_for_http
from tiny import env, tiny_checkpoint

pytestmark = pytest.mark.slow   # a server in a subprocess


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp('web')
    tiny_checkpoint(folder)
    return folder


def start(folder, *flags):
    port = free_port()
    proc = subprocess.Popen([sys.executable, '-m', 'imagelm.chat_web', '--stage=base', f'--port={port}', *flags], env=env(folder),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    wait_for_http(url + '/health', 120, proc)
    return proc, url


@pytest.fixture(scope='module')
def server(folder):
    proc, url = start(folder, '--num_workers=2', '--queue_timeout=120', '--temperature=0')
    yield url
    stop(proc)


def post(url, body, **kw) -> httpx.Response:
    return httpx.post(url + '/v1/chat/completions', json=body, timeout=120, **kw)


def user(text): return {'role': 'user', 'content': text}
CHAT = {'model': 'imagelm-base', 'messages': [user('Hello there!')], 'max_tokens': 24}


def picture_url(size=(48, 32), colour=(220, 40, 40)) -> str:
    buffer = io.BytesIO(); Image.new('RGB', size, colour).save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode()


def test_page_health_models_and_stats(server):
    page = httpx.get(server + '/')
    assert page.status_code == 200 and '<textarea id="message"' in page.text and 'src="http' not in page.text
    assert httpx.get(server + '/health').json() == {'status': 'ok', 'model': 'imagelm-base', 'workers': 2, 'idle_workers': 2,
                                                    'active_replies': 0, 'max_batch': 8}
    assert httpx.get(server + '/v1/models').json()['data'][0]['id'] == 'imagelm-base'
    assert {'requests', 'completed', 'refused', 'first_byte_p50_s', 'active_replies', 'max_batch', 'decode_steps', 'mean_batch',
            'largest_batch'} <= set(httpx.get(server + '/stats').json())
    assert '/v1/chat/completions' in httpx.get(server + '/openapi.json').json()['paths']


def test_a_streamed_reply_is_the_whole_reply_in_pieces(server):
    whole = post(server, CHAT).json()
    with httpx.stream('POST', server + '/v1/chat/completions', json={**CHAT, 'stream': True, 'stream_options': {'include_usage': True}}) as r:
        assert r.status_code == 200 and r.headers['content-type'].startswith('text/event-stream')
        events = [line[6:] for line in r.iter_lines() if line.startswith('data: ')]
    assert events[-1] == '[DONE]'
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]['choices'][0]['delta'] == {'role': 'assistant', 'content': ''}
    assert all(c['object'] == 'chat.completion.chunk' and c['id'] == chunks[0]['id'] for c in chunks)
    text = ''.join(c['choices'][0]['delta'].get('content', '') for c in chunks if c['choices'])
    assert text == whole['choices'][0]['message']['content'] and len(text) > 0
    assert chunks[-2]['choices'][0]['finish_reason'] == whole['choices'][0]['finish_reason']
    assert chunks[-1]['choices'] == [] and chunks[-1]['usage'] == whole['usage']


LIMITS = {   # what a request breaks: (body changes, status, code)
    'malformed JSON': (None, 400, 'invalid_json'),
    'a body that is not an object': ([1, 2], 400, 'invalid_body'),
    'an unknown role': ({'messages': [{'role': 'tool', 'content': '4'}]}, 400, 'unknown_role'),
    'too many messages': ({'messages': [user('hi')] * 65}, 400, 'too_many_messages'),
    'a message too long': ({'messages': [user('x' * 8001)]}, 400, 'message_too_long'),
    'a conversation too long': ({'messages': [user('x' * 8000)] * 5}, 400, 'conversation_too_long'),
    'too many pictures': ({'messages': [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': picture_url()}}] * 5}]},
                          400, 'too_many_pictures'),
    'a picture too wide': ({'messages': [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': picture_url((5000, 1))}}]}]},
                           400, 'picture_too_large'),
    'a picture too heavy': ({'messages': [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {
        'url': 'data:image/png;base64,' + 'A' * 6_000_000}}]}]}, 400, 'picture_too_large'),
    'a picture from a URL': ({'messages': [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': 'file:///etc/passwd'}}]}]},
                             400, 'invalid_image_url'),
    'a broken picture': ({'messages': [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {
        'url': 'data:image/png;base64,' + base64.b64encode(b'not a png').decode()}}]}]}, 400, 'invalid_image'),
    'temperature above 2': ({'temperature': 2.01}, 400, 'invalid_temperature'),
    'temperature below 0': ({'temperature': -1}, 400, 'invalid_temperature'),
    'top_k above 200': ({'top_k': 201}, 400, 'invalid_top_k'),
    'max_tokens 0': ({'max_tokens': 0}, 400, 'invalid_max_tokens'),
    'max_tokens above 4096': ({'max_completion_tokens': 4097}, 400, 'invalid_max_completion_tokens'),
    'another model': ({'model': 'gpt-4o'}, 404, 'model_not_found'),
    'more than one reply': ({'n': 2}, 400, 'unsupported_parameter'),
    'a body over 24 MiB': ({'messages': [user('x' * (25 * 2**20))]}, 413, 'request_too_large'),
}


@pytest.mark.parametrize('what', LIMITS)
def test_every_limit_is_a_4xx_that_names_it(server, what):
    changes, status, code = LIMITS[what]
    r = (httpx.post(server + '/v1/chat/completions', content=b'{"model": "imagelm-base", "messages": [', timeout=60) if changes is None
         else post(server, changes if isinstance(changes, list) else {**CHAT, **changes}))
    assert r.status_code == status, r.text[:300]
    error = r.json()['error']
    assert error['code'] == code and error['message'] and error['type'] == 'invalid_request_error'
    assert httpx.get(server + '/health').json()['status'] == 'ok'


def test_a_conversation_too_long_for_the_context(server):
    long = [user('word ' * 1500), {'role': 'assistant', 'content': 'ok'}] * 3 + [user('and now?')]
    r = post(server, {**CHAT, 'messages': long})
    assert r.status_code == 400 and r.json()['error']['code'] == 'context_length_exceeded'
    assert post(server, {**CHAT, 'messages': long, 'truncate': True}).status_code == 200


def test_a_picture_is_read(server):
    text = [{'type': 'text', 'text': 'What colour is this?'}]
    plain = post(server, {**CHAT, 'messages': [{'role': 'user', 'content': text}]}).json()
    pictured = post(server, {**CHAT, 'messages': [{'role': 'user', 'content': text + [{'type': 'image_url', 'image_url': {'url': picture_url()}}]}]})
    assert pictured.status_code == 200
    assert pictured.json()['usage']['prompt_tokens'] > plain['usage']['prompt_tokens']
    pages = httpx.post(server + '/v1/render', json={'messages': [{'role': 'user', 'content': text + [
        {'type': 'image_url', 'image_url': {'url': picture_url()}}]}]}).json()['pages']
    page = Image.open(io.BytesIO(base64.b64decode(pages[0].split(',', 1)[1])))
    assert len(pages) == 1 and page.mode == 'RGB' and page.width > 300


def test_20_concurrent_requests_on_2_workers_are_all_answered(server):
    before = httpx.get(server + '/stats').json()
    def ask(i): return post(server, {**CHAT, 'messages': [user(f'Question number {i}')], 'max_tokens': 16})
    with concurrent.futures.ThreadPoolExecutor(20) as pool: answers = list(pool.map(ask, range(20)))
    assert [a.status_code for a in answers] == [200] * 20
    assert all(a.json()['choices'][0]['message']['content'] for a in answers)
    after = httpx.get(server + '/stats').json()
    assert after['completed'] - before['completed'] == 20 and after['idle_workers'] == 2


def test_a_client_that_leaves_mid_stream_frees_its_worker(server):
    before = httpx.get(server + '/stats').json()
    long = {**CHAT, 'max_tokens': 4096, 'stream': True}
    for _ in range(2):   # both workers, each left in the middle of a long reply
        with httpx.stream('POST', server + '/v1/chat/completions', json=long, timeout=60) as r:
            lines = r.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(6)) if line.startswith('data: ')) >= 3
    deadline = time.time() + 2
    while httpx.get(server + '/health').json()['idle_workers'] < 2 and time.time() < deadline: time.sleep(0.05)
    after = httpx.get(server + '/stats').json()
    assert after['idle_workers'] == 2 and after['disconnected'] - before['disconnected'] == 2
    assert after['bytes_out'] - before['bytes_out'] < 2000   # stopped early: far from 2 x 4096 bytes


def test_the_official_openai_client(server):
    client = openai.OpenAI(base_url=server + '/v1', api_key='unused', max_retries=0)
    plain = client.chat.completions.create(model='imagelm-base', messages=[user('Hello there!')], max_tokens=24)
    assert plain.choices[0].message.role == 'assistant' and plain.choices[0].finish_reason in ('stop', 'length')
    streamed = client.chat.completions.create(model='imagelm-base', messages=[user('Hello there!')], max_tokens=24, stream=True)
    assert ''.join(c.choices[0].delta.content or '' for c in streamed if c.choices) == plain.choices[0].message.content
    pictured = client.chat.completions.create(model='imagelm-base', max_tokens=8, messages=[{'role': 'user', 'content': [
        {'type': 'text', 'text': 'What colour is this?'}, {'type': 'image_url', 'image_url': {'url': picture_url()}}]}])
    assert pictured.usage.prompt_tokens > plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match='top_k must be an integer in'):
        client.chat.completions.create(model='imagelm-base', messages=[user('hi')], extra_body={'top_k': 500})
    assert [m.id for m in client.models.list()] == ['imagelm-base']


@pytest.fixture(scope='module')
def batched(folder):
    "One worker that decodes up to 8 replies at once."
    proc, url = start(folder, '--num_workers=1', '--max_batch=8', '--queue_timeout=120', '--temperature=0')
    yield url
    stop(proc)


def test_8_concurrent_replies_on_1_worker_equal_each_reply_alone(batched):
    questions = [{**CHAT, 'messages': [user(f'Question {i}: what is {i} plus {i}?')], 'max_tokens': 64} for i in range(8)]
    alone = [post(batched, q).json() for q in questions]   # one at a time: each in a batch of its own
    before = httpx.get(batched + '/stats').json()
    with concurrent.futures.ThreadPoolExecutor(8) as pool: together = list(pool.map(lambda q: post(batched, q), questions))
    after = httpx.get(batched + '/stats').json()
    assert [r.status_code for r in together] == [200] * 8
    assert [r.json()['choices'][0]['message']['content'] for r in together] == [a['choices'][0]['message']['content'] for a in alone]
    assert [r.json()['usage'] for r in together] == [a['usage'] for a in alone]
    ids = sum(a['usage']['completion_tokens'] for a in alone)
    assert after['decode_steps'] - before['decode_steps'] < ids   # some steps wrote several replies
    assert after['active_replies'] == 0 and after['max_batch'] == 8


def test_8_concurrent_streams_on_1_worker_are_decoded_in_the_same_steps(batched):
    long = {**CHAT, 'max_tokens': 4096, 'stream': True}
    def health(): return httpx.get(batched + '/health').json()
    with contextlib.ExitStack() as stack:
        streams = [stack.enter_context(httpx.stream('POST', batched + '/v1/chat/completions', timeout=60,
                                                    json={**long, 'messages': [user(f'Tell me about {i}')]})) for i in range(8)]
        lines = [r.iter_lines() for r in streams]   # kept: a dropped iterator closes its response
        for it in lines: assert sum(1 for line, _ in zip(it, range(3)) if line.startswith('data: {')) == 2   # the role, then text
        assert health()['active_replies'] == 8 and health()['idle_workers'] == 0   # all eight are being written now
        steps = httpx.get(batched + '/stats').json()['decode_steps']
        deadline = time.time() + 5
        while httpx.get(batched + '/stats').json()['decode_steps'] < steps + 3 and time.time() < deadline: time.sleep(0.02)
        stats = httpx.get(batched + '/stats').json()
        assert stats['largest_batch'] == 8 and stats['decode_steps'] >= steps + 3   # steps that wrote all eight replies
    deadline = time.time() + 2
    while health()['active_replies'] and time.time() < deadline: time.sleep(0.02)
    assert health()['active_replies'] == 0 and health()['idle_workers'] == 1


def test_a_client_that_leaves_mid_batch_frees_its_slot_while_the_others_go_on(batched):
    before = httpx.get(batched + '/stats').json()
    long = {**CHAT, 'max_tokens': 4096, 'stream': True}
    def active(): return httpx.get(batched + '/health').json()['active_replies']
    with contextlib.ExitStack() as stack:
        streams = [stack.enter_context(httpx.stream('POST', batched + '/v1/chat/completions', json=long, timeout=60)) for _ in range(3)]
        lines = [r.iter_lines() for r in streams]
        for it in lines: assert sum(1 for line, _ in zip(it, range(6)) if line.startswith('data: ')) >= 3
        assert active() == 3
        streams[1].close()                                   # one client leaves in the middle of its reply
        deadline = time.time() + 2
        while active() > 2 and time.time() < deadline: time.sleep(0.02)
        assert active() == 2
        for it in (lines[0], lines[2]):                      # the others go on
            assert sum(1 for line, _ in zip(it, range(40)) if line.startswith('data: {')) == 20   # 20 events, each and a blank line
        assert post(batched, CHAT).status_code == 200        # and a newcomer takes the free slot
    deadline = time.time() + 2
    while active() > 0 and time.time() < deadline: time.sleep(0.02)
    after = httpx.get(batched + '/stats').json()
    assert after['active_replies'] == 0 and after['disconnected'] - before['disconnected'] == 3


def test_clients_that_give_up_in_the_queue_lose_no_slot(folder):
    proc, url = start(folder, '--num_workers=1', '--max_batch=1', '--queue_timeout=30', '--temperature=0')
    try:
        with httpx.stream('POST', url + '/v1/chat/completions', json={**CHAT, 'max_tokens': 4096, 'stream': True}, timeout=60) as holder:
            lines = holder.iter_lines()
            next(lines)                                       # the one slot is taken
            for _ in range(5):                                # five clients give up while they wait for it
                with pytest.raises(httpx.ReadTimeout): httpx.post(url + '/v1/chat/completions', json=CHAT, timeout=httpx.Timeout(60, read=0.3))
            deadline = time.time() + 10                       # each leaves the queue once the server sees it gone
            def stats(): return httpx.get(url + '/stats').json()
            while (stats()['waiting'] or stats()['disconnected'] < 5) and time.time() < deadline: time.sleep(0.05)
            stats = stats()
            assert stats['waiting'] == 0 and stats['disconnected'] == 5
        answers = [post(url, CHAT).status_code for _ in range(3)]   # the slot came back, once, and only once
        health = httpx.get(url + '/health').json()
        assert answers == [200] * 3 and health['active_replies'] == 0 and health['idle_workers'] == 1
    finally: stop(proc)


@pytest.mark.parametrize('viewport', ['desktop', 'phone'])
def test_the_page_in_a_browser(server, browser, tmp_path, viewport):
    with new_page(browser, **({'viewport': PHONE, 'is_mobile': True, 'has_touch': True} if viewport == 'phone' else {})) as page:
        page.goto(server + '/')
        page.wait_for_function("document.getElementById('model').textContent === 'imagelm-base'")
        Image.new('RGB', (40, 40), (30, 160, 60)).save(tmp_path / 'green.png')
        page.set_input_files('#attach', str(tmp_path / 'green.png'))
        page.wait_for_selector('#attached:has-text("green.png")')
        page.fill('#message', 'Hello from a browser')
        page.click('#send')
        page.wait_for_selector('.assistant:not(.streaming)', timeout=60_000)
        page.wait_for_selector('.user img.page-thumb', timeout=30_000)
        reply = page.inner_text('.assistant')
        assert len(reply) > 0 and page.inner_text('#error') == ''
        assert page.eval_on_selector('.user img.picture', 'i => i.naturalWidth') == 40
        if viewport == 'phone':   # nothing wider than the screen
            assert page.evaluate('document.documentElement.scrollWidth') <= PHONE['width']
            assert page.is_visible('#send') and page.is_visible('#new-chat')
        page.click('.user img.page-thumb')
        assert 'expanded' in page.get_attribute('.user img.page-thumb', 'class')
        screenshot(page, f'chat_web_{viewport}')
        page.fill('#message', 'And a second message')
        page.press('#message', 'Enter')
        page.wait_for_function("document.querySelectorAll('.assistant:not(.streaming)').length === 2", timeout=60_000)
        page.click('#new-chat')
        assert page.locator('.turn').count() == 0


def test_stop_in_the_browser_ends_the_reply(server, browser):
    with new_page(browser) as page:
        page.goto(server + '/')
        page.click('summary')   # the settings
        page.fill('#max-tokens', '4096')
        page.fill('#message', 'Tell me everything')
        page.click('#send')
        page.wait_for_function("document.querySelector('.assistant') && document.querySelector('.assistant').textContent.length > 3")
        page.click('#stop')
        page.wait_for_selector('#send:not([disabled])', timeout=10_000)
        assert page.inner_text('#error') == '' and len(page.inner_text('.assistant')) < 4096
    deadline = time.time() + 2
    while httpx.get(server + '/health').json()['idle_workers'] < 2 and time.time() < deadline: time.sleep(0.05)
    assert httpx.get(server + '/health').json()['idle_workers'] == 2


def test_an_empty_message_is_refused_in_the_page(server, browser):
    with new_page(browser) as page:
        page.goto(server + '/')
        page.click('#send')
        assert page.inner_text('#error') == 'Write a message first.' and page.locator('.turn').count() == 0


def test_a_missing_checkpoint_and_an_open_host(folder, tmp_path):
    out = subprocess.run([sys.executable, '-m', 'imagelm.chat_web'], env=env(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and str(tmp_path / 'checkpoints' / 'sft') in out.stderr and 'python -m imagelm.chat_sft' in out.stderr
    proc, _ = start(folder, '--host=0.0.0.0')
    stop(proc)
    assert 'anyone who can reach this port can use the model' in proc.stderr.read()
