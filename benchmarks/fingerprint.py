"""Benchmark `voxflow fingerprint` (and the planner) on a synthetic dataset.

Writes a synthetic nnU-Net dataset (:func:`voxflow.synthetic.make_dataset`), converts it to a store,
then fingerprints it in a fresh subprocess (so the peak RSS is its own) and plans it. Prints one
JSON object: wall seconds, peak RSS, voxels/s and MB/s (uncompressed voxel bytes) of the fingerprint,
and the planning time per preset.

    python benchmarks/fingerprint.py --quick
    python benchmarks/fingerprint.py --kind mr --n-cases 20 --shape 96,192,192 --scheduler local:2
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

from voxflow.io import convert
from voxflow.synthetic import make_dataset
from voxflow.testing import run_with_memory_cap


def _shape(text: str) -> tuple[int, int, int]:
    z, y, x = (int(v) for v in text.split(","))
    return z, y, x


def _fingerprint(store: Path, out: Path, scheduler: str, samples: int) -> tuple[float, int]:
    code = (
        "import time\nfrom voxflow.cluster import scheduler_context\n"
        "from voxflow.fingerprint import compute_fingerprint\n"
        f"with scheduler_context({scheduler!r}):\n"
        "    t = time.perf_counter()\n"
        f"    fp = compute_fingerprint({str(store)!r}, samples_per_case={samples}, progress=False)\n"
        "    print('SECONDS', time.perf_counter() - t)\n"
        f"fp.save({str(out)!r})\n"
    )
    peak, text = run_with_memory_cap(code, env={"OMP_NUM_THREADS": "1"})
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("SECONDS"))), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a few seconds)")
    ap.add_argument("--kind", default="ct", choices=["ct", "mr", "2d"])
    ap.add_argument("--n-cases", type=int, default=8)
    ap.add_argument("--shape", type=_shape, default=(64, 192, 192), help="Z,Y,X of each synthetic case")
    ap.add_argument("--chunks", type=_shape, default=(64, 128, 128))
    ap.add_argument("--samples-per-case", type=int, default=10_000)
    ap.add_argument("--scheduler", default="threads")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temporary folder, removed)")
    args = ap.parse_args()
    if args.quick:
        args.n_cases, args.shape = 4, (32, 96, 96)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="voxflow-bench-fp-"))
    try:
        raw = make_dataset(work / "raw", kind=args.kind, n_cases=args.n_cases, shape_zyx=args.shape)
        store = convert(raw, work / "ds.zarr", chunks_zyx=args.chunks, overwrite=True, progress=False)
        voxels = sum(int(np.prod(store.geometry(c).shape_zyx)) for c in store.case_ids())
        n_ch = len(store.meta.channel_names)
        itemsize = store.image(store.case_ids()[0]).dtype.itemsize
        seconds, peak = _fingerprint(store.path, work / "fingerprint.json", args.scheduler, args.samples_per_case)
        from voxflow.fingerprint import Fingerprint
        from voxflow.plan import plan_experiment

        fp = Fingerprint.load(work / "fingerprint.json")
        plan_s = {}
        for preset in ("default", "cpu"):
            t = time.perf_counter()
            plan = plan_experiment(fp, preset=preset)
            plan_s[preset] = {
                "seconds": round(time.perf_counter() - t, 3),
                "configurations": {
                    name: {"patch": list(c.patch_size_vox), "batch": c.batch_size}
                    for name, c in plan.configurations.items()
                },
            }
        result = {
            "cpu_count": os.cpu_count(),
            "scheduler": args.scheduler,
            "kind": args.kind,
            "n_cases": args.n_cases,
            "shape_zyx": list(args.shape),
            "chunks_zyx": list(args.chunks),
            "voxels": voxels,
            "fingerprint": {
                "seconds": round(seconds, 3),
                "voxels_per_s": float(f"{voxels / seconds:.3g}"),
                "MB_per_s": round(voxels * (n_ch * itemsize + 1) / 1e6 / seconds, 1),
                "peak_rss_MB": round(peak / 1e6, 1),
                "dataset_voxel_MB": round(voxels * (n_ch * itemsize + 1) / 1e6, 1),
            },
            "plan": plan_s,
        }
        print(json.dumps(result, indent=1))
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
