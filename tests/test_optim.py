"Optimizers: Muon orthogonalises, our AdamW is torch's, the distributed forms equal the single-process ones, state round-trips."
import copy
import os
import sys
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

from imagelm.model import ImageLM, ModelConfig
from imagelm.optim import (AdamW, DistAdamW, DistMuon, Muon, OptimConfig, muon_momentum, setup_optimizers,
                           zeropower_via_newtonschulz5)
from imagelm.render import RenderConfig

@pytest.fixture(autouse=True, scope='module')
def one_thread():
    "Every tensor here is tiny: one thread is much faster, above all on a busy machine."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Newton-Schulz with the quintic (3.4445, -4.7750, 2.0315) does not converge to singular values of exactly 1: after 5
# steps they lie in about [0.68, 1.21] for well-spread inputs. We accept [0.6, 1.25]; the input spans a factor 100.
SV_LO, SV_HI = 0.6, 1.25


def tiny_cfg(depth: int = 2, d_model: int | None = None) -> ModelConfig:
    return ModelConfig(depth=depth, d_model=d_model, seq_len=64, render=RenderConfig(patch_w=32, page_chars=16))


def ill_conditioned(m: int, n: int, seed: int = 0) -> torch.Tensor:
    "A random (m, n) matrix whose singular values are spread evenly (in log) from 1 down to 0.01."
    gen, k = torch.Generator().manual_seed(seed), min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    return U @ torch.diag(torch.logspace(0, -2, k)) @ V.T


@pytest.mark.parametrize('shape', [(64, 192), (192, 64), (64, 64)])
def test_newton_schulz_is_nearly_orthogonal(shape):
    G = ill_conditioned(*shape)
    s_in = torch.linalg.svdvals(G)
    assert s_in.max() / s_in.min() > 90                      # the input is far from orthogonal
    s = torch.linalg.svdvals(zeropower_via_newtonschulz5(G))
    assert SV_LO < s.min() and s.max() < SV_HI, (float(s.min()), float(s.max()))


def test_newton_schulz_keeps_singular_vectors_and_batches():
    G = torch.stack([ill_conditioned(32, 48, seed) for seed in range(3)])
    O = zeropower_via_newtonschulz5(G)
    for g, o in zip(G, O):
        U, _, Vh = torch.linalg.svd(g, full_matrices=False)
        M = U.T @ o @ Vh.T                                    # diagonal when the singular vectors are unchanged
        assert (M - torch.diag(M.diagonal())).abs().max() < 1e-4
        assert torch.allclose(o, zeropower_via_newtonschulz5(g))
    with pytest.raises(ValueError): zeropower_via_newtonschulz5(torch.randn(5))


@pytest.mark.parametrize('shape', [(64, 192), (192, 64)])
def test_muon_update_is_nearly_orthogonal(shape):
    "First step from zero momentum: (W_before - W_after) / (lr * shape scale) has singular values near 1."
    W = torch.nn.Parameter(torch.randn(*shape))
    W.grad = ill_conditioned(*shape, seed=1)
    before = W.detach().clone()
    lr, scale = 0.02, max(1, shape[0] / shape[1]) ** 0.5
    Muon([W], lr=lr).step()
    s = torch.linalg.svdvals((before - W.detach()) / (lr * scale))
    assert SV_LO < s.min() and s.max() < SV_HI, (float(s.min()), float(s.max()))


def test_muon_rejects_vectors_and_momentum_schedule():
    with pytest.raises(ValueError): Muon([torch.nn.Parameter(torch.randn(4))], lr=0.02)
    assert muon_momentum(0) == 0.85 and muon_momentum(300) == 0.95 and muon_momentum(10_000) == 0.95
    assert abs(muon_momentum(150) - 0.90) < 1e-12
    assert all(muon_momentum(s) <= muon_momentum(s + 1) for s in range(400))


@pytest.mark.parametrize('torch_kw, tol', [(dict(foreach=False), 0.0), (dict(), 1e-6)])
def test_adamw_matches_torch(torch_kw, tol):
    "20 steps, two param groups, weight decay: bitwise against torch's single-tensor path, close to its foreach path."
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in ((7, 5), (11,), (3, 4, 2))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    def groups(ps): return [dict(params=ps[:2], lr=0.01), dict(params=ps[2:], lr=0.003, weight_decay=0.0)]
    kw = dict(betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt_ours, opt_theirs = AdamW(groups(ours), **kw), torch.optim.AdamW(groups(theirs), **kw, **torch_kw)
    for step in range(20):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn_like(a); b.grad = a.grad.clone()
        opt_ours.step(); opt_theirs.step()
        for a, b in zip(ours, theirs):
            assert (a.detach() - b.detach()).abs().max() <= tol, step


def set_grads(params, step, rank=0):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    for p in params: p.grad = torch.randn(p.shape, generator=gen) * 0.1


@pytest.mark.parametrize('patch_embed', ['adamw', 'muon'])
def test_setup_optimizers_groups(patch_embed):
    model = ImageLM(tiny_cfg())
    opts = setup_optimizers(model, OptimConfig(patch_embed=patch_embed, weight_decay=0.1))
    assert [type(o) for o in opts] == [AdamW, Muon]
    params = [p for o in opts for g in o.param_groups for p in g['params']]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    names = {g['name']: (type(o), g) for o in opts for g in o.param_groups}
    assert names['patch_embed'][0] is (AdamW if patch_embed == 'adamw' else Muon)
    scale = (model.cfg.d_model / 768) ** -0.5
    assert names['head'][1]['initial_lr'] == names['head'][1]['lr'] == pytest.approx(0.004 * scale)
    assert names['byte_embed'][1]['initial_lr'] == pytest.approx(0.2 * scale)
    assert names['matrices'][1]['initial_lr'] == 0.02 and names['head'][1]['weight_decay'] == 0.1
    wide = ImageLM(tiny_cfg(d_model=512))
    assert setup_optimizers(wide)[0].param_groups[0]['lr'] == pytest.approx(0.004 * (512 / 768) ** -0.5)
    with pytest.raises(ValueError, match='patch_embed'): OptimConfig(patch_embed='sgd')


@pytest.mark.parametrize('patch_embed', ['adamw', 'muon'])
def test_state_dict_round_trip(patch_embed):
    "Save after 3 steps, step on; a fresh model and optimizers loaded from the save take bitwise the same steps."
    torch.manual_seed(0)
    model = ImageLM(tiny_cfg(1))
    opts = setup_optimizers(model, OptimConfig(patch_embed=patch_embed, weight_decay=0.1))
    for step in range(3):
        set_grads(list(model.parameters()), step)
        for o in opts: o.step()
    saved = copy.deepcopy(model.state_dict()), [copy.deepcopy(o.state_dict()) for o in opts]
    for step in range(3, 6):
        set_grads(list(model.parameters()), step)
        for o in opts: o.step()
    model2 = ImageLM(tiny_cfg(1)); model2.load_state_dict(saved[0])
    opts2 = setup_optimizers(model2, OptimConfig(patch_embed=patch_embed, weight_decay=0.1))
    for o, s in zip(opts2, saved[1]): o.load_state_dict(s)
    for step in range(3, 6):
        set_grads(list(model2.parameters()), step)
        for o in opts2: o.step()
    for a, b in zip(model.parameters(), model2.parameters()): assert torch.equal(a, b)


# ---- two ranks on gloo ------------------------------------------------------------------------------------------------

STEPS = 3


def build(distributed: bool, patch_embed: str, emulate=None):
    "A tiny ImageLM and extra tensors whose sizes do not divide the world size, with their optimizers."
    torch.manual_seed(0)
    model = ImageLM(tiny_cfg())
    extra_m = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]               # 3 matrices on 2 ranks
    extra_v = [torch.nn.Parameter(torch.randn(7)), torch.nn.Parameter(torch.randn(1))]  # 7 and 1 entries on 2 ranks
    opts = setup_optimizers(model, OptimConfig(patch_embed=patch_embed, weight_decay=0.1), distributed=distributed)
    kw = dict(emulate_collectives=emulate) if distributed else {}
    opts += [(DistMuon if distributed else Muon)(extra_m, lr=0.02, **kw),
             (DistAdamW if distributed else AdamW)(extra_v, lr=0.01, weight_decay=0.1, **kw)]
    if distributed:                                    # setup_optimizers chose the native/auto path; force ours
        for o in opts: o.emulate = emulate
    return [*model.parameters(), *extra_m, *extra_v], opts


def rank_grads(params, step, rank):
    "The gradient of rank `rank`'s half of the batch; rank 1's patch embedding gets none at step 1 (no pixels)."
    gen = torch.Generator().manual_seed(1000 * step + rank)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    if rank == 1 and step == 1: grads[0] = None        # params[0] is the patch embedding weight
    return grads


def run_steps(params, opts, steps, rank):
    for step in steps:
        for p, g in zip(params, rank_grads(params, step, rank)): p.grad = g
        for o in opts: o.step()


def _worker(rank: int, world: int, port: int):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        assert isinstance(setup_optimizers(ImageLM(tiny_cfg(1)))[1], DistMuon)    # chosen automatically
        for patch_embed, emulate in (('muon', None), ('adamw', True)):
            # distributed: each rank steps on its half-batch gradients
            params, opts = build(True, patch_embed, emulate)
            run_steps(params, opts, range(STEPS), rank)
            # single process on the averaged gradients (a missing gradient counts as zeros)
            ref, ref_opts = build(False, patch_embed)
            for step in range(STEPS):
                per_rank = [rank_grads(ref, step, r) for r in range(world)]
                for i, p in enumerate(ref):
                    p.grad = sum(g[i] if g[i] is not None else torch.zeros_like(p) for g in per_rank) / world
                for o in ref_opts: o.step()
            for i, (a, b) in enumerate(zip(params, ref)):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (patch_embed, emulate, i, float((a - b).abs().max()))
            # per-rank optimizer shards round-trip: save, step on, reload into fresh objects, same steps, same bits
            saved = [p.detach().clone() for p in params], [copy.deepcopy(o.state_dict()) for o in opts]
            run_steps(params, opts, range(STEPS, STEPS + 2), rank)
            params2, opts2 = build(True, patch_embed, emulate)
            with torch.no_grad():
                for p, s in zip(params2, saved[0]): p.copy_(s)
            for o, s in zip(opts2, saved[1]): o.load_state_dict(s)
            run_steps(params2, opts2, range(STEPS, STEPS + 2), rank)
            for a, b in zip(params, params2): assert torch.equal(a, b), patch_embed
            # the shards hold only this rank's part of the state
            n_state = sum(v.numel() for o in opts for st in o.state.values() for v in st.values() if torch.is_tensor(v))
            n_full = sum(v.numel() for o in ref_opts for st in o.state.values() for v in st.values() if torch.is_tensor(v))
            assert n_state < 0.75 * n_full, (n_state, n_full)
        dist.barrier()                                 # leave together: gloo can abort if a peer tears down early
    finally:
        dist.destroy_process_group()
    # Every check passed. Leave without running interpreter teardown, where gloo's threads occasionally abort the
    # process ("terminate called without an active exception") after the work is done.
    sys.stdout.flush(); os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_matches_single_process():
    "2 gloo ranks (spawned, 120 s timeout) = 1 process on the averaged gradient; shards round-trip."
    ctx = mp.start_processes(_worker, args=(2, free_port()), nprocs=2, join=False, start_method='spawn')
    deadline = time.time() + 120
    try:
        while not ctx.join(timeout=1):
            if time.time() > deadline: pytest.fail("the 2-process gloo run hung (over 120 s)")
    finally:
        for p in ctx.processes:
            if p.is_alive(): p.terminate()
