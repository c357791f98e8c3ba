"""nnU-Net cascades: the previous stage's one-hot channels (vs an eager oracle and vs nnU-Net's own
resampling), the translated cascade spec, loading the lowres folder beside a cascade folder and its
errors. Tests needing nnunetv2 / dynamic-network-architectures are marked ``nnunet``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest

from voxflow.nnunet import (
    NnunetModelError,
    foreground_labels,
    previous_stage_onehot,
    translate_configuration,
)
from voxflow.preprocess import zoom_reference
from voxflow.testing import raise_if_computes, write_nnunet_model_folder

DATASET = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1, "lesion": 2},
    "numTraining": 2,
    "file_ending": ".nii.gz",
}


def plans() -> dict[str, Any]:
    """The hand-written nnU-Net plans of ``test_nnunet_translate.py`` (3d_fullres, 3d_lowres, 3d_cascade_fullres)."""
    from voxflow.testing import import_path

    mod = import_path(Path(__file__).with_name("test_nnunet_translate.py"), "nnunet_translate_tests")
    return dict(mod._plans())


def _resize_segmentation(seg: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """nnU-Net's (batchgenerators') ``resize_segmentation``, eagerly in float64: the argmax of the
    zoomed indicators of the present labels; an exact tie goes to the nearest-neighbour label when
    it is one of the tied ones."""
    if seg.shape == shape:
        return seg
    near = zoom_reference(seg.astype(np.float64), shape, order=0)
    if order == 0:
        return near.astype(seg.dtype)
    labels = np.unique(seg)
    scores = np.stack([zoom_reference((seg == c).astype(np.float64), shape, order=order) for c in labels])
    win = np.argmax(scores, axis=0)
    nn = np.searchsorted(labels, near)
    s_nn = np.take_along_axis(scores, nn[None], axis=0)[0]
    win = np.where((s_nn == scores.max(axis=0)) & (s_nn > 0), nn, win)
    return labels[win]


def _along(seg: np.ndarray, shape: tuple[int, ...], order_z: int) -> np.ndarray:
    """nnU-Net's separate-axis pass for segmentations: nearest, or per label ``> 0.5``, larger labels last."""
    if order_z == 0:
        return zoom_reference(seg.astype(np.float64), shape, order=0).astype(seg.dtype)
    out = np.zeros(shape, dtype=seg.dtype)
    for c in np.unique(seg):
        out[zoom_reference((seg == c).astype(np.float64), shape, order=order_z) > 0.5] = c
    return out


def _oracle(
    label: np.ndarray,
    nonzero: np.ndarray,
    bbox: tuple[tuple[int, int], ...],
    shape: tuple[int, int, int],
    labels: list[int],
    *,
    sep: int | None,
    order_z: int,
) -> np.ndarray:
    box = tuple(slice(lo, hi) for lo, hi in bbox)
    seg = label[box].astype(np.int16)
    seg[(seg == 0) & ~nonzero[box]] = -1
    plane = list(shape)
    if sep is not None:
        plane[sep] = seg.shape[sep]
    seg = _resize_segmentation(seg, tuple(plane), 1)
    if sep is not None and seg.shape != shape:
        seg = _along(seg, shape, order_z)
    return np.stack([seg == v for v in labels]).astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "sep", "order_z", "chunks"),
    [
        ((17, 30, 26), None, 0, (7, 6, 5)),  # downsample z, upsample y and x, all order 1
        ((9, 40, 13), 0, 0, (5, 9, 7)),  # separate z: in-plane order 1, then nearest along z
        ((31, 20, 22), 2, 1, (8, 11, 6)),  # separate x with order 1 along it (per label, > 0.5)
        ((14, 22, 18), None, 0, (14, 22, 18)),  # the crop's own shape: no resampling
    ],
)
def test_previous_stage_onehot_matches_nnunet_resampling(
    shape: tuple[int, int, int], sep: int | None, order_z: int, chunks: tuple[int, int, int], rng: np.random.Generator
) -> None:
    from scipy import ndimage as ndi

    noise = ndi.gaussian_filter(rng.normal(size=(18, 26, 22)), 2.0)  # blobby labels 0, 1, 2
    label = np.digitize(noise, np.quantile(noise, [0.5, 0.8])).astype(np.uint8)
    nonzero = np.ones(label.shape, dtype=bool)
    nonzero[:, :8] = False  # background there is nnU-Net's -1 (outside the nonzero mask)
    bbox = ((2, 16), (1, 23), (3, 21))
    with raise_if_computes():
        got = previous_stage_onehot(
            da.from_array(label, chunks=(7, 9, 8)),
            bbox,
            shape,
            labels=[1, 2],
            nonzero=da.from_array(nonzero, chunks=(5, 6, 7)),
            order=1,
            separate_axis=sep,
            order_z=order_z,
            out_chunks=chunks,
        )
    assert got.dtype == np.float32
    assert got.chunks[1][0] == chunks[0]
    ref = _oracle(label, nonzero, bbox, shape, [1, 2], sep=sep, order_z=order_z)
    np.testing.assert_array_equal(got.compute(), ref)
    assert ref[0].any()
    assert ref[1].any()


def test_cascade_spec_has_the_previous_stage_channels() -> None:
    spec = translate_configuration(plans(), DATASET, "3d_cascade_fullres")
    assert spec.previous_stage == "3d_lowres"
    assert spec.previous_labels == (1, 2)
    assert (spec.num_input_channels, spec.network_input_channels) == (1, 3)
    assert spec.configuration.spacing_zyx == (2.5, 0.8, 0.7)  # inherits 3d_fullres
    low = translate_configuration(plans(), DATASET, "3d_lowres")
    assert low.previous_stage is None
    assert low.network_input_channels == 1


def test_foreground_labels_of_regions_are_label_values() -> None:
    """nnU-Net gives a cascade one channel per foreground *label value*, also for region datasets."""
    regions = {"labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": [3], "ignore": 4}}
    assert foreground_labels(regions) == (1, 2, 3)
    assert foreground_labels(DATASET) == (1, 2)


def test_cascade_config_errors_are_named() -> None:
    p = plans()
    p["configurations"]["3d_cascade_fullres"]["previous_stage"] = "3d_lowres_typo"
    with pytest.raises(NnunetModelError, match="previous_stage of configuration '3d_cascade_fullres'"):
        translate_configuration(p, DATASET, "3d_cascade_fullres")
    with pytest.raises(NnunetModelError, match="needs foreground labels"):
        translate_configuration(plans(), {**DATASET, "labels": {"background": 0}}, "3d_cascade_fullres")


# ---- with nnU-Net itself / its network package -------------------------------------------------------------------


@pytest.mark.nnunet
@pytest.mark.parametrize(
    ("spacing", "target"), [((1.0, 1.0, 1.0), (1.3, 0.7, 0.9)), ((0.7, 0.8, 4.0), (1.0, 1.0, 2.2))]
)
def test_onehot_equals_nnunet_preprocessor(
    spacing: tuple[float, ...], target: tuple[float, ...], rng: np.random.Generator
) -> None:
    """The channels equal nnU-Net's own ``resample_data_or_seg_to_shape(is_seg=True)`` and
    ``convert_labelmap_to_one_hot`` (after its crop, with the -1 it writes outside the nonzero mask)."""
    pytest.importorskip("nnunetv2")
    from nnunetv2.preprocessing.resampling.default_resampling import (
        compute_new_shape,
        resample_data_or_seg_to_shape,
    )
    from nnunetv2.utilities.label_handling.label_handling import convert_labelmap_to_one_hot
    from scipy import ndimage as ndi

    from voxflow.nnunet import separate_z_axis

    noise = ndi.gaussian_filter(rng.normal(size=(20, 27, 23)), 1.5)
    label = np.digitize(noise, np.quantile(noise, [0.5, 0.8])).astype(np.uint8)
    bbox = ((1, 19), (2, 27), (0, 21))
    nonzero = np.ones(label.shape, dtype=bool)
    nonzero[:4] = False
    seg = label[tuple(slice(lo, hi) for lo, hi in bbox)].astype(np.int8)[None]
    seg[0, :3][seg[0, :3] == 0] = -1  # nnU-Net's crop_to_nonzero marks background outside the mask -1
    shape = tuple(int(s) for s in compute_new_shape(seg.shape[1:], spacing, target))
    ref_seg = resample_data_or_seg_to_shape(
        seg, shape, spacing, target, is_seg=True, order=1, order_z=0, force_separate_z=None
    )
    ref = convert_labelmap_to_one_hot(ref_seg[0], [1, 2], np.float32)
    sep = separate_z_axis(spacing, target)
    got = previous_stage_onehot(
        da.from_array(label, chunks=(6, 8, 7)),
        bbox,
        shape,
        labels=[1, 2],
        order=1,
        nonzero=da.from_array(nonzero),
        separate_axis=sep,
        order_z=0,
        out_chunks=(5, 9, 8),
    ).compute()
    assert got.shape == ref.shape
    # nnU-Net decides exact ties (true value 0.5 on both sides) on its float64 rounding (0.5000000000000002 vs
    # 0.4999999999999998); voxflow zooms axis by axis in float32: a few such voxels in 10^4 differ.
    assert float((got != ref).mean()) < 5e-4
    assert got.sum() > 1000


def _model_folder(
    root: Path,
    config: str,
    plans: dict[str, Any],
    dataset: dict[str, Any],
    folds: list[int],
    trainer: str = "nnUNetTrainer",
) -> Path:

    from voxflow.nnunet import build_network

    folder = root / f"{trainer}__nnUNetPlans__{config}"
    spec = translate_configuration(plans, dataset, config)
    weights = {int(fold): build_network(spec).state_dict() for fold in folds}
    write_nnunet_model_folder(folder, weights, plans=plans, dataset=dataset, configuration=config, trainer=trainer)
    return folder


@pytest.mark.nnunet
def test_cascade_loads_its_lowres_folder_and_names_what_is_wrong(tmp_path: Path) -> None:
    pytest.importorskip("dynamic_network_architectures")
    from voxflow.nnunet import NnunetPredictionModel, load_nnunet_model

    p = plans()
    casc = _model_folder(tmp_path, "3d_cascade_fullres", p, DATASET, [0, 1])
    with pytest.raises(NnunetModelError, match=r"previous stage '3d_lowres'.*nnUNetTrainer__nnUNetPlans__3d_lowres"):
        load_nnunet_model(casc)
    low = _model_folder(tmp_path, "3d_lowres", p, DATASET, [0])
    with pytest.raises(NnunetModelError, match=r"missing \['fold_1'\]"):
        load_nnunet_model(casc)
    model = load_nnunet_model(casc, folds=[0])
    assert model.previous is not None
    assert model.previous.folder == low
    assert model.previous.fold_names == ["fold_0"]
    assert next(model.networks[0].parameters()).shape[1] == 3  # image + 2 one-hot channels
    pm = NnunetPredictionModel(model)
    assert pm.previous_stage is not None
    assert pm.previous_stage.name == "3d_lowres"
    assert pm.previous_stage.previous_stage is None
    assert pm.n_channels == 1
    assert pm.record["nnunet_previous_model"] == str(low)
    # an explicit folder of the wrong configuration, another label set, a previous model for a single stage
    other = tmp_path / "elsewhere"
    full = _model_folder(other, "3d_fullres", p, DATASET, [0])
    with pytest.raises(NnunetModelError, match="must hold configuration '3d_lowres'.*holds '3d_fullres'"):
        load_nnunet_model(casc, folds=[0], previous_model=full)
    relabelled = {**DATASET, "labels": {"background": 0, "organ": 1, "tumour": 2}}
    low2 = _model_folder(other / "x", "3d_lowres", p, relabelled, [0])
    with pytest.raises(NnunetModelError, match="dataset.json labels of both stages"):
        load_nnunet_model(casc, folds=[0], previous_model=low2)
    with pytest.raises(NnunetModelError, match="for cascade models only"):
        load_nnunet_model(full, previous_model=low)


def test_cascade_prepare_appends_the_previous_stage_channels(tmp_path: Path, rng: np.random.Generator) -> None:
    """``prepare(previous={'3d_lowres': label})`` puts the one-hot channels after the image's, on its grid."""
    from scipy import ndimage as ndi

    from voxflow.geometry import Geometry
    from voxflow.nnunet import NnunetModel, NnunetPredictionModel, dataset_meta, separate_z_axis
    from voxflow.store import DatasetMeta, Store

    p = plans()
    shape, spacing = (10, 22, 18), (3.0, 1.0, 0.6)  # target (2.5, 0.8, 0.7): anisotropic, separate z
    image = rng.normal(100, 50, size=(1, *shape)).astype(np.float32)
    image[:, :, :3] = 0  # cropped away; background there is not -1 (outside the box)
    image[:, :4, 3:9, :5] = 0  # inside the box: nnU-Net's -1 region
    noise = ndi.gaussian_filter(rng.normal(size=shape), 1.5)
    label = np.digitize(noise, np.quantile(noise, [0.5, 0.8])).astype(np.uint8)
    store = Store.create(tmp_path / "in.zarr", DatasetMeta(channel_names=("CT",), labels=DATASET["labels"]))
    store.begin_case("c", geometry=Geometry(shape_zyx=shape, spacing_zyx=spacing))
    store.create_array("c", "image", shape=image.shape, dtype=image.dtype, chunks=(1, 7, 6, 5))[...] = image
    store.mark_complete("c")
    meta = dataset_meta(DATASET, p)
    cascade = NnunetPredictionModel(
        NnunetModel(
            tmp_path, translate_configuration(p, DATASET, "3d_cascade_fullres"), meta, [], ["fold_0"], "nnUNetTrainer"
        )
    )
    single = NnunetPredictionModel(
        NnunetModel(tmp_path, translate_configuration(p, DATASET, "3d_fullres"), meta, [], ["fold_0"], "nnUNetTrainer")
    )
    with pytest.raises(NnunetModelError, match="needs the '3d_lowres' segmentation of case 'c'"):
        cascade.prepare(store, "c", out_chunks=(8, 8, 8), previous={})
    got = cascade.prepare(store, "c", out_chunks=(8, 8, 8), previous={"3d_lowres": da.from_array(label, chunks=5)})
    ref_image = single.prepare(store, "c", out_chunks=(8, 8, 8), previous={}).image.compute()
    assert got.image.shape[0] == 3
    np.testing.assert_array_equal(got.image[:1].compute(), ref_image)
    bbox = ((0, 10), (3, 22), (0, 18))
    sep = separate_z_axis(spacing, (2.5, 0.8, 0.7))
    assert sep == 0
    ref = _oracle(label, image[0] != 0, bbox, ref_image.shape[1:], [1, 2], sep=sep, order_z=0)
    np.testing.assert_array_equal(got.image[1:].compute(), ref)


def test_cli_previous_model_needs_nnunet_model(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from voxflow.cli import main

    (tmp_path / "img").mkdir()
    (tmp_path / "low").mkdir()
    res = CliRunner().invoke(
        main,
        [
            "predict",
            "-i",
            str(tmp_path / "img"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(tmp_path / "low"),
            "--nnunet-previous-model",
            str(tmp_path / "low"),
        ],
    )
    assert res.exit_code != 0
    assert "--nnunet-previous-model goes with --nnunet-model" in res.output
