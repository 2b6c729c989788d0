"""The chat and attention widgets, driven headless as a user drives them (set the message box, click Send, click
Stop, upload a picture, move a slider, click a character), on a small random model made here."""
import datetime, io, json, threading, time

import numpy as np
import pytest
import torch
from PIL import Image

from imagelm.chat_widget import MAX_CHAR_BUTTONS, AttentionWidget, ChatWidget, byte_labels, one_line, patch_position, show_chat, text_ids
from imagelm.conversation import conversation_segments, generate_reply
from imagelm.engine import Engine
from imagelm.model import ImageLM, ModelConfig, randomize_output_projections
from imagelm.segments import SPECIAL_IDS, Bytes, Pixels, dense_mask
from imagelm.train import checkpoint_dir

CFG = ModelConfig(depth=2, n_head=2, seq_len=512)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return randomize_output_projections(ImageLM(CFG)).eval()


@pytest.fixture
def slow(model):
    "The model, each layer 20 ms slower: a reply takes long enough to be stopped or interrupted by hand."
    handles = [block.register_forward_pre_hook(lambda *_: time.sleep(0.01)) for block in model.blocks]
    yield model
    for handle in handles: handle.remove()


def png(size=(40, 40), color=(220, 30, 30)) -> bytes:
    out = io.BytesIO(); Image.new('RGB', size, color).save(out, format='PNG')
    return out.getvalue()


def upload_of(name: str, data: bytes) -> tuple:
    "The value of a FileUpload after a user picked the file `name`, as ipywidgets 8 sets it."
    return ({'name': name, 'type': 'image/png', 'size': len(data), 'content': memoryview(data),
             'last_modified': datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)},)


def sent(chat: ChatWidget, text: str, timeout: float = 60) -> dict:
    "Type `text`, click Send, wait for the reply: the reply's transcript entry."
    chat.message.value = text
    chat.send_button.click()
    assert chat.wait(timeout), 'the reply did not finish'
    return chat.transcript[-1]


def test_send_streams_the_greedy_reply_in_pieces_from_a_thread(model):
    chat = ChatWidget(model, temperature=0.0, max_tokens=24)
    seen = []
    chat.reply_hooks.append(lambda reply: seen.append((threading.current_thread().name, chat.send_button.disabled)))
    reply = sent(chat, 'Hello there')
    user = chat.transcript[0]
    assert reply['text'] == generate_reply(Engine(model), [{'role': 'user', 'content': 'Hello there'}], max_tokens=24)
    assert len(reply['pieces']) > 1 and ''.join(reply['pieces']) == reply['text'] and reply['ending'] == 'length'
    assert set(seen) == {('imagelm-chat-reply', True)}                      # written in the thread, Send disabled meanwhile
    assert not chat.send_button.disabled and chat.stop_button.disabled and chat.message.value == ''
    assert [m['role'] for m in chat.messages] == ['user', 'assistant']
    assert user['page'].width == CFG.render.page_w and user['picture'] is False
    shown = chat.turns.children[0].value
    assert '<details' in shown and shown.count('data:image/png;base64,') == 2 and 'Hello there' in shown
    assert chat.status.endswith('bytes written: max bytes reached')


def test_the_kernel_thread_is_free_while_a_reply_is_written(slow):
    chat = ChatWidget(slow, temperature=0.0, max_tokens=200)
    start = time.perf_counter()
    assert chat.send('Tell me a long story') is True
    assert time.perf_counter() - start < 2 and chat.running
    assert chat.send('And another') is False and chat.status == 'error: a reply is being written: wait for it or press Stop'
    chat.stop_button.click()
    assert chat.wait(10) and chat.transcript[-1]['ending'] == 'interrupted'
    assert len(chat.transcript) == 2


def test_stop_ends_the_reply_within_the_step_under_way(model):
    "Stopped from the writing thread after its third piece: no decode step runs after it."
    chat = ChatWidget(model, temperature=0.0, max_tokens=200)
    steps = []
    handle = model.blocks[0].register_forward_hook(lambda *_: steps.append(1))
    at_stop = []
    def stop_at_three(reply):
        if len(reply['pieces']) == 3: at_stop.append(len(steps)); chat.stop()
    chat.reply_hooks.append(stop_at_three)
    try: reply = sent(chat, 'Go on and on')
    finally: handle.remove()
    assert len(reply['pieces']) == 3 and reply['ending'] == 'interrupted' and at_stop == [len(steps)]
    assert chat.status.endswith('stopped') and reply['text'] == ''.join(reply['pieces'])
    assert '[stopped]' in chat.turns.children[-1].value


def test_stop_clicked_while_writing_ends_the_reply_quickly(slow):
    chat = ChatWidget(slow, temperature=0.0, max_tokens=100_000)
    chat.message.value = 'Write until the context is full'
    chat.send_button.click()
    time.sleep(0.3)
    chat.stop_button.click()
    start = time.perf_counter()
    assert chat.wait(10)
    assert time.perf_counter() - start < 1.0                                 # one step is 20 ms
    reply = chat.transcript[-1]
    assert reply['ending'] == 'interrupted' and 0 < len(reply['text'].encode()) < 100
    assert [m['role'] for m in chat.messages] == ['user', 'assistant'] and chat.messages[-1]['content'] == reply['text']


def test_a_picture_upload_goes_with_the_message_and_shows_on_its_page(model):
    chat = ChatWidget(model, temperature=0.0, max_tokens=4)
    chat.upload.value = upload_of('red.png', png())
    sent(chat, 'What colour is it?')
    user = chat.transcript[0]
    pixels = np.asarray(user['page'].convert('RGB')).reshape(-1, 3)
    assert user['picture'] and ((pixels[:, 0] > 180) & (pixels[:, 1] < 80)).any()
    assert chat.upload.value == ()
    content = chat.messages[0]['content']
    assert content[0] == 'What colour is it?' and content[1]['type'] == 'image' and content[1]['image'].size == (40, 40)
    plain = sent(chat, 'And now?') and chat.transcript[-2]
    assert plain['picture'] is False and plain['page'].mode == 'L'


def test_a_picture_passed_to_send(model):
    chat = ChatWidget(model, temperature=0.0, max_tokens=4)
    assert chat.send('Look', image=Image.new('RGB', (10, 30), (0, 0, 255))) and chat.wait(30)
    assert chat.transcript[0]['picture'] and chat.transcript[0]['page'].mode == 'RGB'


@pytest.mark.parametrize('case, expected', [
    ('empty', 'error: the message is empty'),
    ('no model', 'error: no model loaded: pass one to ChatWidget or load a checkpoint'),
    ('too long', 'error: the message is too long: even the last user turn alone takes'),
    ('broken picture', 'error: the picture broken.png cannot be read: cannot identify image file'),
])
def test_errors_are_one_line_in_the_status_area(model, case, expected):
    chat = ChatWidget(None if case == 'no model' else model, max_tokens=8)
    text = {'empty': ' \n ', 'too long': 'x' * 8000}.get(case, 'Hello')
    if case == 'broken picture': chat.upload.value = upload_of('broken.png', b'not a picture')
    chat.message.value = text
    chat.send_button.click()
    assert chat.status.startswith(expected), chat.status
    assert '\n' not in chat.status and ' at 0x' not in chat.status and len(chat.status) <= 220
    assert not chat.running and chat.transcript == [] and chat.messages == [] and chat.message.value == text
    assert 'color:#c0392b' in chat.status_line.value


def test_an_error_in_the_writing_thread_is_one_line(model):
    chat = ChatWidget(model, max_tokens=8)
    def broken(*args, **kwargs):
        chat.engine.finish_reasons = [None]
        yield [65]
        raise RuntimeError('the engine broke\nat some deep place')
    chat.engine.stream = broken
    reply = sent(chat, 'Hello')
    assert chat.status == 'error: RuntimeError: the engine broke'
    assert reply['ending'] == 'error' and reply['text'] == 'A' and not chat.send_button.disabled
    assert '[an error]' in chat.turns.children[-1].value


def test_the_history_is_cut_when_the_context_fills_but_the_transcript_is_not(model):
    chat = ChatWidget(model, temperature=0.0, max_tokens=100)
    for i in range(6): sent(chat, f'Message number {i}: ' + 'words ' * 20)
    assert len(chat.transcript) == 12
    assert chat.messages[0]['role'] == 'user' and len(chat.messages) < 12
    assert chat.messages[0]['content'] != chat.transcript[0]['text']
    from imagelm.conversation import conversation_positions
    assert conversation_positions(chat.messages[:-1], CFG) <= CFG.seq_len - 100


def test_new_chat_stops_the_reply_and_empties_the_chat(slow):
    chat = ChatWidget(slow, max_tokens=500)
    chat.send('Hello')
    chat.new_button.click()
    assert not chat.running and chat.messages == [] and chat.transcript == [] and chat.turns.children == ()
    assert chat.status == 'a new conversation'


def save_checkpoint(model, stage='sft', run='small', step=3):
    "A checkpoint folder as training writes one: model.pt and meta.json."
    folder = checkpoint_dir(run, stage) / f'step_{step:06d}'
    folder.mkdir(parents=True)
    torch.save(model.state_dict(), folder / 'model.pt')
    (folder / 'meta.json').write_text(json.dumps({'stage': stage, 'model_config': model.cfg.to_dict(), 'step': step,
                                                  'args': {'run': run}}))


def test_loading_a_checkpoint_by_name_and_with_the_load_controls(model, tmp_path, monkeypatch):
    monkeypatch.setenv('IMAGELM_BASE_DIR', str(tmp_path))
    save_checkpoint(model)
    chat = ChatWidget.from_checkpoint('sft', device='cpu', max_tokens=4)
    assert (chat.stage_box.value, chat.run_box.value, chat.step_box.value) == ('sft', 'small', '3')
    assert chat.status.startswith('loaded a depth-2 model with a context of 512 from ')
    empty = ChatWidget()
    assert empty.status == 'no model loaded: pick a checkpoint and press Load'
    empty.stage_box.value, empty.run_box.value, empty.step_box.value = 'rl', '', ''
    empty.load_button.click()
    assert empty.status.startswith('error: no rl checkpoint in ') and empty.model is None
    empty.stage_box.value, empty.step_box.value = 'sft', 'three'
    empty.load_button.click()
    assert empty.status == "error: the step must be a whole number, got 'three'"
    empty.run_box.value, empty.step_box.value = 'small', '7'
    empty.load_button.click()
    assert 'the steps saved are [3]' in empty.status
    empty.step_box.value = '3'
    empty.load_button.click()
    assert empty.model is not None and sent(empty, 'Hi')['text']


def test_the_static_transcript_draws_each_page_and_reply(model):
    chat = ChatWidget(model, temperature=0.0, max_tokens=8)
    chat.upload.value = upload_of('red.png', png())
    sent(chat, 'One'); sent(chat, 'Two')
    fig = chat.figure()
    axes, texts = fig.get_axes(), [t.get_text() for t in fig.texts]
    assert len(axes) == 2 and [len(ax.images) for ax in axes] == [1, 1]
    assert axes[0].images[0].get_array().shape[:2] == chat.transcript[0]['page'].size[::-1]
    assert [texts[i] for i in (0, 1, 3, 4)] == ['you: the page the model read', 'imagelm'] * 2
    assert texts[2].endswith('[max bytes reached]') and all(c.isprintable() or c == '\n' for c in texts[2])
    page = chat.transcript[0]['page']
    drawn = show_chat([{'role': 'user', 'text': 'x', 'page': page}, {'role': 'assistant', 'text': 'a\tb\x07', 'ending': 'interrupted'}])
    assert [t.get_text() for t in drawn.texts] == ['you: the page the model read', 'imagelm', 'a   b�  [stopped]']
    assert [t.get_text() for t in show_chat([]).texts] == ['imagelm', '(no messages yet)']
    assert 'ChatWidget(a depth-2 model, 4 turns shown, 4 messages in context)' == repr(chat)
    assert 'application/vnd.jupyter.widget-view+json' in chat._repr_mimebundle_()


def test_one_line():
    assert one_line(ValueError('cannot identify image file <_io.BytesIO object at 0x7f3a2c1b5e40>\nmore')) == 'cannot identify image file'
    assert one_line(KeyError()) == 'KeyError' and len(one_line('x' * 500)) == 200


def test_byte_labels_and_text_ids():
    ids = list('né\n'.encode()) + [SPECIAL_IDS['<|assistant_end|>'], 0xE2, 0x82, 7]
    assert byte_labels(ids) == ['n', 'é', '·', '⏎', '<a', 'e2', '82', '07']
    assert text_ids('a<|tool_call_start|>1+1<|not_a_token|>') == [97, SPECIAL_IDS['<|tool_call_start|>'], 49, 43, 49,
                                                                  *b'<|not_a_token|>']


READING = [{'role': 'user', 'content': 'Read this back:\nthe quick brown fox'}]


@pytest.fixture(scope='module')
def eyes(model):
    return AttentionWidget.from_messages(model, READING, 'the quick brown fox')


def test_the_slider_and_the_characters_pick_the_byte_drawn(eyes):
    assert eyes.drawn['mode'] == 'byte' and eyes.drawn['byte'] == 0 and eyes.chars[0].button_style == 'info'
    eyes.byte.value = 6
    assert (eyes.drawn['byte'], eyes.drawn['label'], eyes.drawn['position']) == (6, 'i', eyes.positions[6])
    eyes.chars[10].click()
    assert eyes.drawn['byte'] == 10 and eyes.byte.value == 10 and eyes.chars[10].button_style == 'info'
    assert eyes.chars[6].button_style == ''
    assert [b.description for b in eyes.chars][:5] == ['t', 'h', 'e', '␣', 'q']
    assert abs(eyes.drawn['weight'] - 1) < 1e-4
    outputs = eyes.out.outputs
    assert len(outputs) == 1 and outputs[0]['data']['image/png'].startswith('iVBOR')


def test_layer_and_head_offer_the_mean_and_every_index(eyes, model):
    assert [label for label, _ in eyes.layer.options] == ['mean', '0', '1'] and eyes.drawn['layer'] is None
    assert [label for label, _ in eyes.head.options] == ['mean', '0', '1']
    eyes.pick_byte(3)
    eyes.layer.value, eyes.head.value = 1, 0
    assert (eyes.drawn['layer'], eyes.drawn['head'], eyes.drawn['byte']) == (1, 0, 3)
    assert abs(eyes.drawn['weight'] - 1) < 1e-4
    eyes.layer.value, eyes.head.value = 'mean', 'mean'


def test_the_patch_view_shows_weights_that_sum_to_one_over_what_the_patch_may_see(eyes):
    with eyes.hold(): eyes.mode.value, eyes.page.value = 'patch', 0
    eyes.row.value, eyes.col.value = 1, 2
    position = eyes.drawn['position']
    maps = eyes.maps
    assert position == patch_position(maps, 0, 1, 2) and maps.batch.is_pixel[0, position]
    allowed = dense_mask(maps.batch.seg_id, maps.batch.is_pixel, maps.batch.doc_id)[0, 0, position]
    assert abs(float(maps.averaged()[position][allowed].sum()) - 1) < 1e-4
    assert abs(eyes.drawn['weight'] - 1) < 1e-4
    assert bool(allowed[maps.page_of() == 0].all())                           # the whole page, later patches too
    eyes.col.value = 7                                                         # right of the text: blank, not in the sequence
    assert eyes.drawn['position'] is None and patch_position(maps, 0, 1, 7) is None
    eyes.mode.value = 'byte'


def test_the_reading_path_has_one_point_per_reply_byte(eyes):
    eyes.mode.value = 'path'
    assert eyes.drawn['points'] == len(eyes.reply) == len('the quick brown fox')
    assert all(page == 0 for page, _, _ in eyes.drawn['path'])
    assert len(eyes.figure.get_axes()) == 1
    eyes.mode.value = 'byte'


def test_any_prompt_segments_and_several_pages(model):
    prompt = [Pixels('first page'), Bytes([SPECIAL_IDS['<|user_end|>']]), Pixels('second\npage'),
              Bytes([SPECIAL_IDS['<|assistant_start|>']], train=False)]
    widget = AttentionWidget(model, prompt, b'ok')
    assert widget.n_pages == 2 and len(widget.positions) == 2 and widget.page.options == (0, 1)
    assert len(widget.figure.get_axes()) == 3                                  # two pages and the strip
    widget.mode.value = 'patch'
    widget.page.value = 1
    assert widget.row.max == 1 and widget.drawn['page'] == 1
    assert len(widget.figure.get_axes()) == 3 and abs(widget.drawn['weight'] - 1) < 1e-4
    bytes_only = AttentionWidget(model, [Bytes([SPECIAL_IDS['<|bos|>']])], [104, 105])
    assert bytes_only.n_pages == 0 and abs(bytes_only.drawn['weight'] - 1) < 1e-4
    bytes_only.mode.value = 'path'
    assert bytes_only.drawn['points'] == 0
    with pytest.raises(ValueError, match='the reply is empty'): AttentionWidget(model, prompt, '')


def test_a_long_reply_has_buttons_for_its_first_bytes_and_the_slider_for_all(model):
    long = AttentionWidget(model, [Pixels('read this'), Bytes([SPECIAL_IDS['<|assistant_start|>']], train=False)], 'ab' * 150)
    assert len(long.chars) == MAX_CHAR_BUTTONS and long.byte.max == 299
    long.byte.value = 290                                   # past the buttons: drawn, no button lit
    assert long.drawn['byte'] == 290 and all(b.button_style == '' for b in long.chars)
    long.chars[3].click()
    assert long.drawn['byte'] == 3 and long.chars[3].button_style == 'info'


def test_the_attention_of_a_chat_reply(model, slow):
    chat = ChatWidget(model, temperature=0.0, max_tokens=12)
    with pytest.raises(ValueError, match='no reply yet'): chat.attention()
    reply = sent(chat, 'Read this back:\nhi')
    widget = chat.attention()
    assert widget.reply == text_ids(reply['text']) and len(widget.positions) == len(widget.reply)
    assert widget.prompt == conversation_segments(chat.messages[:-1], reply=True)
    chat.max_tokens.value = 500
    chat.send('More')
    with pytest.raises(ValueError, match='a reply is being written'): chat.attention()
    chat.stop(); chat.wait(10)
