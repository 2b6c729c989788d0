"""The CUDA-only branches of imagelm, each run on the CPU where torch allows it and, marked `gpu`, on a CUDA device when
one is present: bf16 autocast, torch.compile (how often it recompiles, and inductor against eager), compiled
flex_attention, Muon's bfloat16 Newton-Schulz, optimizer steps, the distributed optimizers on one NCCL rank, the
datasheet peak FLOP/s, the process's device and RNG state, the loader rendering on the device, the KV-cache engine, the
web server's GPU workers, training runs, and bench/gpu_check.sh refusing to start without a GPU.

`python -m pytest tests -m gpu` runs only the CUDA variants (bench/gpu_check.sh does, on a GPU machine)."""
import json, math, os, subprocess, sys, warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from imagelm import chat_web
from imagelm import train as train_module
from imagelm.baselines import train_baseline
from imagelm.common import autocast_dtype, autocast_for
from imagelm.dataloader import DataConfig, PretrainLoader
from imagelm.engine import Engine, naive_logits
from imagelm.model import ImageLM, ModelConfig, randomize_output_projections
from imagelm.optim import native_collectives, setup_optimizers, zeropower_via_newtonschulz5
from imagelm.segments import Bytes, Pixels, special
from imagelm.train import (GPU_PEAK_FLOPS, init_process, measure_matmul_flops, mfu, peak_flops, rng_state,
                           set_rng_state)

ROOT = Path(__file__).resolve().parent.parent
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]
DEVICES = ['cpu', pytest.param('cuda', marks=GPU)]


def gpu_only(test):
    "Mark `test` as a CUDA test, skipped without a CUDA device."
    for mark in GPU: test = mark(test)
    return test
BATCH_FIELDS = ('byte_ids', 'is_pixel', 'seg_id', 'doc_id', 'pos', 'grid', 'targets', 'patch_index')


def tiny_model(device='cpu', seed: int = 0, **kw) -> ImageLM:
    "A small model whose output projections are not zero, so that every layer and the attention mask matter."
    torch.manual_seed(seed)
    model = ImageLM(ModelConfig(**({'depth': 2, 'd_model': 128, 'seq_len': 256} | kw)))
    return randomize_output_projections(model, head_std=0.05).to(device)


def loader_batches(cfg: ModelConfig, n: int, device='cpu', prefetch: bool = False) -> list:
    "The first `n` pretraining batches (2 rows) of the embedded corpus for `cfg`, built on `device`."
    data = DataConfig.from_model(cfg, batch_rows=2, pixel_chars=96, byte_chars=48)
    with PretrainLoader(data, device=device, prefetch=prefetch) as loader: return [next(loader) for _ in range(n)]


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float().cpu() - expected.float().cpu()).norm() / expected.float().norm())


# ---- bf16 autocast ---------------------------------------------------------------------------------------------------

def test_autocast_defaults_to_bfloat16_on_cuda_only():
    assert [autocast_dtype(d) for d in ('cuda', 'cuda:3', 'cpu', 'mps')] == ['bfloat16', 'bfloat16', 'float32', 'float32']
    assert autocast_dtype('cuda:0', 'float32') == 'float32' and autocast_for('cuda:0', 'float32') is autocast_for('cpu')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                          # a CUDA autocast made without CUDA warns it is off
        context = autocast_for('cuda:1')()
    assert (context.device, context.fast_dtype) == ('cuda', torch.bfloat16)


@pytest.mark.parametrize('device', DEVICES)
def test_bfloat16_autocast_loss_and_gradients_follow_float32(device):
    model = tiny_model(device)
    batch = loader_batches(model.cfg, 1, device)[0]
    seen = []
    model.blocks[0].attn.q.register_forward_hook(lambda module, inputs, out: seen.append(out.dtype))
    def loss_and_grads(dtype):
        model.zero_grad(set_to_none=True)
        with autocast_for(device, dtype)(): loss = model(batch)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
    loss32, grads32 = loss_and_grads('float32')
    loss16, grads16 = loss_and_grads('bfloat16')
    assert seen == [torch.float32, torch.bfloat16]               # the matmuls did run in bf16
    assert loss16.dtype == torch.float32                         # logits and the loss stay in float32
    torch.testing.assert_close(loss16, loss32, rtol=1e-3, atol=0)
    assert 0 < relative_error(grads16, grads32) < 0.05           # bf16 rounding, and no more
    assert F.cosine_similarity(grads16.float(), grads32, dim=0) > 0.999


# ---- torch.compile -----------------------------------------------------------------------------------------------------

def test_compiled_model_stops_recompiling_after_a_few_batches():
    "Batches differ in pixel positions, glyphs and scored bytes: dynamo must settle on dynamic shapes, not recompile each step."
    model = tiny_model()
    batches = loader_batches(model.cfg, 12)
    graphs = []
    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward                              # run the captured graph as it is: eager kernels
    torch._dynamo.reset()
    compiled, new_graphs = torch.compile(model, backend=counting_backend), []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for batch in batches:
            before = len(graphs)
            loss = compiled(batch)
            new_graphs.append(len(graphs) - before)
            torch.testing.assert_close(loss, model(batch), rtol=0, atol=0)
    assert new_graphs[0] > 0 and sum(new_graphs[6:]) == 0, new_graphs


@pytest.mark.parametrize('device', [pytest.param('cpu', marks=pytest.mark.slow), pytest.param('cuda', marks=GPU)])
def test_inductor_compiled_training_step_matches_eager(device):
    "The compiled forward and backward (inductor: C++ on the CPU, Triton on CUDA) against eager, in float32."
    model = tiny_model(device, depth=1, d_model=64, n_head=2, seq_len=128)
    batch = loader_batches(model.cfg, 1, device)[0]
    torch._dynamo.reset()
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for forward in (torch.compile(model), model):
            model.zero_grad(set_to_none=True)
            loss = forward(batch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_c, grads_c), (loss_e, grads_e) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert max(relative_error(c, e) for c, e in zip(grads_c, grads_e)) < 1e-3


@pytest.mark.parametrize('device', [pytest.param('cpu', marks=pytest.mark.slow), pytest.param('cuda', marks=GPU)])
def test_compiled_flex_attention_model_matches_sdpa(device):
    "The whole model compiled with flex_attention's block mask gives SDPA's per-target losses (the dense-mask path)."
    model = tiny_model(device).eval()
    batch = loader_batches(model.cfg, 1, device)[0]
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        flex = torch.compile(model)(batch, attention='flex', reduction='none')
        sdpa = model(batch, reduction='none')
    assert len(sdpa) > 100
    tol = 1e-4 if device == 'cpu' else 1e-3                      # attending by the wrong mask moves them by about 1e-2
    torch.testing.assert_close(flex, sdpa, rtol=tol, atol=tol)


# ---- optimizers ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
def test_newton_schulz_default_dtype_and_bfloat16_accuracy(device):
    G = torch.randn(128, 512, generator=torch.Generator().manual_seed(0)).to(device)
    default = torch.bfloat16 if device == 'cuda' else torch.float32
    out = zeropower_via_newtonschulz5(G)
    assert out.dtype == torch.float32 and torch.equal(out, zeropower_via_newtonschulz5(G, dtype=default))
    f32, bf16 = (zeropower_via_newtonschulz5(G, dtype=dtype).cpu() for dtype in (torch.float32, torch.bfloat16))
    torch.testing.assert_close(f32, zeropower_via_newtonschulz5(G.cpu()), rtol=1e-3, atol=1e-4)   # float32 agrees across devices
    assert 0.005 < relative_error(bf16, f32) < 0.05
    singular_values = torch.linalg.svdvals(bf16)
    assert 0.6 < singular_values.min() and singular_values.max() < 1.25


def set_grads(model: ImageLM, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters(): p.grad = torch.randn(p.shape, generator=generator).to(p.device)


@gpu_only
def test_optimizer_steps_on_cuda_follow_the_cpu():
    "AdamW matches the CPU to float32 rounding; Muon's bf16 Newton-Schulz moves each matrix nearly as the CPU's float32 does."
    device = 'cuda'
    models = {d: tiny_model(d) for d in ('cpu', device)}
    starts = [p.detach().clone() for p in models['cpu'].parameters()]
    for model in models.values():
        optimizers = setup_optimizers(model)
        for step in range(2):
            set_grads(model, step)
            for opt in optimizers: opt.step()
    muon = {id(p) for p in models['cpu'].blocks.parameters()}
    for p_cpu, p_dev, start in zip(models['cpu'].parameters(), models[device].parameters(), starts):
        moved_cpu, moved_dev = p_cpu.detach() - start, p_dev.detach().cpu() - start
        if id(p_cpu) in muon: assert F.cosine_similarity(moved_dev.flatten(), moved_cpu.flatten(), dim=0) > 0.99
        else: torch.testing.assert_close(moved_dev, moved_cpu, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('device', DEVICES)
def test_distributed_optimizers_on_one_rank_equal_the_plain_ones(device, tmp_path):
    "DistAdamW and DistMuon on one rank (gloo on the CPU, NCCL with its in-place all-gather on CUDA) = AdamW and Muon."
    if dist.is_initialized(): pytest.skip('a process group is already running in this process')
    backend = 'nccl' if device == 'cuda' else 'gloo'
    dist.init_process_group(backend, init_method=f'file://{tmp_path}/store', rank=0, world_size=1)
    try:
        if backend == 'nccl': assert native_collectives()
        models = [tiny_model(device), tiny_model(device)]
        runs = [setup_optimizers(models[0], distributed=False), setup_optimizers(models[1], distributed=True)]
        assert [type(o).__name__ for o in runs[1]] == ['DistAdamW', 'DistMuon']
        for model, optimizers in zip(models, runs):
            for step in range(2):
                set_grads(model, step)
                for opt in optimizers: opt.step()
        for plain, sharded in zip(*(m.parameters() for m in models)): torch.testing.assert_close(sharded, plain, rtol=0, atol=1e-6)
    finally: dist.destroy_process_group()


# ---- peak FLOP/s and MFU ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, expected', [('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H200', 989e12),
                                            ('NVIDIA A100-SXM4-80GB', 312e12), ('NVIDIA GeForce RTX 4090', 165e12),
                                            ('NVIDIA H100 PCIe', 756e12), ('NVIDIA L40S', 362e12), ('NVIDIA L4', 121e12),
                                            ('NVIDIA A10G', 70e12), ('NVIDIA A10', 125e12)])
def test_peak_flops_reads_the_datasheet_for_a_known_gpu(monkeypatch, name, expected):
    monkeypatch.setattr(train_module, '_peaks', {})
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    monkeypatch.setattr(train_module, 'measure_matmul_flops', lambda device: pytest.fail(f'measured a {name}, a datasheet GPU'))
    assert peak_flops('cuda:0') == expected
    assert mfu(0.45 * expected * 8 * 2.0, 2.0, 'cuda:0', world_size=8) == pytest.approx(0.45)   # 8 GPUs for 2 s at 45%


def test_peak_flops_of_an_unknown_gpu_is_measured(monkeypatch):
    monkeypatch.setattr(train_module, '_peaks', {})
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: 'Some Future GPU')
    monkeypatch.setattr(train_module, 'measure_matmul_flops', lambda device: 123e12)
    assert peak_flops('cuda:0') == 123e12


@gpu_only
def test_this_gpus_matmul_rate_stays_under_its_datasheet_peak():
    "A measured bf16 rate above the table's figure means the table names the wrong figure for this GPU."
    name = torch.cuda.get_device_name(0)
    known = max((gpu for gpu in GPU_PEAK_FLOPS if gpu in name), key=len, default=None)
    measured = measure_matmul_flops('cuda:0', n=4096)
    assert measured > 1e12
    if known:
        table = GPU_PEAK_FLOPS[known]
        assert peak_flops('cuda:0') == table
        assert measured < 1.1 * table, f'{name}: measured {measured / 1e12:.0f} TFLOP/s, table {table / 1e12:.0f}'


# ---- process, RNG, loader, engine -------------------------------------------------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
def test_process_device_and_rng_state_round_trip(device, monkeypatch):
    for key in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'): monkeypatch.delenv(key, raising=False)
    proc = init_process(device)
    assert (proc.device, proc.world_size) == ('cuda:0' if device == 'cuda' else 'cpu', 1)
    state = rng_state()
    assert ('cuda' in state) == torch.cuda.is_available()
    first = torch.rand(4, device=proc.device)
    set_rng_state(state)
    assert torch.equal(torch.rand(4, device=proc.device), first)


@pytest.mark.parametrize('device', DEVICES)
def test_loader_builds_the_same_batches_on_the_device(device):
    "Pages rendered on the device in the prefetch thread give the CPU loader's batches, field by field."
    cfg = ModelConfig(depth=1, seq_len=256)
    for expected, got in zip(loader_batches(cfg, 3), loader_batches(cfg, 3, device, prefetch=True)):
        assert got.byte_ids.device.type == device and got.rendered.device.type == device
        for name in BATCH_FIELDS: assert torch.equal(getattr(got, name).cpu(), getattr(expected, name)), name
        assert torch.equal(got.slot_glyphs().cpu(), expected.slot_glyphs())
        assert torch.equal(got.patches().cpu(), expected.patches())


@pytest.mark.parametrize('device', DEVICES)
def test_engine_on_the_device_follows_the_naive_oracle_and_the_cpu(device):
    model, cpu_model = tiny_model(device).eval(), tiny_model('cpu').eval()
    prompt = [Bytes([special('<|bos|>')]), Pixels('The cat sat on\nthe mat.'), Bytes.text(' It', before=('<|continue|>',))]
    engine, follow = Engine(model), list(b' was')
    logits = engine.feed(prompt)
    for n in range(len(follow) + 1):
        seen = prompt + ([Bytes(follow[:n])] if n else [])
        torch.testing.assert_close(logits, naive_logits(model, seen), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits.cpu(), naive_logits(cpu_model, seen), rtol=1e-4, atol=1e-4)
        if n < len(follow): logits = engine.step([follow[n]])


def test_web_workers_are_spread_over_the_gpus(monkeypatch):
    loads = []
    def load_model(stage, run, step, device): loads.append(device); return f'model on {device}', {'stage': stage}
    monkeypatch.setattr(chat_web, 'load_model', load_model)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    models, meta = chat_web.worker_models('sft', None, None, 'cuda', 3)
    assert models == ['model on cuda:0', 'model on cuda:1', 'model on cuda:0'] and loads == ['cuda:0', 'cuda:1']
    assert chat_web.worker_models('sft', None, None, 'cuda', None)[0] == ['model on cuda:0', 'model on cuda:1']   # one per GPU


# ---- training runs -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('device', DEVICES)
def test_baseline_training_steps_on_the_device(device):
    "train_baseline times its steps with a CUDA synchronize on the GPU."
    model = tiny_model(device, depth=1, d_model=64, n_head=2, seq_len=128)
    data = DataConfig.from_model(model.cfg, batch_rows=2, pixel_chars=96, byte_chars=48)
    with PretrainLoader(data, device=device) as loader:
        out = train_baseline(model, loader, loader_batches(model.cfg, 1, device), steps=2, n_evals=0)
    assert out['steps'] == 2 and math.isfinite(out['val_bpb']) and all(math.isfinite(loss) for _, loss in out['losses'])


TINY_RUN = ['--run=gpu_paths', '--depth=2', '--max_seq_len=256', '--device_batch_size=2', '--num_iterations=3',
            '--eval_every=0', '--eval_batches=1', '--pixel_chars=96', '--byte_chars=48', '--log_every=1']


@pytest.mark.slow
@pytest.mark.parametrize('device, flags', [('cpu', ['--device=cpu', '--dtype=bfloat16']), pytest.param('cuda', [], marks=GPU)])
def test_base_training_run_in_bfloat16(device, flags, tmp_path):
    "On CUDA the defaults: bf16 autocast, torch.compile, the loader rendering on the GPU; on the CPU, bf16 asked for."
    env = {**os.environ, 'IMAGELM_BASE_DIR': str(tmp_path), 'PYTHONUNBUFFERED': '1'}
    out = subprocess.run([sys.executable, '-m', 'imagelm.base_train', *TINY_RUN, *flags], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"| {'cuda:0' if device == 'cuda' else 'cpu'}, bfloat16" in out.stdout
    steps = [line for line in out.stdout.splitlines() if line.startswith('step ') and 'mfu' in line]
    assert len(steps) == 3 and 'sample |' in out.stdout
    meta = json.loads((tmp_path / 'checkpoints/base/gpu_paths/step_000002/meta.json').read_text())
    assert all(math.isfinite(loss) for _, loss in meta['history']['loss']) and meta['peak_flops'] > 0


@pytest.mark.slow
def test_gpu_check_refuses_to_run_without_a_cuda_device():
    env = {**os.environ, 'CUDA_VISIBLE_DEVICES': ''}
    out = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu_check.sh')], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert 'no CUDA device' in out.stderr and 'step' not in out.stdout


@pytest.mark.slow
def test_loader_benchmark_runs_with_tiny_settings(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'bench' / 'loader.py'), '--depth=2', '--device_batch_size=2', '--max_seq_len=256',
                          '--batches=3', '--profile_batches=2', f'--out={tmp_path / "loader.json"}'],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / 'loader.json').read_text())
    assert result['ratio'] == pytest.approx(result['measured_positions_per_s'] / result['required_positions_per_s_per_gpu'])
    assert result['required_positions_per_s_per_gpu'] == pytest.approx(
        result['mfu'] * result['gpu_peak_flops'] / result['flops_per_position'])
    assert 0 < result['render_share'] < result['pack_share'] < 1 and result['verdict'] in out.stdout
