"""Does reading pixels pay? ImageLM against a byte GPT and a byte-patch model, at equal compute.

- imagelm: pages of pixels in (fused render-and-embed path), bytes out.
- byte_gpt: bytes in, bytes out, causal, one position per byte: the standard tokenizer-free model.
- byte_patch: ImageLM's segment format and attention, k characters per input position, but each position embeds the
  UTF-8 bytes of its k characters instead of their pixels (`imagelm.baselines.SlotByteEmbedding`).

All three are the same trunk (--depth, width 64 x depth unless --d_model), trained one after another for the same
budget: --minutes of training wall-clock each (default 10; evaluation not counted), or --flops training FLOPs each
(`imagelm.model.batch_flops`). They are scored on the same val targets: the byte spans of the first
--eval_batches val batches of the pretraining loader (held-out documents of the embedded corpus), conditioned on the
same preceding text (pages for imagelm and byte_patch, their bytes for byte_gpt). The byte GPT's rows are as long as
the longest of those val pieces in bytes (--byte_seq_len to override), so it never reads a position it did not train
on. The homoglyph table scores each model again with look-alike letters swapped into the conditioning text (targets
clean); homoglyph text is longer in bytes, and a piece that no longer fits the byte GPT's rows is read in sliding
windows (`imagelm.baselines.byte_windows`; counted as `windowed`).

Writes --out (default bench/results/compare.json): one object per model keyed imagelm, byte_gpt, byte_patch, each with
val_bpb, positions_per_char, chars_per_s, flops, minutes (and mfu_percent, steps, parameters, seq_len, the val bpb curve, the
homoglyph row, the look-alike cosines at the start and end), plus setup and corpus_hash, and the machine, git commit and
arguments that every bench result holds (bench/harness.py); and a PNG of val bpb against wall-clock (and FLOPs) beside it.

    python bench/compare.py                    # 10 minutes each, on the detected device
    python bench/compare.py --minutes 1        # a smoke test on a CPU
    python bench/compare.py --flops 2e13       # equal FLOPs instead of equal wall-clock
    python bench/compare.py --seeds 0 1 2      # each model three times; the JSON holds the mean and each seed
    python bench/compare.py --device cuda --depth 8 --minutes 10
"""
import argparse, time
from dataclasses import replace
from pathlib import Path

from imagelm.baselines import KINDS, byte_seq_len_for, val_pieces
from imagelm.corpus import load_embedded_corpus
from imagelm.dataloader import DataConfig, PretrainLoader, make_source
from imagelm.model import ModelConfig
from imagelm.optim import OptimConfig
from imagelm.render import RenderConfig, get_atlas

from harness import RESULTS, VAL_SEED, benchmark_model, budget_parser, over_seeds, plot_curves_by_time, run_line, save_result, start

THREE = ('imagelm', 'byte_gpt', 'byte_patch')


def make_parser() -> argparse.ArgumentParser:
    p = budget_parser(__doc__, 'model', 10.0, None, 'width (default 64 x depth)', 8,
                      'val batches (of --batch_rows x --seq_len) to score on', 6, str(RESULTS / 'compare.json'))
    a = p.add_argument
    a('--models', nargs='+', default=list(THREE), choices=list(KINDS),
      help='which models to run, in order (default the three; byte_patch_blank_spaces: a byte-patch model that sees '
           'spaces as empty slots, as pixels do)')
    a('--byte_seq_len', type=int, default=0, help="positions per row for byte_gpt (0: the longest val piece in bytes)")
    a('--chars_per_patch', type=int, default=RenderConfig().chars_per_patch, help='k, characters per patch (default: RenderConfig)')
    a('--positions', choices=['1d', '2d'], default=ModelConfig().positions, help='rotary positions of patches (default: ModelConfig)')
    a('--skip_blank', type=int, choices=[0, 1], default=int(ModelConfig().skip_blank),
      help='1: patches without ink (all-blank positions for byte_patch) take no position (default: ModelConfig)')
    a('--pixel_chars', type=int, default=DataConfig.pixel_chars, help=f'target characters on each page (default {DataConfig.pixel_chars})')
    a('--show_spaces', type=int, choices=[0, 1], default=int(RenderConfig().show_spaces),
      help='1: a faint dot in every space cell of the pages (default: RenderConfig). It changes which patches have '
           'ink, so the val pieces are cut differently: compare it with and without on the same pieces in ablate.py')
    a('--whiten', type=float, default=ModelConfig().whiten or 0.0,
      help="shrinkage of imagelm's glyph whitener on every patch cell (0: raw pixels; default: ModelConfig)")
    a('--patch_embed_optim', choices=['adamw', 'muon'], default=OptimConfig.patch_embed,
      help=f"imagelm's patch embedding optimizer (default {OptimConfig.patch_embed})")
    a('--homoglyph_rate', type=float, default=1.0, help='share of look-alike letters swapped for the homoglyph table (0: skip)')
    return p


def corpus_hash(data: str) -> str:
    return load_embedded_corpus().content_hash if data == 'embedded' else make_source(data, 'train').name


def main(argv=None):
    args = make_parser().parse_args(argv)
    device, autocast = start(args)
    render = RenderConfig.for_chars_per_patch(args.chars_per_patch, page_chars=args.page_chars, show_spaces=bool(args.show_spaces))
    cfg = ModelConfig(depth=args.depth, d_model=args.d_model, seq_len=args.seq_len, positions=args.positions,
                      skip_blank=bool(args.skip_blank), whiten=args.whiten or None, render=render)
    data_cfg = DataConfig.from_model(cfg, source=args.data, batch_rows=args.batch_rows, pixel_chars=args.pixel_chars,
                                     byte_chars=args.byte_chars, seed=VAL_SEED)
    get_atlas(render.cell_w, render.cell_h)
    val_loader = PretrainLoader(replace(data_cfg, split='val'), loop=False)
    val = [b for _, b in zip(range(args.eval_batches), val_loader)]; val_loader.close()
    pieces = val_pieces(val)
    byte_seq_len = args.byte_seq_len or byte_seq_len_for(pieces)
    budget = dict(flops=args.flops) if args.flops > 0 else dict(minutes=args.minutes)
    mode = 'flops' if args.flops > 0 else 'minutes'
    print(f"{len(pieces)} val pieces; {', '.join(args.models)}: depth {cfg.depth}, width {cfg.d_model}, k={render.chars_per_patch}; "
          f"rows of {cfg.seq_len} positions (byte_gpt {byte_seq_len}); budget {budget} each; {device}", flush=True)
    log = None if args.quiet else (lambda line: print('  ' + line, flush=True))
    result = {}
    for kind in args.models:
        runs = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            run = benchmark_model(kind, cfg, replace(data_cfg, seed=seed), pieces, byte_seq_len=byte_seq_len,
                                  n_evals=args.n_evals, homoglyph_rate=args.homoglyph_rate, seed=seed, device=device,
                                  optim_cfg=OptimConfig(patch_embed=args.patch_embed_optim if kind == 'imagelm' else 'adamw'),
                                  autocast=autocast, log=log, **budget)
            runs.append(run)
            print(run_line(kind, seed, run, time.perf_counter() - t0), flush=True)
        result[kind] = over_seeds(runs, args.seeds)
        if len(runs) > 1: print(f"{kind:10s} mean val bpb {result[kind]['val_bpb']:.4f} ± {result[kind]['val_bpb_std']:.4f} "
                                f"over seeds {args.seeds}", flush=True)
    result.update(mode=mode, budget=budget, corpus_hash=corpus_hash(args.data), models=list(args.models),
                  setup=dict(device=device, d_model=cfg.d_model, n_head=cfg.n_head, byte_seq_len=byte_seq_len, val_pieces=len(pieces)))
    out = Path(args.out)
    save_result(result, out, args, device)
    png = out.with_suffix('.png')
    what = f'{args.flops:.3g} FLOPs' if mode == 'flops' else f'{args.minutes:g} min'
    plot_curves_by_time({k: result[k] for k in args.models}, png, f'depth {cfg.depth}, width {cfg.d_model}, {what} each')
    print(f'wrote {out} and {png}')
    return result


if __name__ == '__main__':
    main()
