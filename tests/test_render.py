"""Property and equivalence tests of imagelm.render's public API, written from the outside: a small
independent reference layout, page/patch/slot-glyph equivalences, Unicode fallbacks, styles, bad
input, non-default geometry and thread safety. Random cases are seeded with `random.Random`."""
import random
import threading
import unicodedata

import numpy as np
import pytest
import torch

from imagelm.render import (GlyphAtlas, Picture, RenderConfig, Rendered, Span, fallback_glyph, get_atlas, layout,
                            layout_batch, patch_image, render_batch, render_page, space_mark_glyph, to_image)

DEFAULT = RenderConfig()
ATLAS = get_atlas(DEFAULT.cell_w, DEFAULT.cell_h)

# ---------------------------------------------------------------------------------------------------
# random text

POOLS = [
    [chr(c) for c in range(32, 127)],                                  # printable ASCII
    ['\n'], ['\t'],
    list('éàüñçÅøßœÉÀ') + ['e\u0301', 'a\u0308'],                       # accents, precomposed and combining
    list('中文字漢語日本語한국어'),                                         # CJK, Hangul
    ['😀', '🚀', '👍', '🏽', '🧪', '\u200d'],                            # emoji and a joiner
    [chr(c) for c in range(0, 32) if c not in (9, 10)] + ['\x7f', '\x85', '\x9f'],  # control characters
    [chr(c) for c in (0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xDABC)],        # lone surrogates
    [chr(c) for c in (0xE000, 0xF8FF, 0xF0000, 0x10FFFD, 0x10FFFF)],  # private use, last code point
]


def random_text(r: random.Random, n_max: int = 120) -> str:
    out = []
    for _ in range(r.randrange(n_max + 1)):
        if r.random() < 0.05: out.append(chr(r.randrange(0x110000)))   # any code point at all
        else: out.append(r.choice(r.choice(POOLS)))
    if r.random() < 0.2: out.append('\n' * r.randrange(1, 3))              # trailing newlines
    if r.random() < 0.1: out.append('x' * r.randrange(60, 200))            # a long line that wraps
    return ''.join(out)


# ---------------------------------------------------------------------------------------------------
# independent reference layout


def ref_layout(text: str, cfg: RenderConfig, max_lines=None, max_patches=None):
    """(line, col) of each code point, n_lines, n_kept, truncated.
    Tabs expand w.r.t. the logical line's column; lines hard-wrap at page_chars; a newline sits on the last
    cell of its line (column 0 for an empty line); a final newline opens no extra line; empty text is one line."""
    W, lpp = cfg.page_chars, cfg.lines_per_patch
    logical = text.split('\n')
    if text.endswith('\n'): logical.pop()
    if not logical: logical = ['']
    pos, row = [], 0
    for i, ln in enumerate(logical):
        col = 0
        for ch in ln:
            pos.append((row + col // W, col % W))
            col += cfg.tab_size - col % cfg.tab_size if ch == '\t' else 1
        if i < len(logical) - 1 or text.endswith('\n'):
            c = max(col - 1, 0)
            pos.append((row + c // W, c % W))
        row += max(1, -(-col // W))
    limit = 10**18
    if max_lines is not None: limit = max_lines
    if max_patches is not None: limit = min(limit, max_patches // cfg.patches_per_row * lpp)
    limit = limit // lpp * lpp
    n_lines = min(-(-max(row, 1) // lpp) * lpp, limit)
    n_kept = sum(1 for r_, _ in pos if r_ < n_lines)
    assert all(r_ < n_lines for r_, _ in pos[:n_kept])                 # reading order: the kept part is a prefix
    return [p[0] for p in pos[:n_kept]], [p[1] for p in pos[:n_kept]], n_lines, n_kept, n_kept < len(text)


def check_against_ref(text, cfg, max_lines=None, max_patches=None):
    lay = layout(text, cfg, max_lines=max_lines, max_patches=max_patches)
    lines, cols, n_lines, n_kept, truncated = ref_layout(text, cfg, max_lines, max_patches)
    ctx = f"text={text!r} cfg={cfg} max_lines={max_lines} max_patches={max_patches}"
    assert (lay.n_lines, lay.n_kept, lay.truncated) == (n_lines, n_kept, truncated), ctx
    assert lay.line.tolist() == lines, ctx
    assert lay.col.tolist() == cols, ctx
    assert lay.text == text, ctx
    assert len(lay.glyph) == n_kept and lay.n_patches == n_lines // cfg.lines_per_patch * cfg.patches_per_row
    # glyphs: blank for newline/tab, otherwise the atlas row of the code point
    atlas = get_atlas(cfg.cell_w, cfg.cell_h)
    cps = np.array([ord(c) for c in text[:n_kept]], np.int64)
    if n_kept:
        want = atlas.rows(cps, 0)
        want[(cps == 9) | (cps == 10)] = 0
        assert lay.glyph.tolist() == want.tolist(), ctx
    return lay


def test_reference_layout_examples():
    cfg = RenderConfig(patch_w=32, page_chars=8)
    assert ref_layout('', cfg)[2:] == (1, 0, False)
    assert ref_layout('ab\n', cfg)[2:] == (1, 3, False)
    assert ref_layout('ab\n\n', cfg)[2:] == (2, 4, False)
    assert ref_layout('a\tb', cfg)[:2] == ([0, 0, 0], [0, 1, 4])
    assert ref_layout('x' * 9, cfg)[2] == 2


@pytest.mark.parametrize('cfg', [DEFAULT, RenderConfig(patch_w=32, page_chars=8), RenderConfig(patch_w=32, page_chars=12, tab_size=8),
                                 RenderConfig(patch_w=32, patch_h=32, page_chars=16, tab_size=3)], ids=str)
def test_layout_matches_reference(cfg):
    r = random.Random(hash(cfg) % 1000)
    for _ in range(60):
        check_against_ref(random_text(r), cfg)


def test_layout_limits_match_reference():
    r = random.Random(1)
    for _ in range(250):
        cfg = r.choice([DEFAULT, RenderConfig(patch_w=32, page_chars=8), RenderConfig(patch_w=32, patch_h=32, page_chars=16)])
        max_lines = r.choice([None, 0, 1, 2, 3, 4, 5, 8, r.randrange(20)])
        max_patches = r.choice([None, 0, 1, 3, cfg.patches_per_row, r.randrange(60)])
        check_against_ref(random_text(r, 60), cfg, max_lines, max_patches)


def test_layout_edge_cases():
    cfg = RenderConfig(patch_w=32, page_chars=8)
    for text in ['', '\n', '\n\n', '\t', '\t' * 9, 'x' * 8, 'x' * 8 + '\n', 'x' * 8 + '\nx', 'x' * 7 + '\t\n',
                 'abc\tdefgh\tij\n\tk', '\r\n', 'a\x0bb\x0cc\u2028d']:
        for max_lines in [None, 0, 1, 2]:
            check_against_ref(text, cfg, max_lines)
    assert not layout('a\n', cfg, max_lines=1).truncated
    assert layout('a\nb', cfg, max_lines=1).truncated


# ---------------------------------------------------------------------------------------------------
# batches


def random_doc(r: random.Random):
    "A random input: str, bytes, Span or a list mixing styled spans, bytes and pictures."
    kind = r.randrange(4)
    if kind == 0: return random_text(r, 50)
    if kind == 1: return random_text(r, 30).encode('utf-8', 'surrogatepass') + bytes([r.randrange(128, 256)])
    if kind == 2: return Span(random_text(r, 30), bold=r.random() < .5, italic=r.random() < .5)
    doc = []
    for _ in range(r.randrange(1, 5)):
        k = r.randrange(4)
        if k == 0: doc.append(random_text(r, 30))
        elif k == 1: doc.append(Span(random_text(r, 30), bold=r.random() < .5, italic=r.random() < .5,
                                     color=r.choice([None, (255, 0, 0), (0, 128, 255)])))
        elif k == 2: doc.append(Picture(np.full((r.randrange(4, 40), r.randrange(4, 60), 3), r.randrange(256), np.uint8),
                                        width_patches=r.choice([None, 1, 3])))
        else: doc.append(b'bytes\xff')
    return doc


def same_layout(a, b):
    assert (a.n_lines, a.n_kept, a.truncated, a.text) == (b.n_lines, b.n_kept, b.truncated, b.text)
    for name in ('glyph', 'line', 'col'):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert (a.color is None) == (b.color is None) and (a.color is None or np.array_equal(a.color, b.color))
    assert len(a.pictures) == len(b.pictures)
    for p, q in zip(a.pictures, b.pictures):
        assert p[:3] == q[:3] and np.array_equal(p[3], q[3])


def test_layout_batch_equals_layout_of_each():
    r = random.Random(2)
    for cfg in [DEFAULT, RenderConfig(patch_w=32, patch_h=32, page_chars=16)]:
        docs = [random_doc(r) for _ in range(40)]
        for max_lines in [None, 4]:
            batch = layout_batch(docs, cfg, max_lines=max_lines)
            assert len(batch) == len(docs)
            for doc, lay in zip(docs, batch):
                same_layout(lay, layout(doc, cfg, max_lines=max_lines))


def test_pictures_take_whole_patches():
    cfg = RenderConfig(patch_w=32, patch_h=32, page_chars=16)
    lay = layout(['abc', Picture(np.zeros((10, 40), np.uint8), width_patches=2), 'de\nf'], cfg)
    (first, n, n_cols, px), = lay.pictures
    assert first % cfg.lines_per_patch == 0 and n % cfg.lines_per_patch == 0 and n_cols == 2 * cfg.chars_per_patch
    assert px.shape == (n * cfg.cell_h, n_cols * cfg.cell_w, 3)
    assert lay.line.tolist() == [0, 0, 0] + [first + n] * 3 + [first + n + 1]
    assert lay.text == 'abcde\nf'


# ---------------------------------------------------------------------------------------------------
# rendering equivalences


def expected_pages(rendered: Rendered) -> np.ndarray:
    "The ink pages drawn directly from the layouts and atlas bitmaps, with no gather."
    c, atlas = rendered.cfg, rendered.atlas
    n = max(max(l.n_lines for l in rendered.layouts), c.lines_per_patch)
    rgb = not rendered.plain
    out = np.zeros((len(rendered), 3 if rgb else 1, n * c.cell_h, c.page_w), np.int64)
    for b, lay in enumerate(rendered.layouts):
        for i in range(lay.n_kept):
            if lay.glyph[i] == 0: continue
            y, x = lay.line[i] * c.cell_h, lay.col[i] * c.cell_w
            bm = atlas.bitmaps([lay.glyph[i]])[0].astype(np.int64)
            if rgb:
                colour = lay.color[i] if lay.color is not None else np.zeros(3, np.uint8)
                for ch in range(3): out[b, ch, y:y + c.cell_h, x:x + c.cell_w] = bm * (255 - int(colour[ch])) // 255
            else: out[b, 0, y:y + c.cell_h, x:x + c.cell_w] = bm
        for first, nl, ncol, px in lay.pictures:
            out[b, :, first * c.cell_h:(first + nl) * c.cell_h, :ncol * c.cell_w] = np.moveaxis(255 - px.astype(np.int64), -1, 0)
    return out


def check_rendered(rendered: Rendered):
    c = rendered.cfg
    pages, patches, packed, mask = rendered.pages(), rendered.patches(), rendered.packed_patches(), rendered.patch_mask()
    B, C = len(rendered), (1 if rendered.plain else 3)
    n_lines = max(max(l.n_lines for l in rendered.layouts), c.lines_per_patch)
    most = n_lines // c.lines_per_patch * c.patches_per_row
    vec = C * c.patch_h * c.patch_w
    assert pages.dtype == torch.uint8 and pages.shape == (B, C, n_lines * c.cell_h, c.page_w)
    assert patches.shape == (B, most, vec) and mask.shape == (B, most) and mask.dtype == torch.bool
    assert packed.shape == (sum(l.n_patches for l in rendered.layouts), vec)
    assert mask.sum(1).tolist() == [l.n_patches for l in rendered.layouts] == rendered.n_patches.tolist()
    # pixels agree with a direct drawing from the layouts
    assert np.array_equal(pages.cpu().numpy(), expected_pages(rendered))
    # packed == padded masked; padding is zero
    assert torch.equal(patches[mask], packed)
    assert not patches[~mask].any()
    # patch_image of every patch is its page box
    for b in range(B):
        for j in range(int(mask[b].sum())):
            row, q = divmod(j, c.patches_per_row)
            box = pages[b, :, row * c.patch_h:(row + 1) * c.patch_h, q * c.patch_w:(q + 1) * c.patch_w]
            assert torch.equal(patch_image(patches[b, j], c), box), (b, j)
    # slot glyphs: padded/packed agree; atlas bitmaps of the slots give the (plain) patch vector
    slots, packed_slots = rendered.slot_glyphs(), rendered.packed_slot_glyphs()
    assert slots.shape == (B, most, c.slots_per_patch) and torch.equal(slots[mask], packed_slots)
    glyph_grid = rendered.glyph_grid()
    assert glyph_grid.shape == (B, n_lines, c.page_chars)
    if rendered.plain:
        bms = torch.from_numpy(rendered.atlas.bitmaps(packed_slots.cpu().numpy())).reshape(packed.shape[0], -1)
        assert torch.equal(bms, packed.cpu())
    # line_pixels, padded by page, are the pages
    lp = rendered.line_pixels()
    assert lp.shape[0] == sum(l.n_lines for l in rendered.layouts)
    assert torch.equal(rendered.pad_pages(lp).permute(0, 2, 1, 3, 4).reshape(pages.shape), pages)
    return pages


def test_render_equivalences_plain_and_styled():
    r = random.Random(3)
    plain = [random_text(r, 150) for _ in range(12)] + ['', b'\xff\xfe', Span('bold', bold=True)]
    rendered = render_batch(plain, max_lines=10)
    assert rendered.plain
    check_rendered(rendered)
    styled = [random_doc(r) for _ in range(12)] + [[Span('red', color=(255, 0, 0))]]
    rendered = render_batch(styled, max_patches=50)
    assert not rendered.plain
    check_rendered(rendered)


def test_render_page_and_to_image():
    page, lay = render_page('Hello\nworld')
    assert page.shape == (1, 2 * 16, 64 * 8) and lay.n_lines == 2
    img = to_image(page)
    assert img.mode == 'L' and img.size == (64 * 8, 32)
    assert np.array_equal(np.asarray(img), 255 - page[0].numpy())
    page, _ = render_page([Span('Hi', color=(0, 0, 255))])
    img = to_image(page)
    assert img.mode == 'RGB' and np.array_equal(np.asarray(img), 255 - page.permute(1, 2, 0).numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_equals_cpu():
    r = random.Random(4)
    for docs in ([random_text(r, 200) for _ in range(16)], [random_doc(r) for _ in range(16)]):
        cpu, gpu = render_batch(docs, max_lines=12), render_batch(docs, max_lines=12, device='cuda')
        assert gpu.pages().is_cuda
        for name in ('pages', 'patches', 'packed_patches', 'slot_glyphs', 'packed_slot_glyphs', 'patch_mask',
                     'glyph_grid', 'line_pixels'):
            assert torch.equal(getattr(cpu, name)(), getattr(gpu, name)().cpu()), name


# ---------------------------------------------------------------------------------------------------
# Unicode


def cell(page, line, col, cfg=DEFAULT):
    return page[:, line * cfg.cell_h:(line + 1) * cfg.cell_h, col * cfg.cell_w:(col + 1) * cfg.cell_w]


def test_every_code_point_class_renders_with_ink():
    r = random.Random(5)
    by_category = {}
    for cp in range(0x110000):
        by_category.setdefault(unicodedata.category(chr(cp)), []).append(cp)
    blank_ok = {0x20, 0xAD, 0xFEFF, 0xFFF9, 0xFFFA, 0xFFFB, 0xFFFC}      # spaces and format chars DejaVu draws empty
    sample = []
    for cat, cps in sorted(by_category.items()):
        sample += r.sample(cps, min(30, len(cps)))
    sample = [cp for cp in sample if cp not in (9, 10) and unicodedata.category(chr(cp)) != 'Zs' and cp not in blank_ok]
    text = ''.join(chr(cp) for cp in sample)
    page, lay = render_page(text, RenderConfig(patch_w=32, page_chars=64))
    assert lay.n_kept == len(text) and not lay.truncated
    blank = [hex(cp) for i, cp in enumerate(sample) if not cell(page, lay.line[i], lay.col[i]).any()]
    assert not blank, f"code points drawn blank: {blank}"


def test_invalid_utf8_gives_visible_replacement():
    page, lay = render_page(b'ab\xffc\xc3(d\xed\xa0\x80')
    assert lay.text.startswith('ab\ufffdc\ufffd(d')
    fffd = ATLAS.bitmaps(ATLAS.rows(np.array([0xFFFD]), 0))[0]
    assert fffd.any()
    for i, ch in enumerate(lay.text):
        if ch == '\ufffd': assert np.array_equal(cell(page, 0, i)[0].numpy(), fffd)
    assert lay.text.count('\ufffd') >= 3
    # the same bytes inside a list and inside a batch
    assert layout([b'ab\xff']).text == 'ab\ufffd'
    assert render_batch([b'\xff'], cfg=DEFAULT).layouts[0].text == '\ufffd'


def test_fallbacks_distinct_for_missing_code_points():
    r = random.Random(6)
    missing = []
    while len(missing) < 2000:
        cp = r.randrange(0x110000)
        if ATLAS.lut[0, cp] < 0 and cp not in missing: missing.append(cp)
    text = ''.join(chr(cp) for cp in missing)
    lay = layout(text)
    assert len(set(lay.glyph.tolist())) == 2000 and (lay.glyph >= ATLAS.n_font_rows).all()
    page, lay = render_page(text[:256])
    for i, cp in enumerate(missing[:256]):
        assert np.array_equal(cell(page, lay.line[i], lay.col[i])[0].numpy(), fallback_glyph(cp)), hex(cp)


@pytest.mark.parametrize('cell_w,cell_h', [(8, 16), (6, 12), (10, 20)])
def test_fallback_glyph_distinct_and_visible(cell_w, cell_h):
    r = random.Random(7)
    cps = r.sample(range(0x110000), 2000)
    glyphs = [fallback_glyph(cp, cell_w, cell_h) for cp in cps]
    assert all(g.shape == (cell_h, cell_w) and g.dtype == np.uint8 and g.any() for g in glyphs)
    assert len({g.tobytes() for g in glyphs}) == len(cps), 'fallback glyphs collide'


def test_homoglyphs_share_an_atlas_row():
    rows = ATLAS.rows(np.array([ord('A'), 0x391, 0x410]), 0)
    assert rows[0] == rows[1] == rows[2] > 0


def test_style_glyph_does_not_depend_on_render_order():
    "U+27BF is in DejaVu Sans Mono Bold but not Regular; rendering it regular must not replace the bold glyph."
    from PIL import Image, ImageDraw, ImageFont
    from imagelm.render import font_path
    drawn = Image.new('L', (DEFAULT.cell_w, DEFAULT.cell_h), 0)
    ImageDraw.Draw(drawn).text((0, 0), '\u27bf', font=ImageFont.truetype(str(font_path(1)), ATLAS.font_size), fill=255)
    bold = Span('\u27bf', bold=True)
    before, _ = render_page(bold)
    assert np.asarray(drawn).any() and np.array_equal(before[0, :, :DEFAULT.cell_w].numpy(), np.asarray(drawn))
    render_page('\u27bf')                                  # regular: a fallback
    after, _ = render_page(bold)
    assert torch.equal(before, after)


def test_get_atlas_is_one_per_cell_size():
    rendered = render_batch(['x\U000F1234'])
    assert get_atlas() is get_atlas(8, 16) is get_atlas(cell_w=8, cell_h=16) is rendered.atlas


# ---------------------------------------------------------------------------------------------------
# styles and colour


def test_styles_change_only_their_cells():
    plain, lay = render_page('Hello world, styled text!')
    for kwargs in [dict(bold=True), dict(italic=True), dict(bold=True, italic=True)]:
        styled, lay2 = render_page(['Hello ', Span('world', **kwargs), ', styled text!'])
        assert np.array_equal(lay.line, lay2.line) and np.array_equal(lay.col, lay2.col)
        for i in range(len(lay.text)):
            a, b = cell(plain, lay.line[i], lay.col[i]), cell(styled, lay.line[i], lay.col[i])
            if 6 <= i < 11: assert not torch.equal(a, b), (kwargs, i)
            else: assert torch.equal(a, b), (kwargs, i)
        assert not styled[:, 16:].any()


def test_colour_is_a_multiply():
    page, lay = render_page(['ab', Span('RED', color=(255, 0, 0)), 'cd', Span('grey', color=(128, 128, 128))])
    assert page.shape[0] == 3
    gray, _ = render_page('abREDcdgrey')
    for i, ch in enumerate(lay.text):
        px, g = cell(page, 0, i).to(torch.int32), cell(gray, 0, i)[0].to(torch.int32)
        if 2 <= i < 5:
            assert not px[0].any() and torch.equal(px[1], g) and torch.equal(px[2], g)   # red text: no red ink
        elif i >= 7:
            assert torch.equal(px[0], g * 127 // 255) and torch.equal(px[0], px[2])
        else:
            assert torch.equal(px[0], g) and torch.equal(px[1], g) and torch.equal(px[2], g)


# ---------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize('make,exc,name', [
    (lambda: RenderConfig(patch_w=32, page_chars=-4), ValueError, 'page_chars'),
    (lambda: RenderConfig(patch_w=32, page_chars=0), ValueError, 'page_chars'),
    (lambda: RenderConfig(patch_w=20), ValueError, 'patch_w'),
    (lambda: RenderConfig(patch_h=24), ValueError, 'patch_h'),
    (lambda: RenderConfig(patch_w=32, page_chars=66), ValueError, 'page_chars'),
    (lambda: RenderConfig(cell_w=8.0), ValueError, 'cell_w'),
    (lambda: RenderConfig(show_spaces=1), ValueError, 'show_spaces'),
    (lambda: layout('a', max_lines=-1), ValueError, 'max_lines'),
    (lambda: layout('a', max_patches='3'), ValueError, 'max_patches'),
    (lambda: render_batch(['a'], max_lines=1.5), ValueError, 'max_lines'),
    (lambda: Span('a', color=(256, 0, 0)), ValueError, 'color'),
    (lambda: Span('a', color=(-1, 0, 0)), ValueError, 'color'),
    (lambda: Span('a', color=(1, 2)), ValueError, 'color'),
    (lambda: Span(3), TypeError, 'text'),
    (lambda: layout(3), TypeError, 'text'),
    (lambda: layout(['a', 3.5]), TypeError, 'piece'),
    (lambda: render_batch([]), ValueError, 'texts'),
    (lambda: render_batch('abc'), ValueError, 'texts'),
    (lambda: layout(Picture(np.zeros((4, 4), np.uint8), width_patches=0)), ValueError, 'width_patches'),
], ids=lambda x: x if isinstance(x, str) else None)
def test_bad_input_names_the_argument(make, exc, name):
    with pytest.raises(exc, match=name):
        make()


def test_layout_batch_rejects_a_bare_string():
    "A str is not a list of inputs (render_batch already refuses it); it must not become one page per character."
    with pytest.raises((TypeError, ValueError), match='texts'):
        layout_batch('abc')


def test_show_spaces_marks_space_cells_and_nothing_else():
    text = 'a b\tc  \nd'                      # spaces at columns 1, 5 and 6 of line 0; a tab over column 3
    plain, shown = (render_batch([text], RenderConfig(patch_w=32, show_spaces=on)) for on in (False, True))
    check_rendered(shown)
    cells = lambda page: page.reshape(-1, DEFAULT.cell_h, DEFAULT.page_chars, DEFAULT.cell_w).transpose(1, 2)
    plain_cells, shown_cells = cells(plain.pages()[0]), cells(shown.pages()[0])
    differ = (plain_cells != shown_cells).flatten(2).any(2).nonzero().tolist()
    assert differ == [[0, 1], [0, 5], [0, 6]]
    for line, col in differ:
        assert (shown_cells[line, col].numpy() == space_mark_glyph()).all() and (plain_cells[line, col] == 0).all()
    mark = ATLAS.bitmaps([ATLAS.space_mark])[0]
    others = ATLAS.bitmaps(ATLAS.rows(np.arange(33, 127)))
    assert (mark > 0).any() and not any((mark == other).all() for other in others)
    spaces_only = [render_batch(['        x'], RenderConfig(patch_w=32, show_spaces=on)).packed_has_ink().tolist()[:2]
                   for on in (False, True)]
    assert spaces_only == [[False, False], [True, True]]     # a patch of spaces now takes a position


# ---------------------------------------------------------------------------------------------------
# non-default geometry

GEOMETRIES = [
    RenderConfig(patch_w=32, patch_h=32),                                   # 2 lines per patch
    RenderConfig(patch_w=16, page_chars=32),                    # 2 chars per patch
    RenderConfig(cell_w=6, cell_h=12, patch_w=24, patch_h=12, page_chars=48),
    RenderConfig(cell_w=6, cell_h=12, patch_w=12, patch_h=24, page_chars=24, tab_size=8),
    RenderConfig(patch_w=8, patch_h=48, page_chars=12),         # 1 char, 3 lines per patch
    RenderConfig(patch_w=32, patch_h=32, page_chars=12),                    # 3 patches per row, 2 lines per patch
    RenderConfig(patch_w=32, patch_h=32, page_chars=4),                     # 1 patch per row, 2 lines per patch
]


@pytest.mark.parametrize('cfg', GEOMETRIES, ids=str)
def test_non_default_geometry(cfg):
    r = random.Random(8)
    texts = [random_text(r, 80) for _ in range(5)] + ['']
    for t in texts[:3]: check_against_ref(t, cfg, max_lines=r.randrange(1, 9))
    rendered = render_batch(texts, cfg, max_lines=9)
    assert all(l.n_lines % cfg.lines_per_patch == 0 for l in rendered.layouts)
    check_rendered(rendered)
    check_rendered(render_batch([random_doc(r) for _ in range(4)], cfg))


# ---------------------------------------------------------------------------------------------------
# threads


def test_threads_render_new_fallbacks_like_a_serial_render():
    r = random.Random(9)
    pool = []
    while len(pool) < 600:                                      # code points no earlier test can have drawn
        cp = r.randrange(0x30000, 0xE0000)
        if ATLAS.lut[0, cp] < 0 and cp not in pool: pool.append(cp)
    jobs = [[''.join(chr(cp) for cp in r.sample(pool, 150)) + '\tx\n' for _ in range(4)] for _ in range(4)]
    results, errors, barrier = [None] * 4, [], threading.Barrier(4)

    def work(i):
        try:
            barrier.wait()
            rendered = render_batch(jobs[i])
            results[i] = (rendered.pages(), rendered.packed_patches(), rendered.layouts)
        except Exception as e: errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert not errors, errors
    for i in range(4):
        pages, packed, lays = results[i]
        serial = render_batch(jobs[i])
        assert torch.equal(pages, serial.pages()) and torch.equal(packed, serial.packed_patches())
        for lay in lays:                                        # every missing code point got its own fallback
            for k, ch in enumerate(lay.text[:150]):
                assert np.array_equal(ATLAS.bitmaps([lay.glyph[k]])[0], fallback_glyph(ord(ch)))
    assert len({g for _, _, lays in results for l in lays for g in l.glyph[:150].tolist()}) == \
        len({ch for job in jobs for t in job for ch in t[:150]})


def test_get_atlas_from_threads_is_one_atlas():
    got, barrier = [None] * 4, threading.Barrier(4)

    def work(i):
        barrier.wait()
        got[i] = get_atlas(5, 10)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert all(a is got[0] for a in got) and isinstance(got[0], GlyphAtlas)
