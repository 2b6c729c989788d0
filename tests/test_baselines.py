"""The baselines: the same targets in the three formats, the byte-patch input, homoglyphs, and bench/compare.py and
bench/ablate.py end to end on a tiny budget."""
import json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from imagelm.baselines import (HOMOGLYPHS, KINDS, BlankSpaceBytePatchLM, BytePatchLM, ByteGPT, ByteLoader,
                               batch_slot_bytes, byte_gpt_segments, bytes_length, char_vectors,
                               homoglyph_swap, homoglyph_unswap, look_alike_cosines, make_model, pack_pieces,
                               packed_slot_codepoints, val_pieces)
from imagelm.dataloader import DataConfig, PretrainLoader, document_spans
from imagelm.model import ModelConfig
from imagelm.optim import OptimConfig, setup_optimizers
from imagelm.render import RenderConfig, render_batch
from imagelm.segments import IGNORE_INDEX, N_BYTES, Bytes, Pixels, pack

ROOT = Path(__file__).resolve().parent.parent
TINY = ['--depth=1', '--d_model=48', '--seq_len=128', '--batch_rows=2', '--pixel_chars=96', '--byte_chars=48',
        '--eval_batches=1', '--n_evals=1', '--device=cpu', '--quiet']


def targets(batches) -> list:
    out = []
    for b in batches:
        t = b.targets[b.targets != IGNORE_INDEX]
        out += t[t < N_BYTES].tolist()
    return out


@pytest.fixture(scope='module')
def val():
    loader = PretrainLoader(DataConfig(seq_len=192, batch_rows=2, pixel_chars=96, byte_chars=48, split='val'), loop=False)
    batches = [next(loader) for _ in range(3)]
    loader.close()
    return batches


def test_same_targets_in_the_three_formats(val):
    pieces = val_pieces(val)
    pages = pack_pieces(pieces, 192, 2, render=val[0].rendered.cfg, skip_blank=DataConfig.skip_blank)
    as_bytes = pack_pieces(pieces, bytes_length(pieces), 2, fmt='bytes')
    assert targets(pages) == targets(val) == targets(as_bytes) and len(targets(val)) > 100
    for a, b in zip(val, pages):          # read back and packed again: the loader's own batches
        for name in ('byte_ids', 'is_pixel', 'pos', 'targets'): assert torch.equal(getattr(a, name), getattr(b, name))
    assert all(b.rendered is None for b in as_bytes)
    # the byte-patch model reads exactly the batches ImageLM reads; all three give a finite loss on them
    cfg = ModelConfig(depth=1, d_model=32, seq_len=192)
    for kind, batches in (('imagelm', val), ('byte_patch', val), ('byte_gpt', as_bytes)):
        model = make_model(kind, cfg if kind != 'byte_gpt' else ModelConfig(depth=1, d_model=32, seq_len=as_bytes[0].byte_ids.shape[1]))
        assert torch.isfinite(model(batches[0]))
    with pytest.raises(ValueError, match='bytes only'): ByteGPT(cfg)(val[0])


def test_byte_gpt_segments_of_a_document():
    text = 'Ünïcode and ASCII text, mixed.\n\tIndented line. ' * 8
    spans = document_spans(text, DataConfig(pixel_chars=64, byte_chars=32))
    as_pages, as_bytes = pack([spans], 1024), pack([byte_gpt_segments(spans)], 1024)
    assert targets([as_pages]) == targets([as_bytes])
    ids = as_bytes.byte_ids[0, 1:int((as_bytes.doc_id[0] >= 0).sum())].tolist()
    assert bytes(ids).decode() == text                # the whole text, no markers left


@pytest.mark.parametrize('k', [2, 4, 8])
def test_byte_patch_input_is_its_k_characters(k):
    cfg = RenderConfig(patch_w=8 * k)
    texts = ['héllo wörld, 😀 emoji', 'line one\nline two is a bit longer than the page is wide, so that it wraps around once']
    rendered = render_batch(texts, cfg)
    codes = packed_slot_codepoints(rendered)
    start = 0
    for lay, n in zip(rendered.layouts, rendered.n_patches.tolist()):
        page = codes[start:start + n]; start += n
        chars = {}
        for ch, line, col in zip(lay.kept_text, lay.line, lay.col):
            if ch != '\n': chars[(int(line), int(col))] = ch
        for p in range(n):
            row, q = divmod(p, cfg.patches_per_row)
            want = [chars.get((row, q * k + s)) for s in range(k)]
            got = [chr(c) if c >= 0 else None for c in page[p].tolist()]
            assert got == want
    batch = pack([[Pixels(texts[0]), Bytes.text('x', before=('<|continue|>',))]], 256, cfg)
    sb = batch_slot_bytes(batch)
    assert sb.shape == (int(batch.is_pixel.sum()), k, 4)
    assert bytes(b for b in sb.flatten().tolist() if b >= 0).decode() == texts[0]
    model = BytePatchLM(ModelConfig(depth=1, d_model=32, render=cfg))
    emb = model.patch_embed(sb)
    row = lambda s, j, b: model.patch_embed.weight[(s * 4 + j) * 256 + b]
    chars = texts[0][:k]
    by_hand = sum(row(s, j, b) for s, ch in enumerate(chars) for j, b in enumerate(ch.encode()))
    assert torch.allclose(emb[0], by_hand, atol=1e-5)


def test_blank_space_byte_patch_sees_spaces_as_empty_slots():
    cfg = RenderConfig(patch_w=32)
    trailing, none = (pack([[Pixels(text), Bytes.text('x', before=('<|continue|>',))]], 64, cfg) for text in ('ab  ', 'ab'))
    model_cfg = ModelConfig(depth=1, d_model=32, seq_len=64, render=cfg)
    seen, blank = BytePatchLM(model_cfg), BlankSpaceBytePatchLM(model_cfg)
    assert torch.equal(blank.slot_bytes(trailing), seen.slot_bytes(none))         # 'ab  ' reads as 'ab', as on the page
    assert not torch.equal(seen.slot_bytes(trailing), seen.slot_bytes(none))       # the byte-patch model tells them apart
    inner = pack([[Pixels('a b c')]], 64, cfg)
    assert blank.slot_bytes(inner)[0, :, 0].tolist() == [ord('a'), -1, ord('b'), -1]
    assert 'byte_patch_blank_spaces' in KINDS and isinstance(make_model('byte_patch_blank_spaces', model_cfg), BytePatchLM)


def test_homoglyph_swap_properties():
    text = 'The Quick brown fox jumps over the lazy dog. PYTHON 3.12 :: ASCII only?\n\tyes'
    for rate in (0.0, 0.3, 1.0):
        out = homoglyph_swap(text, rate, seed=7)
        assert len(out) == len(text)
        assert homoglyph_unswap(out) == text
        assert out == homoglyph_swap(text, rate, seed=7)
        assert all(a == b or HOMOGLYPHS[a] == b for a, b in zip(text, out))
    assert homoglyph_swap(text, 0.0) == text
    full = homoglyph_swap(text, 1.0)
    assert not any(ch in HOMOGLYPHS for ch in full)
    rng_share = np.mean([a != b for a, b in zip(text * 50, homoglyph_swap(text * 50, 0.5, 1)) if a in HOMOGLYPHS])
    assert 0.4 < rng_share < 0.6
    assert homoglyph_swap(text, 0.5, 1) != homoglyph_swap(text, 0.5, 2)
    with pytest.raises(ValueError): homoglyph_swap(text, -0.1)


def test_byte_loader_rows():
    loader = ByteLoader(DataConfig(seq_len=96, batch_rows=3))
    for _ in range(3):
        b = next(loader)
        assert b.byte_ids.shape == (3, 96) and b.rendered is None
        assert loader.last['positions'] > 3 * 96 - 10 and 0 < loader.last['chars'] <= loader.last['positions']
        ok = b.targets[:, :-1] >= 0
        assert torch.equal(b.targets[:, :-1][ok], b.byte_ids[:, 1:][ok])
    loader.close()


def run(script: str, *args, timeout=120):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}
    out = subprocess.run([sys.executable, str(ROOT / 'bench' / script), *args], env=env, capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_compare_end_to_end(tmp_path):
    out = tmp_path / 'compare.json'
    run('compare.py', '--minutes=0.05', *TINY, f'--out={out}')
    result = json.loads(out.read_text())
    for kind in ('imagelm', 'byte_gpt', 'byte_patch'):
        r = result[kind]
        for key in ('val_bpb', 'positions_per_char', 'chars_per_s', 'flops', 'minutes', 'mfu_percent'):
            assert isinstance(r[key], (int, float)) and np.isfinite(r[key]) and r[key] > 0, (kind, key)
        assert 0 < r['val_bpb'] < 12 and r['minutes'] <= 0.05 + 0.05
        assert set(r['homoglyph']) >= {'clean', 'swapped', 'delta'} and r['homoglyph']['windowed'] >= 0
        assert set(r['look_alikes']) == {'start', 'end'} and r['look_alikes']['end']['O0'] != r['look_alikes']['start']['O0']
    assert len({result[k]['val_targets'] for k in ('imagelm', 'byte_gpt', 'byte_patch')}) == 1
    assert result['byte_gpt']['positions_per_char'] > result['imagelm']['positions_per_char']
    assert {'machine', 'git_commit', 'args', 'setup', 'corpus_hash', 'created'} <= set(result)
    assert result['machine']['peak_flops'] > 0 and len(result['git_commit']) >= 40 and result['args']['minutes'] == 0.05
    assert all(0 < result[k]['mfu_percent'] <= 100 for k in ('imagelm', 'byte_gpt', 'byte_patch'))
    assert out.with_suffix('.png').stat().st_size > 1000


@pytest.mark.slow
def test_compare_equal_flops(tmp_path):
    out = tmp_path / 'flops.json'
    run('compare.py', '--flops=2e9', '--homoglyph_rate=0', '--models', 'imagelm', 'byte_gpt', *TINY, f'--out={out}')
    result = json.loads(out.read_text())
    assert result['mode'] == 'flops'
    for kind in ('imagelm', 'byte_gpt'):
        assert 2e9 <= result[kind]['flops'] < 2e9 * 1.5 + 1e9


@pytest.mark.slow
def test_ablate_end_to_end(tmp_path):
    out = tmp_path / 'ablate.json'
    variants = ['base', 'k8', 'pos2d', 'skip_blank', 'skip_blank+k8', 'whiten+patch_lr_x4', 'skip_blank+show_spaces']
    run('ablate.py', '--minutes=0.03', '--variants', *variants, *TINY, f'--out={out}')
    result = json.loads(out.read_text())
    assert result['variants'] == variants
    for name in result['variants']:
        assert np.isfinite(result[name]['val_bpb']) and result[name]['positions_per_char'] > 0
    assert result['skip_blank']['positions_per_char'] < result['base']['positions_per_char']
    assert result['k8']['positions_per_char'] < result['base']['positions_per_char']
    both = result['skip_blank+k8']
    assert both['settings'] == {**result['base']['settings'], 'chars_per_patch': 8, 'skip_blank': True}
    assert both['positions_per_char'] < min(result['k8']['positions_per_char'], result['skip_blank']['positions_per_char'])
    whitened = result['whiten+patch_lr_x4']
    assert whitened['settings'] == {**result['base']['settings'], 'whiten': 1e-3, 'patch_lr_scale': 4.0}
    assert whitened['look_alikes']['start']['O0'] < result['base']['look_alikes']['start']['O0'] - 0.3
    assert result['skip_blank+show_spaces']['settings']['show_spaces'] is True
    assert result['skip_blank+show_spaces']['positions_per_char'] >= result['skip_blank']['positions_per_char']
    assert out.with_suffix('.png').stat().st_size > 1000


@pytest.mark.slow
def test_seeds_are_averaged(tmp_path):
    out = tmp_path / 'seeds.json'
    run('compare.py', '--flops=1e9', '--homoglyph_rate=1', '--models', 'imagelm', '--seeds', '3', '4', *TINY, f'--out={out}')
    r = json.loads(out.read_text())['imagelm']
    assert [s['seed'] for s in r['seeds']] == [3, 4]
    bpbs = [s['val_bpb'] for s in r['seeds']]
    assert bpbs[0] != bpbs[1], 'two seeds trained the same model'
    assert r['val_bpb'] == pytest.approx(np.mean(bpbs)) and r['val_bpb_std'] == pytest.approx(np.std(bpbs, ddof=1))
    assert r['curve'][-1][-1] == pytest.approx(r['val_bpb'])
    assert r['steps'] == pytest.approx(np.mean([s['steps'] for s in r['seeds']]))
    assert set(r['homoglyph']) >= {'clean', 'swapped', 'delta'}


@pytest.mark.slow
@pytest.mark.parametrize('bad, message', [('foo', "unknown variant 'foo'"), ('k2+k8', 'changes the same setting twice'),
                                          ('base+k8', "unknown variant 'base'")])
def test_ablate_refuses_bad_variants(bad, message):
    out = subprocess.run([sys.executable, str(ROOT / 'bench' / 'ablate.py'), '--variants', bad], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and message in out.stderr, out.stderr


@pytest.mark.parametrize('kind', ['imagelm', 'byte_patch'])
def test_patch_lr_scale_scales_only_the_patch_embedding(kind):
    model = make_model(kind, ModelConfig(depth=1, d_model=64, seq_len=64))
    lrs = lambda optimizers: {g['name']: (g['lr'], g['initial_lr']) for opt in optimizers for g in opt.param_groups}
    plain, scaled = lrs(setup_optimizers(model)), lrs(setup_optimizers(model, OptimConfig(patch_lr_scale=4.0)))
    expected = OptimConfig.embedding_lr * (64 / 768) ** -0.5 * model.patch_embed.init_std     # scaled by its initial size
    assert plain['patch_embed'] == pytest.approx((expected, expected))
    assert scaled['patch_embed'] == pytest.approx(tuple(4 * lr for lr in plain['patch_embed']))
    assert {k: v for k, v in scaled.items() if k != 'patch_embed'} == {k: v for k, v in plain.items() if k != 'patch_embed'}


def test_look_alike_cosines_tell_pixels_from_byte_tables():
    cfg = ModelConfig(depth=1, d_model=96, seq_len=64)
    torch.manual_seed(0)
    pixels, whitened, table = (make_model('imagelm', cfg), make_model('imagelm', ModelConfig(**{**cfg.to_dict(), 'whiten': 1e-3})),
                               make_model('byte_patch', cfg))
    raw_probe, whitened_probe, table_probe = (look_alike_cosines(m) for m in (pixels, whitened, table))
    assert raw_probe['O0'] > 0.9 and raw_probe['1I'] > 0.7          # nearly the same pixels, nearly the same vector
    assert whitened_probe['O0'] < raw_probe['O0'] - 0.3 and whitened_probe['mean'] < raw_probe['mean']
    assert abs(table_probe['mean']) < 0.2 and abs(table_probe['all_pairs_mean']) < 0.05   # independent random rows
    assert set(raw_probe) == {'O0', '1I', 'l1', 'lI', '.,', 'rn', 'mean', 'all_pairs_mean'}
    torch.testing.assert_close(char_vectors(table, 'A'), table.patch_embed.weight[[65]])
    with pytest.raises(ValueError, match='printable ASCII'): char_vectors(pixels, 'é')
