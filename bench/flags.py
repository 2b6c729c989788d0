"""What bench/compare.py and bench/ablate.py share: the budget, model, data and device flags, the start-up, MFU, and
the mean over seeds."""
import argparse, statistics, sys

import torch

from imagelm.baselines import autocast_for
from imagelm.train import autodetect_device, peak_flops


def budget_parser(doc: str, what: str, minutes: float, d_model, d_model_help: str, eval_batches: int, eval_help: str,
                  n_evals: int, out: str) -> argparse.ArgumentParser:
    "A parser with the shared flags; `what` names the things trained one after another ('model', 'variant')."
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--minutes', type=float, default=minutes, help=f'training wall-clock budget of each {what}, in minutes (default {minutes:g})')
    a('--flops', type=float, default=0.0, help=f'equal-FLOPs mode: training FLOPs budget of each {what} (replaces --minutes)')
    a('--depth', type=int, default=2, help='transformer layers (default 2)')
    a('--d_model', type=int, default=d_model, help=d_model_help)
    a('--seq_len', type=int, default=512, help='positions per row of the page-reading models')
    a('--batch_rows', type=int, default=8, help='rows per batch')
    a('--page_chars', type=int, default=64, help='characters per rendered line')
    a('--byte_chars', type=int, default=128, help='target characters in each byte span')
    a('--data', default='embedded', help="'embedded', 'parquet' or a folder of parquet shards")
    a('--eval_batches', type=int, default=eval_batches, help=eval_help)
    a('--n_evals', type=int, default=n_evals, help='val evaluations along the way (for the curve), plus one at the end')
    a('--device', default=None, help='cpu, cuda or mps (default: detected)')
    a('--dtype', choices=['float32', 'bfloat16'], default=None, help='autocast dtype (default bf16 on cuda, float32 elsewhere)')
    a('--threads', type=int, default=0, help='torch threads on CPU (0: torch default)')
    a('--seeds', type=int, nargs='+', default=[0],
      help=f'seeds of weights, data order (and homoglyph places); each {what} is trained once per seed and the JSON '
           'holds the mean and each seed (default: 0)')
    a('--out', default=out, help='JSON to write; the PNG goes beside it')
    a('--quiet', action='store_true', help='no per-step lines')
    return p


VAL_SEED = 0   # the val pieces are cut with this data seed whatever the training seeds, so every run scores the same targets
FIGURES = ('val_bpb', 'positions_per_char', 'chars_per_s', 'flops', 'minutes', 'steps', 'mfu_percent')


def over_seeds(runs: list, seeds: list) -> dict:
    """One result from runs that differ only in their seed: the mean of each figure, the spread of val bpb, each seed's
    own figures under `seeds`, and the mean curve (each seed's evaluations fall at the same fractions of the budget)."""
    result = dict(runs[0])
    for key in FIGURES: result[key] = statistics.fmean(r[key] for r in runs)
    bpbs = [r['val_bpb'] for r in runs]
    result['val_bpb_std'] = statistics.stdev(bpbs) if len(runs) > 1 else 0.0
    result['seeds'] = [dict({k: r[k] for k in FIGURES}, seed=s, curve=r['curve']) for s, r in zip(seeds, runs)]
    if len({len(r['curve']) for r in runs}) == 1:
        result['curve'] = [[statistics.fmean(col) for col in zip(*points)] for points in zip(*(r['curve'] for r in runs))]
    if 'homoglyph' in runs[0]:
        result['homoglyph'] = {k: statistics.fmean(r['homoglyph'][k] for r in runs) for k in runs[0]['homoglyph']}
    if 'look_alikes' in runs[0]:
        result['look_alikes'] = {when: {k: statistics.fmean(r['look_alikes'][when][k] for r in runs) for k in row}
                                 for when, row in runs[0]['look_alikes'].items()}
    return result


def look_alikes(run: dict) -> str:
    "The mean cosine of the look-alike pairs' input vectors at the start and end of a run, for its one-line summary."
    start, end = run['look_alikes']['start']['mean'], run['look_alikes']['end']['mean']
    return f"look-alike cos {start:.2f} -> {end:.2f}"


def add_mfu(run: dict, peak: float) -> dict:
    "Add `mfu_percent` to a benchmark run: its training FLOPs per second of training wall-clock, against `peak` FLOP/s."
    run['mfu_percent'] = 100 * run['flops'] / max(run['minutes'] * 60, 1e-9) / peak
    return run


def start(args) -> tuple:
    "Check the budget, set threads; the device, its autocast factory and its peak FLOP/s (measured before any loader starts)."
    if args.flops <= 0 and args.minutes <= 0: sys.exit('give a positive --minutes or --flops budget')
    if args.threads: torch.set_num_threads(args.threads)
    device = args.device or autodetect_device()
    return device, autocast_for(device, args.dtype), peak_flops(device)
