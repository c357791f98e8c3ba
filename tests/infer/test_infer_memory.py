from __future__ import annotations

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from voxflow.testing import run_with_memory_cap

CAP_BYTES = 900 * 2**20
SHAPE = (128, 512, 512)  # 33.5M voxels
N_CLASSES = 8

CODE = textwrap.dedent("""
    import numpy as np, torch
    from pathlib import Path
    from torch import nn
    from voxflow.geometry import Geometry
    from voxflow.infer import predict
    from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, ResamplingSpec
    from voxflow.store import DatasetMeta, Store
    shape, tmp, k = {shape!r}, Path({tmp!r}), {k}
    spec = NetworkSpec(n_stages=1, features_per_stage=(4,), kernel_sizes=((1, 1, 1),), strides=((1, 1, 1),),
                       n_blocks_per_stage=(1,), n_conv_per_stage_decoder=())
    cfg = Configuration(name="3d_fullres", spacing_zyx=(1.0, 1.0, 1.0), median_shape_vox=shape,
                        patch_size_vox=(32, 128, 128), batch_size=2, resampling=ResamplingSpec(), network=spec,
                        normalization=(ChannelNormalization(scheme="ct", mean=0.0, std=1.0, lower=-9.0, upper=9.0),))
    meta = DatasetMeta(channel_names=("CT",), labels={{"background": 0, **{{f"c{{i}}": i for i in range(1, k)}}}})
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 1), nn.Tanh(), nn.Conv3d(4, k, 1))
    src = Store.create(tmp / "ds.zarr", meta)
    src.begin_case("big", geometry=Geometry(shape_zyx=shape, spacing_zyx=(1.0, 1.0, 1.0)))
    z = src.create_array("big", "image", shape=(1, *shape), dtype=np.float32, chunks=(1, 32, 256, 256))
    for z0 in range(0, shape[0], 32):
        z[0, z0:z0 + 32] = np.random.default_rng(z0).normal(size=(32, *shape[1:])).astype(np.float32) + 1.0
    src.mark_complete("big")
    out = predict(src, tmp / "pred", models=[(net, cfg, meta)], tta=False, export=False, progress=False,
                  cache_bytes=128 * 2**20)
    # a pointwise network: the label of a voxel is the argmax of the network at that voxel
    slab = np.asarray(z[:, 40:44])
    with torch.no_grad():
        expected = net(torch.from_numpy(slab[None])).argmax(1)[0].numpy()
    got = np.asarray(out.zarr_array("big", "label")[40:44])
    print("AGREE", float((got == expected).mean()))
""")


@pytest.mark.slow
def test_prediction_runs_a_volume_larger_than_its_memory_cap(tmp_path: Path) -> None:
    voxels = SHAPE[0] * SHAPE[1] * SHAPE[2]
    # float32 image + K float32 probabilities on the preprocessed grid: what an in-memory predictor holds
    volume_bytes = voxels * 4 * (1 + N_CLASSES)
    assert volume_bytes > CAP_BYTES
    peak, out = run_with_memory_cap(
        CODE.format(shape=SHAPE, tmp=str(tmp_path), k=N_CLASSES), cap_bytes=CAP_BYTES, timeout=1800
    )
    agree = float(out.split("AGREE")[-1])
    assert agree > 0.999
    assert peak < CAP_BYTES


def _predict_benchmark():  # noqa: ANN202
    """``benchmarks/predict.py`` as a module (the test measures exactly what the benchmark prints)."""
    from voxflow.testing import import_path

    return import_path(Path(__file__).resolve().parents[2] / "benchmarks" / "predict.py", "voxflow_bench_predict")


@pytest.mark.slow
def test_peak_memory_is_flat_in_the_volume() -> None:
    """Peak RSS of ``predict`` (own subprocess, VmHWM) at 64 M voxels is within 1.10x of that at 8 M
    voxels: nothing in the pipeline -- tile bookkeeping, dask graphs, the tile cache, freed heap --
    may grow with the volume. (The issue's figure is 32 M vs 512 M: ``benchmarks/predict.py``.)"""
    bench = _predict_benchmark()
    rows = [
        bench.run_size(n, patch=(32, 64, 64), cache_mb=32, baseline=False, net="pointwise")
        for n in (8_000_000, 64_000_000)
    ]
    small, large = (r["voxflow"]["peak_rss_mb"] for r in rows)
    assert large <= 1.10 * small, rows  # measured 437 -> 451 MB (1.03x)


HEAP_CODE = textwrap.dedent("""
    import resource
    import torch
    from voxflow.infer._memory import release_large_allocations, tile_loop_allocations

    def faults_of(n):  # minor faults of n allocate-fill-free rounds of a 64 MiB tensor
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):  # torch, not numpy: numpy asks for huge pages (few faults either way)
            torch.empty(2**24).fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()

    assert release_large_allocations()
    outside = faults_of(16)
    before = rss()
    with tile_loop_allocations(2**30) as applied:
        assert applied
        inside = faults_of(16)
        kept = rss() - before
    print("RESULT", outside, inside, kept, rss() - before)
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_tile_loop_reuses_large_buffers_and_gives_them_back() -> None:
    """Inside the tile loop a freed 64 MiB buffer (above glibc's 32 MiB cap on the mmap threshold, as a
    large tile's activations are) is reused by later allocations instead of being faulted in again;
    after the loop the kept heap is given back to the OS. Reuse is not immediate every time (most likely a small
    allocation placed after the buffer keeps it from the next aligned request), so the heap grows by
    1-4 buffers (measured over 16 runs) before it stops."""
    out = subprocess.run([sys.executable, "-c", HEAP_CODE], capture_output=True, text=True, check=True).stdout
    outside, inside, kept, after = (int(v) for v in out.split("RESULT")[1].split())
    import resource  # POSIX only (glibc, as the skip says)

    pages = 2**26 // resource.getpagesize()
    assert outside >= 15 * pages  # every one of the 16 rounds faults the whole buffer in
    assert inside <= 8 * pages  # the first few rounds only
    assert kept >= 2**26 - 2**20  # freed buffers stay in the heap, for the next pass
    assert after < 2**22  # and is given back after the loop
