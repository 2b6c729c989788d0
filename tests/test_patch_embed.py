"""The fused render-and-embed path of imagelm.patch_embed against the explicit one, on real rendered corpus pages:
same embeddings and same weight gradients for every patch geometry, plus the path choice and the errors.
The notebook nbs/02_patch_embed.ipynb teaches and checks the same things step by step."""
import numpy as np
import pytest
import torch

from imagelm.corpus import load_embedded_corpus
from imagelm.patch_embed import PatchEmbedding, glyph_whitener
from imagelm.render import Picture, RenderConfig, Span, get_atlas, render_batch

GEOMETRIES = {'k=2': RenderConfig(patch_w=16), 'k=4': RenderConfig(patch_w=32), 'k=8': RenderConfig(patch_w=64),
              'k=4, 2 lines': RenderConfig(patch_w=32, patch_h=32), 'k=8, spaces shown': RenderConfig(show_spaces=True)}
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}   # largest error relative to the largest value


@pytest.fixture(scope='module')
def styled_texts():
    "Corpus documents in regular, bold, italic and bold-italic spans, a fallback glyph and a tab: still plain."
    docs = load_embedded_corpus().train[20:24]
    return [docs[0][:400],
            [Span(docs[1][:150]), Span(docs[1][150:250], bold=True), Span(docs[1][250:350], italic=True),
             Span(docs[1][350:450], bold=True, italic=True), '\t中\u0007'],
            docs[2][:250], docs[3][:90]]


def relative_error(a, b): return ((a - b).abs().max() / b.abs().max()).item()


def embed_and_grad(embedding, embed, loss_weights):
    embedding.weight.grad = None
    out = embed()
    (out * loss_weights).sum().backward()
    return out.detach(), embedding.weight.grad


@pytest.mark.parametrize('whiten', [False, True], ids=['raw', 'whitened'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize('name', GEOMETRIES)
def test_fused_equals_explicit_forward_and_backward(name, dtype, whiten, styled_texts):
    cfg = GEOMETRIES[name]
    rendered = render_batch(styled_texts, cfg)
    assert rendered.plain
    torch.manual_seed(0)
    embedding = PatchEmbedding(cfg, d_model=96, whitener=glyph_whitener(get_atlas()) if whiten else None).to(dtype)
    loss_weights = torch.randn(int(rendered.n_patches.sum()), 96, dtype=dtype)
    explicit, explicit_grad = embed_and_grad(embedding, lambda: embedding(rendered.packed_patches()), loss_weights)
    fused, fused_grad = embed_and_grad(
        embedding, lambda: embedding.forward_glyphs(rendered.packed_slot_glyphs(), rendered.atlas), loss_weights)
    assert fused.dtype == dtype and fused.shape == explicit.shape
    assert relative_error(fused, explicit) < TOLERANCE[dtype]
    assert relative_error(fused_grad, explicit_grad) < TOLERANCE[dtype]


def test_padded_pages_and_blank_patches(styled_texts):
    cfg = RenderConfig()
    rendered = render_batch(styled_texts, cfg)
    embedding = PatchEmbedding(cfg, 32).double()
    with torch.no_grad():
        fused = embedding.forward_glyphs(rendered.slot_glyphs(), rendered.atlas)      # (pages, most patches, d)
        torch.testing.assert_close(fused, embedding(rendered.patches()))
    assert fused.shape[:2] == rendered.patch_mask().shape
    assert (fused[~rendered.patch_mask()] == 0).all()


@pytest.mark.parametrize('whiten', [False, True], ids=['raw', 'whitened'])
def test_gray_page_equals_black_rgb_page(whiten, styled_texts):
    cfg = RenderConfig()
    gray = render_batch([styled_texts[0]], cfg)
    black = render_batch([Span(styled_texts[0], color=(0, 0, 0))], cfg)
    assert gray.plain and not black.plain
    embedding = PatchEmbedding(cfg, 48, whitener=glyph_whitener(get_atlas()) if whiten else None).double()
    with torch.no_grad():
        torch.testing.assert_close(embedding(black.packed_patches()), embedding(gray.packed_patches()))


def test_forward_rendered_picks_the_path(monkeypatch, styled_texts):
    cfg = RenderConfig()
    embedding = PatchEmbedding(cfg, 32).double()
    red = render_batch([['plain, ', Span('red', color=(255, 0, 0))]], cfg)
    picture = render_batch([['a picture', Picture(np.full((4, 4, 3), 90, np.uint8), 1)]], cfg)
    with torch.no_grad():
        for batch in (red, picture):
            assert not batch.plain
            torch.testing.assert_close(embedding.forward_rendered(batch), embedding(batch.packed_patches()))
        glyphs_only = embedding.forward_glyphs(red.packed_slot_glyphs(), red.atlas)
        assert not torch.allclose(glyphs_only, embedding(red.packed_patches()))   # colour is what the glyph ids lack
    calls = []
    monkeypatch.setattr(PatchEmbedding, 'forward', lambda self, x: calls.append('explicit'))
    embedding.forward_rendered(render_batch([styled_texts[1]], cfg))
    assert calls == []


def test_empty_batch_and_gradient_of_blank():
    cfg = RenderConfig()
    embedding = PatchEmbedding(cfg, 16)
    empty = embedding.forward_glyphs(torch.zeros(0, cfg.slots_per_patch, dtype=torch.long), get_atlas())
    assert empty.shape == (0, 16)
    blank = embedding.forward_glyphs(torch.zeros(3, cfg.slots_per_patch, dtype=torch.long), get_atlas())
    blank.sum().backward()
    assert (blank == 0).all() and (embedding.weight.grad == 0).all()


def test_errors_name_what_is_allowed():
    cfg = RenderConfig()
    embedding, gray_only = PatchEmbedding(cfg, 16), PatchEmbedding(cfg, 16, channels=1)
    px, k = cfg.patch_h * cfg.patch_w, cfg.slots_per_patch
    with pytest.raises(ValueError, match=f'{px} or {3 * px} values'): embedding(torch.zeros(1, 100, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f'must have {px} values'): gray_only(torch.zeros(1, 3 * px, dtype=torch.uint8))
    with pytest.raises(ValueError, match=f'{k} slots per patch'): embedding.forward_glyphs(torch.zeros(2, 2 * k, dtype=torch.long), get_atlas())
    with pytest.raises(ValueError, match='expects 16x8 px'): embedding.forward_glyphs(torch.zeros(2, k, dtype=torch.long), get_atlas(6, 12))
    with pytest.raises(ValueError, match='expects the cells and patches'):
        embedding.forward_rendered(render_batch(['x'], RenderConfig(patch_w=16)))
    with pytest.raises(ValueError, match='channels must be 1'): PatchEmbedding(cfg, 16, channels=2)
    with pytest.raises(ValueError, match='d_model must be a positive int'): PatchEmbedding(cfg, 0)


def test_init_scale():
    torch.manual_seed(0)
    cfg = RenderConfig()
    embedding = PatchEmbedding(cfg, 768)
    assert abs(embedding.weight.std().item() * (3 * cfg.patch_h * cfg.patch_w) ** 0.5 - 1) < 0.01
    full_ink = torch.full((4, cfg.patch_h * cfg.patch_w), 255, dtype=torch.uint8)
    with torch.no_grad(): assert abs(embedding(full_ink).std().item() - 1) < 0.1


def ascii_cosine(vectors, a, b):
    unit = torch.nn.functional.normalize(vectors, dim=1)
    return float(unit[ord(a) - 33] @ unit[ord(b) - 33])


def test_glyph_whitener_spreads_look_alikes_and_keeps_their_size():
    atlas = get_atlas()
    rows = atlas.rows(np.arange(33, 127))
    bitmaps = torch.from_numpy(atlas.bitmaps(rows)).reshape(len(rows), -1).double() / 255
    whitener = glyph_whitener(atlas).double()
    assert whitener.shape == (128, 128) and torch.allclose(whitener, whitener.T, atol=1e-5)
    whitened = bitmaps @ whitener
    assert abs(whitened.square().sum(1).mean() / bitmaps.square().sum(1).mean() - 1) < 1e-5
    assert ascii_cosine(bitmaps, 'O', '0') > 0.95 and ascii_cosine(whitened, 'O', '0') < 0.6
    assert ascii_cosine(bitmaps, '1', 'I') > 0.8 and abs(ascii_cosine(whitened, '1', 'I')) < 0.2

    def spread(shrink):
        eigenvalues = torch.linalg.eigvalsh((bitmaps @ glyph_whitener(atlas, shrink=shrink).double()).T
                                            @ (bitmaps @ glyph_whitener(atlas, shrink=shrink).double()))
        kept = eigenvalues[eigenvalues > 1e-9 * eigenvalues.max()]
        return float(kept.max() / kept.min())
    assert spread(1e-4) < spread(1e-2) < spread(1.0)


def test_whitener_is_a_saved_buffer_not_a_parameter_and_errors():
    cfg = RenderConfig()
    embedding = PatchEmbedding(cfg, 16, whitener=glyph_whitener(get_atlas()))
    assert [n for n, _ in embedding.named_parameters()] == ['weight']
    assert set(embedding.state_dict()) == {'weight', 'whitener'} and set(PatchEmbedding(cfg, 16).state_dict()) == {'weight'}
    with pytest.raises(RuntimeError, match='whitener'): PatchEmbedding(cfg, 16).load_state_dict(embedding.state_dict())
    assert 'whitened cells' in repr(embedding)
    with pytest.raises(ValueError, match=r'whitener must be \(128, 128\)'): PatchEmbedding(cfg, 16, whitener=torch.eye(64))
    with pytest.raises(ValueError, match='shrink must be > 0'): glyph_whitener(get_atlas(), shrink=0)
    with pytest.raises(ValueError, match='at least one character'): glyph_whitener(get_atlas(), chars='')
