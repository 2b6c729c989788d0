"""Does the pretraining loader keep up with the GPUs of the speedrun?

One H100 at a given MFU consumes positions at `mfu x peak / (training FLOPs per position)`, the FLOPs counted by the
model's own estimate (`imagelm.model.batch_flops`, the figure behind every MFU the training loop reports) on real
batches of the run's shape, and the peak from `imagelm.train.GPU_PEAK_FLOPS`. Each rank builds its own batches, so one
rank's loader (`PretrainLoader`, rank 0 of `--world_size`) must deliver that rate alone. Here it builds batches on the
CPU (rendering included), with `--threads` torch threads, and we compare the two rates. A profile of a few batches
splits the build time into laying out pages, packing rows into tensors, and rendering (`render_batch`, inside the
packing): the one part that `PretrainLoader(device='cuda')` runs on the GPU.

    python bench/loader.py                       # depth 20, 32 x 2048, rank 0 of 8, H100 at 45% MFU: about 40 s
    python bench/loader.py --depth 2 --device_batch_size 2 --max_seq_len 256 --batches 2 --out /tmp/loader.json

Prints the figures and writes bench/results/loader.json.
"""
import argparse, cProfile, math, pstats, statistics

import torch

from imagelm.dataloader import DataConfig, PretrainLoader
from imagelm.model import ImageLM, ModelConfig, batch_flops
from imagelm.train import GPU_PEAK_FLOPS

from harness import RESULTS, save_result


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a('--depth', type=int, default=20, help='model depth (default 20: the speedrun)')
    a('--device_batch_size', type=int, default=32, help='rows per batch (default 32: the speedrun)')
    a('--max_seq_len', type=int, default=2048, help='positions per row (default 2048: the speedrun)')
    a('--world_size', type=int, default=8, help='ranks sharing the data; rank 0 is measured (default 8)')
    a('--gpu', choices=sorted(GPU_PEAK_FLOPS), default='H100', help='whose datasheet bf16 peak to use (default H100)')
    a('--mfu', type=float, default=0.45, help='model FLOPs utilisation the GPU is assumed to reach (default 0.45)')
    a('--data', default='embedded', help="'embedded', 'parquet' or a folder of parquet shards (default embedded)")
    a('--threads', type=int, default=1, help='torch threads of the loader (default 1: one core per rank)')
    a('--batches', type=int, default=200, help='batches timed after the warm-up ones (default 200)')
    a('--warmup', type=int, default=2, help='batches built first and not timed: the glyph atlas, first layouts (default 2)')
    a('--profile_batches', type=int, default=5, help='batches built under cProfile for the split of the build (default 5)')
    a('--out', default=str(RESULTS / 'loader.json'), help='where to write the result (default bench/results/loader.json)')
    args = p.parse_args(argv)
    for name in ('depth', 'device_batch_size', 'max_seq_len', 'world_size', 'threads', 'batches', 'profile_batches'):
        if getattr(args, name) < 1: p.error(f'--{name} must be >= 1, got {getattr(args, name)}')
    if not 0 < args.mfu <= 1: p.error(f'--mfu must be in (0, 1], got {args.mfu}')
    return args


def build_times(loader: PretrainLoader, n: int) -> tuple:
    "Build `n` batches: their build seconds, filled positions, characters and batches."
    batches, seconds, positions, chars = [], [], 0, 0
    for _ in range(n):
        batches.append(next(loader))
        seconds.append(loader.last['build_s']); positions += loader.last['positions']; chars += loader.last['chars']
    return seconds, positions, chars, batches


def build_split(loader: PretrainLoader, n: int) -> dict:
    """Shares of the build time (under cProfile) of its parts: rendering (`render_batch`: on the GPU with device='cuda'),
    laying out pages (`RowPacker.lay_out`), and packing rows into tensors (`pack`, rendering included)."""
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(n): next(loader)
    profile.disable()
    stats = pstats.Stats(profile).stats                                # (file, line, function) -> (.., .., .., cumulative, ..)
    cumulative = lambda module, name: sum(v[3] for k, v in stats.items() if k[2] == name and k[0].endswith(module))
    total = cumulative('dataloader.py', 'generate')
    return {'render_share': cumulative('render.py', 'render_batch') / total, 'layout_share': cumulative('dataloader.py', 'lay_out') / total,
            'pack_share': cumulative('segments.py', 'pack') / total, 'profiled_batches': n}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(depth=args.depth, seq_len=args.max_seq_len)
    slots = args.device_batch_size * args.max_seq_len                 # positions a GPU computes per batch, padding included
    data = DataConfig.from_model(cfg, source=args.data, batch_rows=args.device_batch_size)
    with PretrainLoader(data, rank=0, world_size=args.world_size) as loader:
        build_times(loader, args.warmup)
        seconds, positions, chars, batches = build_times(loader, args.batches)
        split = build_split(loader, args.profile_batches)
    with torch.device('meta'): model = ImageLM(cfg)                   # shapes only: batch_flops needs no weights
    flops_per_batch = statistics.mean(batch_flops(model, batch) for batch in batches)
    gpu_flops = args.mfu * GPU_PEAK_FLOPS[args.gpu]
    required = gpu_flops * slots / flops_per_batch                      # positions per second one GPU consumes
    build_s, padding = statistics.mean(seconds), 1 - positions / (slots * args.batches)
    measured = slots / build_s
    ratio = measured / required
    result = dict(
        config=f'depth {args.depth}, {args.device_batch_size} x {args.max_seq_len} per GPU, rank 0 of {args.world_size}',
        parameters=sum(p.numel() for p in model.parameters()),
        flops_per_position=flops_per_batch / slots,
        gpu=args.gpu, gpu_peak_flops=GPU_PEAK_FLOPS[args.gpu], mfu=args.mfu,
        gpu_step_s=flops_per_batch / gpu_flops,
        required_positions_per_s_per_gpu=required,
        measured_positions_per_s=measured,
        measured_filled_positions_per_s=positions / sum(seconds),
        measured_chars_per_s=chars / sum(seconds),
        padding=padding, build_s_mean=build_s, build_s_max=max(seconds), batches_timed=args.batches,
        loader_threads=args.threads, device='cpu (pages rendered on the CPU)',
        ratio=ratio, keeps_up=ratio >= 1,
        **split,
        verdict=verdict(ratio, split['render_share'], split['layout_share'], args),
        caveats=[f'measured on a CPU of {torch.get_num_threads()} torch thread(s) while other people shared its 2 cores: '
                 'the figure is a lower bound on one free core',
                 f"data '{args.data}': the embedded corpus, not FineWeb-Edu; longer documents change the layout cost per position",
                 f'positions are the B x T slots a GPU computes, padding included ({100 * padding:.2f}% of them here)',
                 "the training loop's Python shares the GIL with the prefetch thread; a loader near ratio 1 slows the step",
                 "with device='cuda' the loader renders on the GPU on the training's stream, and its reads back to the host "
                 "(pack's .cpu()) wait for the step's queued kernels; bench/gpu_check.sh prints the loader's share of the step"])
    save_result(result, args.out, args)
    print(f"{result['config']}: {result['flops_per_position'] / 1e9:.2f} GFLOPs per position; one {args.gpu} at "
          f"{100 * args.mfu:.0f}% MFU takes {result['gpu_step_s'] * 1000:.0f} ms per batch, {required:,.0f} positions/s")
    print(f"loader on the CPU ({args.threads} thread): {build_s * 1000:.0f} ms per batch, {measured:,.0f} positions/s "
          f"= {ratio:.2f}x what one GPU needs")
    print(f"build time: {100 * split['layout_share']:.0f}% laying out pages, {100 * split['pack_share']:.0f}% packing rows; rendering, "
          f"the part device='cuda' moves to the GPU, is {100 * split['render_share']:.1f}% of it")
    print(result['verdict'])
    print(f'wrote {args.out}')
    return result


def verdict(ratio: float, render_share: float, layout_share: float, args) -> str:
    "What it would take for the loader to keep up, in one sentence."
    cpu_only = 1 - render_share
    if ratio >= 1:
        return (f'It keeps up: one loader thread per GPU builds batches {ratio:.1f}x as fast as an {args.gpu} at '
                f'{100 * args.mfu:.0f}% MFU consumes them, rendering on the CPU included, so neither GPU rendering nor '
                f'pre-rendered shards are needed; keep a core per rank free for it.')
    workers = math.ceil(1 / ratio)
    gpu_render = ratio / cpu_only
    return (f'It does not keep up ({ratio:.2f}x): it needs {workers} loader processes per GPU, or rendering on the GPU, which '
            f'leaves the {100 * cpu_only:.0f}% of the build that is not rendering on the CPU and so reaches about '
            f'{gpu_render:.2f}x{"" if gpu_render >= 1 else f" (then with {math.ceil(1 / gpu_render)} processes per GPU)"}, '
            f'or shards stored already laid out, which skip the layout ({100 * layout_share:.0f}% of the build).')


if __name__ == '__main__': main()
