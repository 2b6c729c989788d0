"""The figures of the reliability tests: each test records what it tried and what failed, and `bench/reliability.py`
collects them into bench/results/reliability.json. Outside that run (IMAGELM_RELIABILITY_OUT unset) nothing is written."""
import json, os
from pathlib import Path

LONG = os.environ.get('IMAGELM_LONG') == '1'


def examples(short: int, long: int) -> int:
    "How many examples or cycles to try: `long` in the --long mode (IMAGELM_LONG=1), else `short`."
    return long if LONG else short


def record(part: str, **figures) -> None:
    "Merge `figures` into <IMAGELM_RELIABILITY_OUT>/<part>.json, when that folder is set."
    folder = os.environ.get('IMAGELM_RELIABILITY_OUT')
    if not folder: return
    path = Path(folder) / f'{part}.json'
    path.parent.mkdir(parents=True, exist_ok=True)
    merged = {**(json.loads(path.read_text()) if path.exists() else {}), **figures}
    tmp = path.with_suffix('.tmp')
    tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
    tmp.replace(path)
