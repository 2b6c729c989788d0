"""The renderer's edges found by trying it as a new user would (issue 14): pages cut to no patches, one-character
patches several lines tall, cells too small to draw, fallback boxes at the smallest cell, pictures with no pixels or
float pixels, and font sizes for large cells; plus a guard that the default 8x16 atlas keeps its exact pixels."""
import hashlib
import random

import numpy as np
import PIL.features
import pytest
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont

from imagelm.patch_embed import PatchEmbedding
from imagelm.render import (MIN_CELL_H, MIN_CELL_W, SIZE_PROBE, GlyphAtlas, Picture, RenderConfig, Span, fallback_glyph,
                            fit_font_size, font_path, get_atlas, layout, patch_image, render_batch, render_page)

DEFAULT = RenderConfig()


def page_boxes(rendered):
    "Every patch cut straight from the padded pages, (all patches, channels, patch_h, patch_w), in reading order."
    c, pages = rendered.cfg, rendered.pages()
    return torch.cat([rearrange(pages[b, :, :rendered.n_lines[b].item() * c.cell_h], 'c (p h) (q w) -> (p q) c h w',
                                h=c.patch_h, w=c.patch_w) for b in range(len(rendered))])


# ---------------------------------------------------------------------------------------------------
# pages cut to zero patches


CUT_CONFIGS = [DEFAULT, RenderConfig(patch_w=32, page_chars=8), RenderConfig(patch_w=32, patch_h=32, page_chars=16)]
STYLES = {'plain': 'hello\nworld', 'colour': [Span('hello', color=(200, 0, 0))],
          'picture': ['hi', Picture(np.full((8, 8, 3), 90, np.uint8))]}


@pytest.mark.parametrize('style', STYLES)
@pytest.mark.parametrize('cfg', CUT_CONFIGS, ids=lambda c: f'k{c.chars_per_patch}l{c.lines_per_patch}')
def test_a_page_cut_to_no_patches_renders_empty(cfg, style):
    for limits in [dict(max_lines=0), dict(max_patches=0), dict(max_patches=cfg.patches_per_row - 1),
                   dict(max_lines=cfg.lines_per_patch - 1)]:
        rendered = render_batch([STYLES[style]], cfg, **limits)
        lay = rendered.layouts[0]
        assert (lay.n_lines, lay.n_patches, lay.n_kept, lay.kept_text, lay.truncated) == (0, 0, 0, '', True), limits
        channels = 1 if rendered.plain else 3   # a picture cut away entirely leaves a plain page
        width = channels * cfg.patch_h * cfg.patch_w
        assert rendered.packed_patches().shape == (0, width)
        assert rendered.packed_slot_glyphs().shape == (0, cfg.slots_per_patch)
        assert rendered.packed_has_ink().shape == (0,) and rendered.packed_grid_positions().shape == (0, 2)
        patches, mask = rendered.patches(), rendered.patch_mask()
        assert patches.shape == (1, cfg.patches_per_row, width) and not patches.any() and not mask.any()
        assert rendered.pages().shape == (1, channels, cfg.patch_h, cfg.page_w) and not rendered.pages().any()


def test_an_empty_page_beside_a_full_one_changes_nothing_of_it():
    cfg = RenderConfig(patch_w=32, page_chars=8)
    alone = render_batch(['some words to wrap'], cfg)
    both = render_batch([layout('cut away', cfg, max_lines=0), layout('some words to wrap', cfg)], cfg)
    assert both.n_patches.tolist() == [0, alone.n_patches.item()]
    assert torch.equal(both.packed_patches(), alone.packed_patches())
    assert torch.equal(both.patches()[1], alone.patches()[0]) and not both.patches()[0].any()
    assert not layout('', cfg, max_lines=0).truncated   # nothing was there to cut


# ---------------------------------------------------------------------------------------------------
# one-character patches several lines tall


TALL = [RenderConfig(patch_w=8, patch_h=32, page_chars=16), RenderConfig(patch_w=8, patch_h=48, page_chars=2),
        RenderConfig(cell_w=6, cell_h=12, patch_w=6, patch_h=24, page_chars=5),
        RenderConfig(cell_w=5, cell_h=10, patch_w=5, patch_h=30, page_chars=3),
        RenderConfig(cell_w=12, cell_h=24, patch_w=12, patch_h=48, page_chars=4),
        RenderConfig(patch_w=16, patch_h=32, page_chars=16)]
TALL_TEXTS = [['a'], ['ab\ncd'], ['one\ntwo', 'x'], ['hello\n' * 7, ''], ['a\tb c\nd' * 5, 'q\n\nr', 'é中']]


@pytest.mark.parametrize('cfg', TALL, ids=lambda c: f'{c.cell_w}x{c.cell_h} k{c.chars_per_patch}l{c.lines_per_patch} w{c.page_chars}')
def test_tall_patches_explicit_path_equals_pages_and_fused_path(cfg):
    torch.manual_seed(0)
    embedding = PatchEmbedding(cfg, d_model=24).double()
    for texts in TALL_TEXTS:
        rendered = render_batch(texts, cfg)
        packed = rendered.packed_patches()
        assert packed.is_contiguous() and packed.shape == (rendered.n_patches.sum().item(), cfg.patch_h * cfg.patch_w)
        assert torch.equal(torch.stack([patch_image(v, cfg) for v in packed]), page_boxes(rendered)), texts
        explicit = embedding(packed)
        fused = embedding.forward_glyphs(rendered.packed_slot_glyphs(), rendered.atlas)
        assert torch.allclose(fused, explicit, rtol=0, atol=1e-12), texts
        coloured = render_batch([[Span(t, color=(10, 120, 250))] for t in texts], cfg)
        assert torch.equal(torch.stack([patch_image(v, cfg) for v in coloured.packed_patches()]), page_boxes(coloured))


# ---------------------------------------------------------------------------------------------------
# cells too small to draw


@pytest.mark.parametrize('make,match', [
    (lambda: RenderConfig(cell_w=1, cell_h=1, patch_w=8, patch_h=1, page_chars=8), 'cell_w must be an int >= 5'),
    (lambda: RenderConfig(cell_w=1, patch_w=8, page_chars=8), 'cell_w must be an int >= 5'),
    (lambda: RenderConfig(cell_w=4, cell_h=10, patch_w=32, patch_h=10), 'cell_w must be an int >= 5'),
    (lambda: RenderConfig(cell_w=5, cell_h=9, patch_w=40, patch_h=9), 'cell_h must be an int >= 10'),
    (lambda: get_atlas(1, 1), 'cell_w must be an int >= 5'),
    (lambda: GlyphAtlas(8, 9), 'cell_h must be an int >= 10'),
    (lambda: fallback_glyph(0x4E00, 4, 16), 'cell_w must be an int >= 5'),
    (lambda: fallback_glyph(0x4E00, 8, 8.0), 'cell_h must be an int >= 10'),
])
def test_cells_too_small_are_refused_naming_the_range(make, match):
    with pytest.raises(ValueError, match=match) as error:
        make()
    assert '5x10' in str(error.value)


@pytest.mark.parametrize('cell', [(MIN_CELL_W, MIN_CELL_H), (6, 10), (5, 13), (7, 15), (9, 10)])
def test_small_allowed_cells_draw_every_kind_of_character(cell):
    cfg = RenderConfig(cell_w=cell[0], cell_h=cell[1], patch_w=4 * cell[0], patch_h=cell[1], page_chars=16, show_spaces=True)
    text = 'Hi there\tÉé ΩЖ 中😀\x07\ud800' + chr(0x10FFFF)
    page, lay = render_page([Span(text), Span(' bold', bold=True), Span(' it', italic=True)], cfg)
    assert page.shape == (1, lay.n_lines * cell[1], 16 * cell[0]) and page.any() and lay.n_kept == len(text) + 8
    atlas = get_atlas(*cell)
    assert atlas.font_size == fit_font_size(*cell) >= 1
    missing = np.array([ord(c) for c in '中😀\x07\ud800' + chr(0x10FFFF)])
    assert len(set(atlas.rows(missing).tolist())) == len(missing) and (atlas.rows(missing) >= atlas.n_font_rows).all()


# ---------------------------------------------------------------------------------------------------
# fallback boxes at the smallest cell


def box_bits(box: np.ndarray) -> int:
    "The code point written in the inside of a bit-box fallback glyph, least significant bit first."
    inside = box[1:-1, 1:-1].ravel()
    return sum(1 << i for i in range(21) if inside[i])


@pytest.mark.parametrize('cell', [(MIN_CELL_W, MIN_CELL_H), (5, 40), (30, 10), (7, 15)])
def test_fallback_boxes_are_distinct_at_the_smallest_cells(cell):
    r = random.Random(14)
    cps = sorted(set(r.sample(range(0x110000), 20_000)) | {0, 1, 2, 0xFFFF, 0x10000, 0x10FFFE, 0x10FFFF}
                 | set(range(0x4E00, 0x4E00 + 512)))
    boxes = [fallback_glyph(cp, *cell) for cp in cps]
    assert all(b.shape == (cell[1], cell[0]) and b.dtype == np.uint8 for b in boxes)
    assert len({b.tobytes() for b in boxes}) == len(cps), 'fallback boxes collide'
    assert [box_bits(b) for b in boxes] == cps   # the box reads back as its code point: distinct for all 0x110000


def test_the_smallest_cell_is_where_21_bits_still_fit():
    assert (MIN_CELL_W - 2) * (MIN_CELL_H - 2) >= 21 > (MIN_CELL_W - 3) * (MIN_CELL_H - 2)
    assert (MIN_CELL_W, MIN_CELL_H) == (5, 10)


# ---------------------------------------------------------------------------------------------------
# pictures


@pytest.mark.parametrize('image,match', [
    (np.zeros((0, 5, 3), np.uint8), r'at least 1x1 pixel, got 0x5'),
    (np.zeros((5, 0), np.uint8), r'at least 1x1 pixel, got 5x0'),
    (Image.new('RGB', (0, 4)), r'at least 1x1 pixel, got 4x0'),
    (np.zeros((0, 0, 3)), r'at least 1x1 pixel'),
    (np.full((4, 4, 3), 1.5), r'floats in \[0, 1\], got float64 values in \[1.5, 1.5\]'),
    (np.full((4, 4), -0.25, np.float32), r'got float32 values in \[-0.25, -0.25\]'),
    (np.zeros((4, 4, 3), np.int64), r'uint8 \(0..255\).*got int64 values'),
    (np.zeros((4, 4), bool), r'got bool values'),
    (np.zeros((4, 4, 2), np.uint8), r'HxW, HxWx3 or HxWx4 array.*got ndarray of shape \(4, 4, 2\)'),
    (np.zeros((2, 4, 4, 3), np.uint8), r'shape \(2, 4, 4, 3\)'),
    ('picture.png', r'got str of shape \(\)'),
])
def test_bad_pictures_are_refused_naming_what_is_allowed(image, match):
    with pytest.raises(ValueError, match='Picture.image must be'):
        Picture(image)
    with pytest.raises(ValueError, match=match):
        Picture(image)


@pytest.mark.parametrize('shape', [(24, 40), (24, 40, 3), (24, 40, 4)])
def test_float_pictures_in_0_1_render_as_their_uint8_pixels(shape):
    floats = np.random.default_rng(0).random(shape)
    as_bytes = np.round(floats * 255).astype(np.uint8)
    assert np.array_equal(Picture(floats).rgb(), Picture(as_bytes).rgb())
    assert torch.equal(render_page(['a', Picture(floats, 2)])[0], render_page(['a', Picture(as_bytes, 2)])[0])
    assert np.array_equal(Picture(np.ones((2, 2))).rgb(), np.full((2, 2, 3), 255, np.uint8))


# ---------------------------------------------------------------------------------------------------
# font sizes


CELLS = [(8, 16), (10, 20), (12, 24), (16, 32), (24, 48)]
FIT_CHARS = SIZE_PROBE + ''.join(map(chr, range(33, 127))) + 'ÉÀÇÑÅéàüñçß'


def ink_outside_cell(cell_w, cell_h, size, chars=FIT_CHARS):
    font = ImageFont.truetype(str(font_path(0)), size)
    outside = 0
    for char in chars:
        canvas = Image.new('L', (3 * cell_w, 3 * cell_h), 0)
        ImageDraw.Draw(canvas).text((cell_w, cell_h), char, font=font, fill=255)
        ink = np.asarray(canvas) > 0
        outside += int(ink.sum() - ink[cell_h:2 * cell_h, cell_w:2 * cell_w].sum())
    return outside


def test_font_size_grows_with_the_cell_and_glyphs_fit():
    sizes = [fit_font_size(*cell) for cell in CELLS]
    assert sizes == sorted(set(sizes)) and sizes[0] == 13
    assert fit_font_size(16, 32) >= 24 and fit_font_size(24, 48) >= 36   # about 13/8 of the cell width
    for cell, size in zip(CELLS, sizes):
        assert ink_outside_cell(*cell, size) == 0, cell
        assert ink_outside_cell(*cell, size + 1, SIZE_PROBE + 'M') > 0 or ImageFont.truetype(
            str(font_path(0)), size + 1).getlength('M') > cell[0], cell   # one size more no longer fits
    assert get_atlas(16, 32).font_size == fit_font_size(16, 32)


def test_a_size_that_pokes_out_is_skipped_not_the_end():
    font = ImageFont.truetype(str(font_path(0)), 14)
    assert font.getbbox(SIZE_PROBE)[1] < 0            # size 14 puts the accent of É above the cell ...
    assert fit_font_size(16, 32) > 14                  # ... yet larger sizes fit again and are used


# ---------------------------------------------------------------------------------------------------
# the default atlas is unchanged: every trained checkpoint and committed figure depends on its pixels

DEFAULT_ATLAS_SHA256 = 'b03315b42ba145918da73c34534f2695750bc8f9dd5e1582672d5ba96b48c9aa'   # before issue 14
DEFAULT_PAGE_SHA256 = 'a644f154ee84b795fd373f38d8efd074504d53988b844def1e88ce1dc4e8b4f4'
HASHED_WITH_FREETYPE = '2.14.3'    # another FreeType may rasterise a little differently: the hashes hold for this one


def test_default_atlas_and_page_pixels_are_unchanged():
    assert fit_font_size(8, 16) == 13
    if PIL.features.version('freetype2') != HASHED_WITH_FREETYPE:
        pytest.skip(f"pixels hashed with FreeType {HASHED_WITH_FREETYPE}, this is {PIL.features.version('freetype2')}")
    atlas = get_atlas()
    assert (atlas.font_size, atlas.n_font_rows) == (13, 8608)
    font_rows = np.stack([atlas.bitmaps([r])[0] for r in range(atlas.n_font_rows)])
    assert hashlib.sha256(font_rows.tobytes()).hexdigest() == DEFAULT_ATLAS_SHA256
    text = [Span('Hello, world! ÉÀ gjy |_()[]{} 中文 😀\n'), Span('bold', bold=True), Span(' italic\t', italic=True),
            Span('both', bold=True, italic=True), '\nThe quick brown fox jumps over the lazy dog. 0123456789 ~`!@#$%^&*']
    page, _ = render_page(text)
    assert page.shape == (1, 64, 512)
    assert hashlib.sha256(page.numpy().tobytes()).hexdigest() == DEFAULT_PAGE_SHA256
