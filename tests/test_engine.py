"""The KV-cache engine against the naive oracle (greedy, byte for byte) over model variants and sequence shapes:
multi-turn chats, several samples that stop at different steps, a full context, the fused and explicit page paths,
skipped blank patches; the sampling arguments; and the calculator tool, from its parser to forced bytes in a stream."""
import math
import random
from fractions import Fraction

import pytest
import torch

from imagelm.engine import (CALC_MAX_CHARS, CALC_MAX_DEPTH, CALC_MAX_DIGITS, CALC_MAX_MAGNITUDE, TOOL_CALL_END,
                            TOOL_CALL_START, TOOL_OUTPUT_END, TOOL_OUTPUT_START, CalcError, Engine, KVCache, calc_tokens,
                            calculate, evaluate, naive_generate, naive_logits, sample_next)
from imagelm.model import ImageLM, ModelConfig, randomize_output_projections
from imagelm.render import Span
from imagelm.segments import Bytes, Pixels, SequenceTooLong, dense_mask, pack, special

BOS, U0, U1 = special('<|bos|>'), special('<|user_start|>'), special('<|user_end|>')
A0, A1 = special('<|assistant_start|>'), special('<|assistant_end|>')


def random_model(seed: int = 0, **kw) -> ImageLM:
    "A small model with non-zero output projections (the init zeroes them), so every layer reads the context."
    torch.manual_seed(seed)
    model = ImageLM(ModelConfig(**({'depth': 2, 'seq_len': 256, 'skip_blank': False} | kw)))
    return randomize_output_projections(model, head_std=0.05).eval()


VARIANTS = {'mha-1d': dict(positions='1d'), 'gqa-1d': dict(d_model=96, n_head=4, n_kv_head=2, positions='1d'),
            'mha-2d': dict(d_model=96, n_head=2, positions='2d'), 'gqa-2d': dict(d_model=96, n_head=4, n_kv_head=1, positions='2d')}
MODELS = {}


def model_for(name: str) -> ImageLM:
    if name not in MODELS: MODELS[name] = random_model(1, **VARIANTS[name])
    return MODELS[name]


def user_turn(text) -> list: return [Bytes([U0]), Pixels(text), Bytes([U1, A0])]


PROMPTS = {
    'page only': [Pixels('A page alone, read both ways.')],
    'document': [Bytes([BOS]), Pixels('The cat sat on'), Bytes.text(' the', before=('<|continue|>',))],
    'chat': [Bytes([BOS])] + user_turn('What is the capital of France?\nOne word.'),
    'pages and bytes': [Bytes([BOS]), Pixels('first page'), Bytes(b' bytes '), Pixels('second\npage\n\n'), Bytes([A0])],
    'styled page': [Bytes([BOS])] + user_turn([Span('Bold', bold=True), ' and ', Span('red', color=(200, 0, 0))]),
    'unicode page': [Bytes([BOS])] + user_turn('héllo wörld 中文 😀\tend'),
}


def greedy(engine_or_model, segments, n=12, **kw):
    if isinstance(engine_or_model, Engine): return engine_or_model.generate(segments, max_tokens=n, temperature=0, **kw)[0]
    return naive_generate(engine_or_model, segments, max_tokens=n, **kw)


# ----------------------------------------------------------------------------------------------------------------
# the engine against the oracle

CASES = [(v, p) for v in VARIANTS for p in PROMPTS if v in ('mha-1d', 'gqa-2d') or p in ('chat', 'pages and bytes')]


@pytest.mark.parametrize('variant, prompt', CASES)
def test_greedy_equals_oracle(variant, prompt):
    model = model_for(variant)
    out = greedy(Engine(model), PROMPTS[prompt], stop_ids=())
    assert len(out) == 12
    assert out == greedy(model, PROMPTS[prompt], stop_ids=())


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_multi_turn_chat_equals_oracle_turn_by_turn(variant):
    model = model_for(variant)
    engine = Engine(model)
    turns = ['Hi there.', 'What is 2+2?\nShow your work.', 'Thanks', [Span('styled', italic=True), ' turn']]
    history, stop = [Bytes([BOS])], list(range(40, 80))   # stop on many byte values, so that some replies end early
    for i, turn in enumerate(turns):
        reply = engine.generate(([Bytes([BOS])] if i == 0 else []) + user_turn(turn), max_tokens=10, temperature=0,
                                stop_ids=stop, extend=i > 0)[0]
        history += user_turn(turn)
        assert reply == naive_generate(model, history, max_tokens=10, stop_ids=stop), f'turn {i}'
        history.append(Bytes(reply))
    n_history = int(pack([history], seq_len=model.cfg.seq_len, cfg=model.cfg.render).doc_id.ge(0).sum())
    assert engine.cache.length == n_history - 1   # the last reply byte waits, not fed, until the next turn


def test_extend_computes_only_the_new_positions():
    model = model_for('mha-1d')
    engine, seen = Engine(model), []
    hidden = model.hidden
    model.hidden = lambda x, *a, **kw: (seen.append(x.shape[1]), hidden(x, *a, **kw))[1]
    try:
        prompt = PROMPTS['chat']
        engine.generate(prompt, max_tokens=5, temperature=0, stop_ids=())
        turn = user_turn('Second turn')
        engine.generate(turn, max_tokens=5, temperature=0, stop_ids=(), extend=True)
    finally:
        del model.hidden
    n_prompt, n_turn = engine.count_positions(prompt), engine.count_positions(turn)
    # prefill, 4 decode steps; then the last reply byte and the new turn in one pass, and 4 decode steps
    assert seen == [n_prompt, 1, 1, 1, 1, 1 + n_turn, 1, 1, 1, 1]
    assert engine.cache.length == n_prompt + 5 + n_turn + 4


def test_fused_and_explicit_paths_agree_and_fused_is_used_for_plain_pages():
    model = model_for('mha-1d')
    calls = []
    forward_glyphs = model.patch_embed.forward_glyphs
    model.patch_embed.forward_glyphs = lambda *a, **kw: (calls.append(1), forward_glyphs(*a, **kw))[1]
    try:
        fused = greedy(Engine(model), PROMPTS['chat'], stop_ids=())
        assert calls, 'a plain page should take the fused glyph path'
        calls.clear()
        explicit = greedy(Engine(model, fused=False), PROMPTS['chat'], stop_ids=())
        assert not calls
        greedy(Engine(model), PROMPTS['styled page'], stop_ids=())
        assert not calls, 'a coloured page must take the explicit pixel path'
    finally:
        del model.patch_embed.forward_glyphs
    assert fused == explicit == greedy(model, PROMPTS['chat'], stop_ids=(), fused=False)


@pytest.mark.parametrize('positions', ['1d', '2d'])
def test_skipped_blank_patches_follow_the_model_config_and_match_the_oracle(positions):
    model = random_model(3, d_model=96, n_head=2, positions=positions, skip_blank=True)
    prompt = [Bytes([BOS]), Pixels('short\n\n\nline after blank lines'), Bytes(b'and'), Pixels('x'), Bytes([A0])]
    engine = Engine(model)
    assert engine.skip_blank and engine.count_positions(prompt) < Engine(model, skip_blank=False).count_positions(prompt)
    out = greedy(engine, prompt, stop_ids=())
    assert out == greedy(model, prompt, stop_ids=())
    assert not torch.allclose(Engine(model).feed(prompt), Engine(model, skip_blank=False).feed(prompt))   # it matters
    turn = user_turn('again\n\nwith a gap')
    more = engine.generate(turn, max_tokens=6, temperature=0, stop_ids=(), extend=True)[0]
    assert more == naive_generate(model, prompt + [Bytes(out)] + turn, max_tokens=6, stop_ids=())


def test_step_by_step_equals_full_recompute():
    model = model_for('gqa-1d')
    engine = Engine(model)
    engine.feed(PROMPTS['chat'])
    logits = engine.step(torch.tensor([ord('P')]))
    full = pack([PROMPTS['chat'] + [Bytes(b'P')]], seq_len=engine.count_positions(PROMPTS['chat']) + 1, cfg=model.cfg.render)
    with torch.no_grad():
        x = model.embed(full.byte_ids, full.is_pixel, slot_glyphs=full.slot_glyphs())
        ref = model.logits(model.hidden(x, full.pos, full.grid, full.is_pixel, dense_mask(full.seg_id, full.is_pixel, full.doc_id))[:, -1])
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# several samples

def test_samples_share_one_prefill_and_greedy_rows_agree():
    model = model_for('mha-1d')
    engine = Engine(model)
    outs = engine.generate(PROMPTS['chat'], max_tokens=10, temperature=0, num_samples=4, stop_ids=())
    assert len(outs) == 4 and all(o == outs[0] for o in outs)
    assert outs[0] == greedy(model, PROMPTS['chat'], n=10, stop_ids=())
    assert engine.cache.batch_size == 4


def test_seeded_sampling_is_reproducible_and_matches_oracle_sampling():
    model = model_for('mha-1d')
    engine, p = Engine(model), PROMPTS['chat']
    kw = dict(max_tokens=16, temperature=1.0, top_k=40, stop_ids=())
    a = engine.generate(p, seed=5, num_samples=3, **kw)
    assert a == engine.generate(p, seed=5, num_samples=3, **kw)
    assert a != engine.generate(p, seed=6, num_samples=3, **kw)
    assert len({tuple(o) for o in a}) == 3, 'samples of one batch should differ'
    assert engine.generate(p, seed=5, **kw)[0] == naive_generate(model, p, seed=5, **kw)
    assert engine.generate(p, temperature=0.7, top_k=1, num_samples=2, max_tokens=16, stop_ids=()) == [greedy(model, p, 16, stop_ids=())] * 2


def test_samples_that_stop_at_different_steps_continue_as_their_own_sequences():
    model = model_for('gqa-2d')
    engine, p = Engine(model), PROMPTS['chat']
    firsts = engine.generate(p, max_tokens=12, temperature=1.0, seed=3, num_samples=4, stop_ids=range(64))
    assert len({len(f) for f in firsts}) > 1, 'the test needs samples of different lengths'
    assert engine.finish_reasons.count('stop') >= 1
    seconds = engine.generate(user_turn('Go on.'), max_tokens=8, temperature=0, extend=True, stop_ids=())
    for first, second in zip(firsts, seconds):
        assert second == naive_generate(model, p + [Bytes(first)] + user_turn('Go on.'), max_tokens=8, stop_ids=())


def test_extend_with_a_different_number_of_samples():
    model = model_for('mha-1d')
    engine = Engine(model)
    engine.generate(PROMPTS['chat'], max_tokens=3, temperature=0)
    outs = engine.generate(user_turn('more'), max_tokens=4, temperature=0, num_samples=2, extend=True)  # 1 row -> 2 rows
    assert outs[0] == outs[1]
    with pytest.raises(ValueError, match='num_samples'):
        engine.generate(user_turn('again'), max_tokens=2, num_samples=3, extend=True)


# ----------------------------------------------------------------------------------------------------------------
# stopping, streaming, limits, arguments

def scripted(ids):
    "A sampler that writes `ids` first, then decodes greedily."
    return lambda logits, step: torch.full((len(logits),), ids[step]) if step < len(ids) else logits.argmax(-1)


def test_default_stop_is_assistant_end_and_text_drops_it():
    engine = Engine(model_for('mha-1d'))
    ids = list('héllo'.encode()) + [0xff, A1]
    outs = engine.generate(PROMPTS['chat'], max_tokens=50, sampler=scripted(ids))
    assert outs == [ids] and engine.finish_reasons == ['stop']
    assert engine.generate_text(PROMPTS['chat'], max_tokens=50, sampler=scripted(ids)) == ['héllo\ufffd']
    assert engine.generate_text(PROMPTS['chat'], max_tokens=3, sampler=scripted(ids)) == ['hé']
    assert engine.finish_reasons == ['length']
    # stop_ids=() disables stopping: the stop token is just a token
    assert engine.generate(PROMPTS['chat'], max_tokens=len(ids) + 2, sampler=scripted(ids), stop_ids=())[0][:len(ids)] == ids


def test_stream_yields_each_step_and_none_after_a_stop():
    engine = Engine(model_for('mha-1d'))
    steps = list(engine.stream(PROMPTS['chat'], max_tokens=6, num_samples=2,
                               sampler=lambda logits, step: torch.tensor([A1 if step == 1 else 65, 66])))
    assert steps == [[65, 66], [A1, 66], [None, 66], [None, 66], [None, 66], [None, 66]]
    assert engine.finish_reasons == ['stop', 'length']


def test_interrupted_stream_keeps_what_was_yielded():
    model = model_for('mha-1d')
    engine = Engine(model)
    got = []
    for ids in engine.stream(PROMPTS['chat'], max_tokens=50, temperature=0, stop_ids=()):
        got.append(ids[0])
        if len(got) == 3: break
    assert engine.finish_reasons == ['interrupted']
    nxt = engine.generate(user_turn('next'), max_tokens=5, temperature=0, extend=True, stop_ids=())[0]
    assert nxt == naive_generate(model, PROMPTS['chat'] + [Bytes(got)] + user_turn('next'), max_tokens=5, stop_ids=())


def test_full_context_stops_cleanly_like_the_oracle_and_refuses_more():
    model = random_model(2, seq_len=48)
    engine, p = Engine(model), [Bytes([BOS]), Pixels('one line of text'), Bytes([A0])]
    n = engine.count_positions(p)
    out = engine.generate(p, max_tokens=100, temperature=0, stop_ids=())[0]
    assert len(out) == 48 - n + 1 and engine.finish_reasons == ['context']
    assert engine.cache.length == 48
    assert out == naive_generate(model, p, max_tokens=100, stop_ids=())
    with pytest.raises(ValueError, match='cache is full'):
        engine.generate(None, max_tokens=2, extend=True)


def test_prompt_longer_than_the_context_is_refused():
    model = random_model(2, seq_len=48)
    engine = Engine(model)
    with pytest.raises(ValueError, match='longer than the context') as caught:
        engine.generate([Pixels('x' * 64 * 8)], max_tokens=2)
    assert 'does not fit seq_len=48' in str(caught.value) and not isinstance(caught.value, SequenceTooLong)
    engine.generate([Bytes([BOS]), Pixels('a line')], max_tokens=2)
    with pytest.raises(ValueError, match='refuses rather than cutting'):
        engine.generate([Pixels('\n'.join(['line'] * 6))], max_tokens=2, extend=True)
    assert engine.cache.length == model.cfg.render.patches_per_row + 1 + 1   # the refused turn left the cache as it was (the pending byte aside)


@pytest.mark.parametrize('kw, name', [
    (dict(max_tokens=0), 'max_tokens'), (dict(max_tokens=-3), 'max_tokens'), (dict(max_tokens=2.0), 'max_tokens'),
    (dict(max_tokens=True), 'max_tokens'), (dict(temperature=-0.5), 'temperature'), (dict(temperature=math.nan), 'temperature'),
    (dict(temperature=math.inf), 'temperature'), (dict(temperature='1'), 'temperature'), (dict(top_k=0), 'top_k'),
    (dict(top_k=2.5), 'top_k'), (dict(num_samples=0), 'num_samples')])
def test_bad_arguments_are_refused_by_name(kw, name):
    engine = Engine(model_for('mha-1d'))
    with pytest.raises(ValueError, match=name):
        engine.generate(PROMPTS['chat'], **kw)
    if 'num_samples' not in kw:
        with pytest.raises(ValueError, match=name):
            naive_generate(engine.model, PROMPTS['chat'], **kw)


def test_empty_prompts_are_refused():
    engine = Engine(model_for('mha-1d'))
    for empty in ([], None, [Bytes([])]):
        with pytest.raises(ValueError, match='empty'):
            engine.generate(empty, max_tokens=2)
    with pytest.raises(ValueError, match='empty'):
        engine.generate(None, max_tokens=2, extend=True)
    with pytest.raises(TypeError, match='list of Pixels and Bytes'):
        engine.generate('a string is not a segment list', max_tokens=2)


def test_top_k_draws_stay_in_the_top_k():
    logits = torch.randn(3, 268, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_next(logits, 1.5, 5, g) for _ in range(300)], 1)
    top = logits.topk(5, -1).indices
    for r in range(3): assert set(draws[r].tolist()) <= set(top[r].tolist())
    assert (sample_next(logits, 0.0) == logits.argmax(-1)).all()


# ----------------------------------------------------------------------------------------------------------------
# the cache itself

def test_kvcache_masks_writes_and_expand():
    cfg = ModelConfig(depth=2, d_model=96, n_head=4, n_kv_head=2, seq_len=32)
    cache = KVCache(cfg, 1)
    seg = torch.tensor([[0, 1, 1, 1, 2]]); pix = torch.tensor([[False, True, True, True, False]])
    doc, pos, grid = torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None], torch.zeros(1, 5, 2, dtype=torch.long)
    mask = cache.append(seg[:, :4], pix[:, :4], doc[:, :4], pos[:, :4], grid[:, :4])
    assert torch.equal(mask, dense_mask(seg[:, :4], pix[:, :4], doc[:, :4]))
    k = torch.randn(1, 2, 4, 24)
    for layer in range(2):
        k_all, v_all = cache.write(layer, k, -k)
        assert k_all.shape == (1, 2, 4, 24) and torch.equal(v_all, -k)
    cache.commit()
    mask = cache.append(seg[:, 4:], pix[:, 4:], doc[:, 4:], pos[:, 4:], grid[:, 4:])
    assert torch.equal(mask, dense_mask(seg, pix, doc, q_start=4)) and mask.shape == (1, 1, 1, 5)
    with pytest.raises(ValueError, match='announced'):
        cache.write(0, k, k)
    k1 = torch.randn(1, 2, 1, 24)
    for layer in range(2): k_all, _ = cache.write(layer, k1, k1)
    cache.commit()
    assert torch.equal(k_all[:, :, :4], k) and torch.equal(k_all[:, :, 4:], k1)
    wide = cache.expand(3)
    assert wide.batch_size == 3 and wide.length == 5 and torch.equal(wide.k[:, 2, :, :5], cache.k[:, 0, :, :5])
    assert cache.k.shape == (2, 1, 2, 32, 24)   # preallocated at max_len, only n_kv_head heads
    with pytest.raises(ValueError, match='batch-1'):
        wide.expand(2)
    with pytest.raises(ValueError, match='do not fit'):
        cache.append(*(t.expand(1, 28) for t in (seg[:, :1], pix[:, :1], doc[:, :1], pos[:, :1])), grid[:, :1].expand(1, 28, 2))


# ----------------------------------------------------------------------------------------------------------------
# the calculator

@pytest.mark.parametrize('expr, value', [
    ('1 + 2 * 3', '7'), ('(1 + 2) * 3', '9'), ('10 / 4', '2.5'), ('1/3', '0.333333333333'), ('-2 * -(3 - 5)', '-4'),
    ('--3', '3'), ('+4', '4'), ('0.1 + 0.2', '0.3'), ('.5 * 4', '2'), ('2. + 1', '3'), ('8 / 2 / 2', '2'), ('8 - 2 - 2', '4'),
    ('  7\t*\n6 ', '42'), ('123456789 * 987654321', '121932631112635269'), ('0 - 0.000001', '-1e-06'), ('(((5)))', '5')])
def test_calculator_values(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize('expr, message', [
    ('1 / 0', 'division by zero'), ('1 / (2 - 2.0)', 'division by zero'), ('2 ** 3', "unexpected '*'"),
    ("__import__('os').system('echo hi')", 'unexpected character'), ('1e5', 'unexpected character'),
    ('abs(-1)', 'unexpected character'), ('', 'empty expression'), ('   ', 'empty expression'), ('1 +', 'unexpected end'),
    ('(1 + 2', "missing ')'"), ('1 + 2)', "unexpected ')'"), ('1 2', 'unexpected number 2'), ('1.2.3', 'bad number'),
    ('.', 'bad number'), ('9' * (CALC_MAX_DIGITS + 1), 'number too long'), ('1' * (CALC_MAX_CHARS + 1), 'expression too long'),
    ('(' * (CALC_MAX_DEPTH + 2) + '1' + ')' * (CALC_MAX_DEPTH + 2), 'nesting too deep'), ('-' * 100 + '1', 'nesting too deep'),
    ('10' + '*10' * 18, 'result too large'), ('1' + '0' * 19, 'result too large'), ('1 / 0.' + '0' * 20 + '1', 'result too large'),
    ('١٢', 'unexpected character'), ('1 + \x00', 'unexpected character')])
def test_calculator_errors_are_messages(expr, message):
    out = calculate(expr)
    assert out.startswith('error: ') and message in out, out


def test_calculator_never_raises_on_random_input():
    r = random.Random(0)
    alphabet = '0123456789+-*/(). eE_x\n'
    for _ in range(3000):
        text = ''.join(r.choice(alphabet) for _ in range(r.randrange(0, 60)))
        assert isinstance(calculate(text), str)
    for n in (CALC_MAX_DEPTH + 2, 100, 1000, 100_000):   # deep or long inputs are refused by the limits, never by a RecursionError
        assert calculate('(' * n + '1' + ')' * n).startswith('error: ')
        assert calculate('-' * n + '1').startswith('error: ')
    with pytest.raises(CalcError):
        evaluate('1/0')


def random_expression(r: random.Random, depth: int = 0):
    "(text, exact value) of a random expression tree, valued independently of the parser."
    if depth > 3 or r.random() < 0.3:
        v = Fraction(r.randrange(0, 1000), r.choice([1, 1, 10, 100]))
        text = str(v.numerator) if v.denominator == 1 else f'{float(v):.2f}'.rstrip('0').rstrip('.')
        return text, Fraction(text)
    if r.random() < 0.15:
        t, v = random_expression(r, depth + 1)
        return f'-({t})', -v
    (a, va), (b, vb) = random_expression(r, depth + 1), random_expression(r, depth + 1)
    op = r.choice('+-*/')
    if op == '/' and vb == 0: op = '+'
    value = {'+': va + vb, '-': va - vb, '*': va * vb, '/': va / vb if vb else 0}[op]
    return f'({a}) {op} ({b})', value


def test_calculator_agrees_with_an_independent_evaluation():
    r = random.Random(1)
    for _ in range(500):
        text, value = random_expression(r)
        if len(text) > CALC_MAX_CHARS: continue
        assert evaluate(text) == value, text
    assert calc_tokens('2*(3.5)') == [Fraction(2), '*', '(', Fraction(7, 2), ')']
    assert CALC_MAX_MAGNITUDE == 10 ** 18


# ----------------------------------------------------------------------------------------------------------------
# the calculator in the stream

def test_tool_call_output_is_forced_and_the_model_continues_after_it():
    model = model_for('gqa-1d')
    engine, p = Engine(model), PROMPTS['chat']
    call = [TOOL_CALL_START, *b'12 * (3 + 4) - 1', TOOL_CALL_END]
    forced = [TOOL_OUTPUT_START, *b'83', TOOL_OUTPUT_END]
    out = engine.generate(p, max_tokens=len(call) + len(forced) + 8, calculator=True, sampler=scripted(call), stop_ids=())[0]
    head = len(call) + len(forced)
    assert out[:head] == call + forced
    # the model continues from a cache that holds the forced bytes: exactly the oracle on the whole prefix
    assert out[head:] == naive_generate(model, p + [Bytes(out[:head])], max_tokens=8, stop_ids=())
    assert len(out) == head + 8


def test_tool_errors_are_outputs_and_tools_are_off_by_default():
    engine = Engine(model_for('mha-1d'))
    call = [TOOL_CALL_START, *b'1 / (2 - 2)', TOOL_CALL_END]
    text = engine.generate_text(PROMPTS['chat'], max_tokens=len(call) + 40, calculator=True, sampler=scripted(call), stop_ids=())[0]
    assert '<|tool_call_end|><|tool_output_start|>error: division by zero<|tool_output_end|>' in text
    plain = engine.generate(PROMPTS['chat'], max_tokens=len(call) + 3, sampler=scripted(call), stop_ids=())[0]
    assert TOOL_OUTPUT_START not in plain[len(call):len(call) + 1]
    junk = [TOOL_CALL_START, 0xff, A0, *b'2+2', TOOL_CALL_END]     # invalid UTF-8 and a special token inside the call
    text = engine.generate_text(PROMPTS['chat'], max_tokens=len(junk) + 30, calculator=True, sampler=scripted(junk), stop_ids=())[0]
    assert '<|tool_output_start|>error: unexpected character' in text


def test_tool_calls_are_per_sample_and_a_custom_tool_can_stand_in():
    model = model_for('mha-1d')
    engine, p = Engine(model), PROMPTS['chat']
    call = [TOOL_CALL_START, *b'6*7', TOOL_CALL_END]
    def sampler(logits, step):   # row 0 calls the tool, row 1 decodes greedily
        ids = logits.argmax(-1).clone()
        if step < len(call): ids[0] = call[step]
        return ids
    outs = engine.generate(p, max_tokens=12, num_samples=2, calculator=lambda e: f'<{e}>', sampler=sampler, stop_ids=())
    assert outs[0][:len(call) + 5] == call + [TOOL_OUTPUT_START, *b'<6*7>', TOOL_OUTPUT_END][:5]
    assert outs[1] == naive_generate(model, p, max_tokens=12, stop_ids=())


def test_a_new_stream_supersedes_an_unfinished_one():
    model = model_for('mha-1d')
    engine = Engine(model)
    old = engine.stream(PROMPTS['chat'], max_tokens=20, temperature=0, stop_ids=())
    next(old)
    new = engine.generate(PROMPTS['document'], max_tokens=6, temperature=0, stop_ids=())[0]
    with pytest.raises(RuntimeError, match='superseded'):
        next(old)
    assert new == naive_generate(model, PROMPTS['document'], max_tokens=6, stop_ids=())


# ----------------------------------------------------------------------------------------------------------------
# many conversations in one batch

from imagelm.engine import BatchDecoder, ReplyRules   # noqa: E402
from imagelm.render import Picture                     # noqa: E402

RED = torch.zeros(16, 24, 3, dtype=torch.uint8).numpy(); RED[..., 0] = 200
BATCH_PROMPTS = {**PROMPTS, 'picture': [Bytes([BOS])] + user_turn(['A red picture:', Picture(RED, 2), 'what is it?'])}


def alone(model, segments, **kw) -> tuple:
    "The ids and finish reason of one reply written alone through `Engine.stream`."
    engine = Engine(model)
    return engine.generate(segments, **kw)[0], engine.finish_reasons[0]


def run_to_the_end(decoder, joins=(), removals=()) -> list:
    "Step `decoder` until it is empty; `joins` {step: [(name, segments, kw)]} and `removals` {step: name} happen before a step."
    joins, removals, rows, sizes = dict(joins), dict(removals), {}, []
    while decoder.rows or decoder.joining or joins:
        for name, segments, kw in joins.pop(len(sizes), []): rows[name] = decoder.add(segments, **kw)
        if len(sizes) in removals: decoder.remove(rows[removals[len(sizes)]])
        sizes.append(len(decoder.step()))
    return rows, sizes


@pytest.mark.parametrize('variant', ['mha-1d', 'gqa-2d'])
def test_a_stacked_cache_steps_exactly_like_its_source_rows(variant):
    model = model_for(variant)
    engine = Engine(model)
    firsts = engine.generate(PROMPTS['chat'], max_tokens=10, temperature=1.0, seed=3, num_samples=3, stop_ids=range(64))
    assert len({len(f) for f in firsts}) > 1, 'the test needs rows with unseen positions between their own'
    engine.feed([])                                             # the last ids into the cache
    other = Engine(model); other.feed(PROMPTS['pages and bytes'])
    order = [(engine.cache, 2), (other.cache, 0), (engine.cache, 0), (engine.cache, 1)]
    stacked = KVCache.stack(order)
    seen = [int((c.doc_id[r, :c.length] >= 0).sum()) for c, r in order]
    assert stacked.length == max(seen) and stacked.max_len == model.cfg.seq_len
    assert min(seen[0], seen[2], seen[3]) < engine.cache.length      # unseen positions were dropped
    assert stacked.next_pos.tolist() == [int(c.next_pos[r]) for c, r in order]
    assert stacked.n_segments == max(engine.cache.n_segments, other.cache.n_segments)
    for i, (c, r) in enumerate(order):   # the seen columns, in order, at the front; then nothing anybody sees
        cols = (c.doc_id[r, :c.length] >= 0).nonzero()[:, 0]
        assert torch.equal(stacked.k[:, i, :, :seen[i]], c.k[:, r].index_select(2, cols))
        for name in ('seg_id', 'is_pixel', 'pos', 'grid'): assert torch.equal(getattr(stacked, name)[i, :seen[i]], getattr(c, name)[r, cols])
        assert (stacked.doc_id[i, seen[i]:] == -1).all()
    batch = Engine(model); batch.cache = stacked
    ids = torch.tensor([65, 66, 67, 68])
    segs = torch.tensor([c.n_segments for c, _ in order])
    logits = batch._decode(ids, torch.ones(4, dtype=torch.bool), segs)
    histories = [PROMPTS['chat'] + [Bytes(firsts[2])], PROMPTS['pages and bytes'], PROMPTS['chat'] + [Bytes(firsts[0])],
                 PROMPTS['chat'] + [Bytes(firsts[1])]]
    for i, history in enumerate(histories):   # each row's next step is the oracle's for its own history
        torch.testing.assert_close(logits[i:i + 1], naive_logits(model, history + [Bytes([int(ids[i])])]), rtol=1e-4, atol=1e-4)


def test_stack_refuses_nothing_and_rows_over_max_len():
    engine = Engine(model_for('mha-1d')); engine.feed(PROMPTS['chat'])
    with pytest.raises(ValueError, match='nothing to stack'): KVCache.stack([])
    with pytest.raises(ValueError, match='over max_len'): KVCache.stack([(engine.cache, 0)], max_len=engine.cache.length - 1)


@pytest.mark.parametrize('variant', ['mha-1d', 'gqa-2d'])
def test_batched_greedy_replies_equal_each_reply_alone(variant):
    model = model_for(variant)
    names = ['chat', 'page only', 'picture', 'document', 'styled page', 'unicode page', 'pages and bytes']
    kw = {name: dict(max_tokens=8 + 3 * i, temperature=0, stop_ids=range(40 + 8 * i, 48 + 8 * i)) for i, name in enumerate(names)}
    joins = {0: names[:3], 2: names[3:5], 5: names[5:6], 9: names[6:]}
    decoder = BatchDecoder(model)
    rows, sizes = run_to_the_end(decoder, {s: [(n, BATCH_PROMPTS[n], kw[n]) for n in ns] for s, ns in joins.items()}, {4: 'page only'})
    assert max(sizes) >= 4 and decoder.forwards < sum(sizes)   # several rows in a forward pass
    assert decoder.batch.cache is None and len(decoder) == 0     # everyone has left
    for name in names:
        ids, reason = alone(model, BATCH_PROMPTS[name], **kw[name])
        if name == 'page only': assert (rows[name].ids, rows[name].finish_reason) == (ids[:4], 'interrupted')
        else: assert (rows[name].ids, rows[name].finish_reason) == (ids, reason), name
    assert {rows[n].finish_reason for n in names} >= {'stop', 'length', 'interrupted'}


def test_a_row_that_fills_the_context_ends_there_and_the_others_go_on():
    model = random_model(2, seq_len=48)
    long, short = [Bytes([BOS]), Pixels('one line of text'), Bytes([A0])], [Bytes([BOS, 65, 66, 67])]
    kw = dict(max_tokens=60, temperature=0, stop_ids=())
    decoder = BatchDecoder(model)
    first = decoder.add(long, **kw)
    for _ in range(5): decoder.step()
    second = decoder.add(short, **kw)
    while not first.done: decoder.step()
    third = decoder.add(long, **kw)   # joins in the step where the full row leaves
    while decoder.rows or decoder.joining: decoder.step()
    for row, prompt in ((first, long), (second, short), (third, long)):
        ids, reason = alone(model, prompt, **kw)
        assert (row.ids, row.finish_reason) == (ids, reason) and reason == 'context'
        assert len(ids) == 48 - row.positions + 1


def test_batched_sampling_and_the_calculator_are_per_row():
    model = model_for('gqa-1d')
    p = PROMPTS['chat']
    call = [TOOL_CALL_START, *b'12 * (3 + 4) - 1', TOOL_CALL_END]
    settings = {'tool': dict(max_tokens=30, calculator=True, sampler=scripted(call), stop_ids=()),
                'no tool': dict(max_tokens=30, sampler=scripted(call), stop_ids=()),
                'hot': dict(max_tokens=30, temperature=1.5, seed=7, stop_ids=()),
                'top-k': dict(max_tokens=20, temperature=0.8, top_k=5, seed=11, stop_ids=()),
                'tool and seed': dict(max_tokens=30, temperature=1.0, seed=5, calculator=True, sampler=lambda logits, step: (
                    torch.tensor([call[step]]) if step < len(call) else sample_next(logits, 1.0, None, gen)), stop_ids=()),
                'greedy': dict(max_tokens=25, temperature=0, stop_ids=())}
    gen = torch.Generator().manual_seed(5)
    decoder = BatchDecoder(model)
    rows, _ = run_to_the_end(decoder, {0: [(n, p, kw) for n, kw in list(settings.items())[:3]],
                                       3: [(n, p, kw) for n, kw in list(settings.items())[3:]]})
    for name, kw in settings.items():
        gen.manual_seed(5)
        assert rows[name].ids == alone(model, p, **kw)[0], name
    forced = [TOOL_OUTPUT_START, *b'83', TOOL_OUTPUT_END]
    assert rows['tool'].ids[len(call):len(call) + 4] == forced and rows['no tool'].ids[len(call)] != TOOL_OUTPUT_START
    assert rows['hot'].ids != rows['greedy'].ids[:len(rows['hot'].ids)]


def test_batch_decoder_refuses_bad_prompts_and_settings_and_stays_usable():
    decoder = BatchDecoder(random_model(2, seq_len=48))
    with pytest.raises(ValueError, match='empty'): decoder.add([])
    with pytest.raises(ValueError, match='longer than the context'): decoder.add([Pixels('x' * 64 * 8)])
    with pytest.raises(ValueError, match='temperature'): decoder.add(PROMPTS['chat'][:1], temperature=-1)
    assert len(decoder) == 0 and decoder.step() == []
    row = decoder.add([Bytes([BOS])], max_tokens=3, temperature=0, stop_ids=())
    out = [decoder.step() for _ in range(4)]
    assert [len(o) for o in out] == [1, 1, 1, 0] and out[2][0][2] == 'length' and len(row.ids) == 3


def test_reply_rules_stop_force_and_end():
    rules = ReplyRules(max_tokens=12, calculator=True)
    written = [rules.next(t) for t in [TOOL_CALL_START, *b'2+2', TOOL_CALL_END, 0, 0, 0, 0]]
    assert written == [TOOL_CALL_START, *b'2+2', TOOL_CALL_END, TOOL_OUTPUT_START, ord('4'), TOOL_OUTPUT_END, 0]
    assert rules.next(A1) == A1 and rules.reason == 'stop'
    rules.end('context')
    assert rules.reason == 'stop'
    short = ReplyRules(max_tokens=2, stop_ids=())
    short.next(A1); short.next(A1)
    assert short.reason == 'length'
    with pytest.raises(ValueError, match='has ended'): short.next(65)
