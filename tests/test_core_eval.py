"""CORE on a fixture bundle this file writes and serves on 127.0.0.1: download and unzip, the three task types, a
scorer told the answers gets them all, batched scores equal each option alone, a long context keeps its end, and two
gloo processes give the accuracies of one."""
import json, os, subprocess, sys, zipfile

import pytest
import torch

from imagelm.core_eval import (centered, ensure_bundle, evaluate_core, evaluate_example, example_pairs, load_examples,
                               load_tasks, main, option_sequences, score_pairs, scorer)
from imagelm.download import DownloadError, serve_folder
from imagelm.engine import Engine
from imagelm.model import ImageLM, ModelConfig
from imagelm.segments import Bytes, Pixels, pack, special

CORE_YAML = """icl_tasks:
-
  label: tiny_mc
  dataset_uri: reading/tiny_mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
-
  label: tiny_schema
  dataset_uri: reading/tiny_schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
-
  label: tiny_lm
  dataset_uri: lm/tiny_lm.jsonl
  num_fewshot: [0]
  icl_task_type: language_modeling
  continuation_delimiter: " "
"""
META_CSV = """Eval Task,Task Category,Task Type,#shots,Random baseline,Centered Metric?,Description
tiny_mc,reading,multiple choice,2,33.3333,Yes,three choices
tiny_schema,reading,schema,1,50,Yes,two contexts
tiny_lm,language,language modeling,0,0,Yes,continue the text
"""
MC = [{'query': f'What is {a} plus {b}?', 'choices': [str(a + b + d) for d in ((0, 1, 2), (1, 0, 2), (2, 1, 0))[i % 3]],
       'gold': (0, 1, 2)[i % 3]} for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 1), (2, 2), (7, 1), (4, 4)])]
SCHEMA = [{'context_options': ['The cup was full, so the cup', 'The cup was empty, so the cup'][::1 if i % 2 else -1],
           'continuation': f'spilled {i} drops.', 'gold': 0 if i % 2 else 1} for i in range(5)]
LM = [{'context': f'  Count with me: {i}, {i + 1}, ', 'continuation': f'{i + 2}'} for i in range(4)]


def write_zip(path, files: dict) -> None:
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items(): archive.writestr(name, text)


def jsonl(rows) -> str: return ''.join(json.dumps(r) + '\n' for r in rows)


@pytest.fixture(scope='module')
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp('served')
    write_zip(folder / 'eval_bundle.zip', {'eval_bundle/core.yaml': CORE_YAML, 'eval_bundle/eval_meta_data.csv': META_CSV,
                                           'eval_bundle/eval_data/reading/tiny_mc.jsonl': jsonl(MC),
                                           'eval_bundle/eval_data/reading/tiny_schema.jsonl': jsonl(SCHEMA),
                                           'eval_bundle/eval_data/lm/tiny_lm.jsonl': jsonl(LM)})
    good = (folder / 'eval_bundle.zip').read_bytes()
    (folder / 'corrupt.zip').write_bytes(good[:len(good) // 2] + bytes(len(good) - len(good) // 2))
    server = serve_folder(folder)
    yield server.url
    server.shutdown()


@pytest.fixture(scope='module')
def bundle(served, tmp_path_factory):
    return ensure_bundle(f'{served}/eval_bundle.zip', tmp_path_factory.mktemp('data') / 'eval_bundle')


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return ImageLM(ModelConfig(depth=1, seq_len=256)).eval()


def test_the_bundle_is_downloaded_unzipped_and_kept(bundle, served):
    assert sorted(str(p.relative_to(bundle)) for p in bundle.rglob('*') if p.is_file()) == [
        'core.yaml', 'eval_data/lm/tiny_lm.jsonl', 'eval_data/reading/tiny_mc.jsonl', 'eval_data/reading/tiny_schema.jsonl',
        'eval_meta_data.csv']
    assert not bundle.with_name('eval_bundle.zip').exists() and [p.name for p in bundle.parent.iterdir()] == ['eval_bundle']
    assert ensure_bundle(f'{served}/gone.zip', bundle) == bundle           # already there: nothing is fetched


def test_the_url_comes_from_the_environment(served, tmp_path, monkeypatch):
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path))
    monkeypatch.setenv('IMAGELM_EVAL_BUNDLE_URL', f'{served}/eval_bundle.zip')
    assert ensure_bundle() == tmp_path / 'data' / 'eval_bundle' and (tmp_path / 'data' / 'eval_bundle' / 'core.yaml').exists()


def test_the_command_line_fetches_and_lists(served, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path))
    assert main(['--', f'--url={served}/eval_bundle.zip']) == tmp_path / 'data' / 'eval_bundle'
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(tmp_path / 'data' / 'eval_bundle') and len(lines) == 4
    assert lines[1].split()[:3] == ['tiny_mc', 'multiple_choice', '2-shot'] and '6 examples, random baseline 33.3%' in lines[1]


@pytest.mark.slow
def test_python_m_core_eval_download_only(served, tmp_path):
    env = {**os.environ, 'IMAGELM_BASE_DIR': str(tmp_path), 'IMAGELM_EVAL_BUNDLE_URL': f'{served}/eval_bundle.zip'}
    out = subprocess.run([sys.executable, '-m', 'imagelm.core_eval', '--download_only=1'], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(tmp_path / 'data' / 'eval_bundle') and (tmp_path / 'data' / 'eval_bundle' / 'core.yaml').exists()


def test_a_corrupt_zip_is_refused_and_leaves_nothing(served, tmp_path):
    with pytest.raises(DownloadError, match='in 2 tries: .*zip'):
        ensure_bundle(f'{served}/corrupt.zip', tmp_path / 'eval_bundle', retries=2, backoff=0.01)
    assert list(tmp_path.iterdir()) == []


def test_tasks_read_from_core_yaml_and_the_baselines(bundle):
    tasks = load_tasks(bundle)
    assert [(t['label'], t['kind'], t['shots'], t['delimiter'], t['random_baseline']) for t in tasks] == [
        ('tiny_mc', 'multiple_choice', 2, '\nAnswer: ', 33.3333), ('tiny_schema', 'schema', 1, ' ', 50.0),
        ('tiny_lm', 'language_modeling', 0, ' ', 0.0)]
    assert sorted(map(json.dumps, load_examples(tasks[0]))) == sorted(map(json.dumps, MC))


def test_the_pairs_of_each_kind():
    mc = example_pairs(MC[0], 'multiple_choice', '\nAnswer: ', MC[1:3])
    assert [c for _, c in mc] == MC[0]['choices'] and len({ctx for ctx, _ in mc}) == 1
    assert mc[0][0] == 'What is 3 plus 4?\nAnswer: 7\n\nWhat is 5 plus 1?\nAnswer: 6\n\nWhat is 1 plus 2?\nAnswer: '
    schema = example_pairs(SCHEMA[1], 'schema', ' ', [SCHEMA[0]])
    assert [ctx for ctx, _ in schema] == [f'The cup was full, so the cup spilled 0 drops.\n\n{o} ' for o in SCHEMA[1]['context_options']]
    assert {c for _, c in schema} == {'spilled 1 drops.'}
    assert example_pairs(LM[0], 'language_modeling', ' ') == [('Count with me: 0, 1, ', '2')]


def told(right: set, honest: bool = True):
    "A scorer told the right (end of context, continuation) pairs: it prefers them, or avoids them."
    def score(pairs):
        hits = [any(q in ctx.rsplit('\n\n', 1)[-1] and cont == a for q, a in right) for ctx, cont in pairs]   # the last block: the question
        return [(float(hit != honest), hit == honest) for hit in hits]
    return score


RIGHT = ({(e['query'], e['choices'][e['gold']]) for e in MC} | {(e['context_options'][e['gold']], e['continuation']) for e in SCHEMA}
         | {(e['context'].strip(), e['continuation']) for e in LM})


def test_a_scorer_told_the_answers_gets_core_1_and_one_told_to_avoid_them_gets_0(bundle):
    right = evaluate_core(told(RIGHT), bundle)
    assert [r['accuracy'] for r in right['tasks'].values()] == [1.0, 1.0, 1.0] and right['CORE'] == 1.0
    wrong = evaluate_core(told(RIGHT, honest=False), bundle)
    assert [r['accuracy'] for r in wrong['tasks'].values()] == [0.0, 0.0, 0.0]
    assert wrong['tasks']['tiny_mc']['centered'] == pytest.approx(-0.5, abs=1e-4) and wrong['tasks']['tiny_schema']['centered'] == -1.0
    assert centered(0.5, 50.0) == 0.0 and evaluate_core(told(RIGHT), bundle, max_per_task=2)['tasks']['tiny_mc']['examples'] == 2


def test_batched_scores_equal_each_option_alone(model):
    pairs = example_pairs(MC[3], 'multiple_choice', '\nAnswer: ', MC[:2]) + [('A different page.', 'and a longer continuation')]
    scores = score_pairs(model, pairs)
    sequences, _ = option_sequences(pairs, model.cfg)
    cfg = model.cfg
    alone = [model(pack([s], cfg.seq_len, cfg.render, cfg.skip_blank)).item() for s in sequences]
    assert [loss for loss, _ in scores] == pytest.approx(alone, abs=1e-4)
    engine, go_on = Engine(model), Bytes([special('<|continue|>')], train=False)
    greedy = [engine.generate_text([s[0], s[1], go_on], max_tokens=len(c.encode()), temperature=0.0, stop_ids=())[0]
              for s, (_, c) in zip(sequences, pairs)]
    assert [g == c for g, (_, c) in zip(greedy, pairs)] == [first for _, first in scores]


def test_language_modelling_is_right_exactly_when_every_byte_is_the_first_choice():
    "The model is told the answer: a continuation it writes itself greedily is right; one byte changed, it is not."
    torch.manual_seed(1)
    model = ImageLM(ModelConfig(depth=1, seq_len=256)).eval()
    with torch.no_grad():                                   # it writes printable ASCII only: the other rows of its head are zero
        model.head.weight[:32] = 0; model.head.weight[127:] = 0
    context = 'Count with me: 1, 2,'
    written = Engine(model).generate_text([Bytes([special('<|bos|>')], train=False), Pixels(context + ' '),
                                           Bytes([special('<|continue|>')], train=False)], max_tokens=6, temperature=0.0, stop_ids=())[0]
    body = written.lstrip()
    assert body and written.isprintable() and written.isascii()
    task = {'kind': 'language_modeling', 'shots': 0, 'delimiter': ' '}
    told_right = [{'context': context, 'continuation': written}]
    assert evaluate_example(scorer(model), task, told_right, 0)
    changed = body[:-1] + ('x' if body[-1] != 'x' else 'y')
    assert not evaluate_example(scorer(model), task, [{'context': context, 'continuation': changed}], 0)


def test_a_long_context_keeps_its_end(model):
    context = ''.join(f'Fact {i}: a list keeps its order.\n' for i in range(200)) + 'The last question:'
    sequences, lengths = option_sequences([(context + ' ', 'yes'), (context + ' ', 'no, it does not')], model.cfg)
    assert max(lengths) <= model.cfg.seq_len and sequences[0][1].content is sequences[1][1].content
    kept = sequences[0][1].content.kept_text
    assert context.rstrip().endswith(kept.rstrip()) and kept.rstrip().endswith('The last question:') and len(kept) < len(context) // 2
    assert len(score_pairs(model, [(context, 'yes'), (context, 'no, it does not')])) == 2
    with pytest.raises(ValueError, match='more than the 255'): option_sequences([('q', 'x' * 300)], model.cfg)


SHARDED = """
import json, sys, torch
from imagelm.core_eval import evaluate_core, scorer
from imagelm.model import ImageLM, ModelConfig
from imagelm.train import init_process, shutdown_process
proc = init_process('cpu')
torch.manual_seed(0)
model = ImageLM(ModelConfig(depth=1, seq_len=256)).eval()
core = evaluate_core(scorer(model), sys.argv[1], rank=proc.rank, world_size=proc.world_size)
if proc.master: open(sys.argv[2], 'w').write(json.dumps(core))
shutdown_process(proc)
"""


@pytest.mark.slow
def test_two_gloo_processes_give_the_accuracies_of_one(bundle, model, tmp_path):
    (tmp_path / 'sharded.py').write_text(SHARDED)
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    two = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(tmp_path / 'sharded.py'),
                          str(bundle), str(tmp_path / 'two.json')], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    one = evaluate_core(scorer(model), bundle)
    sharded = json.loads((tmp_path / 'two.json').read_text())
    assert {k: r['accuracy'] for k, r in sharded['tasks'].items()} == {k: r['accuracy'] for k, r in one['tasks'].items()}
    assert sharded['CORE'] == pytest.approx(one['CORE'])
