"""What the integrity guarantees of issue 19 cost; prints JSON.

* chunk checksums: write and read MB/s of a (1, Z, Y, X) float32 CT-like volume (``--mb``, default
  96 MB) in the store's chunking (1, 64, 128, 128), Blosc/zstd alone vs Blosc/zstd + CRC32C, both
  with every chunk written (``write_empty_chunks``), and ``Store.verify_case`` (``info --verify``);
* the gzip stream check of ``.nii.gz`` inputs: ``check_gzip_stream`` vs SimpleITK's own read;
* the writer lock: one acquire + release.

Best of ``--repeat`` runs each (MB = 10**6 bytes of uncompressed voxels).

    python benchmarks/integrity.py            # ~96 MB, about a minute on 2 cores
    python benchmarks/integrity.py --mb 32    # quicker
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store, default_compressor
from voxflow.synthetic import large_volume_slab


def _best(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _volume(mb: float) -> np.ndarray:
    nz = max(8, round(mb * 1e6 / (4 * 512 * 512)))
    image, _label = large_volume_slab((nz, 512, 512), 0, nz, seed=0)
    return image.astype(np.float32)[None]


def bench_checksums(tmp: Path, vol: np.ndarray, repeat: int) -> dict[str, Any]:
    mb = vol.nbytes / 1e6
    out: dict[str, Any] = {"array_mb": round(mb, 1), "shape": list(vol.shape), "chunks": [1, 64, 128, 128]}
    variants = {"blosc": (default_compressor(),), "blosc+crc32c": (default_compressor(), Crc32cCodec())}

    def write(path: Path, codecs: tuple) -> None:
        if path.exists():
            shutil.rmtree(path)
        arr = zarr.create_array(
            store=str(path),
            shape=vol.shape,
            chunks=(1, 64, 128, 128),
            dtype=vol.dtype,
            compressors=codecs,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        arr[...] = vol

    def read(path: Path, codecs: tuple) -> None:
        zarr.open_array(str(path), mode="r")[...]

    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(repeat):  # interleaved, so that both variants see the same machine load
        for step in (write, read):
            for label, codecs in variants.items():
                t0 = time.perf_counter()
                step(tmp / f"{label}.zarr", codecs)
                times.setdefault((label, step.__name__), []).append(time.perf_counter() - t0)
    for label in variants:
        path = tmp / f"{label}.zarr"
        out[label] = {
            "write_mb_s": round(mb / min(times[label, "write"]), 1),
            "read_mb_s": round(mb / min(times[label, "read"]), 1),
            "on_disk_mb": round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6, 2),
        }
    base, crc = out["blosc"], out["blosc+crc32c"]
    out["crc32c_write_cost_pct"] = round(100 * (base["write_mb_s"] / crc["write_mb_s"] - 1), 1)
    out["crc32c_read_cost_pct"] = round(100 * (base["read_mb_s"] / crc["read_mb_s"] - 1), 1)
    st = Store.create(tmp / "store.zarr", DatasetMeta(channel_names=("ct",), labels={"background": 0}), overwrite=True)
    st.begin_case("a", geometry=Geometry(shape_zyx=vol.shape[1:], spacing_zyx=(1.0, 1.0, 1.0)))
    st.create_array("a", "image", shape=vol.shape, dtype=vol.dtype, chunks=(1, 64, 128, 128))[...] = vol
    st.mark_complete("a")
    t = _best(lambda: st.verify_case("a"), repeat)
    out["verify_mb_s"] = round(mb / t, 1)
    return out


def bench_gzip_check(tmp: Path, vol: np.ndarray, repeat: int) -> dict[str, Any]:
    import SimpleITK as sitk

    from voxflow.io._volume import check_gzip_stream

    path = tmp / "image.nii.gz"
    img = sitk.GetImageFromArray(vol[0].astype(np.int16))
    sitk.WriteImage(img, str(path), True)
    mb = vol[0].astype(np.int16).nbytes / 1e6
    t_check = _best(lambda: check_gzip_stream(path), repeat)
    t_read = _best(lambda: sitk.ReadImage(str(path)), repeat)
    return {
        "nii_gz_mb": round(mb, 1),
        "compressed_mb": round(path.stat().st_size / 1e6, 1),
        "check_mb_s": round(mb / t_check, 1),
        "sitk_read_mb_s": round(mb / t_read, 1),
        "check_cost_pct_of_read": round(100 * t_check / t_read, 1),
    }


def bench_lock(tmp: Path) -> dict[str, Any]:
    from voxflow._lock import dir_lock_file, exclusive_lock

    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        with exclusive_lock(dir_lock_file(tmp), command="bench"):
            pass
    return {"acquire_release_ms": round(1e3 * (time.perf_counter() - t0) / n, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=96.0, help="uncompressed float32 array size in MB")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="voxflow-integrity-") as d:
        tmp = Path(d)
        vol = _volume(args.mb)
        result = {
            "checksums": bench_checksums(tmp, vol, args.repeat),
            "gzip_check": bench_gzip_check(tmp, vol, args.repeat),
            "lock": bench_lock(tmp),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
