"""The CPU preset of speedrun.sh: throughput, the loader's share of step time, and val bits per byte after a time budget.

Runs `bash speedrun.sh` with MINUTES=<m> for each budget (in a fresh base folder each; its output is kept as
cpu_preset_<m>min.log beside --out), or summarises logs of runs already made (--logs), then writes
bench/results/cpu_preset.json.

    python bench/cpu_preset.py --minutes 5 15
    python bench/cpu_preset.py --logs cpu5.log cpu15.log
"""
import argparse, json, os, platform, re, statistics, subprocess, tempfile
from pathlib import Path

import torch

from imagelm.dataloader import DataConfig, PretrainLoader
from imagelm.model import ModelConfig, flops_per_position
from imagelm.train import peak_flops

PRESET = ModelConfig(depth=2, seq_len=512)   # the CPU path of speedrun.sh

STEP = re.compile(r'^step (\d+)/(\d+) \| loss ([\d.]+) \| lrm ([\d.]+) \| ([\d,]+) pos/s \| ([\d,]+) chars/s \| '
                  r'mfu ([\d.]+)% \| loader ([\d.]+)% \| (\d+) ms')
VAL = re.compile(r'^step (\d+) \| val bpb ([\d.]+) \| ([\d.]+) min trained')
HEAD = re.compile(r'^ImageLM: ([\d,]+) parameters, depth (\d+)')
SAMPLE = re.compile(r'^  sample \| (.*)$')
DONE = re.compile(r'^done: (\{.*?\}) \|')


def summarise(log: str) -> dict:
    "Figures of one base_train log: medians over logged steps after the first (which builds the atlas and warms up)."
    steps, vals, head, samples, done = [], [], None, [], {}
    for line in log.splitlines():
        if m := STEP.match(line): steps.append(m.groups())
        elif m := VAL.match(line): vals.append((int(m[1]), float(m[2]), float(m[3])))
        elif m := HEAD.match(line): head = m.groups()
        elif m := SAMPLE.match(line): samples.append(m[1])
        elif m := DONE.match(line): done = json.loads(m[1])
    if not steps or not vals: raise ValueError('the log has no step or val lines: was it a base_train run?')
    warm = steps[1:] or steps
    num = lambda s: float(s.replace(',', ''))
    return {
        'parameters': int(head[0].replace(',', '')) if head else None, 'depth': int(head[1]) if head else None,
        'steps': done.get('steps', int(steps[-1][0]) + 1), 'minutes': done.get('minutes', vals[-1][2]),
        'positions_per_s': statistics.median(num(s[4]) for s in warm),
        'chars_per_s': statistics.median(num(s[5]) for s in warm),
        'loader_share_percent': statistics.median(float(s[7]) for s in warm),
        'step_ms': statistics.median(float(s[8]) for s in warm),
        'val_bpb_curve': [(step, bpb) for step, bpb, _ in vals], 'final_val_bpb': vals[-1][1],
        'final_samples': samples[-4:],
    }


def preset_pixel_share(n_batches: int = 20) -> float:
    "Share of pixel positions among real positions in the preset's pretraining batches."
    loader = PretrainLoader(DataConfig.from_model(PRESET, batch_rows=8))
    pixel = real = 0
    for _, batch in zip(range(n_batches), loader):
        pixel += int(batch.is_pixel.sum()); real += int((batch.doc_id >= 0).sum())
    loader.close()
    return pixel / real


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--minutes', type=float, nargs='*', default=[5, 15], help='time budgets to run (default 5 15)')
    parser.add_argument('--logs', nargs='*', help='summarise these existing logs instead of running')
    parser.add_argument('--out', default=str(Path(__file__).parent / 'results' / 'cpu_preset.json'))
    args = parser.parse_args()
    runs = {}
    if args.logs:
        for path in args.logs: runs[Path(path).stem] = summarise(Path(path).read_text())
    else:
        root = Path(__file__).resolve().parent.parent
        for minutes in args.minutes:
            env = {**os.environ, 'IMAGELM_BASE_DIR': tempfile.mkdtemp(), 'RUN': f'cpu{minutes:g}', 'MINUTES': str(minutes)}
            out = subprocess.run(['bash', str(root / 'speedrun.sh')], env=env, capture_output=True, text=True, check=True)
            log = Path(args.out).with_name(f'cpu_preset_{minutes:g}min.log')
            log.parent.mkdir(parents=True, exist_ok=True); log.write_text(out.stdout)
            runs[log.stem] = summarise(out.stdout)
    peak, pixel_share = peak_flops('cpu'), preset_pixel_share()
    for name, r in runs.items():
        r['mfu_percent'] = 100 * flops_per_position(PRESET, pixel_share) * r['positions_per_s'] / peak
        print(f"{name}: {r['minutes']:.1f} min, {r['steps']} steps, {r['positions_per_s']:,.0f} pos/s, {r['chars_per_s']:,.0f} chars/s, "
              f"loader {r['loader_share_percent']:.1f}%, mfu {r['mfu_percent']:.1f}%, val bpb {r['final_val_bpb']:.4f}")
    result = {'runs': runs, 'torch_threads': torch.get_num_threads(), 'device': 'cpu', 'peak_flops_measured': peak,
              'pixel_share_of_positions': pixel_share,
              'mfu_note': 'flops_per_position of the preset (patch embedding counted as explicit) x positions/s over a '
                          'float32 matmul peak measured by this script on an idle machine',
              'machine': f'{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}, torch {torch.__version__}',
              'preset': 'speedrun.sh CPU path: --depth=2 --max_seq_len=512 --device_batch_size=8, embedded corpus'}
    out = Path(args.out); out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix('.tmp'); tmp.write_text(json.dumps(result, indent=2) + '\n'); os.replace(tmp, out)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()
