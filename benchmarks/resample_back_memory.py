"""Memory of resampling a cascade first stage's probabilities back to the original grid.

What the first stage of a cascade prediction does at the end (``tests/infer/test_cascade_memory.py``):
K float32 scores on the low-resolution grid (a Zarr array, chunked as prediction chunks them) are
resampled back at order 1 (:func:`voxflow.infer.undo_preprocessing`), turned into labels and written
to Zarr with the threaded scheduler. Two graphs, each in its own subprocess:

* ``per_axis``: one 1-D resampling pass per axis (y, x, then z), each an array of the graph (what
  ``resample_to_shape`` did for every order before);
* ``fused``: one task per output chunk reading its input footprint and applying the three 1-D
  passes itself (what it does now for orders 0 and 1).

Prints JSON: per graph, peak VmData (private writable memory: what RLIMIT_DATA, the cap of the
memory tests, limits) and peak VmRSS above the process's level before the compute (MiB), seconds,
and whether the labels of both graphs are identical.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import dask, dask.array as da, numpy as np, zarr
    from voxflow.infer import probabilities_to_label, release_large_allocations, undo_preprocessing
    from voxflow.infer._chunks import output_chunks
    from voxflow.preprocess import _resample as R

    mode, root, k = sys.argv[1], sys.argv[2], int(sys.argv[3])
    low, full = tuple(json.loads(sys.argv[4])), tuple(json.loads(sys.argv[5]))
    release_large_allocations()  # as predict() does
    if mode == "per_axis":
        def per_axis(x, out_shape, axes, target):
            for axis, order in axes:
                x = R._resample_axis(x, x.ndim - 3 + axis, out_shape[axis], order, target[axis])
            return x
        R._resample_axes = per_axis
    scores = zarr.open_array(root + "/scores.zarr", mode="r")
    out_chunks = output_chunks(full, k)
    lazy = da.from_zarr(scores, chunks=(k, *output_chunks(low, k)))
    back = undo_preprocessing(lazy, shape_after_crop_zyx=full, crop_bbox_zyx=[(0, n) for n in full],
                              original_shape_zyx=full, out_chunks_zyx=out_chunks)
    target = zarr.create_array(root + f"/labels_{mode}.zarr", shape=full, chunks=out_chunks, dtype=np.uint8)
    def status():
        with open("/proc/self/status") as f:
            return {a: int(v.split()[0]) for a, _, v in (line.partition(":") for line in f) if a in ("VmData", "VmRSS")}
    base, peak = status(), status()
    def sample():
        while True:
            for a, v in status().items():
                peak[a] = max(peak[a], v)
            time.sleep(0.01)
    threading.Thread(target=sample, daemon=True).start()
    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads"):
        da.store(probabilities_to_label(back), target, lock=False)
    seconds = time.perf_counter() - t0
    print(json.dumps({"vmdata_mib": round((peak["VmData"] - base["VmData"]) / 1024),
                      "vmrss_mib": round((peak["VmRSS"] - base["VmRSS"]) / 1024), "seconds": round(seconds, 1)}))
""")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--low", type=int, nargs=3, default=(64, 256, 256), help="low-resolution grid (z y x)")
    ap.add_argument("--full", type=int, nargs=3, default=(128, 512, 512), help="original grid (z y x)")
    ap.add_argument("--classes", type=int, default=8)
    a = ap.parse_args()
    import numpy as np
    import zarr

    from voxflow.infer._chunks import output_chunks

    k, low = a.classes, tuple(a.low)
    result: dict[str, object] = {"low": low, "full": tuple(a.full), "classes": k}
    with tempfile.TemporaryDirectory() as tmp:
        z = zarr.create_array(
            f"{tmp}/scores.zarr",
            shape=(k, *low),
            chunks=(k, *output_chunks(low, k)),
            dtype=np.float32,
            compressors=None,
        )
        for z0 in range(0, low[0], 8):
            z[:, z0 : z0 + 8] = np.random.default_rng(z0).random((k, min(8, low[0] - z0), *low[1:]), dtype=np.float32)
        for mode in ("per_axis", "fused"):
            args = [mode, tmp, str(k), json.dumps(list(low)), json.dumps(list(a.full))]
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, encoding="utf-8",
                errors="replace", check=True,
            )  # fmt: skip
            result[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        labels = [zarr.open_array(f"{tmp}/labels_{m}.zarr", mode="r")[...] for m in ("per_axis", "fused")]
        result["identical_labels"] = bool(np.array_equal(*labels))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
