from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from voxflow.testing import run_with_memory_cap


def write_random_mask(path: Path, shape: tuple[int, int, int], chunks: tuple[int, int, int]) -> None:
    arr = zarr.create_array(store=str(path), shape=shape, chunks=chunks, dtype=np.uint8, fill_value=0)
    for z in range(0, shape[0], chunks[0]):
        rng = np.random.default_rng(z)
        arr[z : z + chunks[0]] = rng.random((min(chunks[0], shape[0] - z), *shape[1:]), dtype=np.float32) < 0.3


@pytest.mark.slow
def test_chunked_components_and_ops_use_a_fraction_of_scipys_memory(tmp_path: Path) -> None:
    """67 M voxels: scipy holds the mask and int32 labels (~335 MB); the chunked path one block per thread."""
    shape, chunks = (256, 512, 512), (64, 128, 128)
    write_random_mask(tmp_path / "mask.zarr", shape, chunks)
    chunked = f"""
        import dask.array as da, numpy as np, zarr
        from voxflow.postprocess import fill_holes, keep_largest_component, label_components
        lab = da.from_zarr(zarr.open_array({str(tmp_path / "mask.zarr")!r}, mode="r"))
        labels, n = label_components(lab > 0)
        assert int(labels.max().compute()) == n
        out = fill_holes(keep_largest_component(lab, 1), 1)
        z = zarr.create_array(store={str(tmp_path / "out.zarr")!r}, shape=lab.shape, chunks=lab.chunksize,
                              dtype=np.uint8)
        da.store(out, z, lock=False)
        print(n)
    """
    whole = f"""
        import numpy as np, zarr, scipy.ndimage as ndi
        labels, n = ndi.label(zarr.open_array({str(tmp_path / "mask.zarr")!r}, mode="r")[...])
        print(n)
    """
    peak_chunked, n_chunked = run_with_memory_cap(textwrap.dedent(chunked))
    peak_scipy, n_scipy = run_with_memory_cap(textwrap.dedent(whole))
    assert n_chunked.strip() == n_scipy.strip()
    assert peak_chunked < 0.7 * peak_scipy, (peak_chunked, peak_scipy)
