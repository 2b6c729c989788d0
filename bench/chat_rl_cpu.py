"""RL on the CPU: start from the SFT checkpoint of a CPU chat run, train `python -m imagelm.chat_rl --preset=cpu`
(synthetic arithmetic, rewarded by its own evaluate) for a few minutes, then measure the same chat evals as after SFT.
Writes bench/results/chat_rl_cpu.json (and chat_rl_cpu.log beside it): the accuracy of every eval after SFT and after
RL, the mean reward per logged step, and the minutes and steps of RL.

    python bench/chat_cpu.py                      # prints the base folder of its run
    python bench/chat_rl_cpu.py --base_dir /tmp/tmpXXXX --minutes 3
"""
import argparse, json, os, subprocess, sys
from pathlib import Path

from harness import RESULTS, save_result



def latest_eval(base: Path, stage: str, run: str) -> dict:
    found = sorted((base / 'evals').glob(f'{stage}_{run}_*.json'), key=lambda p: int(p.stem.rsplit('_', 1)[1]))
    if not found: raise SystemExit(f'no {stage} evals of run {run!r} in {base / "evals"}')
    return json.loads(found[-1].read_text())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--base_dir', required=True, help='IMAGELM_BASE_DIR of a CPU chat run with an SFT checkpoint and its evals')
    parser.add_argument('--run', default='chat_cpu', help='the run name (default chat_cpu, as bench/chat_cpu.py names it)')
    parser.add_argument('--minutes', type=float, default=3.0, help='RL training budget (default 3)')
    parser.add_argument('--examples', type=int, default=200, help='examples per eval (default 200, as speedrun.sh)')
    parser.add_argument('--out', default=str(RESULTS / 'chat_rl_cpu.json'), help='JSON to write; the log goes beside it')
    args = parser.parse_args()
    base = Path(args.base_dir)
    before = latest_eval(base, 'sft', args.run)
    env = {**os.environ, 'IMAGELM_BASE_DIR': str(base)}
    log = []
    for command in (['imagelm.chat_rl', '--preset=cpu', f'--run={args.run}', f'--source_run={args.run}', f'--time_budget={args.minutes}'],
                    ['imagelm.chat_eval', '--stage=rl', f'--run={args.run}', f'--examples={args.examples}']):
        out = subprocess.run([sys.executable, '-m', *command], env=env, capture_output=True, text=True)
        log.append(out.stdout + out.stderr)
        if out.returncode: raise SystemExit(f'{command[0]} failed ({out.returncode}):\n{out.stderr[-2000:]}')
    Path(args.out).with_name('chat_rl_cpu.log').write_text('\n'.join(log))
    after = latest_eval(base, 'rl', args.run)
    meta = json.loads(max((base / 'checkpoints/rl' / args.run).glob('step_*'), key=lambda p: p.name).joinpath('meta.json').read_text())
    accuracy = {name: {'sft': e['accuracy'], 'rl': after['evals'][name]['accuracy']} for name, e in before['evals'].items()}
    rewards = [(r['step'], r['reward']) for r in meta['history']['log']]
    result = {'accuracy': accuracy, 'val_bpb': {'sft': before['val_bpb'], 'rl': after['val_bpb']}, 'reward_by_step': rewards,
              'minutes': meta['minutes'], 'steps': meta['step'] + 1, 'rl_args': {k: meta['args'][k] for k in (
                  'mix', 'num_samples', 'max_tokens', 'temperature', 'device_batch_size', 'matrix_lr')}}
    save_result(result, args.out, args, 'cpu')
    print(json.dumps({'accuracy': accuracy, 'reward_first_last': [rewards[0][1], rewards[-1][1]], 'steps': result['steps']}, indent=1))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
