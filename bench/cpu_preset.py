"""The CPU preset of base training (`python -m imagelm.base_train --preset=cpu`, the base stage of speedrun.sh on a CPU):
throughput, MFU, the loader's share of step time, and val bits per byte after a time budget.

For each budget, runs the preset with `--time_budget=<m>` in a fresh base folder, keeps its output as
cpu_preset_<m>min.log beside --out, and reads the figures from the run's final checkpoint: the step records and val
bpb curve of its `meta.json`, and greedy samples of the trained model.
Throughput figures are medians over the logged steps after the first (which builds the atlas and warms up). Writes
bench/results/cpu_preset.json.

    python bench/cpu_preset.py --minutes 5 15
"""
import argparse, json, os, statistics, subprocess, sys, tempfile
from pathlib import Path

import torch

from imagelm.base_train import PRESETS, SAMPLE_PROMPTS, sample_completions
from imagelm.model import ImageLM, ModelConfig
from imagelm.train import checkpoint_dir, latest_checkpoint

from harness import RESULTS, save_result



def summarise(ckpt: Path) -> dict:
    "The figures of a finished base_train run from its last checkpoint folder `ckpt`."
    meta = json.loads((ckpt / 'meta.json').read_text())
    log = meta['history']['log'][1:] or meta['history']['log']
    median = lambda key: statistics.median(record[key] for record in log)
    model = ImageLM(ModelConfig(**meta['model_config']))
    model.load_state_dict(torch.load(ckpt / 'model.pt', weights_only=True))
    val = meta['history']['val_bpb']
    return {'parameters': sum(p.numel() for p in model.parameters()), 'depth': model.cfg.depth, 'steps': meta['step'] + 1,
            'minutes': meta['minutes'], 'positions_per_s': median('positions_per_s'), 'chars_per_s': median('chars_per_s'),
            'mfu_percent': 100 * median('mfu'), 'loader_share_percent': 100 * median('loader_share'), 'step_ms': median('ms'),
            'peak_flops': meta['peak_flops'], 'val_bpb_curve': val, 'final_val_bpb': val[-1][1],
            'final_samples': [f'{prompt}|{text!r}' for prompt, text in zip(SAMPLE_PROMPTS, sample_completions(model))]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--minutes', type=float, nargs='+', default=[5, 15], help='time budgets to run (default 5 15)')
    parser.add_argument('--out', default=str(RESULTS / 'cpu_preset.json'), help='JSON to write; the logs go beside it')
    args = parser.parse_args()
    runs = {}
    for minutes in args.minutes:
        base, name = tempfile.mkdtemp(), f'cpu_preset_{minutes:g}min'
        env = {**os.environ, 'IMAGELM_BASE_DIR': base}
        out = subprocess.run([sys.executable, '-m', 'imagelm.base_train', '--preset=cpu', f'--run={name}', f'--time_budget={minutes}'],
                             env=env, capture_output=True, text=True, check=True)
        Path(args.out).with_name(f'{name}.log').write_text(out.stdout)
        os.environ['IMAGELM_BASE_DIR'] = base
        runs[name] = r = summarise(latest_checkpoint(checkpoint_dir(name)))
        print(f"{name}: {r['minutes']:.1f} min, {r['steps']} steps, {r['positions_per_s']:,.0f} pos/s, {r['chars_per_s']:,.0f} chars/s, "
              f"loader {r['loader_share_percent']:.1f}%, MFU {r['mfu_percent']:.1f}%, val bpb {r['final_val_bpb']:.4f}", flush=True)
    save_result({'runs': runs, 'preset': PRESETS['cpu']}, args.out, args, 'cpu')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
