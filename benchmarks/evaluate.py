"""Benchmark `voxflow evaluate`: metrics of synthetic predictions against references.

Writes pairs of label volumes (reference spheres and the same spheres shifted by a few voxels) into a
prediction and a reference store, then evaluates them in a fresh subprocess and prints JSON: wall s,
voxels/s and peak RSS, with and without surface metrics (HD95, ASSD, NSD).

    python benchmarks/evaluate.py --quick
    python benchmarks/evaluate.py --n-cases 8 --shape 128 256 256
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store
from voxflow.testing import run_with_memory_cap

META = dict(channel_names=("CT",), labels={"background": 0, "organ": 1, "lesion": 2})


def _spheres(shape: tuple[int, int, int], shift: int) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    c = [s / 2 for s in shape]
    r = min(shape) / 3
    d = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2] - shift) ** 2
    out = np.zeros(shape, np.uint8)
    out[d < r**2] = 1
    out[d < (r / 3) ** 2] = 2
    return out


def _write(path: Path, kind: str, n: int, shape: tuple[int, int, int], shift: int) -> None:
    store = Store.create(path, DatasetMeta(**META, kind=kind))
    geom = Geometry(shape_zyx=shape, spacing_zyx=(2.0, 0.8, 0.8))
    for i in range(n):
        cid = f"case_{i:03d}"
        store.begin_case(cid, geometry=geom)
        store.create_array(cid, "label", shape=shape, dtype=np.uint8, chunks=(64, 128, 128))[...] = _spheres(
            shape, shift
        )
        store.mark_complete(cid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 cases of 48x96x96")
    ap.add_argument("--n-cases", type=int, default=6)
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 192, 192))
    args = ap.parse_args()
    if args.quick:
        args.n_cases, args.shape = 4, (48, 96, 96)
    shape = tuple(args.shape)
    work = Path(tempfile.mkdtemp(prefix="voxflow-bench-eval-"))
    try:
        _write(work / "pred.zarr", "prediction", args.n_cases, shape, shift=3)
        _write(work / "ref.zarr", "dataset", args.n_cases, shape, shift=0)
        voxels = args.n_cases * int(np.prod(shape))
        result: dict = {"n_cases": args.n_cases, "shape_zyx": list(shape), "voxels": voxels}
        for surface in (False, True):
            code = (
                "import time\nfrom voxflow.evaluate import evaluate\nt = time.perf_counter()\n"
                f"s = evaluate({str(work / 'pred.zarr')!r}, {str(work / 'ref.zarr')!r}, surface={surface})\n"
                "print('SECONDS', time.perf_counter() - t)\nprint('DICE', s.dice)\n"
            )
            peak, text = run_with_memory_cap(code)
            vals = dict(line.split()[:2] for line in text.splitlines() if line.startswith(("SECONDS", "DICE")))
            sec = float(vals["SECONDS"])
            result["surface" if surface else "overlap_only"] = {
                "seconds": round(sec, 3),
                "voxels_per_s": float(f"{voxels / sec:.3g}"),
                "peak_rss_MB": round(peak / 1e6, 1),
                "foreground_dice": round(float(vals["DICE"]), 4),
            }
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
