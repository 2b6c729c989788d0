"""The chat server under load: aggregate bytes/s and time to the first byte (p50, p99) with 1, 4 and 16 concurrent
clients, and each figure's ratio to one client, for several server setups: workers x CPU threads per worker x
replies each worker decodes at once (--max_batch; 1 is one reply at a time). The server is `python -m imagelm.chat_web`
in its own process, over a checkpoint of the CPU preset's shape (2 steps of training: the speed of a model does not
depend on its weights); each client streams replies one after the other for --seconds, all greedy and --max_tokens
long at most. Writes bench/results/serve.json and serve.log.

    python bench/serve.py                                   # setups 1x1x8 1x2x8 2x1x8 1x1x1
    python bench/serve.py --setups 1x1x8 --clients 1 4 16 --seconds 30
"""
import argparse, asyncio, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import httpx

from harness import RESULTS, save_result

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))
from browser import free_port, stop, wait_for_http   # noqa: E402  (the tests' server helpers)


def quantile(values: list, q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def client(url: str, until: float, max_tokens: int, i: int, replies: list):
    "Stream replies one after the other until `until`: for each, the time to its first byte of text and its bytes."
    body = {'model': 'imagelm-base', 'stream': True, 'max_tokens': max_tokens, 'temperature': 0}
    async with httpx.AsyncClient(timeout=300) as http:
        n = 0
        while time.perf_counter() < until:
            sent, first, written = time.perf_counter(), None, 0
            messages = [{'role': 'user', 'content': f'Client {i}, question {n}: what is {i + n} plus {n}?'}]
            async with http.stream('POST', url + '/v1/chat/completions', json={**body, 'messages': messages}) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith('data: {'): continue
                    choices = json.loads(line[6:])['choices']
                    text = choices[0]['delta'].get('content', '') if choices else ''
                    if text and first is None: first = time.perf_counter() - sent
                    written += len(text.encode('utf-8'))
            replies.append({'first_byte_s': first, 'bytes': written, 'seconds': time.perf_counter() - sent})
            n += 1


async def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    replies, started = [], time.perf_counter()
    await asyncio.gather(*(client(url, started + seconds, max_tokens, i, replies) for i in range(clients)))
    wall = time.perf_counter() - started
    firsts = [r['first_byte_s'] for r in replies if r['first_byte_s'] is not None]
    return {'clients': clients, 'replies': len(replies), 'wall_s': round(wall, 2),
            'bytes_per_s': round(sum(r['bytes'] for r in replies) / wall, 1),
            'mean_reply_bytes': round(statistics.fmean(r['bytes'] for r in replies), 1),
            'first_byte_p50_s': round(quantile(firsts, 0.5), 3), 'first_byte_p99_s': round(quantile(firsts, 0.99), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--seconds', type=float, default=15.0, help='length of each load level (default 15)')
    parser.add_argument('--clients', type=int, nargs='+', default=[1, 4, 16], help='concurrent clients of each level')
    parser.add_argument('--setups', nargs='+', default=['1x1x8', '1x2x8', '2x1x8', '1x1x1'],
                        help='server setups, each workers x threads x max_batch (default 1x1x8 1x2x8 2x1x8 1x1x1)')
    parser.add_argument('--max_tokens', type=int, default=128, help='most bytes of a reply (default 128)')
    parser.add_argument('--out', default=str(RESULTS / 'serve.json'), help='JSON to write; the log goes beside it')
    args = parser.parse_args()
    env = {**os.environ, 'IMAGELM_BASE_DIR': tempfile.mkdtemp(), 'PYTHONUNBUFFERED': '1'}
    made = subprocess.run([sys.executable, '-m', 'imagelm.base_train', '--preset=cpu', '--run=serve', '--num_iterations=2',
                           '--eval_batches=1', '--sample_every=0'], env=env, capture_output=True, text=True)
    if made.returncode: sys.exit(f'the checkpoint could not be made:\n{made.stderr[-2000:]}')
    result, log = {'setups': {}}, []
    for setup in args.setups:
        workers, threads, max_batch = (int(n) for n in setup.split('x'))
        port = free_port()
        server = subprocess.Popen([sys.executable, '-m', 'imagelm.chat_web', '--stage=base', f'--port={port}', f'--num_workers={workers}',
                                   f'--threads={threads}', f'--max_batch={max_batch}', '--queue_timeout=600', '--max_waiting=1000'],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        url = f'http://127.0.0.1:{port}'
        try:
            wait_for_http(url + '/health', 120, server)
            asyncio.run(load(url, 1, 2.0, args.max_tokens))   # warm up
            levels = [asyncio.run(load(url, n, args.seconds, args.max_tokens)) for n in args.clients]
        finally: stop(server)
        one = levels[0]
        for level in levels:
            level['bytes_per_s_vs_one_client'] = round(level['bytes_per_s'] / one['bytes_per_s'], 2)
            level['first_byte_p50_vs_one_client'] = round(level['first_byte_p50_s'] / one['first_byte_p50_s'], 2)
            line = (f"{workers} worker(s) x {threads} thread(s) x batch {max_batch}, {level['clients']:>2} clients: "
                    f"{level['bytes_per_s']:7.1f} bytes/s ({level['bytes_per_s_vs_one_client']:.2f}x one client), first byte p50 "
                    f"{level['first_byte_p50_s']:.3f} s, p99 {level['first_byte_p99_s']:.3f} s, {level['replies']} replies of "
                    f"{level['mean_reply_bytes']:.0f} bytes")
            print(line, flush=True); log.append(line)
        result['setups'][setup] = {'workers': workers, 'threads': threads, 'max_batch': max_batch, 'levels': levels}
    path = save_result(result, args.out, args)
    path.with_suffix('.log').write_text('\n'.join(log) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
