"""Sampling speed: the KV-cache engine against the naive sampler that recomputes the whole sequence for every byte.

Both decode greedily, with stopping disabled, from the same random model (output projections perturbed so that every
layer reads the context) and the same prompt: `<|bos|>`, a page of the first 1,000 characters of a real document of
the embedded corpus, then `<|continue|>`. The engine prefills the page once and then runs one position per byte; the
naive sampler packs, renders and runs the whole sequence for every byte. Both produce the same bytes, and the script
checks that they do.

    python bench/sample.py [--depth 4] [--max_tokens 256] [--prompt_chars 1000] [--device cpu] [--threads N]

Prints bytes per second for each (the time of the whole generation, prefill included; the engine's decode-only rate
and prefill time are reported too) and writes bench/results/sample.json. Both are timed best-of, so that other work on
the machine skews them alike: the engine's run is the best of a few, and each step of the naive sampler (one
`naive_logits` call over the whole sequence) the best of two. The load average is recorded too.
"""
import argparse, os, time
from pathlib import Path

import torch

from imagelm.corpus import load_embedded_corpus
from imagelm.engine import Engine, naive_generate, naive_logits
from imagelm.model import ImageLM, ModelConfig, randomize_output_projections
from imagelm.segments import Bytes, Pixels, special

from harness import save_result


def random_model(cfg: ModelConfig, device: str, seed: int = 0) -> ImageLM:
    "A model whose zero-initialised output projections are perturbed, so that its bytes depend on the whole context."
    torch.manual_seed(seed)
    return randomize_output_projections(ImageLM(cfg)).to(device).eval()


def timed(fn):
    start = time.perf_counter(); out = fn(); return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--depth', type=int, default=4, help='model depth; it sets the width as in ModelConfig (default 4)')
    parser.add_argument('--max_tokens', type=int, default=256, help='bytes to generate (default 256)')
    parser.add_argument('--prompt_chars', type=int, default=1000, help='characters of the rendered prompt page (default 1000)')
    parser.add_argument('--seq_len', type=int, default=1024, help='context length of the model (default 1024)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda (default cpu)')
    parser.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument('--repeats', type=int, default=2, help='engine runs before and after the naive run; the best counts (default 2)')
    parser.add_argument('--naive_repeats', type=int, default=2, help='timings of each naive step; the best counts (default 2)')
    parser.add_argument('--check_oracle', action='store_true', help='also run naive_generate once and check it gives the same bytes')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'sample.json'), help='output JSON path')
    args = parser.parse_args()
    if args.depth < 1 or args.max_tokens < 1 or args.prompt_chars < 1: parser.error('--depth, --max_tokens and --prompt_chars must be >= 1')
    if args.repeats < 1 or args.naive_repeats < 1: parser.error('--repeats and --naive_repeats must be >= 1')
    if args.device.startswith('cuda') and not torch.cuda.is_available(): parser.error('--device cuda given, but CUDA is not available')
    if args.threads: torch.set_num_threads(args.threads)

    corpus = load_embedded_corpus()
    text = next((d for d in corpus.train if len(d) >= args.prompt_chars), None)
    if text is None: parser.error(f'no corpus document has {args.prompt_chars} characters')
    text = text[:args.prompt_chars]
    prompt = [Bytes([special('<|bos|>')]), Pixels(text), Bytes([special('<|continue|>')])]
    cfg = ModelConfig(depth=args.depth, seq_len=args.seq_len)
    model = random_model(cfg, args.device)
    engine = Engine(model)
    n_prompt = engine.count_positions(prompt)
    if n_prompt + args.max_tokens > cfg.seq_len:
        parser.error(f'the prompt takes {n_prompt} positions; with {args.max_tokens} new bytes that exceeds --seq_len={cfg.seq_len}')
    greedy = dict(temperature=0.0, stop_ids=())

    engine.generate(prompt, max_tokens=4, **greedy); naive_generate(model, prompt, max_tokens=2, **greedy)   # warm-up
    load_before = os.getloadavg()[0]
    # Both sides are timed best-of, so that other work on the machine skews them alike: the engine's whole run is short,
    # best of a few before and after the naive one; the naive sampler's steps are long, each timed twice, best kept.
    engine_runs = [timed(lambda: engine.generate(prompt, max_tokens=args.max_tokens, **greedy)) for _ in range(args.repeats)]
    naive_out, naive_s = [], 0.0
    for _ in range(args.max_tokens):
        segments = prompt + ([Bytes(naive_out)] if naive_out else [])
        logits, step_s = min((timed(lambda: naive_logits(model, segments)) for _ in range(args.naive_repeats)), key=lambda r: r[1])
        naive_out.append(int(logits.argmax(-1)[0])); naive_s += step_s
    engine_runs += [timed(lambda: engine.generate(prompt, max_tokens=args.max_tokens, **greedy)) for _ in range(args.repeats)]
    (engine_out,), engine_s = min(engine_runs, key=lambda r: r[1])
    prefill_s = min(timed(lambda: (engine.reset(), engine.feed(prompt), engine.logits[0, 0].item()))[1] for _ in range(args.repeats))
    if args.check_oracle: assert naive_out == naive_generate(model, prompt, max_tokens=args.max_tokens, **greedy)
    n = args.max_tokens
    result = {
        'engine_bytes_per_s': n / engine_s,
        'naive_bytes_per_s': n / naive_s,
        'speedup': naive_s / engine_s,
        'engine_decode_bytes_per_s': (n - 1) / max(engine_s - prefill_s, 1e-9),   # the first byte comes from the prefill
        'engine_prefill_s': prefill_s,
        'outputs_equal': engine_out == naive_out,
        'generated_bytes': n,
        'prompt_chars': len(text),
        'prompt_positions': n_prompt,
        'torch_threads': torch.get_num_threads(),
        'device': args.device,
        'load_average_1min': [load_before, os.getloadavg()[0]],   # before and after: other work on the machine skews the figures
        'model_config': cfg.to_dict(),
        'corpus_hash': corpus.content_hash,
    }
    print(f"engine {result['engine_bytes_per_s']:9.1f} bytes/s  (prefill {prefill_s * 1000:.0f} ms for {n_prompt} positions, "
          f"then {result['engine_decode_bytes_per_s']:.1f} bytes/s)")
    print(f"naive  {result['naive_bytes_per_s']:9.1f} bytes/s  (the whole sequence for every byte)")
    print(f"speedup {result['speedup']:.1f}x on depth {cfg.depth}, {n} bytes, {args.device}, {torch.get_num_threads()} threads; "
          f"identical bytes: {result['outputs_equal']}")
    save_result(result, args.out, args, args.device)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
