"""Rendering speed: ImageLM's glyph-atlas gather against drawing with PIL's ImageDraw.

Both render the same real documents of the embedded corpus to the same patch tensors (slot-by-slot patch vectors,
uint8 ink) on the same cell grid and page size. Both use ImageLM's layout (where each character goes), so the
comparison is of drawing: an atlas gather for a batch, against PIL drawing each character at its cell, one document at
a time. A second PIL figure draws each line as one string, which is faster but not grid-exact (PIL advances 7.83 px
per character at this size, not 8).

    python bench/render.py [--docs 500] [--batch 64] [--repeats 5] [--device cpu]

Prints characters per second for each and writes bench/results/render.json.
"""
import argparse, time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from imagelm.corpus import load_embedded_corpus
from imagelm.render import RenderConfig, font_path, get_atlas, layout, render_batch

from harness import save_result


def pil_patches(text: str, cfg: RenderConfig, font, per_line: bool = False) -> torch.Tensor:
    "The reference: lay out, draw with PIL on a page image, cut the page into slot-by-slot patch vectors."
    lay = layout(text, cfg)
    page = Image.new('L', (cfg.page_w, lay.n_lines * cfg.cell_h), 0)
    draw = ImageDraw.Draw(page)
    drawn = lay.glyph > 0
    chars = [ch for ch, d in zip(lay.text[:lay.n_kept], drawn) if d]
    lines, cols = lay.line[drawn].tolist(), lay.col[drawn].tolist()
    if per_line:
        rows = {}
        for ch, line, col in zip(chars, lines, cols): rows.setdefault(line, [' '] * cfg.page_chars)[col] = ch
        for line, row in rows.items(): draw.text((0, line * cfg.cell_h), ''.join(row), font=font, fill=255)
    else:
        for ch, line, col in zip(chars, lines, cols): draw.text((col * cfg.cell_w, line * cfg.cell_h), ch, font=font, fill=255)
    pixels = torch.from_numpy(np.array(page))
    return rearrange(pixels, '(p l h) (q k w) -> (p q) (l k h w)', l=cfg.lines_per_patch, k=cfg.chars_per_patch,
                     h=cfg.cell_h, w=cfg.cell_w)


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--docs', type=int, default=500, help='number of corpus documents to render (default 500)')
    parser.add_argument('--batch', type=int, default=64, help='documents per atlas batch (default 64)')
    parser.add_argument('--repeats', type=int, default=5, help='timing repeats; the best is kept (default 5)')
    parser.add_argument('--device', default='cpu', help='device for the atlas gather: cpu or cuda (default cpu)')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'render.json'), help='output JSON path')
    args = parser.parse_args()
    if args.docs < 1 or args.batch < 1 or args.repeats < 1:
        parser.error('--docs, --batch and --repeats must be >= 1')

    cfg = RenderConfig()
    start = time.perf_counter(); atlas = get_atlas(cfg.cell_w, cfg.cell_h); atlas_build_s = time.perf_counter() - start
    corpus = load_embedded_corpus()
    docs = corpus.train[:args.docs]
    n_chars = sum(map(len, docs))
    font = ImageFont.truetype(str(font_path(0)), atlas.font_size)
    sync = torch.cuda.synchronize if args.device.startswith('cuda') else (lambda: None)

    def atlas_run():
        out = [render_batch(docs[i:i + args.batch], cfg, device=args.device).packed_patches()
               for i in range(0, len(docs), args.batch)]
        sync()
        return out

    atlas_out = torch.cat(atlas_run()).cpu()          # warm-up, and the output to compare
    atlas_s = best_time(atlas_run, args.repeats)
    pil_out = torch.cat([pil_patches(d, cfg, font) for d in docs])
    pil_s = best_time(lambda: [pil_patches(d, cfg, font) for d in docs], 1)
    pil_line_s = best_time(lambda: [pil_patches(d, cfg, font, per_line=True) for d in docs], 1)

    result = {
        'atlas_chars_per_s': n_chars / atlas_s,
        'pil_chars_per_s': n_chars / pil_s,
        'speedup': pil_s / atlas_s,
        'pil_line_strings_chars_per_s': n_chars / pil_line_s,
        'speedup_vs_line_strings': pil_line_s / atlas_s,
        'pixel_agreement': (atlas_out == pil_out).float().mean().item(),
        'patches_per_char': atlas_out.shape[0] / n_chars,
        'atlas_build_s': atlas_build_s,
        'atlas_rows': len(atlas),
        'torch_threads': torch.get_num_threads(),
        'device': args.device,
        'docs': len(docs), 'chars': n_chars, 'batch': args.batch,
        'config': cfg.__dict__,
        'corpus_hash': corpus.content_hash,
    }
    print(f"atlas  {result['atlas_chars_per_s'] / 1e6:8.2f}M chars/s  (batches of {args.batch} docs, {args.device})")
    print(f"PIL    {result['pil_chars_per_s'] / 1e6:8.3f}M chars/s  (per character on the cell grid)")
    print(f"PIL    {result['pil_line_strings_chars_per_s'] / 1e6:8.3f}M chars/s  (one string per line, not grid-exact)")
    print(f"speedup {result['speedup']:.0f}x (vs line strings {result['speedup_vs_line_strings']:.0f}x); "
          f"identical pixels {result['pixel_agreement']:.2%}; {result['patches_per_char']:.3f} patches per character")
    save_result(result, args.out, args, args.device)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
