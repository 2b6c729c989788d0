"""Chat tasks: held-out examples never appear in training, every example is deterministic and right by its own
evaluate, and the mixture is deterministic and sharded."""
import pytest

from imagelm.conversation import conversation_segments
from imagelm.tasks import (ArithmeticTask, DocsTask, IdentityTask, PictureTask, ReadingTask, SpellingTask, TaskMixture,
                           in_test_split)

GENERATED = {
    'reading': lambda split, n: ReadingTask(split, n, max_chars=64),
    'reading_short': lambda split, n: ReadingTask(split, n, max_chars=4),
    'addition': lambda split, n: ArithmeticTask(split, n, ops='+', digits=(2, 2)),
    'calculator': lambda split, n: ArithmeticTask(split, n, calculator=True),
    'spell': lambda split, n: SpellingTask(split, n, kind='spell'),
    'count': lambda split, n: SpellingTask(split, n, kind='count'),
    'identity': lambda split, n: IdentityTask(split, n),
    **{f'picture_{k}': (lambda k: lambda split, n: PictureTask(split, n, kind=k))(k) for k in ('colour', 'count', 'position', 'character')},
}


@pytest.mark.parametrize('name', list(GENERATED))
def test_held_out_examples_never_appear_in_training(name):
    train, test = GENERATED[name]('train', 1500), GENERATED[name]('test', 300)
    train_keys = {train[i]['key'] for i in range(len(train))}
    test_keys = {test[i]['key'] for i in range(len(test))}
    assert train_keys.isdisjoint(test_keys)
    assert not any(map(in_test_split, train_keys)) and all(map(in_test_split, test_keys))
    if name not in ('reading_short', 'identity'): assert len(test_keys) > 0.5 * len(test)   # mostly distinct examples


@pytest.mark.parametrize('name', list(GENERATED))
def test_examples_are_deterministic_and_their_own_answers_are_right(name):
    task, again = GENERATED[name]('train', 50), GENERATED[name]('train', 50)
    for i in range(0, 50, 7):
        example = task[i]
        assert example['key'] == again[i]['key'] and example['answer'] == again[i]['answer']
        reply = example['messages'][-1]['content']
        text = reply if isinstance(reply, str) else next(p for p in reversed(reply) if isinstance(p, str))
        assert task.evaluate(example, text), (example['key'], text)
        assert not task.evaluate(example, 'certainly not')
        conversation_segments(example['messages'])            # every example is a valid conversation


def test_docs_split_follows_the_corpus_split():
    train, test = DocsTask('train'), DocsTask('test')
    assert {train[i]['key'] for i in range(len(train))}.isdisjoint({test[i]['key'] for i in range(len(test))})


def test_mixture_is_deterministic_weighted_and_sharded():
    tasks = [ReadingTask('train', 100), ArithmeticTask('train', 100)]
    a, b = TaskMixture(tasks, [3, 1], seed=5), TaskMixture(tasks, [3, 1], seed=5)
    assert [a[i]['key'] for i in range(50)] == [b[i]['key'] for i in range(50)]
    assert [a[i]['key'] for i in range(50)] != [TaskMixture(tasks, [3, 1], seed=6)[i]['key'] for i in range(50)]
    share = sum(a[i]['task'] == 'reading' for i in range(2000)) / 2000
    assert abs(share - 0.75) < 0.04
    ranks = [[i for (i, _), _ in zip(a.stream(r, 3, start=10), range(20))] for r in range(3)]
    seen = sorted(i for rank in ranks for i in rank)
    assert seen == list(range(10, 70)) and all(i % 3 == r for r, rank in enumerate(ranks) for i in rank)


@pytest.mark.parametrize('make, message', [
    (lambda: ReadingTask('dev'), 'split must be one of'),
    (lambda: ReadingTask(size=0), 'size must be an int >= 1'),
    (lambda: ReadingTask(kinds=('poems',)), 'kinds must be some of'),
    (lambda: ArithmeticTask(ops='/'), 'ops must be some of'),
    (lambda: ArithmeticTask(digits=(3, 2)), 'digits must be'),
    (lambda: PictureTask(kind='video'), 'kind must be one of'),
    (lambda: TaskMixture([ReadingTask()], [0]), 'weights must be 1 positive'),
    (lambda: ReadingTask(size=3)[3], 'out of range'),
])
def test_bad_arguments_are_refused_by_name(make, message):
    with pytest.raises((ValueError, IndexError), match=message): make()
