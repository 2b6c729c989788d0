"""Model properties that need many configurations or random trials: masks honoured end to end, 1-D and 2-D positions,
GQA, flex_attention."""
import dataclasses
import importlib.util
import math
import warnings

import pytest
import torch

from imagelm.model import (ImageLM, ModelConfig, batch_flops, parameter_counts, randomize_output_projections,
                           rotary_cos_sin)
from imagelm.render import RenderConfig, Span
from imagelm.segments import Bytes, Pixels, dense_mask, pack, special


def perturbed(cfg: ModelConfig, seed: int = 0) -> ImageLM:
    "A model whose zero-initialised output projections are made non-zero, so that every layer matters."
    torch.manual_seed(seed)
    return randomize_output_projections(ImageLM(cfg), std=0.05, head_std=0.05).eval()


def hidden_of(model: ImageLM, batch) -> torch.Tensor:
    x = model.embed(batch.byte_ids, batch.is_pixel, patches=batch.patches())
    return model.hidden(x, batch.pos, batch.grid, batch.is_pixel, dense_mask(batch.seg_id, batch.is_pixel, batch.doc_id))


def doc(page: str, reply: str) -> list:
    return [Bytes([special('<|bos|>')], train=False), Pixels(page), Bytes.text(reply, before=('<|continue|>',))]


RENDER = RenderConfig(patch_w=32, page_chars=16)
SHAPES = {'mha': dict(depth=2), 'gqa': dict(depth=2, d_model=96, n_head=4, n_kv_head=2)}
CFGS = {f'{name}-{positions}': ModelConfig(**shape, seq_len=96, positions=positions, render=RENDER)
        for name, shape in SHAPES.items() for positions in ('1d', '2d')}
both_positions = pytest.mark.parametrize('positions', ['1d', '2d'])


@pytest.mark.parametrize('cfg', CFGS.values(), ids=CFGS.keys())
def test_packed_documents_do_not_see_each_other(cfg):
    model = perturbed(cfg)
    alone = pack([doc('first page here', ' and bytes')], cfg.seq_len, cfg.render)
    packed = pack([doc('first page here', ' and bytes'), doc('other text', ' more')], cfg.seq_len, cfg.render)
    changed = pack([doc('first page here', ' and bytes'), doc('DIFFERENT!!', ' zzz')], cfg.seq_len, cfg.render)
    n = int((alone.doc_id[0] == 0).sum())
    with torch.no_grad():
        h_alone, h_packed, h_changed = (hidden_of(model, b)[0, :n] for b in (alone, packed, changed))
    torch.testing.assert_close(h_packed, h_alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_changed, h_alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('cfg', CFGS.values(), ids=CFGS.keys())
def test_pages_read_both_ways_and_bytes_only_backwards(cfg):
    model = perturbed(cfg, seed=1)
    a = pack([doc('abcdefgh ijklmnopq', ' xyz')], cfg.seq_len, cfg.render)
    b = pack([doc('abcdefgh ijklmnoZZ', ' xyw')], cfg.seq_len, cfg.render)   # last patch of the page and last byte differ
    with torch.no_grad(): ha, hb = hidden_of(model, a)[0], hidden_of(model, b)[0]
    pixel = torch.nonzero(a.is_pixel[0]).flatten()
    first_patch, last_byte = int(pixel[0]), int(torch.nonzero(a.doc_id[0] == 0).flatten()[-1])
    assert not torch.allclose(ha[first_patch], hb[first_patch])                 # the first patch sees a later one
    torch.testing.assert_close(ha[:first_patch], hb[:first_patch])              # the bos before the page does not
    changed = [t for t in range(last_byte + 1) if not torch.allclose(ha[t], hb[t], atol=1e-6)]
    assert changed[0] == first_patch and last_byte in changed
    c = pack([doc('abcdefgh ijklmnopq', ' xyQ')], cfg.seq_len, cfg.render)          # only the last byte differs from a
    with torch.no_grad(): hc = hidden_of(model, c)[0]
    torch.testing.assert_close(hc[:last_byte], ha[:last_byte])                        # no earlier position sees it
    assert not torch.allclose(hc[last_byte], ha[last_byte])


@both_positions
def test_fused_equals_explicit_on_styled_free_batches_and_explicit_handles_colour(positions):
    cfg = CFGS[f'mha-{positions}']
    model = perturbed(cfg)
    plain = pack([doc('plain words', ' then bytes'), [Pixels(['bold ', Span('word', bold=True)]), Bytes.text('!')]],
                 cfg.seq_len, cfg.render)
    torch.testing.assert_close(model(plain, fused=True), model(plain, fused=False), rtol=1e-5, atol=1e-6)
    coloured = pack([[Pixels(['red ', Span('word', color=(255, 0, 0))]), Bytes.text('ok', before=('<|continue|>',))]],
                    cfg.seq_len, cfg.render)
    assert not coloured.plain
    black = pack([[Pixels(['red ', Span('word')]), Bytes.text('ok', before=('<|continue|>',))]], cfg.seq_len, cfg.render)
    assert not torch.allclose(model(coloured), model(black))


def test_2d_positions_rotate_patches_by_row_and_column_and_bytes_by_position():
    cfg = ModelConfig(depth=1, d_model=96, n_head=2, seq_len=64, positions='2d', render=RENDER)
    batch = pack([doc('row zero text..\nrow one', ' b')], cfg.seq_len, cfg.render)
    cos2, _ = rotary_cos_sin(batch.pos, batch.grid, batch.is_pixel, cfg)
    cos1, _ = rotary_cos_sin(batch.pos, batch.grid, batch.is_pixel, dataclasses.replace(cfg, positions='1d'))
    byte_positions = ~batch.is_pixel[0]
    torch.testing.assert_close(cos2[0, 0][byte_positions], cos1[0, 0][byte_positions])
    pixel = torch.nonzero(batch.is_pixel[0]).flatten()
    assert not torch.allclose(cos2[0, 0][pixel], cos1[0, 0][pixel])
    same_column = [int(t) for t in pixel if batch.grid[0, t, 1] == 0]
    section = cfg.head_dim // 6
    a, b = same_column[:2]
    torch.testing.assert_close(cos2[0, 0, a, :section], cos2[0, 0, b, :section])               # same page start
    torch.testing.assert_close(cos2[0, 0, a, 2 * section:], cos2[0, 0, b, 2 * section:])       # same column


def test_1d_and_2d_positions_differ_on_pages_of_several_patch_rows_only():
    models = {p: perturbed(CFGS[f'gqa-{p}'], seed=2) for p in ('1d', '2d')}     # the same weights: positions add none
    torch.testing.assert_close(models['1d'].state_dict(), models['2d'].state_dict())
    cfg = CFGS['gqa-2d']
    page = pack([doc('two lines of\ntext on a page', ' bytes')], cfg.seq_len, cfg.render)
    assert int(page.grid[..., 0].max()) >= 1                                      # more than one patch row
    with torch.no_grad(): h1, h2 = (hidden_of(models[p], page)[0] for p in ('1d', '2d'))
    pixel = torch.nonzero(page.is_pixel[0]).flatten()
    torch.testing.assert_close(h1[:pixel[0]], h2[:pixel[0]])                     # the bos before the page is the same
    assert all(not torch.allclose(h1[t], h2[t], atol=1e-4) for t in pixel)        # every patch reads the page differently
    assert not torch.allclose(models['1d'](page), models['2d'](page))
    only_bytes = pack([[Bytes([special('<|bos|>')], train=False), Bytes.text('no page at all')]], cfg.seq_len, cfg.render)
    torch.testing.assert_close(models['1d'](only_bytes), models['2d'](only_bytes))  # bytes rotate the same either way


@both_positions
def test_loss_is_uniform_guess_at_init_and_pages_get_gradients(positions):
    torch.manual_seed(0)
    cfg = CFGS[f'mha-{positions}']
    batch = pack([doc('fit me if you can', ' please, model')] * 2, cfg.seq_len, cfg.render)
    assert abs(ImageLM(cfg)(batch).item() - math.log(cfg.vocab_size)) < 0.05
    model = perturbed(cfg)                      # at init the zero output projections keep pages from the loss
    model(batch).backward()
    assert model.patch_embed.weight.grad is not None and model.patch_embed.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_loss_decreases_when_fitting_one_batch():
    torch.manual_seed(0)
    cfg = CFGS['mha-2d']
    model = ImageLM(cfg)
    batch = pack([doc('fit me if you can', ' please, model')] * 2, cfg.seq_len, cfg.render)
    first = model(batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad(); loss = model(batch); loss.backward(); opt.step()
    assert loss.item() < first.item() / 3


def test_config_sizes_and_errors():
    assert (ModelConfig(depth=20).d_model, ModelConfig(depth=20).n_head) == (1280, 10)
    assert ModelConfig(depth=2, d_model=200, n_head=4).head_dim == 50
    for bad, message in [(dict(depth=0), 'depth must be'), (dict(depth=2, n_head=3), 'divisible by n_head'),
                         (dict(depth=2, n_head=4, n_kv_head=3), 'multiple of n_kv_head'), (dict(positions='3d'), "'1d' or '2d'"),
                         (dict(depth=2, d_model=8, n_head=2, positions='2d'), 'at least 6'),
                         (dict(whiten=0), 'shrinkage > 0'), (dict(whiten='yes'), 'shrinkage > 0')]:
        with pytest.raises(ValueError, match=message): ModelConfig(**bad)
    whitened = ImageLM(ModelConfig(depth=1, whiten=1e-3))
    assert whitened.patch_embed.whitener is not None and ImageLM(ModelConfig(depth=1)).patch_embed.whitener is None
    assert 'patch_embed.whitener' in whitened.state_dict()          # a checkpoint says whether it was trained whitened
    with torch.device('meta'): big = ImageLM(ModelConfig(depth=20, seq_len=2048))
    counts = parameter_counts(big)
    assert 380e6 < counts['total'] < 410e6
    batch = pack([doc('a page', ' and bytes')], 2048, big.cfg.render)
    assert batch_flops(big, batch) > 6 * counts['trunk'] * batch.byte_ids.numel()   # every trunk weight, forward and back


def flex_attention_available() -> bool:
    try: return importlib.util.find_spec('torch.nn.attention.flex_attention') is not None
    except ModuleNotFoundError: return False


@pytest.mark.skipif(not flex_attention_available(), reason='torch.nn.attention.flex_attention is not in this torch')
@both_positions
def test_flex_attention_loss_equals_sdpa_loss(positions):
    cfg = ModelConfig(depth=2, d_model=96, n_head=4, n_kv_head=2, seq_len=256, positions=positions, render=RENDER)
    model = perturbed(cfg, seed=3)
    docs = [doc('a first page\nof two lines', ' then its bytes'), doc('short\nlines\n\nand a gap', ' more bytes here')]
    batch = pack(docs, cfg.seq_len, cfg.render, skip_blank=True)
    assert batch.byte_ids.shape[0] == 1 and set(batch.doc_id[0].tolist()) == {-1, 0, 1}   # both in one row, then padding
    assert int(batch.is_pixel.sum()) < int(batch.rendered.n_patches.sum())       # blank patches were left out
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')                                           # flex_attention runs uncompiled here
        flex, sdpa = (model(batch, attention=attention, reduction='none') for attention in ('flex', 'sdpa'))
    assert len(sdpa) > 20
    torch.testing.assert_close(flex, sdpa, rtol=0, atol=1e-4)       # target by target: finer than the mean loss


def test_unknown_attention_is_refused_by_name():
    cfg = CFGS['mha-2d']
    batch = pack([doc('page', ' bytes')], cfg.seq_len, cfg.render)
    with pytest.raises(ValueError, match="attention must be 'sdpa' or 'flex'"): ImageLM(cfg)(batch, attention='other')
