"""Benchmark: one large CT-like volume end to end with block-parallel prediction on a Dask cluster.

Stages, each in a fresh subprocess (its own peak RSS, plus its workers'):

1. generate: a synthetic CT-like ``.mha`` (int16, spacing 1.0 x 0.8 x 0.8 mm), written slab by slab;
2. convert: streaming ``voxflow.io.convert`` into a dataset store;
3. predict: ``voxflow.infer.predict`` on a LocalCluster of ``--workers`` single-threaded workers
   (``scheduler=tcp://...``): staging resamples to 1 mm, block tasks predict the volume (a small
   CPU network, 8-16-32 features, patch ``--patch``, no TTA), scores are resampled back and argmaxed;
   per-worker peak RSS is read from each worker, the duplicated-tile overhead from the log;
4. components: chunked connected components (``voxflow.postprocess.label_components``) of the
   foreground, written to Zarr;
5. export: the labels as NIfTI (``voxflow.io.export_store``).

Prints one JSON document: per size and stage wall time, peak RSS, voxels/s; per-worker peaks.

    python benchmarks/large_volume.py                       # the issue's sizes: 0.25, 0.5, 1, 2 G voxels
    python benchmarks/large_volume.py --sizes 16M 32M 64M   # what a shared 2-core machine allows
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import textwrap
from typing import Any

from voxflow.testing import run_with_memory_cap

log = logging.getLogger("voxflow.benchmarks.large_volume")

GENERATE = """
from voxflow.synthetic import write_large_volume
write_large_volume({tmp!r} + "/ct.mha", {shape!r}, spacing_zyx=(1.0, 0.8, 0.8))
"""

CONVERT = """
from voxflow.io import convert
convert({tmp!r} + "/ct.mha", {tmp!r} + "/ds.zarr", overwrite=True, progress=False)
"""

PREDICT = textwrap.dedent("""
    import logging, os, sys
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the workers: one torch thread per worker process
    import torch
    from distributed import Client, LocalCluster
    from voxflow.infer import predict
    from voxflow.nets import build_network
    from voxflow.plan.schema import ChannelNormalization, Configuration, NetworkSpec, ResamplingSpec, TrainSpec
    from voxflow.store import DatasetMeta, Store
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="LOG %(message)s")
    spec = NetworkSpec(n_stages=3, features_per_stage=(8, 16, 32), kernel_sizes=((3, 3, 3),) * 3,
                       strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)), n_blocks_per_stage=(1, 1, 1),
                       n_conv_per_stage_decoder=(1, 1))
    cfg = Configuration(name="3d_fullres", spacing_zyx=(1.0, 1.0, 1.0), median_shape_vox=(64, 64, 64),
                        patch_size_vox={patch!r}, batch_size=2, resampling=ResamplingSpec(), network=spec,
                        normalization=(ChannelNormalization(scheme="ct", mean=0.0, std=300.0, lower=-1000.0,
                                                            upper=1500.0),), train=TrainSpec())
    meta = DatasetMeta(channel_names=("CT",), labels={{"background": 0, "organ": 1, "lesion": 2}})
    torch.manual_seed(0)
    net = build_network(spec, 1, 3).eval()

    def peak(dask_worker=None):
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) * 1024

    with LocalCluster(n_workers={workers}, threads_per_worker=1, processes=True, memory_limit={memory_limit!r},
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        predict(Store.open({tmp!r} + "/ds.zarr"), {tmp!r} + "/pred", models=[(net, cfg, meta)], tta=False,
                export=False, progress=False, postprocessing=None, scheduler=cluster.scheduler_address,
                block_bytes={block_bytes})
        print("WORKERS", json.dumps(sorted(client.run(peak).values())))
""").replace("import logging, os, sys", "import json, logging, os, sys")

COMPONENTS = """
import dask.array as da, zarr
from voxflow.postprocess import label_components
from voxflow.store import Store
store = Store.open({tmp!r} + "/pred/prediction.zarr")
label = store.zarr_array(store.case_ids()[0], "label")
comps, n = label_components(da.from_zarr(label, chunks=label.chunks) > 0)
out = zarr.create_array({tmp!r} + "/components.zarr", shape=label.shape, chunks=label.chunks, dtype="uint32")
da.store(comps.astype("uint32"), out, lock=False)
print("COMPONENTS", int(n))
"""

EXPORT = """
from voxflow.io import export_store
export_store({tmp!r} + "/pred/prediction.zarr", {tmp!r} + "/nifti", file_ending=".nii.gz", progress=False)
"""


def parse_size(text: str) -> int:
    """'32M' -> 32_000_000 voxels; plain integers are voxel counts."""
    mult = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1].lower(), 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def shape_for(n_voxels: int) -> tuple[int, int, int]:
    """A volume of the issue's proportions (1024 x 1400 x 1400) with about ``n_voxels`` voxels."""
    z = max(16, round((n_voxels / (1400 / 1024) ** 2) ** (1 / 3)))
    xy = round(z * 1400 / 1024)
    return (z, xy, xy)


def _stage(name: str, code: str, fmt: dict[str, Any], voxels: int) -> tuple[dict[str, Any], str]:
    import time

    t = time.perf_counter()
    peak, out = run_with_memory_cap(code.format(**fmt), timeout=24 * 3600)
    wall = time.perf_counter() - t
    row = {"wall_s": round(wall, 2), "voxels_per_s": round(voxels / wall), "peak_rss_mb": round(peak / 2**20)}
    log.info("%s %s: %s", name, fmt["shape"], row)
    return row, out


def run_size(
    n_voxels: int, *, patch: tuple[int, int, int], workers: int, block_mb: int, memory_limit: str
) -> dict[str, Any]:
    shape = shape_for(n_voxels)
    voxels = shape[0] * shape[1] * shape[2]
    row: dict[str, Any] = {"voxels": voxels, "shape_zyx": list(shape), "stages": {}}
    with tempfile.TemporaryDirectory(prefix="voxflow-large-") as tmp:
        fmt = {
            "tmp": tmp,
            "shape": shape,
            "patch": patch,
            "workers": workers,
            "block_bytes": block_mb * 2**20,
            "memory_limit": memory_limit,
        }
        for name, code in (
            ("generate", GENERATE),
            ("convert", CONVERT),
            ("predict", PREDICT),
            ("components", COMPONENTS),
            ("export", EXPORT),
        ):
            row["stages"][name], out = _stage(name, code, fmt, voxels)
            if name == "predict":
                # peak_rss_mb of predict: the client process plus the largest of its children (the workers)
                row["worker_peak_rss_mb"] = [
                    round(p / 2**20) for p in json.loads(out.split("WORKERS", 1)[1].splitlines()[0])
                ]
                m = re.search(r"(\d+) tiles predicted for (\d+) grid tiles", out)
                blocks = re.search(r"(\d+) of (\d+) blocks of \(([\d, ]+)\)", out)
                if m:
                    row["tiles_predicted"], row["grid_tiles"] = int(m[1]), int(m[2])
                    row["duplicated_tile_overhead"] = round(int(m[1]) / int(m[2]), 3)
                if blocks:
                    row["blocks"], row["block_zyx"] = int(blocks[2]), [int(v) for v in blocks[3].split(",")]
            if name == "components":
                row["components"] = int(out.split("COMPONENTS", 1)[1].split()[0])
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["256M", "512M", "1G", "2G"], help="voxel counts, e.g. 16M 1G")
    ap.add_argument("--patch", type=int, nargs=3, default=(64, 96, 96), metavar=("Z", "Y", "X"))
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (one thread each)")
    ap.add_argument("--block-mb", type=int, default=512, help="memory of one block task (predict --block-mb)")
    ap.add_argument("--memory-limit", default="3GB", help="dask memory limit per worker")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [
        run_size(
            parse_size(s),
            patch=tuple(args.patch),
            workers=args.workers,
            block_mb=args.block_mb,
            memory_limit=args.memory_limit,
        )
        for s in args.sizes
    ]
    result = {
        "benchmark": "large_volume",
        "workers": args.workers,
        "block_mb": args.block_mb,
        "patch_size_vox": list(args.patch),
        "tta": False,
        "step": 0.5,
        "results": rows,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
