"""What a new user meets when something is wrong: a bad flag of the training entry points is one usage line (exit 2),
and a damaged checkpoint, a checkpoint of another config or a folder that cannot be written is one error line naming the
file and what is wrong (exit 1), before the first step rather than after the last."""
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch

from imagelm.base_train import main, parse_args
from imagelm.chat_train import parse_chat_args
from imagelm.checkpoints import load_model
from imagelm.common import save_json
from imagelm.model import ImageLM, ModelConfig
from imagelm.train import (CheckpointError, Process, checkpoint_dir, config_differences, file_sha256, load_checkpoint,
                           read_meta, save_checkpoint, writable_checkpoint_dir)

TINY = ['--depth=1', '--max_seq_len=128', '--device_batch_size=2', '--eval_batches=1', '--eval_every=0', '--sample_every=0',
        '--pixel_chars=96', '--byte_chars=48', '--log_every=1', '--prefetch=0']

BAD_FLAGS = [
    (['--max_seq_len=0'], 'argument --max_seq_len: must be >= 1, got 0'),
    (['--device_batch_size=0'], 'argument --device_batch_size: must be >= 1, got 0'),
    (['--chars_per_patch=3'], 'argument --chars_per_patch: must divide --page_chars=64'),
    (['--page_chars=60', '--chars_per_patch=8'], 'argument --chars_per_patch: must divide --page_chars=60'),
    (['--eval_batches=0'], 'argument --eval_batches: must be >= 1, got 0'),
    (['--log_every=0'], 'argument --log_every: must be >= 1, got 0'),
    (['--eval_every=-1'], 'argument --eval_every: must be >= 0, got -1'),
    (['--num_iterations=0'], 'argument --num_iterations: must be -1 (derived) or >= 1, got 0'),
    (['--total_batch_size=100', '--max_seq_len=64', '--device_batch_size=2'], 'argument --total_batch_size: must be a multiple'),
    (['--warmdown_ratio=1.5'], 'argument --warmdown_ratio: must be in [0, 1], got 1.5'),
    (['--max_seq_len=two'], "argument --max_seq_len: must be an int, got 'two'"),
    (['--device=tpu'], "argument --device: invalid choice: 'tpu'"),
]


def usage_error(parse, argv, capsys) -> str:
    "The one error line `parse(argv)` prints before exiting with status 2."
    with pytest.raises(SystemExit) as stop: parse(argv)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if 'error:' in line]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.mark.parametrize('argv,expected', BAD_FLAGS, ids=[' '.join(a) for a, _ in BAD_FLAGS])
def test_a_bad_flag_is_one_usage_line_naming_it(argv, expected, capsys):
    assert expected in usage_error(parse_args, argv, capsys)


CHAT_BAD_FLAGS = [BAD_FLAGS[i] for i in (0, 1, 3, 4, 5)]   # --page_chars of a chat stage is its checkpoint's unless given


@pytest.mark.parametrize('argv,expected', CHAT_BAD_FLAGS, ids=[' '.join(a) for a, _ in CHAT_BAD_FLAGS])
def test_the_chat_stages_check_the_same_flags(argv, expected, capsys):
    assert expected in usage_error(lambda a: parse_chat_args('sft', a), argv, capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has CUDA')
def test_a_device_this_machine_lacks_is_a_usage_error(capsys):
    assert 'argument --device: cuda is not available on this machine; cpu is' in usage_error(parse_args, ['--device=cuda'], capsys)


@pytest.mark.parametrize('argv,expected', [(['--depth=0'], 'argument --depth: must be >= 1, got 0'),
                                           (['--d_model=100', '--n_head=3'], 'the model flags do not make a model')])
def test_model_flags_that_make_no_model_are_a_usage_error(argv, expected, capsys):
    line = usage_error(main, argv, capsys)
    assert expected in line and (argv[0] != '--d_model=100' or 'd_model' in line)


def test_good_flags_still_parse():
    args = parse_args(['--max_seq_len=64', '--chars_per_patch=4', '--total_batch_size=256', '--device_batch_size=2', '--device=cpu'])
    assert (args.max_seq_len, args.chars_per_patch, args.device) == (64, 4, 'cpu')
    assert parse_chat_args('mid', ['--chars_per_patch=4']).chars_per_patch == 4


@pytest.fixture
def saved(tmp_path):
    "A complete checkpoint of a depth-1 model, and the model."
    torch.manual_seed(0)
    model = ImageLM(ModelConfig(depth=1, seq_len=128))
    meta = {'stage': 'base', 'model_config': model.cfg.to_dict(), 'args': {'max_seq_len': 128}, 'history': {}}
    path = save_checkpoint(checkpoint_dir('tiny', 'base'), 3, Process(), model.state_dict(), [{'lr': 1.0}], [{'doc': 5}], meta)
    return path, model


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path / 'base'))
    return tmp_path / 'base'


def flip_middle(file: Path, n: int = 4):
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + n] = bytes(b ^ 0xff for b in data[middle:middle + n])
    file.write_bytes(data)


def test_meta_records_the_sha256_of_every_file(saved):
    path, model = saved
    meta = read_meta(path)
    assert meta['sha256'] == {name: file_sha256(path / name) for name in ('model.pt', 'rank_000.pt')}
    loaded = load_checkpoint(path, Process())
    assert torch.equal(loaded['model']['head.weight'], model.state_dict()['head.weight']) and loaded['loader'] == [{'doc': 5}]


@pytest.mark.parametrize('name', ['model.pt', 'rank_000.pt'])
def test_bytes_flipped_in_the_middle_are_refused_on_resume(saved, name):
    path, _ = saved
    flip_middle(path / name)
    with pytest.raises(CheckpointError, match=f'{path / name} does not match the sha256 recorded in {path / "meta.json"}'):
        load_checkpoint(path, Process())


def test_bytes_flipped_in_the_middle_are_refused_by_load_model(saved):
    path, _ = saved
    flip_middle(path / 'model.pt')
    with pytest.raises(CheckpointError, match='model.pt does not match the sha256'): load_model('base', 'tiny', device='cpu')


def test_a_checkpoint_saved_before_checksums_still_loads(saved):
    path, model = saved
    meta = read_meta(path); del meta['sha256']; save_json(meta, path / 'meta.json')
    loaded, _ = load_model('base', 'tiny', device='cpu')
    assert torch.equal(loaded.state_dict()['head.weight'], model.state_dict()['head.weight'])
    assert load_checkpoint(path, Process())['optimizers'] == [{'lr': 1.0}]


@pytest.mark.parametrize('checksums', [True, False])
def test_an_empty_model_file_is_named(saved, checksums):
    path, _ = saved
    if not checksums:
        meta = read_meta(path); del meta['sha256']; save_json(meta, path / 'meta.json')
    (path / 'model.pt').write_bytes(b'')
    for load in (lambda: load_checkpoint(path, Process()), lambda: load_model('base', 'tiny', device='cpu')):
        with pytest.raises(CheckpointError, match=f'{path / "model.pt"} is empty'): load()


def test_a_truncated_model_file_without_checksums_is_named(saved):
    path, _ = saved
    meta = read_meta(path); del meta['sha256']; save_json(meta, path / 'meta.json')
    (path / 'model.pt').write_bytes((path / 'model.pt').read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=f'{path / "model.pt"} cannot be read'): load_checkpoint(path, Process())


def test_a_missing_rank_file_is_named(saved):
    path, _ = saved
    (path / 'rank_000.pt').unlink()
    with pytest.raises(CheckpointError, match='rank_000.pt is missing'): load_checkpoint(path, Process())


def test_an_invalid_meta_json_is_named(saved):
    path, _ = saved
    (path / 'meta.json').write_text('{"step": 3,')
    for load in (lambda: load_checkpoint(path, Process()), lambda: load_model('base', 'tiny', device='cpu')):
        with pytest.raises(CheckpointError, match=f'{path / "meta.json"} is not valid JSON'): load()


def test_a_meta_json_without_world_size_is_named(saved):
    path, _ = saved
    meta = read_meta(path); del meta['world_size']; save_json(meta, path / 'meta.json')
    with pytest.raises(CheckpointError, match=r"meta.json lacks \['world_size'\]"): load_checkpoint(path, Process())
    save_json([1, 2], path / 'meta.json')
    with pytest.raises(CheckpointError, match='meta.json holds a list'): load_checkpoint(path, Process())


def test_a_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_each_field_that_differs_is_named_with_both_values(saved):
    path, model = saved
    asked = {**model.cfg.to_dict(), 'positions': '1d', 'seq_len': 256}
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, Process(), expect={'model_config': asked, 'args': {'max_seq_len': 128}})
    assert "model_config.positions: '2d' -> '1d'" in str(error.value) and 'model_config.seq_len: 128 -> 256' in str(error.value)
    assert 'max_seq_len' not in str(error.value)
    assert config_differences({'a': (1, 2), 'b': {'c': 1}}, {'a': [1, 2], 'b': {'c': 2}, 'd': 0}) == ['b.c: 1 -> 2', "d: '(not saved)' -> 0"]


def test_a_base_dir_under_a_regular_file_fails_before_anything_is_built(tmp_path, monkeypatch):
    (tmp_path / 'file').write_text('')
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path / 'file' / 'base'))
    with pytest.raises(CheckpointError, match="cannot write the checkpoints of run 'x'.*set IMAGELM_BASE_DIR to a folder you can write"):
        writable_checkpoint_dir('x')


@pytest.mark.skipif(hasattr(os, 'geteuid') and os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_base_dir_fails_before_anything_is_built(base_dir):
    base_dir.mkdir(parents=True); base_dir.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match='set IMAGELM_BASE_DIR to a folder you can write'): writable_checkpoint_dir('x')
    finally: base_dir.chmod(0o755)


def test_the_write_probe_leaves_nothing_behind(base_dir):
    folder = writable_checkpoint_dir('x', 'mid')
    assert folder == base_dir / 'checkpoints' / 'mid' / 'x' and list(folder.iterdir()) == []


# The entry points themselves, in subprocesses: what a user sees on the terminal.

def run(base: Path, module: str, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, 'IMAGELM_BASE_DIR': str(base), 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    return subprocess.run([sys.executable, '-m', f'imagelm.{module}', *args], env=env, capture_output=True, text=True, timeout=240)


def one_line_error(out: subprocess.CompletedProcess, status: int) -> str:
    assert out.returncode == status and 'Traceback' not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if 'error' in line]
    assert len(errors) == 1, out.stderr
    return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize('module', ['base_train', 'chat_sft'])
def test_the_entry_points_refuse_a_bad_flag_in_one_line(tmp_path, module):
    assert 'argument --max_seq_len: must be >= 1, got 0' in one_line_error(run(tmp_path, module, '--max_seq_len=0'), 2)


@pytest.mark.slow
def test_an_impossible_base_dir_fails_before_the_first_step(tmp_path):
    (tmp_path / 'file').write_text('')
    out = run(tmp_path / 'file' / 'base', 'base_train', '--run=x', '--num_iterations=2', *TINY)
    assert 'set IMAGELM_BASE_DIR to a folder you can write' in one_line_error(out, 1)
    assert 'step 0' not in out.stdout


@pytest.mark.slow
def test_resume_refuses_another_config_and_a_damaged_checkpoint_in_one_line(tmp_path):
    out = run(tmp_path, 'base_train', '--run=r', '--num_iterations=2', *TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    other = one_line_error(run(tmp_path, 'base_train', '--run=r', '--num_iterations=4', '--resume=1', *TINY, '--positions=1d',
                               '--max_seq_len=256'), 1)
    assert "model_config.positions: '2d' -> '1d'" in other and 'model_config.seq_len: 128 -> 256' in other
    step = tmp_path / 'checkpoints' / 'base' / 'r' / 'step_000001'
    flip_middle(step / 'model.pt')
    damaged = one_line_error(run(tmp_path, 'base_train', '--run=r', '--num_iterations=4', '--resume=1', *TINY), 1)
    assert f'{step / "model.pt"} does not match the sha256' in damaged
    assert json.loads((step / 'meta.json').read_text())['step'] == 1       # the checkpoint is left as it was
