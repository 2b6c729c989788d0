"""`python -m imagelm.base_eval` end to end on a tiny checkpoint, with a byte-baseline checkpoint and an eval bundle
served on 127.0.0.1: the JSON, the report section and its figure; CORE skipped in one line when the bundle cannot be
had; and two gloo processes under torchrun give the figures of one."""
import json, os, shutil, subprocess, sys

import pytest
import torch

from imagelm.base_eval import load_baseline, save_baseline
from imagelm.baselines import ByteLoader, make_model, train_baseline
from imagelm.core_eval import DEMO_TASKS, write_bundle
from imagelm.dataloader import DataConfig
from imagelm.download import serve_folder
from imagelm.model import ModelConfig

from tiny import env, tiny_checkpoint

pytestmark = pytest.mark.slow   # training, subprocesses, torchrun


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    "A base folder with a tiny base checkpoint and a byte GPT saved by save_baseline; a server with an eval bundle."
    folder = tmp_path_factory.mktemp('base')
    tiny_checkpoint(folder, seq_len=256)
    torch.manual_seed(0)
    cfg = ModelConfig(depth=1, seq_len=512)
    byte_gpt = make_model('byte_gpt', cfg)
    loader = ByteLoader(DataConfig.from_model(cfg, batch_rows=2))
    train_baseline(byte_gpt, loader, [next(loader)], steps=3, n_evals=0)
    loader.close()
    save_baseline(byte_gpt, folder / 'byte_gpt', steps=3)
    served = tmp_path_factory.mktemp('served')
    write_bundle(served / 'eval_bundle.zip', [replace_examples(t, 3) for t in DEMO_TASKS])
    server = serve_folder(served)
    yield folder, server.url
    server.shutdown()


def replace_examples(task: dict, n: int) -> dict: return {**task, 'examples': task['examples'][:n]}


def run(folder, *flags, torchrun: bool = False):
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2'] if torchrun else [sys.executable]
    out = subprocess.run([*launcher, '-m', 'imagelm.base_eval', *(['--'] if torchrun else []), *flags], env=env(folder),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_a_saved_byte_baseline_loads_back(setup):
    folder, _ = setup
    model, meta = load_baseline(folder / 'byte_gpt', 'cpu')
    assert meta['kind'] == 'byte_gpt' and meta['steps'] == 3 and type(model).__name__ == 'ByteGPT' and model.cfg.seq_len == 512


def test_the_cli_end_to_end(setup):
    folder, url = setup
    stdout = run(folder, '--run=tiny', '--val_batches=2', f'--bundle_url={url}/eval_bundle.zip', f'--byte_baseline={folder / "byte_gpt"}')
    measured = json.loads(next((folder / 'evals').glob('base_tiny_*.json')).read_text())
    assert 0 < measured['val_bpb'] < 9 and measured['step'] == 1 and measured['byte_baseline'] == str(folder / 'byte_gpt')
    assert [r['examples'] for r in measured['core']['tasks'].values()] == [3, 3, 3]
    assert set(measured['homoglyph']) == {'imagelm', 'byte_baseline'} and measured['homoglyph']['imagelm']['ratio'] == 1.0
    assert len(measured['samples']) == 4
    section = json.loads((folder / 'report' / 'base_eval.json').read_text())
    assert section['stage'] == 'base' and set(section['metrics']) == {'val_bpb', 'CORE', 'homoglyph_bpb_ratio', 'fullwidth_bpb_ratio',
                                                                      'byte_baseline_homoglyph_bpb_ratio', 'byte_baseline_fullwidth_bpb_ratio'}
    assert measured['homoglyph']['imagelm']['fullwidth_ratio'] != 1.0                 # fallback boxes are a different picture
    assert section['metrics']['CORE'] == measured['core']['CORE'] and (folder / 'report' / 'base_eval_base_tiny_1_core_example.png').exists()
    report = (folder / 'report' / 'base_eval.md').read_text()
    assert 'GPT-2 (1.5B) 0.2565' in report and '| byte_baseline |' in report and 'CORE' in stdout


def test_core_is_skipped_in_one_line_when_the_bundle_cannot_be_had(setup):
    folder, url = setup
    shutil.rmtree(folder / 'data' / 'eval_bundle', ignore_errors=True)
    stdout = run(folder, '--run=tiny', '--val_batches=1', '--homoglyph_rate=0', '--samples=0', f'--bundle_url={url}/missing.zip',
                 f'--out={folder / "offline.json"}')
    skipped = [line for line in stdout.splitlines() if line.startswith('CORE skipped')]
    assert len(skipped) == 1 and 'HTTP 404' in skipped[0]
    measured = json.loads((folder / 'offline.json').read_text())
    assert 'core' not in measured and 'homoglyph' not in measured and measured['val_bpb'] > 0


def test_two_gloo_processes_give_the_figures_of_one(setup):
    folder, url = setup
    flags = ['--run=tiny', '--val_batches=2', '--samples=0', f'--bundle_url={url}/eval_bundle.zip', f'--byte_baseline={folder / "byte_gpt"}']
    run(folder, *flags, f'--out={folder / "one.json"}')
    run(folder, *flags, f'--out={folder / "two.json"}', torchrun=True)
    one, two = (json.loads((folder / f'{n}.json').read_text()) for n in ('one', 'two'))
    assert two['val_bpb'] == pytest.approx(one['val_bpb'], rel=1e-6)
    assert {k: r['accuracy'] for k, r in two['core']['tasks'].items()} == {k: r['accuracy'] for k, r in one['core']['tasks'].items()}
    for name in ('imagelm', 'byte_baseline'):
        for key in ('clean', 'swapped', 'fullwidth'): assert two['homoglyph'][name][key] == pytest.approx(one['homoglyph'][name][key], rel=1e-5)
    assert two['homoglyph']['byte_baseline']['windowed'] == one['homoglyph']['byte_baseline']['windowed']


@pytest.mark.parametrize('module', ['base_eval', 'chat_eval'])
def test_no_checkpoint_is_one_line_and_exit_1(tmp_path, module):
    out = subprocess.run([sys.executable, '-m', f'imagelm.{module}'], env={**os.environ, 'IMAGELM_BASE_DIR': str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().startswith('error: no ') and len(out.stderr.strip().splitlines()) == 1, out.stderr
