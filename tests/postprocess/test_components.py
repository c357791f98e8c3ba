from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voxflow.errors import VoxflowError
from voxflow.postprocess import component_sizes, connectivity_structure, label_components, select_components
from voxflow.postprocess._components import prepare_filter
from voxflow.testing import raise_if_computes


def assert_same_partition(ours: np.ndarray, ref: np.ndarray) -> None:
    """Equal up to a permutation of labels: a bijection between nonzero labels."""
    np.testing.assert_array_equal(ours > 0, ref > 0)
    fg = ref > 0
    pairs = np.unique(np.stack([ours[fg], ref[fg]]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


def check(x: np.ndarray, chunks: tuple[int, ...], connectivity: int) -> None:
    structure = connectivity_structure(x.ndim, connectivity)
    ref, n_ref = ndi.label(x, structure)
    lab, n = label_components(da.from_array(x, chunks=chunks), connectivity=connectivity)
    out = lab.compute()
    assert n == n_ref
    assert out.max() == n
    np.testing.assert_array_equal(np.unique(out), np.arange(n + 1) if (out == 0).any() else np.arange(1, n + 1))
    assert_same_partition(out, ref)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("density", [0.25, 0.5, 0.7])
def test_random_3d_matches_scipy(connectivity: int, density: float, rng: np.random.Generator) -> None:
    check(rng.random((19, 23, 17)) < density, (7, 6, 5), connectivity)


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("chunks", [(5, 7), (1, 40), (3, 3)])
def test_random_2d_matches_scipy(connectivity: int, chunks: tuple[int, int], rng: np.random.Generator) -> None:
    check(rng.random((31, 40)) < 0.55, chunks, connectivity)


@pytest.mark.parametrize("connectivity", [1, 3])
def test_snake_across_many_chunk_borders_is_one_component(connectivity: int) -> None:
    x = np.zeros((9, 21, 20), bool)
    # a serpentine in each even z plane, planes joined at alternating corners
    for z in range(0, 9, 2):
        for i, y in enumerate(range(0, 21, 2)):
            x[z, y, :] = True
            if y + 2 < 21:
                x[z, y : y + 3, 19 if i % 2 == 0 else 0] = True
        if z + 2 < 9:
            x[z : z + 3, 20 if (z // 2) % 2 == 0 else 0, 19 if (z // 2) % 2 == 0 else 0] = True
    ref, n_ref = ndi.label(x, connectivity_structure(3, connectivity))
    assert n_ref == 1
    check(x, (2, 3, 2), connectivity)


def test_diagonal_chain_through_block_corners() -> None:
    x = np.zeros((8, 8, 8), bool)
    idx = np.arange(8)
    x[idx, idx, idx] = True  # only corner-connected: 1 component at 26-, 8 at 6-connectivity
    check(x, (1, 1, 1), 3)
    check(x, (3, 3, 3), 1)
    lab, n = label_components(da.from_array(x, chunks=2), connectivity=26)
    assert n == 1
    lab, n = label_components(da.from_array(x, chunks=2), connectivity=18)
    assert n == 8


def test_many_small_components(rng: np.random.Generator) -> None:
    x = np.zeros((20, 20, 20), bool)
    x[::2, ::2, ::2] = True  # 1000 isolated voxels under every connectivity
    for c in (1, 2, 3):
        check(x, (3, 4, 5), c)
    checker = (np.indices((10, 12, 14)).sum(0) % 2).astype(bool)
    check(checker, (3, 5, 4), 1)  # every voxel its own component
    check(checker, (3, 5, 4), 2)  # edge-connected: a few large ones


def test_empty_and_full() -> None:
    lab, n = label_components(da.zeros((5, 6, 7), dtype=bool, chunks=3))
    assert n == 0
    assert int(lab.max().compute()) == 0
    lab, n = label_components(da.ones((5, 6, 7), dtype=bool, chunks=3))
    assert n == 1
    assert (lab.compute() == 1).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(1, 12), st.integers(1, 12), st.integers(1, 12)),
    chunk=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6)),
    density=st.floats(0.05, 0.95),
    connectivity=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_property_matches_scipy(
    shape: tuple[int, int, int], chunk: tuple[int, int, int], density: float, connectivity: int, seed: int
) -> None:
    x = np.random.default_rng(seed).random(shape) < density
    check(x, chunk, connectivity)


def test_component_sizes_in_voxels_and_mm3(rng: np.random.Generator) -> None:
    x = rng.random((15, 16, 17)) < 0.4
    ref, _ = ndi.label(x)
    sizes, mm3 = component_sizes(da.from_array(x, chunks=(4, 5, 6)), spacing=(2.0, 0.5, 0.75))
    np.testing.assert_array_equal(np.sort(sizes[1:]), np.sort(np.bincount(ref.ravel())[1:]))
    assert mm3 is not None
    np.testing.assert_allclose(mm3, sizes * 0.75)
    # sizes are indexed by the labels label_components returns
    lab, _ = label_components(da.from_array(x, chunks=(4, 5, 6)))
    np.testing.assert_array_equal(np.bincount(lab.compute().ravel())[1:], sizes[1:])


def _keep_odd(tables):  # keep components with an odd final label
    return np.arange(tables.n + 1) % 2 == 1


def test_select_components_builds_lazily_and_matches_eager(rng: np.random.Generator) -> None:
    x = rng.random((13, 14, 15)) < 0.45
    with raise_if_computes():
        prepare_filter(da.from_array(x, chunks=(4, 5, 6)), lambda m: m, _keep_odd, lambda s, m, k: k)
    out = select_components(da.from_array(x, chunks=(4, 5, 6)), _keep_odd)
    lab, _ = label_components(da.from_array(x, chunks=(4, 5, 6)))
    labels = lab.compute()
    np.testing.assert_array_equal(out.compute(), (labels % 2 == 1))


def test_bad_connectivity_names_the_choices() -> None:
    with pytest.raises(VoxflowError, match=r"connectivity must be one of \[1, 2, 3, 6, 18, 26\]"):
        label_components(da.zeros((3, 3, 3), chunks=2), connectivity=5)


def test_threads_and_sync_schedulers_agree(rng: np.random.Generator) -> None:
    x = da.from_array(rng.random((12, 13, 14)) < 0.5, chunks=5)
    with dask.config.set(scheduler="sync"):
        a, na = label_components(x)
        a = a.compute()
    b, nb = label_components(x)
    assert na == nb
    assert_same_partition(a, b.compute())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.tuples(st.integers(1, 20), st.integers(1, 20)),
    chunk=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    density=st.floats(0.05, 0.95),
    connectivity=st.sampled_from([1, 2, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_property_2d_matches_scipy(
    shape: tuple[int, int], chunk: tuple[int, int], density: float, connectivity: int, seed: int
) -> None:
    x = np.random.default_rng(seed).random(shape) < density
    check(x, chunk, connectivity)


def _organ_mask(rng: np.random.Generator) -> np.ndarray:
    """A segmentation-like mask: one large ball across many blocks and specks."""
    z, y, x = np.indices((24, 30, 36))
    ball = (z - 12) ** 2 + (y - 15) ** 2 + (x - 16) ** 2 < 9**2
    specks = np.zeros_like(ball)
    for p in rng.integers((0, 0, 22), (24, 30, 36), size=(16, 3)):
        specks[tuple(p)] = True
    return ball | specks


def test_blocks_the_tables_settle_are_not_labelled_again(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pass 3 labels only blocks with several components (selection: several, some kept and some not):
    empty and one-component blocks, and blocks kept or dropped whole, are answered from the tables.
    The results still equal scipy's (labels up to a permutation; keep-largest exactly)."""
    import voxflow.postprocess._components as comp

    x, edge = _organ_mask(rng), 6
    blocks = [tuple(slice(o * edge, (o + 1) * edge) for o in c) for c in np.ndindex(4, 5, 6)]
    calls: list[int] = []
    real = comp._label_block
    monkeypatch.setattr(comp, "_label_block", lambda b, s: (calls.append(b.size), real(b, s))[1])

    check(x, (edge,) * 3, 1)
    several = sum(ndi.label(x[b])[1] > 1 for b in blocks)
    assert 1 < several < len(blocks) // 4
    assert len(calls) == len(blocks) + several  # pass 1: every block; pass 3: those with several

    calls.clear()
    ref, _ = ndi.label(x)
    largest = ref == np.argmax(np.bincount(ref.ravel())[1:]) + 1
    keep_big = lambda t: np.arange(t.n + 1) == np.argmax(t.sizes_vox[1:]) + 1  # noqa: E731
    out = select_components(da.from_array(x, chunks=edge), keep_big).compute()
    np.testing.assert_array_equal(out, largest)
    mixed = sum(largest[b].any() and (x[b] & ~largest[b]).any() for b in blocks)  # the ball and a speck
    assert len(calls) == len(blocks) + mixed
    assert mixed > 0


@pytest.mark.parametrize("top", [50, 2**40])
def test_unique_pairs_equals_numpy(top: int, rng: np.random.Generator) -> None:
    """The pair de-duplication of the merge step equals ``np.unique(axis=0)``, runs and large labels
    (past the packed int64 key) included."""
    from voxflow.postprocess._components import _unique_pairs

    a = np.repeat(rng.integers(1, top, 300), rng.integers(1, 5, 300))
    b = rng.permutation(a)
    b[:40] = a[:40]
    np.testing.assert_array_equal(_unique_pairs(a, b), np.unique(np.stack([a, b], axis=1), axis=0))
    np.testing.assert_array_equal(_unique_pairs(a[:1], b[:1]), [[a[0], b[0]]])
