"""Ablations of ImageLM's own choices, each variant trained for the same wall-clock and scored on the same val bpb.

Variants (each changes one thing from `base`):
- base: k=4 characters per patch, 1-D rotary positions, AdamW on the patch embedding, pages of ~256 characters,
  blank patches kept;
- k2, k8: 2 or 8 characters per patch;
- pos2d: 2-D rotary positions (row, column) for patches (ModelConfig.positions='2d');
- muon_patch: Muon instead of AdamW on the patch embedding (setup_optimizers(patch_embed='muon'));
- pixel_chars_128, pixel_chars_512: shorter or longer pages in pretraining (DataConfig.pixel_chars);
- skip_blank: patches without ink take no position (ModelConfig.skip_blank / DataConfig.skip_blank);
- show_spaces: a faint dot in every space cell, so a space differs from an empty cell (RenderConfig.show_spaces);
- whiten: every patch cell whitened by the ASCII glyphs' pixel statistics (ModelConfig.whiten=1e-3, 02_patch_embed);
- patch_lr_x0.25, patch_lr_x4, patch_lr_x16: the patch embedding's learning rate scaled;
- combinations, named by joining single changes with '+' (e.g. skip_blank+k8): the winners together.

Every variant is scored on the same targets with the same conditioning text: the pieces of val batches that the base
loader cuts into rows of --seq_len / 2 positions (so that the same pieces, drawn at k=2, still fit one row),
re-rendered with each variant's own render config. The default width is 144 (2 heads of 72), the width every committed
ablation ran at, so that new variants compare with the old ones; nothing else requires it.

Writes --out (default bench/results/ablate.json): one object per variant keyed by its name (val_bpb,
positions_per_char, chars_per_s, flops, minutes, steps, the curve, and its settings), plus setup and corpus_hash, and
the machine, git commit and arguments that every bench result holds; and a PNG beside it.

    python bench/ablate.py                       # every variant, 3 minutes each
    python bench/ablate.py --variants base k2 k8 --minutes 5
    python bench/ablate.py --variants base skip_blank+k8+pos2d --seeds 1 2
"""
import argparse, time
from dataclasses import replace
from pathlib import Path

from imagelm.baselines import val_pieces
from imagelm.corpus import load_embedded_corpus
from imagelm.dataloader import DataConfig, PretrainLoader, make_source
from imagelm.model import ModelConfig
from imagelm.optim import OptimConfig
from imagelm.render import RenderConfig, get_atlas

from harness import RESULTS, VAL_SEED, benchmark_model, budget_parser, over_seeds, run_line, save_result, start

VARIANTS = {
    'base': {},
    'k2': dict(chars_per_patch=2),
    'k8': dict(chars_per_patch=8),
    'pos2d': dict(positions='2d'),
    'muon_patch': dict(patch_embed='muon'),
    'pixel_chars_128': dict(pixel_chars=128),
    'pixel_chars_512': dict(pixel_chars=512),
    'skip_blank': dict(skip_blank=True),
    'show_spaces': dict(show_spaces=True),
    'whiten': dict(whiten=1e-3),
    'patch_lr_x0.25': dict(patch_lr_scale=0.25),
    'patch_lr_x4': dict(patch_lr_scale=4.0),
    'patch_lr_x16': dict(patch_lr_scale=16.0),
}
COMBINATIONS = ['skip_blank+k8', 'skip_blank+pos2d', 'skip_blank+k8+pos2d', 'skip_blank+k8+pos2d+muon_patch']


def variant(name: str) -> str:
    "Check a variant name: one of VARIANTS, or several of them joined by '+', each changing a different setting."
    parts = name.split('+')
    unknown = [part for part in parts if part not in VARIANTS or part == 'base']
    if unknown and name != 'base':
        raise argparse.ArgumentTypeError(f"unknown variant {'+'.join(unknown)!r} in {name!r}: use base, one of "
                                         f"{', '.join(v for v in VARIANTS if v != 'base')}, or several joined by '+'")
    changed = [key for part in parts for key in VARIANTS[part]]
    if len(changed) != len(set(changed)):
        raise argparse.ArgumentTypeError(f'{name!r} changes the same setting twice')
    return name


def make_parser() -> argparse.ArgumentParser:
    p = budget_parser(__doc__, 'variant', 3.0, 144, 'width (default 144: 2 heads of 72, divisible into 2-D rotary sections)',
                      16, 'val batches of --batch_rows x --seq_len/2 to cut the val pieces from', 4, str(RESULTS / 'ablate.json'))
    a = p.add_argument
    a('--variants', nargs='+', type=variant, default=list(VARIANTS) + COMBINATIONS,
      help="which variants to run, in order: base, single changes, or single changes joined by '+' (default: all "
           "single changes, then the combinations of the winners)")
    a('--chars_per_patch', type=int, default=4, help='k of the base variant')
    a('--pixel_chars', type=int, default=DataConfig.pixel_chars, help='page length of the base variant (and of the val pieces)')
    return p


def settings(args, name: str) -> dict:
    "The settings of variant `name`: the base ones from the flags, with the variant's change."
    base = dict(chars_per_patch=args.chars_per_patch, positions='1d', patch_embed='adamw', pixel_chars=args.pixel_chars,
                skip_blank=False, show_spaces=False, whiten=None, patch_lr_scale=1.0)
    return {**base, **{k: v for part in name.split('+') for k, v in VARIANTS[part].items()}}


def configs(args, s: dict, seed: int) -> tuple:
    render = RenderConfig.for_chars_per_patch(s['chars_per_patch'], page_chars=args.page_chars, show_spaces=s['show_spaces'])
    cfg = ModelConfig(depth=args.depth, d_model=args.d_model, seq_len=args.seq_len, positions=s['positions'],
                      skip_blank=s['skip_blank'], whiten=s['whiten'], render=render)
    data_cfg = DataConfig.from_model(cfg, source=args.data, batch_rows=args.batch_rows, pixel_chars=s['pixel_chars'],
                                     byte_chars=args.byte_chars, seed=seed)
    return cfg, data_cfg


def plot(runs: dict, path: Path, title: str):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 3.8))
    axs = fig.subplots(1, 2)
    for name, run in runs.items():
        seconds, _, _, bpb = zip(*run['curve'])
        axs[0].plot([s / 60 for s in seconds], bpb, 'o-', ms=3, label=name)
    axs[0].set(xlabel='training wall-clock (minutes)', ylabel='val bits per byte', title=title)
    axs[0].legend(fontsize=7); axs[0].grid(alpha=.3)
    names = list(runs)
    axs[1].barh(names, [runs[n]['val_bpb'] for n in names], color=['tab:gray' if n == 'base' else 'tab:blue' for n in names])
    lo = min(runs[n]['val_bpb'] for n in names)
    axs[1].set(xlabel='final val bits per byte (lower is better)', xlim=(lo * 0.97, None), title='at the end of the budget')
    axs[1].invert_yaxis()
    for i, n in enumerate(names): axs[1].text(runs[n]['val_bpb'], i, f" {runs[n]['val_bpb']:.3f}", va='center', fontsize=7)
    fig.tight_layout(); fig.savefig(path, dpi=110)


def main(argv=None):
    args = make_parser().parse_args(argv)
    device, autocast = start(args)
    base_cfg, base_data = configs(args, settings(args, 'base'), VAL_SEED)
    get_atlas(base_cfg.render.cell_w, base_cfg.render.cell_h)
    half = replace(base_data, split='val', seq_len=args.seq_len // 2)
    val_loader = PretrainLoader(half, loop=False)
    pieces = val_pieces([b for _, b in zip(range(args.eval_batches), val_loader)]); val_loader.close()
    budget = dict(flops=args.flops) if args.flops > 0 else dict(minutes=args.minutes)
    print(f"{len(pieces)} val pieces; variants {', '.join(args.variants)}; depth {args.depth}, width {args.d_model}; "
          f"budget {budget} each; {device}", flush=True)
    log = None if args.quiet else (lambda line: print('  ' + line, flush=True))
    result = {}
    for name in args.variants:
        s = settings(args, name)
        runs = []
        for seed in args.seeds:
            cfg, data_cfg = configs(args, s, seed)
            t0 = time.perf_counter()
            run = benchmark_model('imagelm', cfg, data_cfg, pieces, n_evals=args.n_evals, seed=seed, device=device,
                                  optim_cfg=OptimConfig(patch_embed=s['patch_embed'], patch_lr_scale=s['patch_lr_scale']),
                                  autocast=autocast, log=log, **budget)
            run['settings'] = s
            runs.append(run)
            print(run_line(name, seed, run, time.perf_counter() - t0), flush=True)
        result[name] = over_seeds(runs, args.seeds)
        if len(runs) > 1: print(f"{name:16s} mean val bpb {result[name]['val_bpb']:.4f} ± {result[name]['val_bpb_std']:.4f}",
                                flush=True)
    targets = {result[n]['val_targets'] for n in args.variants}
    if len(targets) != 1: raise RuntimeError(f'the variants were scored on different numbers of target bytes: {targets}')
    corpus = load_embedded_corpus().content_hash if args.data == 'embedded' else make_source(args.data, 'train').name
    result.update(mode='flops' if args.flops > 0 else 'minutes', budget=budget, corpus_hash=corpus, variants=list(args.variants),
                  setup=dict(device=device, val_pieces=len(pieces), val_targets=targets.pop()))
    out = Path(args.out)
    save_result(result, out, args, device)
    png = out.with_suffix('.png')
    what = f'{args.flops:.3g} FLOPs' if args.flops > 0 else f'{args.minutes:g} min'
    plot({n: result[n] for n in args.variants}, png, f'ImageLM ablations, depth {args.depth}, {what} each')
    print(f'wrote {out} and {png}')
    return result


if __name__ == '__main__':
    main()
