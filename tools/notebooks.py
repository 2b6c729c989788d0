"""Notebook chores: execute notebooks with their outputs for committing, check that committed notebooks show their
results, and write README.md from nbs/index.ipynb.

    python tools/notebooks.py run nbs/01_render.ipynb      # execute top to bottom at reader settings, keep outputs
    python tools/notebooks.py run --all                    # every notebook and lesson
    python tools/notebooks.py check                        # fail when a notebook hides its results or README is stale
    python tools/notebooks.py readme                       # write README.md from nbs/index.ipynb
"""
import argparse, json, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / 'nbs'
README, INDEX = ROOT / 'README.md', NBS / 'index.ipynb'
DRAWING = re.compile(r'\bplt\.|show_page\(|imshow\(|\.plot\(|subplots\(|show_packed_rows\(|draw_\w+\(|plot_\w+\(')
MIN_SHOWN = 0.5                 # share of the non-export code cells that must show an output
MAX_NOTEBOOK_BYTES = 2_000_000  # outputs stay small: pictures at a sensible dpi, no logs
MAX_STREAM_LINES = 60           # no progress-bar spam


def all_notebooks() -> list:
    return sorted(p for p in NBS.rglob('*.ipynb') if '.ipynb_checkpoints' not in p.parts)


def source(cell) -> str:
    return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']


def directives(cell) -> dict:
    "The `#|` directives of a code cell, as nbdev reads them."
    from fastcore.basics import AttrDict
    from nbdev.process import extract_directives
    return extract_directives(AttrDict(cell_type=cell['cell_type'], source=source(cell)), remove=False)


def run(paths: list) -> None:
    "Execute each notebook in its own folder, at reader settings (IN_TEST unset), and save it with its outputs, cleaned."
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    os.environ.pop('IN_TEST', None)
    for path in paths:
        path = Path(path).resolve()
        start = time.perf_counter()
        nb = read_nb(path)
        shell = CaptureShell(path, mpl_format='png')
        skip = lambda cell: cell.cell_type != 'code' or directives(cell).get('eval:', [''])[0].lower() == 'false'
        cwd = os.getcwd()
        os.chdir(path.parent)
        try: shell.run_all(nb, exc_stop=True, preproc=skip)
        except Exception:
            sys.exit(f'{shown_path(path)} failed:\n{shell.prettytb(fname=path)}')
        finally: os.chdir(cwd)
        write_nb(nb, path)
        subprocess.run(['nbdev_clean', '--fname', str(path)], check=True, cwd=ROOT)
        print(f'{shown_path(path)}: executed in {time.perf_counter() - start:.0f} s', flush=True)


def shown_path(path: Path) -> str:
    "`path` relative to the repository when it is inside it."
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def output_problems(path: Path) -> list:
    "What is wrong with the committed outputs of the notebook at `path`: an empty list when it shows its results."
    nb = json.loads(path.read_text())
    problems, shown, counted, images, draws = [], 0, 0, 0, False
    for cell in nb['cells']:
        if cell['cell_type'] != 'code': continue
        found = directives(cell)
        outputs = cell.get('outputs', [])
        images += sum('image/png' in o.get('data', {}) for o in outputs)
        draws = draws or bool(DRAWING.search(source(cell)))
        for o in outputs:
            if o['output_type'] == 'error': problems.append(f"a cell shows an error: {o.get('ename')}: {o.get('evalue', '')[:80]}")
            if o['output_type'] == 'stream' and len(o['text']) > MAX_STREAM_LINES:
                problems.append(f"a cell prints {len(o['text'])} lines (at most {MAX_STREAM_LINES}: no logs or progress bars)")
        if {'export', 'exports', 'exporti', 'default_exp', 'hide'} & set(found) or not source(cell).strip(): continue
        counted += 1
        shown += bool(outputs)
    if counted and shown < MIN_SHOWN * counted:
        problems.append(f'only {shown} of its {counted} non-export code cells show an output (at least half must): '
                        f'execute it with `python tools/notebooks.py run {shown_path(path)}`')
    if (draws or 'lessons' in path.parts) and images == 0:
        problems.append('it draws (or is a lesson) but has no picture in its outputs')
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        problems.append(f'{path.stat().st_size:,} bytes, over {MAX_NOTEBOOK_BYTES:,}: make the pictures smaller')
    return problems


def readme_text() -> str:
    "README.md as written from nbs/index.ipynb: its markdown, and its code cells that are not hidden, with text outputs."
    parts = []
    for cell in json.loads(INDEX.read_text())['cells']:
        text = source(cell).strip()
        if cell['cell_type'] == 'markdown': parts.append(text); continue
        found = directives(cell)
        if 'hide' in found or 'default_exp' in found or not text: continue
        parts.append(f'```python\n{text}\n```')
        for o in cell.get('outputs', []):
            shown = o.get('text') or o.get('data', {}).get('text/plain')
            if shown: parts.append('```\n' + ''.join(shown).rstrip() + '\n```')
    return '<!-- Written from nbs/index.ipynb by `python tools/notebooks.py readme`: edit the notebook, not this file. -->\n\n' \
           + '\n\n'.join(parts) + '\n'


def check() -> int:
    "Print every problem of every notebook and of README.md; the number of problems."
    count = 0
    for path in all_notebooks():
        for problem in output_problems(path):
            print(f'FAIL {shown_path(path)}: {problem}'); count += 1
    if README.read_text() != readme_text():
        print('FAIL README.md differs from what nbs/index.ipynb writes: edit the notebook, then run '
              '`python tools/notebooks.py readme`'); count += 1
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='command', required=True)
    run_parser = commands.add_parser('run', help='execute notebooks and save them with their outputs')
    run_parser.add_argument('paths', nargs='*', help='notebooks to execute')
    run_parser.add_argument('--all', action='store_true', help='every notebook under nbs/, lessons included')
    commands.add_parser('check', help='check outputs of every notebook, and README.md against nbs/index.ipynb')
    commands.add_parser('readme', help='write README.md from nbs/index.ipynb')
    args = parser.parse_args(argv)
    if args.command == 'run':
        if not args.paths and not args.all: parser.error('give notebooks to run, or --all')
        run(all_notebooks() if args.all else args.paths)
    elif args.command == 'readme':
        README.write_text(readme_text()); print(f'wrote {README.relative_to(ROOT)}')
    else:
        problems = check()
        print(f'{problems} problem(s) in {len(all_notebooks())} notebooks and README.md' if problems else
              f'{len(all_notebooks())} notebooks show their results; README.md matches nbs/index.ipynb')
        sys.exit(1 if problems else 0)


if __name__ == '__main__':
    main()
