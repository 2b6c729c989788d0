"Packing and the attention rule against plain-Python references, and compiled flex_attention against SDPA."
import pickle
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from imagelm.render import RenderConfig, render_batch
from imagelm.segments import (IGNORE_INDEX, VOCAB_SIZE, Bytes, Pixels, SequenceTooLong, block_mask, decode, dense_mask,
                              greedy_rows, pack, special)

CFG = RenderConfig(patch_w=32, page_chars=16)
WORDS = ['alpha', 'beta', 'gamma\n', 'δέλτα', '中文', '\t', 'x' * 20, '']


def random_sequence(rng: random.Random) -> list:
    seq = [Bytes([special('<|bos|>')], train=False)]
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.5:
            seq.append(Pixels(' '.join(rng.choice(WORDS) for _ in range(rng.randint(0, 4)))))
        else:
            ids = [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(1, 6))]
            seq.append(Bytes(ids, [rng.random() < 0.7 for _ in ids]))
    return seq


def reference_mask(seg, pix, doc):
    T = len(seg)
    return torch.tensor([[bool(doc[i] == doc[j] and (j <= i or (pix[i] and seg[i] == seg[j]))) for j in range(T)]
                         for i in range(T)])


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('skip_blank', [False, True])
def test_pack_against_reference(seed, skip_blank):
    rng = random.Random(seed)
    seqs = [random_sequence(rng) for _ in range(rng.randint(1, 5))]
    batch = pack(seqs, seq_len=80, cfg=CFG, skip_blank=skip_blank)
    B, T = batch.byte_ids.shape
    assert int(batch.is_pixel.sum()) == batch.patches().shape[0] == batch.slot_glyphs().shape[0]
    seen_docs = set()
    for r in range(B):
        docs = batch.doc_id[r].tolist()
        real = [d for d in docs if d >= 0]
        assert real == sorted(real) and docs[:len(real)] == real            # sequences sit whole, in order, then padding
        seen_docs |= set(real)
        for t in range(T):
            target = int(batch.targets[r, t])
            if target == IGNORE_INDEX: continue
            assert not batch.is_pixel[r, t] and not batch.is_pixel[r, t + 1] and docs[t] == docs[t + 1]
            assert target == int(batch.byte_ids[r, t + 1])
        pos = batch.pos[r].tolist()
        for t in range(1, len(real)):
            if docs[t] == docs[t - 1]: assert pos[t] > pos[t - 1]                # positions grow within a sequence
        mask = dense_mask(batch.seg_id, batch.is_pixel, batch.doc_id)[r, 0]
        assert torch.equal(mask, reference_mask(batch.seg_id[r].tolist(), batch.is_pixel[r].tolist(), docs))
    assert seen_docs == set(range(len(seqs)))
    for d, seq in enumerate(seqs):                                             # every trained byte after a byte is a target
        expected, prev_is_byte = [], False
        for seg in seq:
            if isinstance(seg, Pixels):
                prev_is_byte &= skip_blank and not render_batch([seg.content], CFG).packed_has_ink().any()
                continue
            for i, train in zip(seg.ids, seg.train):
                if prev_is_byte and train: expected.append(i)
                prev_is_byte = True
        got = [t for t in batch.targets[batch.doc_id == d].tolist() if t != IGNORE_INDEX]
        assert got == expected


def test_targets_cross_byte_segments_but_not_pages_or_documents():
    seqs = [[Bytes.text('ab'), Bytes.text('cd')], [Pixels('page'), Bytes.text('ef')]]
    batch = pack(seqs, seq_len=16, cfg=CFG)
    assert decode(batch.targets[0][batch.targets[0] >= 0]) == 'bcdf'


def test_pack_rows_and_errors():
    seqs = [[Bytes.text('x' * 10)] for _ in range(5)]
    assert pack(seqs, seq_len=20, cfg=CFG).byte_ids.shape == (3, 20)
    assert pack(seqs, seq_len=20, cfg=CFG, n_rows=4).byte_ids.shape == (4, 20)
    with pytest.raises(ValueError, match='more than n_rows=2'): pack(seqs, seq_len=20, cfg=CFG, n_rows=2)
    with pytest.raises(ValueError, match='seq_len must be'): pack(seqs, seq_len=0, cfg=CFG)
    with pytest.raises(ValueError, match='non-empty list'): pack([[]], seq_len=20, cfg=CFG)
    with pytest.raises(TypeError, match='must be Pixels or Bytes'): pack([['text']], seq_len=20, cfg=CFG)


def test_sequence_too_long_says_by_how_much():
    with pytest.raises(SequenceTooLong, match='a sequence of 12 positions does not fit seq_len=10') as caught:
        pack([[Bytes.text('x' * 5)], [Bytes.text('x' * 12)]], seq_len=10, cfg=CFG)
    assert isinstance(caught.value, ValueError) and (caught.value.positions, caught.value.seq_len) == (12, 10)
    again = pickle.loads(pickle.dumps(caught.value))
    assert (type(again), again.positions, again.seq_len, str(again)) == (SequenceTooLong, 12, 10, str(caught.value))


@pytest.mark.parametrize('seed', range(4))
def test_greedy_rows_are_the_rows_pack_fills(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([0, 1, 3, 7, 10]) for _ in range(rng.randint(1, 12))]
    rows = greedy_rows(lengths, 10)
    assert [i for row in rows for i in row] == list(range(len(lengths)))          # every sequence once, in order
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    for row, following in zip(rows, rows[1:]):                                        # a row ends only when the next one does not fit
        assert sum(lengths[i] for i in row) + lengths[following[0]] > 10
    seqs = [[Bytes.text('x' * n)] if n else [Pixels('')] for n in lengths]
    batch = pack(seqs, seq_len=10, cfg=CFG, skip_blank=True)
    assert [sorted(set(batch.doc_id[r].tolist()) - {-1}) for r in range(len(rows))] == [
        [i for i in row if lengths[i]] for row in rows]
    assert greedy_rows([], 10) == []
    with pytest.raises(SequenceTooLong): greedy_rows([11], 10)


@pytest.mark.slow
def test_compiled_flex_attention_equals_sdpa():
    rng = random.Random(0)
    batch = pack([random_sequence(rng) for _ in range(6)], seq_len=128, cfg=CFG, n_rows=2)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 128, 16) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(batch.seg_id, batch.is_pixel, batch.doc_id))
    from torch.nn.attention.flex_attention import flex_attention
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        got = torch.compile(flex_attention)(q, k, v, block_mask=block_mask(batch.seg_id, batch.is_pixel, batch.doc_id, 32))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
