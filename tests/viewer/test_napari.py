"""A real viewer: napari with the ``napari-ome-zarr`` reader opens a dataset case and a predicted case.

Marked ``viewer`` (napari starts in ~20 s): `make test-viewer` runs it in its own venv under
``xvfb-run`` (napari draws with OpenGL, which Qt's offscreen platform does not provide).
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

pytestmark = pytest.mark.viewer
napari = pytest.importorskip("napari")
pytest.importorskip("napari_ome_zarr")

import voxflow._ngff as ngff  # noqa: E402


@pytest.fixture(scope="module")
def viewer() -> Any:
    if not os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM") != "offscreen":
        pytest.skip("no display: run under xvfb-run (make test-viewer does)")
    v = napari.Viewer(show=False)
    yield v
    v.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from voxflow.infer import predict
    from voxflow.io import convert
    from voxflow.plan.schema import (
        ChannelNormalization,
        Configuration,
        NetworkSpec,
        ResamplingSpec,
        TrainSpec,
    )
    from voxflow.synthetic import make_dataset

    mp = pytest.MonkeyPatch()
    mp.setattr(ngff, "MAX_LEVEL_VOXELS", 4000)  # a pyramid even for a small volume
    root = tmp_path_factory.mktemp("viewer")
    raw = make_dataset(root / "raw", kind="ct", n_cases=1, n_test_cases=1, shape_zyx=(12, 24, 20), seed=2)
    ds = convert(raw, root / "dataset.zarr", progress=False)
    spec = NetworkSpec(
        n_stages=1,
        features_per_stage=(4,),
        kernel_sizes=((3, 3, 3),),
        strides=((1, 1, 1),),
        n_blocks_per_stage=(1,),
        n_conv_per_stage_decoder=(),
    )
    cfg = Configuration(
        name="3d_fullres",
        spacing_zyx=(2.0, 1.0, 1.0),
        median_shape_vox=(8, 16, 16),
        patch_size_vox=(8, 16, 16),
        batch_size=2,
        normalization=(ChannelNormalization(scheme="zscore"),),
        resampling=ResamplingSpec(),
        network=spec,
        train=TrainSpec(mirror_axes=()),
    )
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, len(ds.meta.labels), 3, padding=1)
    ).eval()
    out = root / "test_predictions"
    pred = predict(raw / "imagesTs", out, models=[(net, cfg, ds.meta)], progress=False, export=False)
    mp.undo()
    return {"dataset": ds, "prediction": pred, "input": out / ".input" / "input.zarr"}


def _levels(layer: Any) -> list[Any]:
    return list(layer.data) if layer.multiscale else [layer.data]


def test_napari_opens_a_dataset_case_as_image_and_labels(viewer: Any, stores: dict[str, Any]) -> None:
    ds = stores["dataset"]
    cid = ds.case_ids()[0]
    geom = ds.geometry(cid)
    viewer.layers.clear()
    layers = viewer.open(str(ds.path / "cases" / cid), plugin="napari-ome-zarr")
    kinds = sorted(type(layer).__name__ for layer in layers)
    assert kinds == ["Image", "Labels"], kinds
    for layer in layers:
        levels = _levels(layer)
        assert tuple(levels[0].shape[-3:]) == geom.shape_zyx
        assert len(levels) >= 2  # the pyramid
        np.testing.assert_allclose(layer.scale[-3:], geom.spacing_zyx)
    labels = next(layer for layer in layers if type(layer).__name__ == "Labels")
    np.testing.assert_array_equal(np.asarray(_levels(labels)[0]), ds.label(cid).compute())


def test_the_demo_napari_command_opens_the_prediction_over_its_image(viewer: Any, stores: dict[str, Any]) -> None:
    from voxflow.pipeline._demo import napari_command

    pred = stores["prediction"]
    cid = pred.case_ids()[0]
    geom = pred.geometry(cid)
    argv = shlex.split(napari_command(pred, cid, image_store=stores["input"]))
    assert argv[:3] == ["napari", "--plugin", "napari-ome-zarr"]
    assert len(argv) == 5
    viewer.layers.clear()
    layers = viewer.open(argv[3:], plugin=argv[2])  # what `napari PATHS --plugin P` does
    kinds = [type(layer).__name__ for layer in layers]
    assert sorted(kinds) == ["Image", "Labels"], kinds  # the (unlabelled) input image, the prediction
    for layer in layers:
        assert tuple(_levels(layer)[0].shape[-3:]) == geom.shape_zyx
        np.testing.assert_allclose(layer.scale[-3:], geom.spacing_zyx)
    labels = next(layer for layer in layers if type(layer).__name__ == "Labels")
    assert len(_levels(labels)) >= 2
    np.testing.assert_array_equal(np.asarray(_levels(labels)[0]), pred.label(cid).compute())
