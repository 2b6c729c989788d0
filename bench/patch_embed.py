"""Patch embedding speed: the fused render-and-embed path against the explicit one.

Both embed the same batch of laid-out corpus text (rows x patches, plain) to d_model and backpropagate the same output
gradient into the weight. The explicit path draws the patch pixels (`packed_patches`) and multiplies them by the
weight; the fused path takes the slot glyph ids (`packed_slot_glyphs`), builds the per-(slot, glyph) table from the
atlas and the weight, and sums k table rows per patch. Per k it reports:

- explicit_ms / fused_ms: producing the input from the laid-out batch (pixels / glyph ids) + forward + backward;
- explicit_embed_ms / fused_embed_ms: forward + backward alone, the input made beforehand;
- layout_ms: `render_batch` (layout and glyph grid), which both paths share and neither figure includes.

Every figure is the fastest of --repeats runs, the two paths interleaved so that a busy machine slows both alike.
Run it on an idle machine: when other processes compete for the cores, torch's parallel sections stall, and the fused
path, made of short memory-bound parallel kernels, suffers most (its figures can swing several-fold). `--threads 1`
gives steadier figures on a shared machine.

    python bench/patch_embed.py [--ks 2 4 8] [--d_model 768] [--rows 16] [--patches 1024] [--repeats 15] [--device cpu]

Writes bench/results/patch_embed.json.
"""
import argparse, time
from pathlib import Path

import torch

from imagelm.corpus import load_embedded_corpus
from imagelm.patch_embed import PatchEmbedding
from imagelm.render import RenderConfig, render_batch

from harness import save_result


def corpus_rows(text: str, cfg: RenderConfig, rows: int, patches: int, device) -> tuple:
    "Lay out `rows` consecutive slices of `text`, each long enough to fill exactly `patches` patches; and the layout time."
    chars = 2 * patches * cfg.chars_per_patch
    while True:
        texts = [text[i * chars:(i + 1) * chars] for i in range(rows)]
        start = time.perf_counter()
        batch = render_batch(texts, cfg, max_patches=patches, device=device)
        layout_s = time.perf_counter() - start
        if (batch.n_patches == patches).all(): return batch, layout_s
        if (rows + 1) * chars > len(text): raise ValueError(f'the corpus is too short for {rows} rows of {patches} patches')
        chars *= 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ks', type=int, nargs='+', default=[2, 4, 8], help='characters per patch to measure (default 2 4 8)')
    parser.add_argument('--d_model', type=int, default=768, help='embedding width (default 768)')
    parser.add_argument('--rows', type=int, default=16, help='rows (pages) per batch (default 16)')
    parser.add_argument('--patches', type=int, default=1024, help='patches per row (default 1024)')
    parser.add_argument('--repeats', type=int, default=15, help='timed runs of each path; the fastest is kept (default 15)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda (default cpu)')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'patch_embed.json'), help='output JSON path')
    args = parser.parse_args()
    if min(args.ks + [args.d_model, args.rows, args.patches, args.repeats]) < 1:
        parser.error('--ks, --d_model, --rows, --patches and --repeats must be >= 1')
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    corpus = load_embedded_corpus()
    text = '\n'.join(corpus.train)
    results = {}
    for k in args.ks:
        cfg = RenderConfig(patch_w=8 * k, page_chars=k * max(1, 64 // k))        # a 64-character page, or near
        if args.patches % cfg.patches_per_row:
            parser.error(f'--patches must be a multiple of the {cfg.patches_per_row} patches of a line at k={k}')
        corpus_rows(text, cfg, 1, cfg.patches_per_row, device)                     # warm the atlas and the layout code
        batch, layout_s = corpus_rows(text, cfg, args.rows, args.patches, device)
        assert batch.plain
        torch.manual_seed(0)
        embedding = PatchEmbedding(cfg, args.d_model).to(device)
        output_grad = torch.randn(args.rows * args.patches, args.d_model, device=device)
        pixels, slot_glyphs = batch.packed_patches(), batch.packed_slot_glyphs()

        def step(embed):
            embedding.weight.grad = None
            embed().backward(output_grad)
            sync()

        paths = {
            'explicit_ms': lambda: step(lambda: embedding(batch.packed_patches())),
            'fused_ms': lambda: step(lambda: embedding.forward_glyphs(batch.packed_slot_glyphs(), batch.atlas)),
            'explicit_embed_ms': lambda: step(lambda: embedding(pixels)),
            'fused_embed_ms': lambda: step(lambda: embedding.forward_glyphs(slot_glyphs, batch.atlas)),
        }
        best = {name: float('inf') for name in paths}
        for run in paths.values(): run()                                            # warm-up
        for _ in range(args.repeats):
            for name, run in paths.items():
                start = time.perf_counter(); run(); best[name] = min(best[name], time.perf_counter() - start)
        figures = {name: 1e3 * seconds for name, seconds in best.items()}
        results[f'k={k}'] = {
            'k': k, **figures,
            'speedup': figures['explicit_ms'] / figures['fused_ms'],
            'embed_speedup': figures['explicit_embed_ms'] / figures['fused_embed_ms'],
            'layout_ms': 1e3 * layout_s,
            'slots': cfg.slots_per_patch,
            'unique_glyphs': len(torch.unique(slot_glyphs)),
            'patch_pixels': pixels.shape[1],
        }
        r = results[f'k={k}']
        print(f"k={k}: explicit {r['explicit_ms']:7.1f} ms  fused {r['fused_ms']:6.1f} ms  speedup {r['speedup']:5.1f}x   "
              f"(embedding alone: {r['explicit_embed_ms']:.1f} vs {r['fused_embed_ms']:.1f} ms, "
              f"{r['embed_speedup']:.1f}x; layout {r['layout_ms']:.1f} ms; {r['unique_glyphs']} distinct glyphs)")

    report = {
        **results,
        'torch_threads': torch.get_num_threads(), 'device': str(device), 'd_model': args.d_model,
        'patches': args.rows * args.patches, 'rows': args.rows, 'patches_per_row': args.patches, 'repeats': args.repeats,
        'target': 'fused at least 5x cheaper than explicit at k=4',
        'corpus_hash': corpus.content_hash,
    }
    save_result(report, args.out, args, device)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
