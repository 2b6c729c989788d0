"""The chat datasets from a local stand-in for the hub: downloaded by `python -m imagelm.chat_datasets`, read as tasks
in each dataset's own columns, turned into training batches, and HumanEval replies run with limits."""
import os, subprocess, sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imagelm.chat_data import ConversationLoader
from imagelm.chat_datasets import DATASETS, HUB_TASKS, GSM8KTask, HumanEvalTask, MMLUTask, run_python
from imagelm.chat_train import make_mixture
from imagelm.download import serve_folder
from imagelm.model import ModelConfig

ROWS = {
    'smoltalk': [{'messages': [{'role': 'user', 'content': f'What is {i} squared?'},
                               {'role': 'assistant', 'content': f'{i} squared is {i * i}.'}]} for i in range(6)],
    'mmlu': [{'question': f'Pick choice {"ABCD"[i % 4]}.', 'subject': 'test', 'choices': ['w', 'x', 'y', 'z'], 'answer': i % 4}
             for i in range(6)],
    'arc_easy': [{'id': f'e{i}', 'question': 'Which one is warm?', 'choices': {'text': ['ice', 'sun', 'snow'], 'label': ['1', '2', '3']},
                  'answerKey': '2'} for i in range(3)],
    'arc_challenge': [{'id': 'c0', 'question': 'Which is a gas?', 'choices': {'text': ['steam', 'rock', 'wood', 'iron'],
                       'label': ['A', 'B', 'C', 'D']}, 'answerKey': 'A'}],
    'gsm8k': [{'question': f'Tom has {i} boxes of 4 eggs. How many eggs?', 'answer': f'{i}*4=<<{i}*4={4 * i}>>{4 * i}\n#### {4 * i}'}
              for i in range(1, 7)],
    'humaneval': [{'task_id': 'HumanEval/1', 'prompt': 'def double(x):\n    """Twice x."""\n', 'canonical_solution': '    return 2 * x\n',
                   'test': 'def check(f):\n    assert f(3) == 6\n    assert f(-2) == -4\n', 'entry_point': 'double'}],
}


@pytest.fixture(scope='module')
def hub(tmp_path_factory):
    "A local HTTP server laid out like the hub, with every split of every dataset; HF_ENDPOINT points at it."
    folder = tmp_path_factory.mktemp('hub')
    for name, dataset in DATASETS.items():
        for path in dataset.files.values():
            target = folder / 'datasets' / dataset.repo / 'resolve/main' / path
            target.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(ROWS[name]), target)
    server = serve_folder(folder)
    yield server.url
    server.shutdown()


@pytest.fixture(scope='module')
def downloaded(hub, tmp_path_factory):
    base = tmp_path_factory.mktemp('base')
    env = {**os.environ, 'HF_ENDPOINT': hub, 'IMAGELM_BASE_DIR': str(base)}
    out = subprocess.run([sys.executable, '-m', 'imagelm.chat_datasets', '--workers', '3'], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == sum(len(d.files) for d in DATASETS.values())
    with pytest.MonkeyPatch.context() as patch:     # the tasks read from this base folder, for this module's tests only
        patch.setenv('IMAGELM_BASE_DIR', str(base))
        yield base


@pytest.mark.slow
def test_every_split_is_downloaded_where_the_tasks_read_it(downloaded):
    for name, make in HUB_TASKS.items():
        for split in DATASETS[name].files:
            task = make(split)
            assert len(task) == len(ROWS[name]), (name, split)
            example = task[0]
            assert example['messages'][-1]['role'] == 'assistant' and task.evaluate(example, example['answer']) is not None


@pytest.mark.slow
def test_reference_replies_are_scored_right_and_others_wrong(downloaded):
    gsm = GSM8KTask('test')
    assert all(gsm.evaluate(gsm[i], gsm[i]['messages'][-1]['content'][-1]) for i in range(len(gsm)))
    assert not gsm.evaluate(gsm[0], '#### 5')
    mmlu = MMLUTask('test')
    assert [mmlu[i]['answer'] for i in range(4)] == list('ABCD')
    assert mmlu.evaluate(mmlu[2], 'C) y') and not mmlu.evaluate(mmlu[2], 'D')
    humaneval = HumanEvalTask()
    assert humaneval.evaluate(humaneval[0], humaneval[0]['answer'])
    assert humaneval.evaluate(humaneval[0], '    return x + x\n')
    assert not humaneval.evaluate(humaneval[0], '```python\ndef double(x):\n    return x\n```')


@pytest.mark.slow
def test_hub_tasks_mix_with_synthetic_ones_into_batches(downloaded):
    mixture = make_mixture('gsm8k=1,smoltalk=1,mmlu=1,arc_easy=1,reading=1', 'train', seed=3)
    cfg = ModelConfig(depth=1, d_model=64, n_head=2, n_kv_head=2, seq_len=512)
    batch = next(ConversationLoader(mixture, cfg, batch_rows=2))
    assert batch.byte_ids.shape == (2, 512) and int((batch.targets >= 0).sum()) > 0
    assert {mixture[i]['task'] for i in range(40)} == {'gsm8k', 'smoltalk', 'mmlu', 'arc_easy', 'reading'}


@pytest.mark.slow
def test_a_missing_dataset_names_the_file_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r'gsm8k \(train\) is not downloaded: there is no .*gsm8k/train.parquet.*'
                                                r'python -m imagelm.chat_datasets gsm8k'):
        GSM8KTask('train')


@pytest.mark.slow
def test_a_failed_download_exits_naming_the_file(tmp_path):
    env = {**os.environ, 'HF_ENDPOINT': 'http://127.0.0.1:9', 'IMAGELM_BASE_DIR': str(tmp_path)}
    code = 'import imagelm.download as d, functools; d.download = functools.partial(d.download, retries=1); ' \
           'import imagelm.chat_datasets as c; c.download_all = functools.partial(c.download_all, retries=1, timeout=2); c.main(["gsm8k"])'
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and 'error: could not download' in out.stderr and 'gsm8k' in out.stderr


@pytest.mark.slow
def test_the_sandbox_stops_loops_memory_hogs_and_crashes():
    done = run_python('print(sum(range(10)))')
    assert (done.status, done.output) == ('passed', '45\n')
    assert run_python('while True: pass', timeout=2).status == 'timed out'
    assert run_python('x = bytearray(3 << 30)', memory_mb=256).status == 'out of memory'
    crash = run_python('raise SystemExit("bad")')
    assert crash.status == 'failed' and 'bad' in crash.detail
    assert run_python('import os; print(os.listdir("."))').output == '[]\n'
