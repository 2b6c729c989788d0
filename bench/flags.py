"""Flags that bench/compare.py and bench/ablate.py share: the budget, the model and data shape, the device."""
import argparse


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
    a('--seed', type=int, default=0, help='seed of weights, data jitter (and homoglyph places)')
    a('--out', default=out, help='JSON to write; the PNG goes beside it')
    a('--quiet', action='store_true', help='no per-step lines')
    return p
