"""The reliability suite with its figures: run the tests/test_reliability_*.py files (bad inputs generated for every
surface, kill-and-resume cycles, a killed rank, download faults, a full disk, the web server under load), have each
record what it tried and what failed, and write them together to bench/results/reliability.json.

    python bench/reliability.py            # the counts the test suite uses (a few minutes on 2 cores)
    python bench/reliability.py --long     # more cycles and examples
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

from harness import RESULTS, save_result

ROOT = Path(__file__).resolve().parent.parent


def collect(folder: Path) -> dict:
    "The parts the tests recorded in `folder`, arranged: bad inputs by surface, then each other part under its own name."
    parts = {path.stem: json.loads(path.read_text()) for path in sorted(folder.glob('*.json'))}
    bad_inputs = {name[len('bad_inputs_'):]: figures for name, figures in parts.items() if name.startswith('bad_inputs_')}
    return {'bad_inputs': bad_inputs, **{name: figures for name, figures in parts.items() if not name.startswith('bad_inputs_')}}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--long', action='store_true', help='more kill cycles and generated examples (IMAGELM_LONG=1)')
    parser.add_argument('--out', default=str(RESULTS / 'reliability.json'), help='where to write the figures')
    args = parser.parse_args(argv)
    tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / 'tests').glob('test_reliability_*.py'))
    if not tests: parser.error('no tests/test_reliability_*.py files to run')
    with tempfile.TemporaryDirectory(prefix='imagelm-reliability-') as folder:
        env = {**os.environ, 'IMAGELM_RELIABILITY_OUT': folder, 'IMAGELM_LONG': '1' if args.long else '0'}
        start = time.perf_counter()
        print(f'== running {len(tests)} files: {" ".join(tests)}', flush=True)
        done = subprocess.run([sys.executable, '-m', 'pytest', *tests, '-q', '-p', 'no:cacheprovider'], cwd=ROOT, env=env)
        figures = collect(Path(folder))
    result = {**figures, 'tests_passed': done.returncode == 0, 'minutes': (time.perf_counter() - start) / 60,
              'mode': 'long' if args.long else 'short'}
    save_result(result, args.out, args)
    print(json.dumps(result, indent=1))
    if done.returncode != 0: sys.exit(f'the reliability tests failed (pytest exit {done.returncode}); figures written to {args.out}')
    return result


if __name__ == '__main__': main()
