"""The CPU path of speedrun.sh, measured: base, mid and SFT training on 2 cores, then the chat evals, against the floors
a laptop chat model must reach.

Runs `bash speedrun.sh` in a fresh base folder (its output is kept as chat_cpu.log beside --out), then reads the
figures from the run's checkpoints and the chat_eval JSON, and writes bench/results/chat_cpu.json with
reading_exact_le16, addition_2digit and colour_naming (fractions), val_bpb and unigram_bpb, the minutes of each stage
and minutes_total, and whether each floor was met.

    python bench/chat_cpu.py
    python bench/chat_cpu.py --base_minutes 3 --mid_minutes 11 --sft_minutes 4
"""
import argparse, json, os, subprocess, tempfile, time
from pathlib import Path

from imagelm.train import checkpoint_dir, latest_checkpoint

from harness import RESULTS, save_result

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {'reading_exact_le16': 0.90, 'addition_2digit': 0.80, 'colour_naming': 0.90}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--base_minutes', type=float, default=3, help='base training budget (default 3)')
    parser.add_argument('--mid_minutes', type=float, default=11, help='midtraining budget (default 11)')
    parser.add_argument('--sft_minutes', type=float, default=4, help='fine-tuning budget (default 4)')
    parser.add_argument('--out', default=str(RESULTS / 'chat_cpu.json'), help='JSON to write; the log goes beside it')
    args = parser.parse_args()
    base, run = tempfile.mkdtemp(), 'chat_cpu'
    env = {**os.environ, 'IMAGELM_BASE_DIR': base, 'RUN': run, 'BASE_MINUTES': str(args.base_minutes),
           'MID_MINUTES': str(args.mid_minutes), 'SFT_MINUTES': str(args.sft_minutes)}
    start = time.perf_counter()
    out = subprocess.run(['bash', str(ROOT / 'speedrun.sh')], env=env, capture_output=True, text=True)
    minutes_total = (time.perf_counter() - start) / 60
    Path(args.out).with_name('chat_cpu.log').write_text(out.stdout + out.stderr)
    if out.returncode: raise SystemExit(f'speedrun.sh failed ({out.returncode}); see {Path(args.out).with_name("chat_cpu.log")}')
    os.environ['IMAGELM_BASE_DIR'] = base
    metas = {stage: json.loads((latest_checkpoint(checkpoint_dir(run, stage)) / 'meta.json').read_text()) for stage in ('base', 'mid', 'sft')}
    measured = json.loads(next((Path(base) / 'evals').glob(f'sft_{run}_*.json')).read_text())
    evals = measured['evals']
    figures = {'reading_exact_le16': evals['reading']['reading']['by_length']['1-16']['exact'],
               'addition_2digit': evals['addition_2digit']['accuracy'], 'colour_naming': evals['picture_colour']['accuracy'],
               'val_bpb': measured['val_bpb'], 'unigram_bpb': measured['unigram_bpb']}
    met = {name: figures[name] >= floor for name, floor in FLOORS.items()} | {'val_bpb': figures['val_bpb'] < figures['unigram_bpb']}
    result = {**figures, 'minutes': {stage: meta['minutes'] for stage, meta in metas.items()}, 'minutes_total': minutes_total,
              'steps': {stage: meta['step'] + 1 for stage, meta in metas.items()}, 'floors': FLOORS, 'met': met,
              'accuracy': {name: e['accuracy'] for name, e in evals.items()},
              'reading': {k: v for k, v in evals['reading']['reading'].items()}, 'val_bpb_by_stage': {
                  stage: meta['history']['val_bpb'][-1][1] for stage, meta in metas.items()}}
    save_result(result, args.out, args, 'cpu')
    print(json.dumps({k: result[k] for k in ('reading_exact_le16', 'addition_2digit', 'colour_naming', 'val_bpb', 'unigram_bpb',
                                             'minutes_total', 'met')}, indent=1))
    print(f'wrote {args.out}; the run is in {base} (RL from it: python bench/chat_rl_cpu.py --base_dir {base})')


if __name__ == '__main__':
    main()
