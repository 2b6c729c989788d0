"""Bad input, generated (issue 14): property-based tests of the renderer, the conversation builder and engine, and every
entry point's flags. Each surface tries `examples(short, long)` generated inputs and records what it tried and what failed
through `reliability.record('bad_inputs_<surface>', ...)`."""
import contextlib
import importlib
import io
import math
import re
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from imagelm.conversation import conversation_segments, generate_reply, message_pages, reply_message
from imagelm.engine import Engine
from imagelm.model import ImageLM, ModelConfig
from imagelm.render import Picture, RenderConfig, Span, as_pieces, layout, render_batch, render_page
from imagelm.segments import Bytes, Pixels
from reliability import examples, record

N_RENDER, N_CONVERSATION, N_SAMPLING, N_FLAGS = examples(400, 4000), examples(200, 2000), examples(80, 800), examples(10, 100)

# The bugs these tests found and this session fixed, one entry each (failures_found); failures_left is what a run finds now.
FIXED = {
    'render': [
        'Picture: width_patches was not checked: 1.5 was drawn, 0 refused only at layout, far from where it was given',  # 01_render
    ],
    'conversation': [
        'normalize: content neither str nor list (3, b"..", a dict) raised a bare TypeError or was read key by key',   # 12_conversation
        'normalize: an image part with width_patches=0 was accepted, to fail later inside the renderer',
        'normalize: an assistant text with a lone surrogate (JSON allows "\\ud800") raised UnicodeEncodeError in _reply',
    ],
    'engine': [
        'sample_next: a tiny temperature (1e-300) overflowed the scaled logits to a nan softmax: RuntimeError in multinomial',
        'check_sampling: seed was not checked: 1.5 gave a RuntimeError, 2**64 an OverflowError without naming seed',  # 05_engine
    ],
    'flags': [
        'common.bounded: nan and inf passed every range (base_train --time_budget, chat_cli --temperature, dataset --ratio)',
        'chat_eval: --examples/--max_tokens/--batch_size out of range ended in a ValueError traceback, not a usage error',
        'chat_eval: --val_batches=-1 was accepted',
        'chat_eval: --evals with an unknown name was refused only after loading the model, by a traceback',
        'base_eval: --max_per_task=0 and below -1 were accepted (-5 would cut each task to all but its last 5)',
        'chat_rl: --temperature took any float (-1, nan) and --top_k any int (0, -3), failing deep in sampling',
    ],
}
FLAG_TALLY = {'tried': 0, 'failures_left': 0}   # summed over the entry points' tests


def fuzz_settings(n: int):
    "Hypothesis settings for `n` examples, the same ones on every run (derandomized, no example database)."
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


class Tally:
    "Count the examples tried and the ones that broke a property, so each surface can record its figures."
    def __init__(self): self.tried, self.failed = 0, []
    def __call__(self, check, *args):
        self.tried += 1
        try: check(*args)
        except Exception as error:
            self.failed.append(f'{type(error).__name__}: {str(error)[:200]}')
            raise


# ---------------------------------------------------------------------------------------------------
# text: arbitrary Unicode with the awkward kinds over-represented

AWKWARD = ['\ud800', '\udfff', '\udc80x', '\u0301', 'e\u0301\u0302\u0303', '\u200b', '\u200d', '\u200c', '\ufeff', '\u202e',
           '\u2066', '\u2069', '\u200f', '👩\u200d👩\u200d👧', '🇫🇷', '👍🏽', '\x00', '\x1b[31m', '\r\n', '\r', '\t', '\n',
           '\x7f', '\x85', '\u2028', '\u2029', '\uffff', '\U0010ffff', '\U000e0001', '中文', ' ' * 70, '\t' * 20, '\n' * 9]
HUNDRED_K = (''.join(AWKWARD) * 2000)[:100_000]   # one explicit example: a 100k-character string of the awkward kinds
code_points = st.integers(0, 0x10FFFF).map(chr)
texts = st.lists(st.one_of(code_points, st.sampled_from(AWKWARD), st.text(max_size=20)), max_size=40).map(''.join)
raw_bytes = st.binary(max_size=200)

colors = st.one_of(st.none(), st.tuples(*[st.integers(0, 255)] * 3),
                   st.sampled_from([(256, 0, 0), (-1, 0, 0), (1, 2), (0.5, 0, 0), 'red', (True, 0, 0)]))
flags_ = st.one_of(st.booleans(), st.sampled_from([0, 1, None, 'yes']))
spans = st.builds(lambda t, b, i, c: (t, b, i, c), texts, flags_, flags_, colors)


@st.composite
def picture_arrays(draw):
    "Arrays of random shapes and dtypes: some pictures, most not."
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 4, 5, 17]), min_size=ndim, max_size=ndim)))
    dtype = draw(st.sampled_from([np.uint8, np.float32, np.float64, np.int64, np.bool_, np.float16, np.int8]))
    fill = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0, math.nan, math.inf, 255.0, 300.0]))
    with np.errstate(invalid='ignore', over='ignore'):
        return np.full(shape, fill).astype(dtype) if dtype is not np.bool_ else np.full(shape, fill > 0)


pictures = st.builds(lambda a, w: (a, w), picture_arrays(), st.one_of(st.none(), st.integers(-2, 10), st.sampled_from([1.5, True])))
pieces = st.one_of(texts, raw_bytes, spans.map(lambda s: ('span', s)), pictures.map(lambda p: ('picture', p)))
inputs = st.one_of(texts, raw_bytes, st.lists(pieces, max_size=5))

CELLS = [(8, 16), (5, 10), (6, 12)]   # each new cell size builds its atlas once, so a few only
configs = st.one_of(
    st.just(RenderConfig()),
    st.builds(lambda cell, k, l, n, tab, show: dict(cell_w=cell[0], cell_h=cell[1], patch_w=k * cell[0], patch_h=l * cell[1],
                                                     page_chars=n * k, tab_size=tab, show_spaces=show),
              st.sampled_from(CELLS), st.integers(1, 8), st.integers(1, 3), st.integers(1, 12), st.integers(1, 9), st.booleans()),
    st.fixed_dictionaries({}, optional={'cell_w': st.sampled_from([0, -1, 4, 8, 7.5, True, '8']), 'cell_h': st.sampled_from([9, 16, 0, None]),
                                        'patch_w': st.sampled_from([63, 64, 0]), 'page_chars': st.sampled_from([65, 64, -64]),
                                        'tab_size': st.sampled_from([0, 4, 2.0]), 'show_spaces': st.sampled_from([1, 'no', False])}))
limits = st.one_of(st.none(), st.integers(0, 40), st.sampled_from([-1, -100, True, 2.5, '3', 10**12]))


def build_piece(piece):
    "A generated piece as the renderer's input: text, bytes, a Span or a Picture (the last two may refuse their fields)."
    if not isinstance(piece, tuple): return piece
    kind, fields = piece
    if kind == 'span': return Span(*fields)
    return Picture(*fields)


def documented_error(error: Exception, names) -> bool:
    "A ValueError or TypeError whose message names one of `names` (in any case)."
    return isinstance(error, (ValueError, TypeError)) and any(n.lower() in str(error).lower() for n in names)


def check_render(text, cfg_fields, max_lines, max_patches):
    try:
        cfg = cfg_fields if isinstance(cfg_fields, RenderConfig) else RenderConfig(**cfg_fields)
    except (ValueError, TypeError) as error:
        assert documented_error(error, ['RenderConfig.', 'cell_w', 'cell_h']), error
        return
    try:
        text = [build_piece(p) for p in text] if isinstance(text, list) else text
    except (ValueError, TypeError) as error:
        assert documented_error(error, ['Span.', 'Picture.']), error
        return
    try:
        rendered = render_batch([text, 'second page'], cfg, max_lines, max_patches)
    except (ValueError, TypeError) as error:
        assert documented_error(error, ['max_lines', 'max_patches', 'Picture.width_patches']), error
        return
    full_text = ''.join(p.text for p in as_pieces(text) if isinstance(p, Span))
    lay, unlimited = rendered.layouts[0], layout(text, cfg)
    c, lpp = cfg, cfg.lines_per_patch
    # kept text: a prefix of the normalised input; truncated iff something was dropped
    assert lay.text == full_text and lay.kept_text == full_text[:lay.n_kept] and lay.n_kept <= len(full_text)
    assert unlimited.n_kept == len(full_text) and not unlimited.truncated
    dropped_pictures = sum(p[1] for p in lay.pictures) < sum(p[1] for p in unlimited.pictures)
    assert lay.truncated == (lay.n_kept < len(full_text) or dropped_pictures)
    if max_lines is None and max_patches is None: assert lay.n_kept == len(full_text) and not lay.truncated
    # shapes agree with the lines and patches of each page
    assert lay.n_lines % lpp == 0 and lay.n_lines <= unlimited.n_lines
    if max_lines is not None: assert lay.n_lines <= max_lines
    if max_patches is not None: assert lay.n_patches <= max_patches
    assert len(lay.glyph) == len(lay.line) == len(lay.col) == lay.n_kept
    if lay.n_kept: assert lay.line.max() < lay.n_lines and 0 <= lay.col.min() and lay.col.max() < c.page_chars
    n_patches = rendered.n_patches.tolist()
    assert n_patches == [l.n_patches for l in rendered.layouts] and rendered.truncated.tolist() == [l.truncated for l in rendered.layouts]
    channels = 1 if rendered.plain else 3
    width = channels * c.patch_h * c.patch_w
    assert rendered.packed_patches().shape == (sum(n_patches), width)
    assert rendered.packed_slot_glyphs().shape == (sum(n_patches), c.slots_per_patch)
    assert rendered.patches().shape == (2, rendered.most_patches(), width)
    assert rendered.patch_mask().sum().item() == sum(n_patches)
    assert rendered.pages().shape == (2, channels, rendered.most_lines() * c.cell_h, c.page_w)
    page, alone = render_page(text, cfg, max_lines, max_patches)
    assert (alone.n_kept, alone.n_lines, alone.truncated) == (lay.n_kept, lay.n_lines, lay.truncated)
    assert page.shape[1:] == (max(lay.n_lines, lpp) * c.cell_h, c.page_w)


def test_renderer_takes_any_input():
    tally = Tally()

    @fuzz_settings(N_RENDER)
    @given(inputs, configs, limits, limits)
    @example('\ud800\udfff lone surrogates, é\u0301 combining, \u202e bidi \u200d zero-width', RenderConfig(), 1, None)
    @example(b'\xff\xfe\x00\xc3(\xed\xa0\x80 bad utf-8', RenderConfig(), None, 0)
    @example(HUNDRED_K, RenderConfig(), None, None)
    @example(HUNDRED_K, RenderConfig(), 32, None)
    def run(text, cfg, max_lines, max_patches): tally(check_render, text, cfg, max_lines, max_patches)

    try: run()
    finally: record('bad_inputs_render', tried=tally.tried, failures_found=len(FIXED['render']), failures_left=len(tally.failed))


# ---------------------------------------------------------------------------------------------------
# the conversation builder and the engine, with a tiny random model


@pytest.fixture(scope='module')
def engine():
    torch.manual_seed(0)
    return Engine(ImageLM(ModelConfig(depth=1, seq_len=256)).eval())


image_values = st.one_of(st.just(np.zeros((4, 4, 3), np.uint8)), picture_arrays(),
                         st.sampled_from([b'not a png', '/no/such/file.png', None, 3, [[1, 2]]]))
parts = st.one_of(texts, st.fixed_dictionaries({'type': st.sampled_from(['text', 'tool_call', 'tool_output', 'bogus', 3])},
                                               optional={'text': st.one_of(texts, st.integers(), st.none())}),
                  st.fixed_dictionaries({'type': st.just('image'), 'image': image_values},
                                        optional={'width_patches': st.sampled_from([None, 1, 2, 0, -1, 1.5])}),
                  st.sampled_from([None, 3, {'text': 'no type'}]))
contents = st.one_of(texts, st.lists(parts, max_size=4), st.sampled_from([None, 3, {}, b'bytes', 'x' * 20_000]))
messages = st.one_of(
    st.fixed_dictionaries({'role': st.sampled_from(['user', 'assistant', 'system', 'tool', '', None, 1]), 'content': contents}),
    st.sampled_from([None, 'hello', 3, {}, {'role': 'user'}, {'content': 'hi'}, ('user', 'hi')]))
conversations = st.one_of(st.lists(messages, max_size=5),
                          st.lists(messages, min_size=1, max_size=4).map(lambda m: m + [{'role': 'user', 'content': 'hi'}]),
                          st.sampled_from([None, 'hello', {}, ()]))


def check_segments(conversation):
    try: segments = conversation_segments(conversation)
    except (ValueError, TypeError) as error:
        assert documented_error(error, ['message', 'conversation', 'picture']), error
        return
    assert isinstance(segments[0], Bytes) and all(isinstance(s, (Bytes, Pixels)) for s in segments)
    assert len(message_pages(conversation, RenderConfig())) == sum(isinstance(s, Pixels) for s in segments)


def test_conversation_builder_takes_any_messages():
    tally = Tally()

    @fuzz_settings(N_CONVERSATION)
    @given(conversations)
    @example([{'role': 'user', 'content': 3}])
    @example([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': '\ud800'}])
    @example([{'role': 'user', 'content': {'type': 'text', 'text': 'hi'}}])
    @example([{'role': 'user', 'content': [{'type': 'image', 'image': np.zeros((2, 2), np.uint8), 'width_patches': 0}]}])
    def run(conversation): tally(check_segments, conversation)

    try: run()
    finally: record('bad_inputs_conversation', tried=tally.tried, failures_found=len(FIXED['conversation']),
                    failures_left=len(tally.failed))


sampling = st.fixed_dictionaries({}, optional={
    'max_tokens': st.one_of(st.integers(-2, 12), st.sampled_from([0, 1.0, True, None, '5'])),
    'temperature': st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0, 1, 1e-30, 1e30, -0.0, True, '1', None])),
    'top_k': st.one_of(st.none(), st.integers(-2, 300), st.sampled_from([0, 2.0, True, '3'])),
    'seed': st.one_of(st.none(), st.integers(0, 2**63 - 1), st.sampled_from([-1, 2**64, 1.5, 'seed']))})
SAMPLING_NAMES = ('max_tokens', 'temperature', 'top_k', 'seed')


def check_reply(engine, conversation, kw):
    try: text = generate_reply(engine, conversation, **kw)
    except (ValueError, TypeError) as error:
        assert documented_error(error, SAMPLING_NAMES + ('message', 'conversation', 'prompt', 'context', 'picture')), error
        return
    assert isinstance(text, str) and len(text.encode('utf-8', 'surrogatepass')) <= 4 * 20 * kw.get('max_tokens', 256)
    message = reply_message(text)
    assert message['role'] == 'assistant'


def test_engine_replies_or_refuses_clearly(engine):
    tally = Tally()
    short_conversations = st.one_of(
        st.lists(messages, max_size=3).map(lambda m: m + [{'role': 'user', 'content': 'hi'}]),
        st.just([{'role': 'user', 'content': [{'type': 'image', 'image': np.zeros((3, 3), np.uint8)}, 'what is it?']}]),
        conversations)

    @fuzz_settings(N_SAMPLING)
    @given(short_conversations, sampling)
    @example([{'role': 'user', 'content': 'hi'}], {'temperature': 1e-300, 'max_tokens': 3})
    @example([{'role': 'user', 'content': 'hi'}], {'seed': 1.5, 'max_tokens': 3})
    @example([{'role': 'user', 'content': 'hi'}], {'seed': 2**64, 'max_tokens': 3})
    @example([{'role': 'user', 'content': 'hi'}], {'temperature': 1e30, 'top_k': 1, 'max_tokens': 3, 'seed': 0})
    def run(conversation, kw):
        kw = {**kw, 'max_tokens': kw.get('max_tokens', 4)}
        tally(check_reply, engine, conversation, kw)

    try: run()
    finally: record('bad_inputs_engine', tried=tally.tried, failures_found=len(FIXED['engine']), failures_left=len(tally.failed))


# ---------------------------------------------------------------------------------------------------
# every entry point's flags: refused with usage (exit 2) or a one-line error naming the flag, never a traceback


class Accepted(Exception):
    "Raised where an entry point would start its work: the flags given were taken as good."


def accept(*args, **kw): raise Accepted()


# entry point -> (functions that start its work, replaced by `accept`; argv that must come first; flags with bad values)
NOT_INT = st.sampled_from(['x', '1.5', '', '0x10', '1e3', ' ', 'nan', '3.0'])
NOT_NUMBER = st.sampled_from(['x', '', 'one', '1,5'])   # not '--': argparse itself reads '--flag=--' as an empty list
NON_FINITE = st.sampled_from(['nan', 'inf', '-inf', 'NaN'])
def below(low): return st.integers(-10**6, low - 1).map(str)
def above(high): return st.integers(high + 1, 10**9).map(str)
def floats_below(low): return st.floats(-1e9, low, exclude_max=True).map(repr)
def not_in(choices): return st.text(string.ascii_letters + string.digits + '-_', max_size=8).filter(lambda s: s not in choices)


TRAIN_FLAGS = {'--depth': NOT_INT,   # below 1: test_chat_stage_refuses_depth_zero
               '--device_batch_size': st.one_of(NOT_INT, below(1)),
               '--num_iterations': st.one_of(NOT_INT, below(-1), st.just('0')), '--total_batch_size': st.one_of(below(-1), st.just('0')),
               '--target_param_data_ratio': st.one_of(NOT_NUMBER, floats_below(0), NON_FINITE),
               '--time_budget': st.one_of(NOT_NUMBER, floats_below(0), NON_FINITE), '--eval_every': below(0),
               '--resume': not_in(['0', '1']), '--device': not_in(['cuda', 'mps', 'cpu']), '--preset': st.just('nope'),
               '--seed': NOT_INT}
ENTRY_POINTS = {
    'base_train': (['train_or_exit'], [], {**TRAIN_FLAGS, '--depth': st.one_of(NOT_INT, below(1))}),
    'mid_train': (['chat_train.train_or_exit'], [], TRAIN_FLAGS),
    'chat_sft': (['chat_train.train_or_exit'], [], TRAIN_FLAGS),
    'chat_rl': (['chat_train.train_or_exit'], [], {**TRAIN_FLAGS, '--num_samples': st.one_of(NOT_INT, below(2)),
                                                   '--max_tokens': below(1), '--temperature': st.one_of(floats_below(0), NON_FINITE, NOT_NUMBER),
                                                   '--top_k': st.one_of(below(1), NOT_INT)}),
    'chat_eval': (['init_process', 'load_model'], [], {'--examples': st.one_of(below(-1), st.just('0'), NOT_INT),
                                                       '--max_tokens': st.one_of(below(1), NOT_INT), '--batch_size': below(1),
                                                       '--val_batches': below(0), '--stage': not_in(['base', 'mid', 'sft', 'rl']),
                                                       '--step': NOT_INT}),
    'base_eval': (['init_process', 'load_model'], [], {'--val_batches': below(1), '--core': not_in(['0', '1']),
                                                       '--max_per_task': st.one_of(below(-1), st.just('0')),
                                                       '--homoglyph_rate': st.one_of(floats_below(0), NON_FINITE, st.just('1.5')),
                                                       '--dtype': not_in(['float32', 'bfloat16', 'float16']), '--step': NOT_INT}),
    'chat_cli': (['load_model'], [], {'--temperature': st.one_of(floats_below(0), above(2), NON_FINITE), '--top_k': below(1),
                                      '--max_tokens': below(1), '--seed': NOT_INT, '--stage': not_in(['base', 'mid', 'sft', 'rl'])}),
    'chat_web': (['worker_models'], [], {'--port': st.one_of(below(1), above(65535)), '--temperature': st.one_of(floats_below(0), NON_FINITE),
                                         '--top_k': st.one_of(below(0), above(200)), '--max_tokens': below(1), '--num_workers': below(1),
                                         '--queue_timeout': st.one_of(floats_below(0.1), NON_FINITE)}),
    'dataset': (['download_shards', 'shard_plan'], [], {'-n': st.one_of(below(-1), st.just('0'), NOT_INT),
                                                          '--shards_for_depth': st.one_of(below(1), NOT_INT), '--plan': below(1),
                                                          '--workers': below(1), '--ratio': st.one_of(floats_below(1e-9), NON_FINITE)}),
    'core_eval': (['ensure_bundle'], [], {'--download_only': not_in(['0', '1'])}),
    'report': (['generate', 'reset'], ['generate'], {'--gpu_hour_cost': st.one_of(floats_below(0), NON_FINITE, NOT_NUMBER)}),
    'chat_datasets': (['download_datasets'], [], {'--workers': st.one_of(below(1), NOT_INT)}),
}
EXTRA_FOR = {'dataset': ['--plan=1']}   # a required choice, so that the bad flag is what is judged


def run_main(name, argv, monkeypatch):
    "Exit status, stderr and the exception of `imagelm.<name>.main(argv)` with its work replaced by `accept`."
    module = importlib.import_module(f'imagelm.{name}')
    for target in ENTRY_POINTS[name][0]:
        owner, attr = (importlib.import_module(f'imagelm.{target.split(".")[0]}'), target.split('.')[1]) if '.' in target else (module, target)
        monkeypatch.setattr(owner, attr, accept)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try: result = module.main(argv)
        except SystemExit as stop: return stop.code, err.getvalue(), None
        except Exception as error: return None, err.getvalue(), error
    return result, err.getvalue(), None


def check_refused(name, flag, value, monkeypatch):
    argv = ENTRY_POINTS[name][1] + [f'{flag}={value}'] + (EXTRA_FOR.get(name, []) if flag not in ('--plan', '--shards_for_depth', '-n') else [])
    code, err, error = run_main(name, argv, monkeypatch)
    assert not isinstance(error, Accepted), f'{name} {argv}: the bad value was accepted'
    assert error is None, f'{name} {argv}: {type(error).__name__}: {error}'   # a traceback, not a usage error
    if isinstance(code, str): code, err = 1, code   # sys.exit('error: ...') prints its message, exit 1
    assert code in (1, 2), f'{name} {argv}: exit {code!r}'
    last = err.strip().splitlines()[-1] if err.strip() else ''
    assert 'error' in last and re.search(rf'(^|\W){re.escape(flag.lstrip("-"))}\b', last), f'{name} {argv}: {last!r}'


@pytest.fixture
def empty_base(tmp_path, monkeypatch):
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path))
    return tmp_path


@pytest.mark.parametrize('name', list(ENTRY_POINTS))
def test_entry_point_refuses_bad_flags(name, empty_base, monkeypatch):
    tally, bad = Tally(), ENTRY_POINTS[name][2]
    known = {flag for action in _parser_actions(name) for flag in action}

    @fuzz_settings(N_FLAGS * len(bad))
    @given(st.sampled_from(list(bad)), st.data())
    def out_of_range(flag, data): tally(check_refused, name, flag, data.draw(bad[flag]), monkeypatch)

    @fuzz_settings(N_FLAGS)
    @given(st.from_regex(r'--[a-z][a-z_]{2,12}', fullmatch=True).filter(lambda f: not any(k.startswith(f) for k in known)), NOT_NUMBER)
    def unknown(flag, value): tally(check_refused, name, flag, value, monkeypatch)

    try: out_of_range(); unknown()
    finally:
        FLAG_TALLY['tried'] += tally.tried; FLAG_TALLY['failures_left'] += len(tally.failed)
        record('bad_inputs_flags', tried=FLAG_TALLY['tried'], failures_found=len(FIXED['flags']), failures_left=FLAG_TALLY['failures_left'])


@pytest.mark.parametrize('name', ['mid_train', 'chat_sft', 'chat_rl'])
def test_chat_stage_refuses_depth_zero(name, empty_base, monkeypatch):
    check_refused(name, '--depth', '0', monkeypatch)


def _parser_actions(name):
    "The option strings of every flag of entry point `name`, for telling unknown flags (and abbreviations) from known ones."
    module = importlib.import_module(f'imagelm.{name}')
    parser = getattr(module, 'make_parser', None)
    if name in ('mid_train', 'chat_sft', 'chat_rl'):
        from imagelm.chat_train import make_chat_parser
        parser = lambda: make_chat_parser({'mid_train': 'mid', 'chat_sft': 'sft', 'chat_rl': 'rl'}[name], getattr(module, 'add_rl_flags', None))
    if parser is None: return [['--workers', '-w', '-n', '--num_shards', '--shards_for_depth', '--plan', '--max_seq_len', '--ratio', '--data']]
    return [action.option_strings for action in parser()._actions] + [['--gpu_hour_cost']]   # report's, on its subcommand
