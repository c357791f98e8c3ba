"""The case pipeline's seams: any PredictionModel plugs in; options are one typed value."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest

from voxflow.infer import CaseInput, PredictionModel, PredictOptions, TilePredictor, predict
from voxflow.store import DatasetMeta, Store


class _ThresholdModel:
    """A model without a network: class 1 where the raw image is positive (probabilities one-hot)."""

    name, names, n_outputs, activation, regions_class_order = "threshold", ["threshold/rule"], 2, "softmax", None
    patch_size_vox, n_channels, record = (4, 8, 8), 1, {"rule": "image > 0"}

    def __init__(self, dataset: DatasetMeta):
        self.dataset = dataset
        self.previous_seen: list[Mapping[str, Any]] = []

    def batch_size(self, requested: int | None) -> int:
        return requested or 3

    def importance_map(self) -> np.ndarray | None:
        return None

    def check_input(self, store: Store) -> None:
        pass

    def prepare(
        self, store: Store, case_id: str, *, out_chunks: Sequence[int], previous: Mapping[str, da.Array]
    ) -> CaseInput:
        self.previous_seen.append(previous)
        image = store.image(case_id).astype(np.float32)
        return CaseInput(image, store.geometry(case_id), lambda scores, chunks: scores.rechunk((2, *chunks)))

    def tile_predictor(self, *, device: str, tta: bool, amp: bool) -> Any:
        def scores(tiles: np.ndarray) -> np.ndarray:
            fg = (tiles[:, :1] > 0).astype(np.float32)
            return np.concatenate([1 - fg, fg], axis=1)

        return scores


def test_any_prediction_model_plugs_into_predict(tmp_path: Path, write_store) -> None:  # noqa: ANN001
    meta = DatasetMeta(channel_names=("MR",), labels={"background": 0, "fg": 1})
    src = write_store(tmp_path / "ds.zarr", meta, [(9, 13, 11)])
    model = _ThresholdModel(meta)
    model_protocol: PredictionModel = model  # what the type checker checks
    out = predict(src, tmp_path / "out", models=[model_protocol], save_probabilities=True, progress=False, export=False)
    cid = src.case_ids()[0]
    np.testing.assert_array_equal(out.label(cid).compute(), (src.image(cid).compute()[0] > 0).astype(np.uint8))
    assert out.case_attrs(cid)["rule"] == "image > 0"
    assert out.meta.extra["models"] == ["threshold/rule"]
    assert model.previous_seen == [{}]  # single stage: no earlier outputs


def test_predict_options_are_one_typed_value(
    tmp_path: Path,
    meta,
    make_config,
    conv_net,  # noqa: ANN001
    write_store,
) -> None:  # noqa: ANN001
    with pytest.raises(TypeError, match="unknown prediction option"):
        PredictOptions.build(stpe=0.5)
    opts = PredictOptions.build(PredictOptions(tta=False), device=["cpu", "cpu"])
    assert opts.devices() == ["cpu", "cpu"]
    assert not opts.tta
    assert PredictOptions(device="cuda:0, cuda:1").devices() == ["cuda:0", "cuda:1"]
    src = write_store(tmp_path / "ds.zarr", meta, [(5, 9, 30)])
    model = (conv_net(seed=1), make_config(), meta)
    a = predict(
        src,
        tmp_path / "a",
        models=[model],
        options=PredictOptions(tta=False, progress=False, export=False, save_probabilities=True),
    )
    b = predict(src, tmp_path / "b", models=[model], tta=False, progress=False, export=False, save_probabilities=True)
    np.testing.assert_array_equal(a.array("case_000", "probs").compute(), b.array("case_000", "probs").compute())


def test_logits_predictor_in_another_axis_order_averages_like_the_plain_one(conv_net) -> None:  # noqa: ANN001
    """axis_order permutes tiles for the network and back; with a network that is itself permuted the
    same way, the result is the plain predictor's (mirrorings included)."""
    import torch

    net = conv_net(seed=3)
    tiles = np.random.default_rng(0).normal(size=(2, 1, 4, 6, 8)).astype(np.float32)

    class Permuted(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x in (x, z, y) order
            return net(x.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)

    plain = TilePredictor(net, mirror_axes=(0, 2), activation=None)(tiles).numpy()
    permuted = TilePredictor(Permuted(), mirror_axes=(0, 2), activation=None, axis_order=(2, 0, 1))(tiles).numpy()
    np.testing.assert_allclose(permuted, plain, rtol=1e-5, atol=1e-6)


class _CountingThreshold(_ThresholdModel):
    """The threshold model, counting the tiles its predictor sees (to tell what a rerun predicts)."""

    def __init__(self, dataset: DatasetMeta, name: str = "threshold"):
        super().__init__(dataset)
        self.name, self.names, self.tiles_seen = name, [f"{name}/rule"], 0

    def tile_predictor(self, *, device: str, tta: bool, amp: bool) -> Any:
        plain = super().tile_predictor(device=device, tta=tta, amp=amp)

        def scores(tiles: np.ndarray) -> np.ndarray:
            self.tiles_seen += len(tiles)
            return plain(tiles)

        return scores


class _SecondStage(_CountingThreshold):
    """A cascade's second stage: class 1 where the first stage said 1 and the image is below 0.5, so the
    result needs both the image and the previous label (given as an extra channel)."""

    def __init__(self, dataset: DatasetMeta, first: _CountingThreshold):
        super().__init__(dataset, name="second")
        self.previous_stage = first

    def prepare(
        self, store: Store, case_id: str, *, out_chunks: Sequence[int], previous: Mapping[str, da.Array]
    ) -> CaseInput:
        self.previous_seen.append(previous)
        image = store.image(case_id).astype(np.float32)
        prev = previous["threshold"].astype(np.float32)[None].rechunk(image.chunks)
        return CaseInput(
            da.concatenate([image, prev]), store.geometry(case_id), lambda scores, chunks: scores.rechunk((2, *chunks))
        )

    def tile_predictor(self, *, device: str, tta: bool, amp: bool) -> Any:
        def scores(tiles: np.ndarray) -> np.ndarray:
            self.tiles_seen += len(tiles)
            fg = ((tiles[:, 1:2] > 0.5) & (tiles[:, :1] < 0.5)).astype(np.float32)
            return np.concatenate([1 - fg, fg], axis=1)

        return scores


def test_a_second_stage_gets_the_first_stages_labels_and_resumes_per_stage(tmp_path: Path, write_store) -> None:  # noqa: ANN001
    from voxflow.infer import STAGES_DIR, stage_chain

    meta = DatasetMeta(channel_names=("MR",), labels={"background": 0, "fg": 1})
    src = write_store(tmp_path / "ds.zarr", meta, [(9, 13, 11), (6, 10, 12)])
    first = _CountingThreshold(meta)
    second = _SecondStage(meta, first)
    assert stage_chain([second]) == [first]
    out = predict(src, tmp_path / "out", models=[second], progress=False, export=False)
    stage_store = Store.open(tmp_path / "out" / STAGES_DIR / "threshold.zarr")
    for cid in src.case_ids():
        image = src.image(cid).compute()[0]
        np.testing.assert_array_equal(stage_store.label(cid).compute(), (image > 0).astype(np.uint8))
        np.testing.assert_array_equal(out.label(cid).compute(), ((image > 0) & (image < 0.5)).astype(np.uint8))
    assert {tuple(p) for p in second.previous_seen} == {("threshold",)}
    seen = second.previous_seen[0]["threshold"]
    assert seen.dtype == np.uint8
    assert seen.shape == src.geometry(src.case_ids()[0]).shape_zyx
    assert out.meta.extra["stages"] == ["threshold"]

    # a run killed after the first stage of a case: only the second stage is predicted again
    out.delete_case(src.case_ids()[1])
    first.tiles_seen = second.tiles_seen = 0
    predict(src, tmp_path / "out", models=[second], progress=False, export=False)
    assert first.tiles_seen == 0
    assert second.tiles_seen > 0
    assert out.is_complete(src.case_ids()[1])
    # a lost first-stage case is predicted again, for that case only, and the result is unchanged
    stage_store.delete_case(src.case_ids()[0])
    out.delete_case(src.case_ids()[0])
    first.tiles_seen = 0
    again = predict(src, tmp_path / "out", models=[second], progress=False, export=False)
    assert 0 < first.tiles_seen
    image = src.image(src.case_ids()[0]).compute()[0]
    np.testing.assert_array_equal(
        again.label(src.case_ids()[0]).compute(), ((image > 0) & (image < 0.5)).astype(np.uint8)
    )
