"""Benchmark `voxflow convert`: a synthetic nnU-Net dataset and one large streamed volume.

Prints one JSON object: per scenario cases/s, MB/s (uncompressed voxel bytes read), peak RSS and
store size. Each conversion runs in a fresh subprocess so its peak RSS is its own.

    python benchmarks/convert.py --quick
    python benchmarks/convert.py --n-cases 20 --shape 64,160,160 --large-shape 512,512,512 --max-memory 1GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from voxflow.synthetic import make_dataset, write_large_volume
from voxflow.testing import run_with_memory_cap


def _shape(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.split(","))
    return z, y, x


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _run(src: Path, dst: Path, *, scheduler: str, max_memory: int | None, chunks: str) -> tuple[float, int]:
    code = (
        "import time\nfrom voxflow.io import convert\nt = time.perf_counter()\n"
        f"convert({str(src)!r}, {str(dst)!r}, scheduler={scheduler!r}, max_memory_bytes={max_memory!r}, "
        f"chunks_zyx=({chunks}), overwrite=True, progress=False)\n"
        "print('SECONDS', time.perf_counter() - t)\n"
    )
    peak, out = run_with_memory_cap(code, env={"OMP_NUM_THREADS": "1"})
    seconds = float(next(line.split()[1] for line in out.splitlines() if line.startswith("SECONDS")))
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds)")
    ap.add_argument("--kind", default="ct", choices=["ct", "mr", "2d"])
    ap.add_argument("--n-cases", type=int, default=12)
    ap.add_argument("--shape", type=_shape, default=(48, 128, 128), help="Z,Y,X of each synthetic case")
    ap.add_argument("--large-shape", type=_shape, default=(192, 512, 512), help="Z,Y,X of the large volume")
    ap.add_argument("--max-memory", type=float, default=128.0, help="converter memory for the large volume, MB")
    ap.add_argument("--chunks", default="64,128,128")
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary folder, removed)")
    args = ap.parse_args()
    if args.quick:
        args.n_cases, args.shape, args.large_shape = 4, (24, 64, 64), (64, 256, 256)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="voxflow-bench-"))
    try:
        result: dict[str, object] = {
            "cpu_count": os.cpu_count(),
            "scheduler": args.scheduler,
            "chunks_zyx": args.chunks,
        }
        src = make_dataset(work / "raw", kind=args.kind, n_cases=args.n_cases, shape_zyx=args.shape)
        n_ch = 2 if args.kind == "mr" else 1
        itemsize = 4 if args.kind == "mr" else 2
        raw_bytes = args.n_cases * int(np.prod(args.shape)) * (n_ch * itemsize + 1)
        sec, peak = _run(src, work / "ds.zarr", scheduler=args.scheduler, max_memory=None, chunks=args.chunks)
        result["dataset"] = {
            "kind": args.kind,
            "n_cases": args.n_cases,
            "shape_zyx": list(args.shape),
            "seconds": round(sec, 3),
            "cases_per_s": round(args.n_cases / sec, 2),
            "MB_per_s": round(raw_bytes / 1e6 / sec, 1),
            "peak_rss_MB": round(peak / 1e6, 1),
            "store_MB": round(_du(work / "ds.zarr") / 1e6, 2),
            "voxel_MB": round(raw_bytes / 1e6, 1),
        }
        t = time.perf_counter()
        big = write_large_volume(work / "big.mha", args.large_shape, slab_z=16)
        gen = time.perf_counter() - t
        vol_bytes = int(np.prod(args.large_shape)) * 2
        max_mem = int(args.max_memory * 1e6)
        sec, peak = _run(big, work / "big.zarr", scheduler=args.scheduler, max_memory=max_mem, chunks=args.chunks)
        result["large_volume"] = {
            "shape_zyx": list(args.large_shape),
            "voxel_MB": round(vol_bytes / 1e6, 1),
            "max_memory_MB": args.max_memory,
            "seconds": round(sec, 3),
            "MB_per_s": round(vol_bytes / 1e6 / sec, 1),
            "peak_rss_MB": round(peak / 1e6, 1),
            "store_MB": round(_du(work / "big.zarr") / 1e6, 2),
            "generate_seconds": round(gen, 2),
        }
        print(json.dumps(result, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
