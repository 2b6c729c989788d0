"The pretraining loader: exact resume, rank sharding, parquet shards (corrupt ones too), padding, odd documents, prefetch."
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from imagelm.render import RenderConfig
from imagelm.dataloader import (DataConfig, ParquetSource, PretrainLoader, ShardError, list_parquet_files, make_source,
                                 page_positions, row_segments)
from imagelm.segments import IGNORE_INDEX, SPECIAL_TOKENS

FIELDS = ('byte_ids', 'is_pixel', 'seg_id', 'doc_id', 'pos', 'grid', 'targets')
WORDS = ['alpha', 'beta', 'gamma', 'δέλτα', '中文', 'x' * 70, 'def', 'f(x):', '\n', '\n\n', '\t', '🙂']


def make_docs(n, seed=0, longest=1500):
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, longest // 5))]
        docs.append(f"doc {i}: " + ' '.join(words))
    return docs


def assert_same_batch(a, b):
    for name in FIELDS: assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.patches(), b.patches())
    assert torch.equal(a.slot_glyphs(), b.slot_glyphs())


def stream_docs(batches):
    "The documents a run of batches holds, read back from pages and bytes; pieces of a document join up across rows."
    text = ''.join(seg_text for batch in batches for row in range(batch.byte_ids.shape[0])
                   for _, _, seg_text in row_segments(batch, row))
    assert text.startswith('<|bos|>')
    return text.replace('<|continue|>', '').split('<|bos|>')[1:]


def write_shards(folder, shards, row_group_size=4):
    for n, texts in enumerate(shards):
        pq.write_table(pa.table({'text': texts}), folder / f"shard_{n:05d}.parquet", row_group_size=row_group_size)
    return folder


@pytest.fixture
def shard_dir(tmp_path):
    shards = [make_docs(10, seed=n, longest=400) + ['', None, '   \n'] for n in range(3)]
    return write_shards(tmp_path, shards), shards


@pytest.mark.parametrize('source,skip_blank', [('embedded', False), ('embedded', True), ('list', False), ('parquet', False)])
def test_restore_is_exact(source, skip_blank, shard_dir):
    if source == 'list': source = make_docs(12, longest=300)        # a few batches go round several epochs
    if source == 'parquet': source = str(shard_dir[0])
    cfg = DataConfig(source=source, seq_len=256, batch_rows=3, skip_blank=skip_blank, pixel_chars=96, byte_chars=48)
    loader = PretrainLoader(cfg)
    for _ in range(3): next(loader)
    state = json.loads(json.dumps(loader.state_dict()))               # a state survives a checkpoint as JSON
    expected = [next(loader) for _ in range(4)]
    restored = PretrainLoader(cfg, state=state)
    for a in expected: assert_same_batch(a, next(restored))
    other = PretrainLoader(cfg)                                       # load_state_dict on a loader that moved on
    next(other)
    other.load_state_dict(state)
    assert_same_batch(expected[0], next(other))
    if isinstance(source, list): assert loader.state_dict()['epoch'] > 0


@pytest.mark.parametrize('world_size', [2, 3])
def test_ranks_are_disjoint_and_cover(world_size):
    docs = make_docs(300, longest=500)                                # 5 row groups of 64
    cfg = DataConfig(source=docs, seq_len=512, batch_rows=4, pixel_chars=128, byte_chars=64, skip_blank=False)  # blank pages kept: every character comes back
    per_rank = [stream_docs(list(PretrainLoader(cfg, rank, world_size, loop=False))) for rank in range(world_size)]
    ids = [[int(d.split(':')[0][4:]) for d in got] for got in per_rank]
    for rank, got in enumerate(ids):                                  # rank r reads row groups r, r + world_size, ...
        assert got == [i for i in range(300) if (i // 64) % world_size == rank]
    assert sorted(sum(ids, [])) == list(range(300))
    for got, rank_ids in zip(per_rank, ids):
        assert got == [docs[i] for i in rank_ids]                     # every character once, in order


def test_parquet_shards(shard_dir):
    folder, shards = shard_dir
    assert [p.name for p in list_parquet_files(folder)] == [f"shard_{n:05d}.parquet" for n in range(3)]
    real = lambda texts: [t for t in texts if t and not t.isspace()]
    train = DataConfig(source=str(folder), seq_len=256, batch_rows=2, pixel_chars=96, byte_chars=48, skip_blank=False)
    assert stream_docs(list(PretrainLoader(train, loop=False))) == real(shards[0]) + real(shards[1])
    val = DataConfig(source=str(folder), split='val', seq_len=256, batch_rows=2, skip_blank=False)
    assert stream_docs(list(PretrainLoader(val, loop=False))) == real(shards[2])
    by_rank = [stream_docs(list(PretrainLoader(train, rank, 2, loop=False))) for rank in range(2)]
    assert sorted(by_rank[0] + by_rank[1]) == sorted(real(shards[0]) + real(shards[1]))
    assert not set(by_rank[0]) & set(by_rank[1])


@pytest.mark.parametrize('prefetch', [False, True])
def test_bad_shards_name_the_file(shard_dir, prefetch):
    folder, _ = shard_dir
    (folder / 'shard_00001.parquet').write_bytes(b'PAR1 this is not parquet')
    loader = PretrainLoader(DataConfig(source=str(folder), seq_len=256, batch_rows=2), loop=False, prefetch=prefetch)
    with pytest.raises(ShardError, match='shard_00001.parquet'):
        for _ in loader: pass
    assert loader._prefetcher is None                                 # the prefetch thread is gone
    with pytest.raises(ShardError, match='missing.parquet'):
        list(ParquetSource([folder / 'missing.parquet']).row_groups())
    pq.write_table(pa.table({'body': ['no text column']}), folder / 'notext.parquet')
    with pytest.raises(ShardError, match='notext.parquet'):
        list(ParquetSource([folder / 'notext.parquet']).row_groups())


FOUR_PATCHES_A_ROW = dict(patch_w=32, page_chars=16)   # 16 characters a line, 4 to a patch


def test_the_shortest_rows_allowed_carry_every_document():
    "<|bos|>, a page row of 4 patches, <|continue|> and a byte: 7 positions a row must be enough."
    docs = make_docs(3, seed=2, longest=150) + ['y' * 50]
    cfg = DataConfig(source=docs, seq_len=7, batch_rows=3, pixel_chars=32, byte_chars=8, skip_blank=False,
                     render=FOUR_PATCHES_A_ROW)
    assert stream_docs(list(PretrainLoader(cfg, loop=False))) == docs


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match='seq_len=6 is too small'): DataConfig(seq_len=6, render=FOUR_PATCHES_A_ROW)
    with pytest.raises(ValueError, match='rank'): PretrainLoader(DataConfig(source=['a b']), rank=2, world_size=2)
    write_shards(tmp_path, [['only one shard']])
    with pytest.raises(ValueError, match='at least 2'): make_source(str(tmp_path))
    with pytest.raises(FileNotFoundError, match='nowhere'): make_source(str(tmp_path / 'nowhere'))
    state = PretrainLoader(DataConfig(source=['a b c'])).state_dict()
    with pytest.raises(ValueError, match='seed'): PretrainLoader(DataConfig(source=['a b c'], seed=1), state=state)
    with pytest.raises(ValueError, match='source'): PretrainLoader(DataConfig(source=['other']), state=state)


def recount_positions(batch, skip_blank: bool) -> list:
    "Positions the segments of each row take, counted from what they hold: a page's patch rows, a byte span's ids."
    layouts, counts = iter(batch.rendered.layouts), []
    for row in range(batch.byte_ids.shape[0]):
        n = 0
        for _, kind, text in row_segments(batch, row):
            if kind == 'pixels': n += int(page_positions(next(layouts), skip_blank)[-1]); continue
            n_special = sum(text.count(name) for name in SPECIAL_TOKENS)
            for name in SPECIAL_TOKENS: text = text.replace(name, '')
            n += n_special + len(text.encode('utf-8'))
        counts.append(n)
    return counts


@pytest.mark.parametrize('skip_blank', [False, True])
def test_padding_is_small_and_counted_right(skip_blank):
    rows, seq_len = 4, 1024
    loader = PretrainLoader(DataConfig(seq_len=seq_len, batch_rows=rows, skip_blank=skip_blank))
    for _ in range(5):
        batch = next(loader)
        counts = recount_positions(batch, skip_blank)
        assert loader.last['positions'] == sum(counts)
        assert loader.last['padding'] == pytest.approx(1 - sum(counts) / (rows * seq_len))
        for row, n in enumerate(counts):                              # padding fills each row after its segments
            assert (batch.doc_id[row, :n] >= 0).all() and (batch.doc_id[row, n:] < 0).all()
            assert not batch.is_pixel[row, n:].any() and (batch.targets[row, n:] == IGNORE_INDEX).all()
    assert loader.stats()['padding'] < 0.02


def test_unrenderable_documents_train():
    docs = ['\x00\x01\x02', '🙂🚀🎉', '\x7f\x80\x81\x82', 'a\ud800b']  # controls, emoji, C1 controls, a lone surrogate
    batches = list(PretrainLoader(DataConfig(source=docs, seq_len=64, batch_rows=2, skip_blank=False, render=RenderConfig(patch_w=32)),
                                  loop=False))     # one document a row
    assert stream_docs(batches) == docs[:3] + ['a\ufffdb']
    for row in range(2):
        targets = batches[0].targets[row]
        assert (targets != IGNORE_INDEX).sum() >= 1                   # each row's document has a byte to predict
    first_patch = batches[0].grid[batches[0].is_pixel][:, 1] == 0
    assert batches[0].patches()[first_patch].bool().any(1).all()     # every page shows its characters


def test_prefetch_matches_and_stops():
    cfg = DataConfig(seq_len=512, batch_rows=2)
    plain = PretrainLoader(cfg)
    expected = [next(plain) for _ in range(5)]
    with PretrainLoader(cfg, prefetch=True) as fetched:
        for a in expected[:3]: assert_same_batch(a, next(fetched))
        thread = fetched._prefetcher.thread
        assert thread.is_alive()
        fetched.close()                                               # stops the thread, keeps the position
        assert not thread.is_alive()
        for a in expected[3:]: assert_same_batch(a, next(fetched))   # and starts again where it stopped
        assert fetched.state_dict() == plain.state_dict()
    stats = fetched.stats()
    assert stats['batches'] == 5 and 0 <= stats['loader_fraction'] <= 1
    assert stats['positions_per_s'] > 0 and stats['chars_per_s'] > 0 and fetched.last['build_s'] > 0


@pytest.mark.parametrize('render', [dict(patch_w=16, page_chars=32), dict(patch_w=32, patch_h=32, page_chars=32)])
@pytest.mark.parametrize('skip_blank', [False, True])
def test_other_geometries_pack_as_planned(render, skip_blank):
    docs = make_docs(40, seed=1, longest=800) + ['\n\n\n   x', 'y' * 300]
    cfg = DataConfig(source=docs, seq_len=96, batch_rows=3, pixel_chars=80, byte_chars=20, skip_blank=skip_blank,
                     render=render)
    loader = PretrainLoader(cfg, loop=False)
    batches = list(loader)                                            # _build checks pack's rows against the plan
    assert loader.stats()['padding'] < 0.1
    if not skip_blank: assert stream_docs(batches) == docs


def test_dropped_prefetching_loader_stops_its_thread():
    import gc
    loader = PretrainLoader(DataConfig(seq_len=256, batch_rows=2), prefetch=True)
    next(loader)
    thread = loader._prefetcher.thread
    del loader
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_rank_without_documents_says_so():
    with pytest.raises(ValueError, match='no documents for rank 1'):
        next(PretrainLoader(DataConfig(source=make_docs(10), seq_len=256), rank=1, world_size=2))
