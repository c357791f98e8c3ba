"""Benchmark: out-of-core sliding-window prediction vs a whole-array in-memory sliding window.

For each size, one subprocess writes a CT-like case (int16, slab by slab) into a dataset store;
a fresh subprocess then runs ``voxflow.infer.predict`` on it end to end (preprocess to scratch Zarr, tiled
Gaussian-weighted prediction, undo, argmax, write the prediction store; no file export) with a
small U-Net, no TTA, step 0.5. Another subprocess runs the nnU-Net way on the same volume and
network: whole image read into memory, whole float32 probability and weight accumulators. Each prints
wall time, voxels/s and peak RSS; the script prints one JSON document.

    python benchmarks/predict.py --quick               # 1M and 4M voxels (shared machines)
    python benchmarks/predict.py --sizes 32M 128M 512M # the issue's sizes (hours on 2 CPU cores)
    python benchmarks/predict.py --net pointwise --sizes 4M 32M 128M   # memory scaling, fast
    python benchmarks/predict.py --net nnunet --patch 80 160 160 --sizes 9M --no-baseline  # speed vs nnU-Net
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import textwrap

from voxflow.testing import run_with_memory_cap

log = logging.getLogger("voxflow.benchmarks.predict")

SETUP = textwrap.dedent("""
    import dataclasses, json, time, numpy as np, torch
    from pathlib import Path
    from voxflow.geometry import Geometry
    from voxflow.nets import build_network
    from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, ResamplingSpec, TrainSpec
    from voxflow.store import DatasetMeta, Store
    from voxflow.synthetic import large_volume_slab
    shape, tmp, patch = {shape!r}, Path({tmp!r}), {patch!r}
    spec = NetworkSpec(n_stages=3, features_per_stage=(8, 16, 32), kernel_sizes=((3, 3, 3),) * 3,
                       strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), n_blocks_per_stage=(1, 1, 1),
                       n_conv_per_stage_decoder=(1, 1))
    cfg = Configuration(name="3d_fullres", spacing_zyx=(1.0, 1.0, 1.0), median_shape_vox=shape,
                        patch_size_vox=patch, batch_size=2, resampling=ResamplingSpec(), network=spec,
                        normalization=(ChannelNormalization(scheme="ct", mean=0.0, std=300.0, lower=-1000.0,
                                                            upper=1500.0),), train=TrainSpec())
    meta = DatasetMeta(channel_names=("CT",), labels={{"background": 0, "organ": 1, "lesion": 2}})
    if {net!r} == "nnunet":  # nnU-Net's 3d_fullres topology for an 80x160x160 patch: 6 stages, 32-320 features
        spec = NetworkSpec(n_stages=6, features_per_stage=(32, 64, 128, 256, 320, 320),
                           kernel_sizes=((3, 3, 3),) * 6, strides=((1, 1, 1),) + ((2, 2, 2),) * 4 + ((1, 2, 2),),
                           n_blocks_per_stage=(2,) * 6, n_conv_per_stage_decoder=(2,) * 5)
        cfg = dataclasses.replace(cfg, network=spec)
    torch.manual_seed(0)
    if {net!r} in ("unet", "nnunet"):
        net = build_network(spec, 1, 3).eval()
    else:  # per-voxel network: measures the tiling, accumulation and I/O machinery, not convolutions
        net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 1), torch.nn.Tanh(), torch.nn.Conv3d(8, 3, 1)).eval()
""")

GENERATE = SETUP + textwrap.dedent("""
    src = Store.create(tmp / "ds.zarr", meta, overwrite=True)
    src.begin_case("big", geometry=Geometry(shape_zyx=shape, spacing_zyx=(1.0, 1.0, 1.0)))
    z = src.create_array("big", "image", shape=(1, *shape), dtype=np.int16, chunks=(1, 64, 128, 128))
    for z0 in range(0, shape[0], 8):
        z[0, z0:z0 + 8] = large_volume_slab(shape, z0, min(z0 + 8, shape[0]))[0]
    src.mark_complete("big")
    print(json.dumps({{"wall_s": 0.0}}))
""")

VOXFLOW = SETUP + textwrap.dedent("""
    from voxflow.infer import predict
    src = Store.open(tmp / "ds.zarr")
    t = time.perf_counter()
    out = predict(src, tmp / "pred", models=[(net, cfg, meta)], tta=False, export=False, progress=False,
                  cache_bytes={cache_bytes})
    print(json.dumps({{"wall_s": time.perf_counter() - t}}))
""")

BASELINE = SETUP + textwrap.dedent("""
    from voxflow.infer import TilePredictor, release_large_allocations, sliding_window_predict_in_memory
    release_large_allocations()  # same allocator setting as voxflow: the baseline's own needs only
    t = time.perf_counter()
    image = np.asarray(Store.open(tmp / "ds.zarr").zarr_array("big", "image")[...]).astype(np.float32)
    image = (np.clip(image, -1000.0, 1500.0) - 0.0) / 300.0
    probs = sliding_window_predict_in_memory(image, TilePredictor(net), patch_size_vox=patch, n_classes=3)
    label = probs.argmax(0).astype(np.uint8)
    print(json.dumps({{"wall_s": time.perf_counter() - t}}))
""")


def parse_size(text: str) -> int:
    """'32M' -> 32_000_000 voxels; plain integers are voxel counts."""
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def shape_for(n_voxels: int) -> tuple[int, int, int]:
    """A (z, 2z, 2z) volume of about ``n_voxels`` voxels (4 z^3 = n)."""
    z = max(8, round((n_voxels / 4) ** (1 / 3)))
    return (z, 2 * z, 2 * z)


def run_size(
    n_voxels: int, *, patch: tuple[int, int, int], cache_mb: int, baseline: bool, net: str
) -> dict[str, object]:
    shape = shape_for(n_voxels)
    voxels = shape[0] * shape[1] * shape[2]
    row: dict[str, object] = {"voxels": voxels, "shape_zyx": list(shape), "patch_size_vox": list(patch)}
    runs = {"voxflow": VOXFLOW}
    if baseline:
        runs["in_memory_baseline"] = BASELINE
    with tempfile.TemporaryDirectory(prefix="voxflow-bench-") as tmp:
        fmt = {"shape": shape, "tmp": tmp, "patch": patch, "cache_bytes": cache_mb * 2**20, "net": net}
        run_with_memory_cap(GENERATE.format(**fmt), timeout=6 * 3600)  # input store, in its own process
        for name, template in runs.items():
            peak, out = run_with_memory_cap(template.format(**fmt), timeout=6 * 3600)
            wall = json.loads(out.strip().splitlines()[-1])["wall_s"]
            row[name] = {
                "wall_s": round(wall, 2),
                "voxels_per_s": round(voxels / wall),
                "peak_rss_mb": round(peak / 2**20),
            }
            log.info("%s %s: %s", name, shape, row[name])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["32M", "128M", "512M"], help="voxel counts, e.g. 32M 128M")
    ap.add_argument("--quick", action="store_true", help="only 1M and 4M voxels")
    ap.add_argument("--patch", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"))
    ap.add_argument(
        "--cache-mb", type=int, default=128, help="accumulator cache before spilling (predict's default: 128)"
    )
    ap.add_argument("--no-baseline", action="store_true", help="skip the in-memory baseline")
    ap.add_argument(
        "--net",
        choices=("unet", "nnunet", "pointwise"),
        default="unet",
        help="unet: 3-stage U-Net (8-32 features); nnunet: nnU-Net's 6-stage 32-320 network (use "
        "--patch 80 160 160; compare with nnU-Net 2.8.1's ~42k voxels/s on 2 CPU cores); "
        "pointwise: 1x1x1 convs (machinery only, fast)",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = ["1M", "4M"] if args.quick else args.sizes
    rows = [
        run_size(
            parse_size(s), patch=tuple(args.patch), cache_mb=args.cache_mb, baseline=not args.no_baseline, net=args.net
        )
        for s in sizes
    ]
    print(
        json.dumps(
            {
                "benchmark": "predict",
                "net": args.net,
                "step": 0.5,
                "tta": False,
                "cache_mb": args.cache_mb,
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
