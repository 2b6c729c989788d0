"""Reading with spaces drawn and without: does a faint dot in every space cell (`--show_spaces=1`) help a model read a
page back exactly? The same recipe for each setting, one after the other on the same machine: a base model of 2 steps
(weights near their start, so that no pretraining prior mixes in), then midtraining on the reading task alone for
--minutes, then the reading eval on held-out strings (exact match and character error rate, by length and by
characters per position). Writes bench/results/reading_spaces.json and reading_spaces.log.

    python bench/reading_spaces.py
    python bench/reading_spaces.py --minutes 4 --examples 200
"""
import argparse, json, os, subprocess, sys, tempfile
from pathlib import Path

from harness import RESULTS, save_result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--minutes', type=float, default=4.0, help='reading-only midtraining budget of each setting (default 4)')
    parser.add_argument('--examples', type=int, default=200, help='held-out reading examples per setting (default 200)')
    parser.add_argument('--out', default=str(RESULTS / 'reading_spaces.json'), help='JSON to write; the log goes beside it')
    args = parser.parse_args()
    result, log = {}, []
    for show in (0, 1):
        env = {**os.environ, 'IMAGELM_BASE_DIR': tempfile.mkdtemp()}
        evals = Path(env['IMAGELM_BASE_DIR']) / f'reading_{show}.json'
        for command in (['imagelm.base_train', '--run=r', '--depth=2', '--max_seq_len=512', '--num_iterations=2', f'--show_spaces={show}',
                         '--eval_batches=1', '--sample_every=0'],
                        ['imagelm.mid_train', '--preset=cpu', '--run=r', f'--time_budget={args.minutes}', '--log_every=200', '--mix=reading=1'],
                        ['imagelm.chat_eval', '--stage=mid', '--run=r', f'--examples={args.examples}', '--evals=reading', '--val_batches=0',
                         f'--out={evals}']):
            out = subprocess.run([sys.executable, '-m', *command], env=env, capture_output=True, text=True)
            log.append(f'$ {" ".join(command)}\n{out.stdout}{out.stderr}')
            if out.returncode: raise SystemExit(f'{command[0]} failed ({out.returncode}):\n{out.stderr[-2000:]}')
        reading = json.loads(evals.read_text())['evals']['reading']['reading']
        steps = json.loads(max((Path(env['IMAGELM_BASE_DIR']) / 'checkpoints/mid/r').glob('step_*')).joinpath('meta.json').read_text())['step'] + 1
        result[f'show_spaces={show}'] = {**reading, 'mid_steps': steps}
        print(f"show_spaces={show}: exact by length {json.dumps({k: v['exact'] for k, v in reading['by_length'].items()})}", flush=True)
    Path(args.out).with_name('reading_spaces.log').write_text('\n'.join(log))
    save_result(result, args.out, args, 'cpu')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
