"""What the benchmark scripts share: the budget, model, data and device flags of compare.py and ablate.py, training one
model of a kind for a budget, the mean over seeds, the machine's description, the picture of val bpb against time, and
one writer that gives every result file the same shape (its figures, plus `machine`, `git_commit`, `args` and
`created`)."""
import argparse, os, platform, statistics, subprocess, sys, time
from dataclasses import replace
from pathlib import Path

import torch

from imagelm.baselines import (ByteLoader, byte_seq_len_for, homoglyph_eval, look_alike_cosines, make_model, model_batches,
                               train_baseline)
from imagelm.common import autocast_for, save_json
from imagelm.dataloader import DataConfig, PretrainLoader
from imagelm.model import ModelConfig
from imagelm.optim import OptimConfig
from imagelm.render import RenderConfig
from imagelm.segments import N_BYTES
from imagelm.train import autodetect_device, mfu, peak_flops

RESULTS = Path(__file__).resolve().parent / 'results'
VAL_SEED = 0   # the val pieces are cut with this data seed whatever the training seeds, so every run scores the same targets
FIGURES = ('val_bpb', 'positions_per_char', 'chars_per_s', 'flops', 'minutes', 'steps', 'mfu_percent')


def machine_info(device='cpu') -> dict:
    "What ran the benchmark: platform, CPU, cores, threads, Python, torch, the device, its peak FLOP/s, and the GPU if any."
    info = dict(platform=platform.platform(), machine=platform.machine(), processor=platform.processor() or None,
                cpus=os.cpu_count(), torch_threads=torch.get_num_threads(), python=platform.python_version(),
                torch=torch.__version__, device=str(device), peak_flops=peak_flops(device))
    if str(device).startswith('cuda'): info['gpu'] = torch.cuda.get_device_name(torch.device(device))
    return info


def git_commit() -> str:
    "The commit of the code that ran, with '+changes' when the working tree differs from it."
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--', 'imagelm', 'bench'], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError): return 'unknown'
    return commit + ('+changes' if dirty else '')


def save_result(result: dict, path, args, device='cpu') -> Path:
    "Write `result` to `path` (atomically) with the shape every bench result shares: machine, git_commit, args, created."
    shaped = {**result, 'machine': machine_info(device), 'git_commit': git_commit(), 'args': vars(args),
              'created': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}
    return save_json(shaped, path)


def budget_parser(doc: str, what: str, minutes: float, d_model, d_model_help: str, eval_batches: int, eval_help: str,
                  n_evals: int, out: str) -> argparse.ArgumentParser:
    "A parser with the flags compare.py and ablate.py share; `what` names the things trained one after another."
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--minutes', type=float, default=minutes, help=f'training wall-clock budget of each {what}, in minutes (default {minutes:g})')
    a('--flops', type=float, default=0.0, help=f'equal-FLOPs mode: training FLOPs budget of each {what} (replaces --minutes)')
    a('--depth', type=int, default=2, help='transformer layers (default 2)')
    a('--d_model', type=int, default=d_model, help=d_model_help)
    a('--seq_len', type=int, default=512, help='positions per row of the page-reading models (default 512)')
    a('--batch_rows', type=int, default=DataConfig.batch_rows, help=f'rows per batch (default {DataConfig.batch_rows})')
    a('--page_chars', type=int, default=RenderConfig.page_chars, help=f'characters per rendered line (default {RenderConfig.page_chars})')
    a('--byte_chars', type=int, default=DataConfig.byte_chars, help=f'target characters in each byte span (default {DataConfig.byte_chars})')
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


def start(args) -> tuple:
    "Check the budget, set threads; the device and its autocast factory. The peak is measured now, before any loader starts."
    if args.flops <= 0 and args.minutes <= 0: sys.exit('give a positive --minutes or --flops budget')
    if args.threads: torch.set_num_threads(args.threads)
    device = args.device or autodetect_device()
    peak_flops(device)
    return device, autocast_for(device, args.dtype)


def benchmark_model(kind: str, model_cfg: ModelConfig, data_cfg: DataConfig, pieces: list, steps: int | None = None,
                    minutes: float | None = None, flops: float | None = None, byte_seq_len: int | None = None,
                    optim_cfg: OptimConfig = OptimConfig(), fused: bool = True, n_evals: int = 4, homoglyph_rate: float = 0.0,
                    seed: int = 0, device='cpu', autocast=None, log=None) -> dict:
    "Train a fresh model of `kind` for the budget on `data_cfg`'s stream: val bpb on `pieces`, throughput, FLOPs, MFU, homoglyphs."
    autocast = autocast or autocast_for(device)
    if kind == 'byte_gpt':
        cfg = replace(model_cfg, seq_len=byte_seq_len or byte_seq_len_for(pieces))
        loader = ByteLoader(data_cfg, seq_len=cfg.seq_len, device=device)
    else:
        cfg = model_cfg
        loader = PretrainLoader(data_cfg, device=device, prefetch=True)
    torch.manual_seed(seed)
    model = make_model(kind, cfg).to(device)
    val, _ = model_batches(model, pieces, data_cfg.batch_rows)
    look_alikes_at_start = look_alike_cosines(model)
    try: run = train_baseline(model, loader, val, steps, minutes, flops, fused, optim_cfg, n_evals=n_evals, autocast=autocast, log=log)
    finally: loader.close()
    used = [p for name, p in model.named_parameters() if not (kind == 'byte_gpt' and name.startswith('patch_embed'))]
    run.update(kind=kind, seq_len=cfg.seq_len, parameters=sum(p.numel() for p in used),
               mfu_percent=100 * mfu(run['flops'], max(run['minutes'] * 60, 1e-9), device),
               val_targets=sum(int(((b.targets >= 0) & (b.targets < N_BYTES)).sum()) for b in val),
               look_alikes=dict(start=look_alikes_at_start, end=look_alike_cosines(model)))
    if homoglyph_rate: run['homoglyph'] = homoglyph_eval({kind: model}, pieces, homoglyph_rate, seed, data_cfg.batch_rows, autocast)[kind]
    losses = run.pop('losses')
    run['losses'] = losses[::max(1, len(losses) // 100)]
    return run


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


def run_line(name: str, seed: int, run: dict, seconds: float) -> str:
    "The one line printed for a finished run."
    start, end = run['look_alikes']['start']['mean'], run['look_alikes']['end']['mean']
    h = run.get('homoglyph')
    return (f"{name:16s} seed {seed} val bpb {run['val_bpb']:.4f} | {run['steps']} steps in {run['minutes']:.2f} min | "
            f"{run['chars_per_s']:,.0f} chars/s | MFU {run['mfu_percent']:.1f}% | {run['positions_per_char']:.3f} positions/char | "
            f"{run['flops']:.3g} FLOPs" + (f" | homoglyphs {h['clean']:.4f} -> {h['swapped']:.4f}" if h else '')
            + f" | look-alike cos {start:.2f} -> {end:.2f} | {seconds:.0f} s")


def plot_curves_by_time(runs: dict, path, title: str = 'val bits per byte') -> None:
    "PNG of each run's val bpb against minutes of training and against training FLOPs."
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 3.6))
    axs = fig.subplots(1, 2)
    for name, run in runs.items():
        seconds, used, _, bpb = zip(*run['curve'])
        axs[0].plot([s / 60 for s in seconds], bpb, 'o-', ms=3, label=f"{name} ({run['val_bpb']:.3f})")
        axs[1].plot(used, bpb, 'o-', ms=3, label=name)
    axs[0].set(xlabel='training wall-clock (minutes)', ylabel='val bits per byte', title=title)
    axs[1].set(xlabel='training FLOPs', ylabel='val bits per byte', title='against compute')
    for ax in axs: ax.grid(alpha=.3)
    axs[0].legend(fontsize=8)
    fig.tight_layout(); fig.savefig(path, dpi=110)
