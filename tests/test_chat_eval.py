"""The chat evals: scores come from each task's own evaluate on held-out examples, the reading summary buckets by
length and by characters per position, and the entry point writes JSON and the report, on one process or two."""
import json, os, subprocess, sys

import pytest
import torch

from imagelm.chat_eval import (EVALS, answer_task, char_error_rate, edit_distance, evaluate_chat, reading_summary,
                               unigram_bpb, val_batches)
from imagelm.model import ImageLM, ModelConfig
from imagelm.tasks import ReadingTask, in_test_split



def test_edit_distance_and_cer():
    assert edit_distance('abc', 'abc') == 0 and edit_distance('abc', 'abd') == 1 and edit_distance('ab', 'ba') == 2
    assert char_error_rate('', 'abcd') == 1.0 and char_error_rate('abcd', 'abcd') == 0.0


def test_every_eval_uses_held_out_examples():
    for name, make in EVALS.items():
        task = make()
        assert task.split == 'test'
        assert all(in_test_split(task[i]['key']) for i in range(20)), name


def test_reading_summary_buckets():
    results = [dict(correct=i % 2 == 0, cer=0.1 * (i % 3), chars=n, positions=max(1, n // 3)) for i, n in enumerate([1, 16, 17, 64, 65, 256, 257, 300])]
    summary = reading_summary(results)
    assert [v['n'] for v in summary['by_length'].values()] == [2, 2, 2, 2]
    assert sum(v['n'] for v in summary['by_chars_per_position'].values()) == 8
    assert summary['exact'] == 0.5


def test_an_untrained_model_is_scored_honestly():
    torch.manual_seed(0)
    model = ImageLM(ModelConfig(depth=1, seq_len=512))
    results = answer_task(model, ReadingTask('test', 50, max_chars=8), n=5)
    assert len(results) == 5 and not any(r['correct'] for r in results) and all(r['cer'] > 0 for r in results)
    measured = evaluate_chat(model, ('picture_colour',), n=3, val_batches_n=1)
    assert measured['evals']['picture_colour']['n'] == 3 and measured['unigram_bpb'] > 4
    assert abs(measured['val_bpb'] - 8.07) < 0.5                      # an untrained model: about log2(268)
    assert model.training                                           # evaluate_chat leaves the mode as it found it


def test_unigram_bpb_is_the_entropy_of_the_byte_frequencies():
    model = ImageLM(ModelConfig(depth=1, seq_len=256))
    bpb = unigram_bpb(val_batches(model, 2))
    assert 4.0 < bpb < 5.5


@pytest.mark.slow
def test_chat_eval_on_two_gloo_processes_equals_one(tmp_path):
    env = {**os.environ, 'IMAGELM_BASE_DIR': str(tmp_path), 'OMP_NUM_THREADS': '1'}
    tiny = ['--max_seq_len=192', '--device_batch_size=2', '--eval_batches=1', '--prefetch=0', '--sample_every=0']
    for module, extra in (('base_train', ['--depth=1', '--num_iterations=2', '--pixel_chars=96', '--byte_chars=48']),
                          ('mid_train', ['--num_iterations=2']), ('chat_sft', ['--num_iterations=2'])):
        out = subprocess.run([sys.executable, '-m', f'imagelm.{module}', '--run=t', *extra, *tiny], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    common = ['--evals=reading,addition_2digit', '--examples=6', '--val_batches=1']
    one = subprocess.run([sys.executable, '-m', 'imagelm.chat_eval', *common, f'--out={tmp_path}/one.json'], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'imagelm.chat_eval',
                          '--', *common, f'--out={tmp_path}/two.json'], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f'{n}.json').read_text()) for n in ('one', 'two'))
    for name in ('reading', 'addition_2digit'):
        assert [r['reply'] for r in a['evals'][name]['results']] == [r['reply'] for r in b['evals'][name]['results']]
    assert abs(a['val_bpb'] - b['val_bpb']) < 0.5 and '## Chat evals: sft run t' in (tmp_path / 'report.md').read_text()
