"Packing and the attention rule against plain-Python references, and compiled flex_attention against SDPA."
import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from imagelm.render import RenderConfig, render_batch
from imagelm.segments import (IGNORE_INDEX, VOCAB_SIZE, Bytes, Pixels, block_mask, decode, dense_mask, pack, special)

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
