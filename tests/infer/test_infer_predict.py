from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from torch import nn

from voxflow.cli import main
from voxflow.errors import IncompleteStoreError, LayoutError
from voxflow.geometry import Geometry
from voxflow.infer import TilePredictor, predict, sliding_window_predict_in_memory
from voxflow.preprocess import preprocess_case, zoom_reference
from voxflow.store import Store

SHAPES = [(11, 23, 17), (5, 9, 30)]


def _oracle(src: Store, cid: str, net: nn.Module, cfg) -> np.ndarray:  # noqa: ANN001
    """Eager pipeline: preprocess (computed), whole-array sliding window, zoom back, uncrop."""
    pc = preprocess_case(src.image(cid), src.geometry(cid), cfg)
    img = pc.image.compute()
    probs = sliding_window_predict_in_memory(img, TilePredictor(net), patch_size_vox=cfg.patch_size_vox, n_classes=3)
    back = np.stack([zoom_reference(p, pc.shape_after_crop_zyx, order=1) for p in probs])
    full = np.zeros((3, *pc.original_geometry.shape_zyx), np.float32)
    full[0] = 1.0
    full[(slice(None), *(slice(lo, hi) for lo, hi in pc.crop_bbox_zyx))] = back
    return full


def test_predict_matches_eager_pipeline_and_exports_geometry(
    tmp_path: Path,
    meta,
    make_config,
    conv_net,  # noqa: ANN001
    write_store,
) -> None:  # noqa: ANN001
    src = write_store(tmp_path / "ds.zarr", meta, SHAPES)
    cfg = make_config()
    net = conv_net(seed=4)
    out = predict(src, tmp_path / "out", models=[(net, cfg, meta)], tta=False, save_probabilities=True, progress=False)
    assert out.meta.kind == "prediction"
    assert out.case_ids() == src.case_ids()
    assert not (tmp_path / "out" / ".scratch").exists()
    for cid in src.case_ids():
        expected = _oracle(src, cid, net, cfg)
        probs = out.array(cid, "probs").compute()
        label = out.array(cid, "label").compute()
        assert probs.dtype == np.float16
        assert label.dtype == np.uint8
        np.testing.assert_allclose(probs.astype(np.float32), expected, atol=2e-3)
        top2 = np.sort(expected, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 1e-4
        np.testing.assert_array_equal(label[clear], expected.argmax(0)[clear])
        assert out.geometry(cid) == src.geometry(cid)
        img = sitk.ReadImage(str(tmp_path / "out" / f"{cid}.nii.gz"))
        src.geometry(cid).check_matches(Geometry.from_sitk(img), what="exported label", case=cid)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), label)


class _Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("a complete case must not be predicted again")


def test_predict_resumes_and_ensembles_folds(
    tmp_path: Path,
    meta,
    make_config,
    conv_net,  # noqa: ANN001
    write_store,
) -> None:  # noqa: ANN001
    src = write_store(tmp_path / "ds.zarr", meta, SHAPES[1:])
    cfg = make_config(mirror_axes=(1, 2))
    nets = [conv_net(seed=s) for s in (1, 2)]
    first = predict(
        src,
        tmp_path / "out",
        models=[(n, cfg, meta) for n in nets],
        save_probabilities=True,
        progress=False,
        export=False,
    )
    again = predict(
        src,
        tmp_path / "out",
        models=[(_Exploding(), cfg, meta), (_Exploding(), cfg, meta)],
        save_probabilities=True,
        progress=False,
        export=False,
    )
    assert again.case_ids() == first.case_ids() == ["case_000"]
    single = predict(
        src, tmp_path / "single", models=[(nets[0], cfg, meta)], save_probabilities=True, progress=False, export=False
    )
    a = first.array("case_000", "probs").compute().astype(np.float32)
    b = single.array("case_000", "probs").compute().astype(np.float32)
    assert np.abs(a - b).max() > 1e-3  # the second fold changed the result
    with pytest.raises(LayoutError, match="different metadata"):
        predict(src, tmp_path / "out", models=[(nets[0], cfg, meta)], step=0.7, progress=False)


def _save_fold(run_dir: Path, cfg, meta, seed: int) -> None:  # noqa: ANN001
    from voxflow.nets import build_network
    from voxflow.train.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    net = build_network(cfg.network, 1, 3)
    save_checkpoint(
        run_dir / "checkpoint_final.pt",
        {
            "network": net.state_dict(),
            "configuration": dataclasses.asdict(cfg),
            "dataset": meta.to_dict(),
            "in_channels": 1,
            "num_outputs": 3,
            "epoch": 1,
        },
    )


def test_cli_predict_nifti_folder_with_checkpoints(tmp_path: Path, meta, make_config) -> None:  # noqa: ANN001
    cfg = make_config(patch=(8, 16, 16))
    for fold in (0, 1):
        _save_fold(tmp_path / "runs" / cfg.name / f"fold_{fold}", cfg, meta, seed=fold)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    geoms = {}
    for i, shape in enumerate(SHAPES[1:]):
        img = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
        img.SetSpacing((0.9, 1.1, 1.7))
        img.SetOrigin((10.0, -5.0, 2.5))
        img.SetDirection((0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
        sitk.WriteImage(img, str(images / f"pat{i}_0000.nii.gz"))
        geoms[f"pat{i}"] = Geometry.from_sitk(img)
    out = tmp_path / "pred"
    res = CliRunner().invoke(
        main,
        [
            "predict",
            "-i",
            str(images),
            "-o",
            str(out),
            "-m",
            str(tmp_path / "runs" / cfg.name),
            "-f",
            "0",
            "1",
            "--no-tta",
        ],
    )
    assert res.exit_code == 0, res.output + repr(res.exception)
    store = Store.open(out / "prediction.zarr")
    assert store.meta.extra["models"] == ["3d_fullres/fold_0", "3d_fullres/fold_1"]
    for cid, geom in geoms.items():
        written = sitk.ReadImage(str(out / f"{cid}.nii.gz"))
        geom.check_matches(Geometry.from_sitk(written), what="exported label", case=cid)
        assert set(np.unique(sitk.GetArrayFromImage(written))) <= {0, 1, 2}
    bad = CliRunner().invoke(
        main, ["predict", "-i", str(images), "-o", str(out), "-m", str(tmp_path / "runs" / cfg.name), "-f", "7"]
    )
    assert bad.exit_code != 0
    assert "fold_7" in bad.output


def test_missing_checkpoint_is_a_clear_error(tmp_path: Path, meta, write_store) -> None:  # noqa: ANN001
    src = write_store(tmp_path / "ds.zarr", meta, SHAPES[1:])
    (tmp_path / "runs" / "3d_fullres" / "fold_0").mkdir(parents=True)
    with pytest.raises(IncompleteStoreError, match="checkpoint_final.pt must exist"):
        predict(src, tmp_path / "out", model_dir=tmp_path / "runs" / "3d_fullres", folds=[0], progress=False)


def test_configurations_are_ensembled_in_original_space(
    tmp_path: Path,
    meta,
    make_config,
    conv_net,  # noqa: ANN001
    write_store,
) -> None:  # noqa: ANN001
    src = write_store(tmp_path / "ds.zarr", meta, SHAPES[:1])
    full = make_config(name="3d_fullres", mirror_axes=())
    low = make_config(name="3d_lowres", spacing=(3.0, 2.0, 2.0), patch=(8, 8, 8), mirror_axes=())
    models = [(conv_net(seed=1), full, meta), (conv_net(seed=2), low, meta)]
    kw = {"save_probabilities": True, "progress": False, "export": False}
    both = predict(src, tmp_path / "both", models=models, **kw)
    singles = [predict(src, tmp_path / m[1].name, models=[m], **kw) for m in models]
    probs = [s.array("case_000", "probs").compute().astype(np.float32) for s in singles]
    np.testing.assert_allclose(
        both.array("case_000", "probs").compute().astype(np.float32), (probs[0] + probs[1]) / 2, atol=2e-3
    )
    assert both.meta.extra["configurations"] == ["3d_fullres", "3d_lowres"]


def test_preprocessed_store_input_equals_dataset_input(
    tmp_path: Path,
    meta,
    make_config,
    conv_net,  # noqa: ANN001
    write_store,
) -> None:  # noqa: ANN001
    from voxflow.plan.schema import Plan
    from voxflow.preprocess import run_preprocess

    src = write_store(tmp_path / "ds.zarr", meta, SHAPES[1:])
    cfg = make_config()
    plan = Plan(channel_names=("MR",), labels=meta.labels, configurations={cfg.name: cfg})
    pre = run_preprocess(src, plan, cfg.name, tmp_path / "pre.zarr", progress=False)
    kw = {"models": [(conv_net(seed=3), cfg, meta)], "save_probabilities": True, "progress": False, "export": False}
    a = predict(src, tmp_path / "a", **kw)
    b = predict(pre, tmp_path / "b", **kw)
    assert b.geometry("case_000") == src.geometry("case_000")
    np.testing.assert_array_equal(a.array("case_000", "probs").compute(), b.array("case_000", "probs").compute())
    wrong = make_config(name="2d_other")
    with pytest.raises(LayoutError, match="must match the model configuration"):
        predict(pre, tmp_path / "c", models=[(conv_net(), wrong, meta)], progress=False, export=False)


@pytest.mark.slow
def test_one_process_per_device_and_dask_cluster(tmp_path: Path, meta, make_config, write_store) -> None:  # noqa: ANN001
    """Cases split over two worker processes ("cpu,cpu" stands in for two GPUs) and a LocalCluster for
    the dask parts give the same result as one process on the threaded scheduler."""
    src = write_store(tmp_path / "ds.zarr", meta, [(6, 10, 12), (7, 9, 11), (5, 12, 10)])
    cfg = make_config()
    _save_fold(tmp_path / "runs" / cfg.name / "fold_0", cfg, meta, seed=0)
    kw = {"model_dir": tmp_path / "runs" / cfg.name, "save_probabilities": True, "progress": False, "export": False}
    ref = predict(src, tmp_path / "ref", **kw)
    multi = predict(src, tmp_path / "multi", device="cpu,cpu", **kw)
    cluster = predict(src, tmp_path / "cluster", scheduler="local:2", **kw)
    assert multi.case_ids() == cluster.case_ids() == ref.case_ids() == src.case_ids()
    for cid in src.case_ids():
        for other in (multi, cluster):
            np.testing.assert_array_equal(other.array(cid, "probs").compute(), ref.array(cid, "probs").compute())


def test_region_dataset_uses_sigmoid_and_regions_class_order(
    tmp_path: Path,
    make_config,
    conv_net,  # noqa: ANN001
    write_store,
) -> None:  # noqa: ANN001
    from voxflow.store import DatasetMeta

    regions = DatasetMeta(
        channel_names=("MR",), labels={"background": 0, "whole": [1, 2], "core": [2]}, regions_class_order=(1, 2)
    )
    src = write_store(tmp_path / "ds.zarr", regions, SHAPES[1:])
    out = predict(
        src,
        tmp_path / "out",
        models=[(conv_net(k=2, seed=6), make_config(), regions)],
        save_probabilities=True,
        progress=False,
        export=False,
    )
    probs = out.array("case_000", "probs").compute().astype(np.float32)
    label = out.array("case_000", "label").compute()
    assert probs.shape[0] == 2
    assert out.case_attrs("case_000")["activation"] == "sigmoid"
    expected = np.where(probs[1] > 0.5, 2, np.where(probs[0] > 0.5, 1, 0))
    clear = (np.abs(probs - 0.5) > 1e-2).all(0)
    np.testing.assert_array_equal(label[clear], expected[clear])
    assert not np.allclose(probs.sum(0), 1.0)  # independent sigmoids, not a softmax


def test_2d_configuration_predicts_slice_by_slice(tmp_path: Path, meta, write_store) -> None:  # noqa: ANN001
    from voxflow.plan.schema import (
        ChannelNormalization,
        Configuration,
        NetworkSpec,
        ResamplingSpec,
        TrainSpec,
    )

    spec = NetworkSpec(
        spatial_dims=2,
        n_stages=1,
        features_per_stage=(4,),
        kernel_sizes=((3, 3),),
        strides=((1, 1),),
        n_blocks_per_stage=(1,),
        n_conv_per_stage_decoder=(),
    )
    cfg = Configuration(
        name="2d",
        spacing_zyx=(1.5, 1.0, 1.0),
        median_shape_vox=(5, 9, 30),
        patch_size_vox=(1, 16, 16),
        batch_size=4,
        normalization=(ChannelNormalization(scheme="zscore"),),
        resampling=ResamplingSpec(),
        network=spec,
        train=TrainSpec(mirror_axes=(0, 1, 2)),
    )
    torch.manual_seed(0)
    net2d = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1)).eval()
    src = write_store(tmp_path / "ds.zarr", meta, SHAPES[1:])
    out = predict(
        src, tmp_path / "out", models=[(net2d, cfg, meta)], save_probabilities=True, progress=False, export=False
    )
    probs = out.array("case_000", "probs").compute().astype(np.float32)
    assert probs.shape == (3, *SHAPES[1])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=3e-3)


def test_model_postprocessing_is_applied_automatically(tmp_path: Path, meta, make_config, write_store) -> None:  # noqa: ANN001
    """postprocessing.json in the model dir is applied (label) and the raw argmax kept (label_raw)."""
    from scipy import ndimage as ndi

    from voxflow.postprocess import PostprocessingSpec

    cfg = make_config(patch=(8, 16, 16))
    _save_fold(tmp_path / "runs" / cfg.name / "fold_0", cfg, meta, seed=3)
    src = write_store(tmp_path / "src.zarr", meta, SHAPES[1:2])
    spec = PostprocessingSpec(operations=({"op": "keep_largest", "target": "foreground"},))
    spec.save(tmp_path / "runs" / cfg.name / "postprocessing.json")
    out = predict(src, tmp_path / "pred", model_dir=tmp_path / "runs" / cfg.name, tta=False, progress=False)
    cid = out.case_ids()[0]
    raw, label = out.array(cid, "label_raw").compute(), out.label(cid).compute()
    comps, n = ndi.label(raw > 0)
    assert n > 1, "the random network should give several components (else the test proves nothing)"
    sizes = ndi.sum(raw > 0, comps, range(1, n + 1))
    keep = comps == 1 + int(np.argmax(sizes))
    np.testing.assert_array_equal(label, np.where(keep, raw, 0))
    assert out.case_attrs(cid)["postprocessing"]["operations"][0]["op"] == "keep_largest"
    plain = predict(
        src, tmp_path / "plain", model_dir=tmp_path / "runs" / cfg.name, tta=False, progress=False, postprocessing=None
    )
    np.testing.assert_array_equal(plain.label(cid).compute(), raw)


def test_staging_graph_does_not_grow_with_small_chunks(
    tmp_path: Path,
    meta,
    make_config,
    conv_net,  # noqa: ANN001
    write_store,
    monkeypatch,
) -> None:  # noqa: ANN001
    """The per-case dask graphs must stay small: with half-patch chunks a 512 M-voxel case held ~10^5
    tasks (~150 MB of Python objects, the part of peak memory that grew with the volume). The case
    here has 64 x 128 x 128 voxels in 1 x 7 x 6 x 5 store chunks and a 16 x 32 x 32 patch (512
    half-patch chunks)."""
    import voxflow.infer._engine as P

    src = write_store(tmp_path / "ds.zarr", meta, [(64, 128, 128)], spacing=(2.0, 1.0, 1.0))
    cfg = make_config(patch=(16, 32, 32))
    sizes: dict[str, int] = {}
    real = P.compute

    def counting(*collections, desc: str = "", progress: bool = True):  # noqa: ANN002, ANN202
        sizes[desc.split(": ")[-1]] = sum(len(c.__dask_graph__()) for c in collections)
        return real(*collections, desc=desc, progress=progress)

    monkeypatch.setattr(P, "compute", counting)
    out = predict(
        src,
        tmp_path / "out",
        models=[(conv_net(seed=2), cfg, meta)],
        tta=False,
        progress=False,
        export=False,
        postprocessing=None,
    )
    assert out.is_complete(src.case_ids()[0])
    assert set(sizes) == {"preprocess", "write"}
    assert sizes["preprocess"] < 150, sizes
    assert sizes["write"] < 150, sizes
    assert P.grow_chunks((32, 64, 64), 4) == (64, 128, 256)
    assert P.grow_chunks((80, 160, 160), 8) == (80, 160, 160)
