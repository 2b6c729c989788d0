"""The chat evals: scores come from each task's own evaluate on held-out examples, the reading summary buckets by
length and by characters per position, the hub evals score multiple choice by the logits of the letters and written
answers by their task (HumanEval's in the sandbox), ChatCORE says what it covers, a missing dataset is skipped, and
the entry point writes JSON and the report, on one process or two."""
import json, subprocess, sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from imagelm.chat_datasets import ARCTask, GSM8KTask, HumanEvalTask, MMLUTask, dataset_file
from imagelm.chat_eval import (EVALS, HUB_EVALS, SYNTHETIC_EVALS, answer_choices, answer_generative, answer_task, centred,
                               char_error_rate, chat_core, edit_distance, eval_order, evaluate_chat, prompt_logits,
                               reading_summary, report_lines, report_metrics, unigram_bpb, val_batches)
from imagelm.conversation import conversation_segments
from imagelm.engine import naive_logits
from imagelm.model import ImageLM, ModelConfig
from imagelm.tasks import ReadingTask, in_test_split
from tiny import env, tiny_checkpoint

ROWS = {   # a few rows of each hub dataset, in its own columns
    'arc_easy': [{'id': f'e{i}', 'question': f'Which of these is number {i}?', 'answerKey': 'ABCDE'[i % k],
                  'choices': {'text': [f'choice {j}' for j in range(k)], 'label': list('ABCDE'[:k])}}
                 for i, k in enumerate([3, 4, 5, 4, 4, 3, 4])],
    'mmlu': [{'question': f'Pick choice {"ABCD"[i % 4]}.', 'subject': 'test', 'choices': ['w', 'x', 'y', 'z'], 'answer': i % 4}
             for i in range(6)],
    'gsm8k': [{'question': f'Tom has {i} boxes of 4 eggs. How many eggs?', 'answer': f'{i}*4=<<{i}*4={4 * i}>>{4 * i}\n#### {4 * i}'}
              for i in range(1, 6)],
    'humaneval': [{'task_id': f'HumanEval/{i}', 'prompt': f'def times_{i}(x):\n    """x times {i}."""\n',
                   'canonical_solution': f'    return {i} * x\n', 'test': f'def check(f):\n    assert f(3) == {3 * i}\n',
                   'entry_point': f'times_{i}'} for i in range(1, 5)],
}


def write_hub_fixtures(names=tuple(ROWS)):
    "The test split of each dataset of `names`, written where `python -m imagelm.chat_datasets` puts it."
    for name in names:
        path = dataset_file(name, 'test')
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(ROWS[name]), path)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    "A base folder of this test's own with the fixture datasets (all but ARC-Challenge, as if it were not downloaded)."
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path))
    write_hub_fixtures()
    return tmp_path


def untrained(seq_len: int = 512) -> ImageLM:
    torch.manual_seed(0)
    return ImageLM(ModelConfig(depth=1, seq_len=seq_len)).eval()


def test_edit_distance_and_cer():
    assert edit_distance('abc', 'abc') == 0 and edit_distance('abc', 'abd') == 1 and edit_distance('ab', 'ba') == 2
    assert char_error_rate('', 'abcd') == 1.0 and char_error_rate('abcd', 'abcd') == 0.0


def test_every_eval_uses_held_out_examples():
    assert set(EVALS) == set(SYNTHETIC_EVALS) | set(HUB_EVALS)
    for name, make in SYNTHETIC_EVALS.items():
        task = make()
        assert task.split == 'test' and len(task) == 1000
        assert all(in_test_split(task[i]['key']) for i in range(20)), name


def test_hub_evals_read_the_test_splits(hub):
    for name, make in HUB_EVALS.items():
        if name == 'arc_challenge': continue
        task = make()
        assert task.split == 'test' and task.dataset == name and len(task) == len(ROWS[name])


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
    assert len(answer_task(model, ReadingTask('test', 3, max_chars=8), n=-1)) == 3        # -1: every example
    measured = evaluate_chat(model, ('picture_colour',), n=3, val_batches_n=1)
    assert measured['evals']['picture_colour']['n'] == 3 and measured['unigram_bpb'] > 4
    assert abs(measured['val_bpb'] - 8.07) < 0.5                      # an untrained model: about log2(268)
    assert model.training                                           # evaluate_chat leaves the mode as it found it


def test_unigram_bpb_is_the_entropy_of_the_byte_frequencies():
    model = ImageLM(ModelConfig(depth=1, seq_len=256))
    bpb = unigram_bpb(val_batches(model, 2))
    assert 4.0 < bpb < 5.5


def test_eval_order_is_a_fixed_permutation():
    assert sorted(eval_order(50)) == list(range(50)) and list(eval_order(50)) == list(eval_order(50))
    assert list(eval_order(50)) != list(range(50)) and list(eval_order(50, seed=1)) != list(eval_order(50))


def test_prompts_packed_together_give_the_logits_of_a_forward_each(hub):
    model, task = untrained(), ARCTask('test', level='easy')
    prompts = [conversation_segments(task[i]['messages'][:-1], reply=True) for i in range(len(task))]
    together = prompt_logits(model, prompts)
    alone = torch.cat([naive_logits(model, p) for p in prompts])
    assert together.shape == (len(task), model.cfg.vocab_size)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_the_categorical_scorer_picks_the_offered_letter_with_the_highest_logit(hub):
    model, task = untrained(), ARCTask('test', level='easy')
    results = answer_choices(model, task, n=-1, batch_size=3)
    assert [r['index'] for r in results] == list(range(len(task))) and sorted(r['row'] for r in results) == list(range(len(task)))
    assert [r['row'] for r in results] == [int(i) for i in eval_order(len(task))]
    for r in results:                                                # the full logits of a plain forward, restricted to the letters
        example = task[r['row']]
        logits = naive_logits(model, conversation_segments(example['messages'][:-1], reply=True))[0]
        letters = example['letters']
        assert r['reply'] == letters[int(logits[[ord(c) for c in letters]].argmax())] and r['letters'] == letters
        assert r['correct'] == (r['reply'] == example['answer'])
    rigged = untrained()
    def prefer_e_then_c(h):                                          # E above all, then C: E wins only where it is offered
        logits = torch.zeros(h.shape[0], rigged.cfg.vocab_size)
        logits[:, [ord('A'), ord('C'), ord('E'), ord('Z')]] = torch.tensor([1.0, 2.0, 3.0, 9.0])
        return logits
    rigged.logits = prefer_e_then_c
    picks = answer_choices(rigged, task, n=-1, batch_size=2)
    assert [r['reply'] for r in picks] == ['E' if len(r['letters']) == 5 else 'C' for r in picks]
    assert {len(r['letters']) for r in picks} == {3, 4, 5}


def test_categorical_prompts_over_the_context_are_wrong_and_counted(hub):
    results = answer_choices(untrained(seq_len=8), MMLUTask('test'), n=3)
    assert [(r['correct'], r['too_long'], r['reply']) for r in results] == [(False, True, None)] * 3


def test_generative_evals_score_replies_by_their_task_and_decode_together_as_alone(hub):
    model = untrained()
    gsm = answer_generative(model, GSM8KTask('test'), n=4, max_tokens=16, batch_size=3, calculator=True)
    alone = answer_generative(model, GSM8KTask('test'), n=4, max_tokens=16, batch_size=1, calculator=True)
    assert [r['reply'] for r in gsm] == [r['reply'] for r in alone] and [r['index'] for r in gsm] == [0, 1, 2, 3]
    assert not any(r['correct'] for r in gsm) and all(r['answer'] == str(4 * (r['row'] + 1)) for r in gsm)
    code = answer_generative(model, HumanEvalTask('test'), n=-1, max_tokens=16, batch_size=4)
    assert len(code) == 4 and all(r['sandbox'] == 'failed' and not r['correct'] for r in code)


def test_chat_core_is_the_mean_centred_accuracy_labelled_by_what_it_covers():
    assert centred(0.25, 0.25) == 0 and centred(1.0, 0.25) == 1 and centred(0.0, 0.25) == pytest.approx(-1 / 3)
    three = {'arc_easy': {'centred': 0.4}, 'mmlu': {'centred': 0.0}, 'gsm8k': {'centred': 0.2}, 'reading': {'accuracy': 1.0}}
    assert chat_core(three) == {'label': 'ChatCORE (3 of 5 tasks)', 'value': pytest.approx(0.2), 'tasks': ['arc_easy', 'mmlu', 'gsm8k']}
    assert chat_core({name: {'centred': 0.5} for name in HUB_EVALS})['label'] == 'ChatCORE'
    assert chat_core({'reading': {'accuracy': 1.0}}) is None


def test_hub_evals_measure_chance_skip_what_is_missing_and_report_chat_core(hub, capsys):
    model = untrained()
    measured = evaluate_chat(model, ('arc_easy', 'arc_challenge', 'mmlu', 'gsm8k', 'humaneval'), n=-1, val_batches_n=0,
                             max_tokens=8, batch_size=4)
    assert capsys.readouterr().out == ('arc_challenge: skipped, its test split is not downloaded; '
                                       'fetch it with: python -m imagelm.chat_datasets arc_challenge\n')
    assert list(measured['skipped']) == ['arc_challenge'] and list(measured['evals']) == ['arc_easy', 'mmlu', 'gsm8k', 'humaneval']
    arc = measured['evals']['arc_easy']
    assert arc['chance'] == pytest.approx(sum(1 / k for k in [3, 4, 5, 4, 4, 3, 4]) / 7) and arc['n'] == 7
    assert arc['centred'] == pytest.approx(centred(arc['accuracy'], arc['chance']))
    assert measured['evals']['mmlu']['chance'] == 0.25 and measured['evals']['gsm8k']['chance'] == 0.0
    assert measured['evals']['humaneval']['sandbox'] == {'failed': 4}
    assert measured['chatcore']['label'] == 'ChatCORE (4 of 5 tasks)'
    assert measured['chatcore']['value'] == pytest.approx(sum(e['centred'] for e in measured['evals'].values()) / 4)
    assert report_metrics(measured)['ChatCORE (4 of 5 tasks)'] == measured['chatcore']['value']
    text = '\n'.join(report_lines(measured))
    assert 'ChatCORE (4 of 5 tasks): ' in text and '- arc_challenge: skipped' in text and 'HumanEval programs in the sandbox' in text


def test_without_any_hub_dataset_nothing_crashes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path))
    measured = evaluate_chat(untrained(), tuple(HUB_EVALS), n=2, val_batches_n=0)
    assert measured['evals'] == {} and list(measured['skipped']) == list(HUB_EVALS) and 'chatcore' not in measured
    assert len(capsys.readouterr().out.splitlines()) == 5
    assert report_metrics(measured) == {}


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    "A tiny base checkpoint (two steps) and the hub fixtures, in a base folder of this module's own."
    folder = tmp_path_factory.mktemp('base')
    tiny_checkpoint(folder, seq_len=512)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('IMAGELM_BASE_DIR', str(folder))
        write_hub_fixtures()
    return folder


def run_eval(folder, *args, processes: int = 1):
    launch = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={processes}', '-m', 'imagelm.chat_eval', '--']
              if processes > 1 else [sys.executable, '-m', 'imagelm.chat_eval'])
    out = subprocess.run([*launch, '--stage=base', '--run=tiny', *args], env=env(folder), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_the_entry_point_writes_the_hub_evals_to_json_and_the_report(checkpoint):
    out = run_eval(checkpoint, '--evals=arc_easy,arc_challenge,mmlu,gsm8k,humaneval', '--examples=-1', '--max_tokens=24',
                   '--val_batches=0', f'--out={checkpoint}/hub.json')
    assert 'arc_challenge: skipped, its test split is not downloaded; fetch it with: python -m imagelm.chat_datasets arc_challenge' in out.stdout
    measured = json.loads((checkpoint / 'hub.json').read_text())
    assert {name: e['n'] for name, e in measured['evals'].items()} == {name: len(ROWS[name]) for name in ROWS}
    assert measured['chatcore']['label'] == 'ChatCORE (4 of 5 tasks)' and measured['args']['max_tokens'] == 24
    section = json.loads((checkpoint / 'report' / 'base_eval.json').read_text())
    assert section['metrics']['ChatCORE (4 of 5 tasks)'] == measured['chatcore']['value'] and section['stage'] == 'base'
    assert 'ChatCORE (4 of 5 tasks): ' in (checkpoint / 'report' / 'base_eval.md').read_text()


@pytest.mark.slow
def test_chat_eval_on_two_gloo_processes_equals_one(checkpoint):
    common = ['--evals=reading,addition_2digit,arc_easy,mmlu,gsm8k,humaneval', '--examples=6', '--val_batches=1', '--max_tokens=24',
              '--batch_size=2']
    run_eval(checkpoint, *common, f'--out={checkpoint}/one.json')
    run_eval(checkpoint, *common, f'--out={checkpoint}/two.json', processes=2)
    a, b = (json.loads((checkpoint / f'{n}.json').read_text()) for n in ('one', 'two'))
    assert {name: e['n'] for name, e in a['evals'].items()} == {name: e['n'] for name, e in b['evals'].items()} == \
        {'reading': 6, 'addition_2digit': 6, 'arc_easy': 6, 'mmlu': 6, 'gsm8k': 5, 'humaneval': 4}
    for name in ('reading', 'addition_2digit', 'gsm8k', 'humaneval'):
        assert [r['reply'] for r in a['evals'][name]['results']] == [r['reply'] for r in b['evals'][name]['results']], name
    assert [r['sandbox'] for r in a['evals']['humaneval']['results']] == [r['sandbox'] for r in b['evals']['humaneval']['results']]
    for name in ('arc_easy', 'mmlu'):
        for x, y in zip(a['evals'][name]['results'], b['evals'][name]['results']):
            assert x['row'] == y['row'] and x['letters'] == y['letters']
            assert x['letter_logits'] == pytest.approx(y['letter_logits'], abs=1e-3)
            top = sorted(x['letter_logits'])
            if top[-1] - top[-2] > 1e-3: assert x['reply'] == y['reply']      # a near tie may fall either way
    assert a['chatcore']['label'] == b['chatcore']['label'] == 'ChatCORE (4 of 5 tasks)'
    assert abs(a['val_bpb'] - b['val_bpb']) < 0.5
    assert '## Chat evals: base run tiny' in (checkpoint / 'report' / 'base_eval.md').read_text()
