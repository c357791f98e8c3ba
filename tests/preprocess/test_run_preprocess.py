from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from voxflow.geometry import Geometry
from voxflow.plan.schema import ChannelNormalization, ResamplingSpec
from voxflow.preprocess import preprocess_case, run_preprocess, zoom_reference
from voxflow.store import Store
from voxflow.testing import raise_if_computes


def _eager(image, label, geom: Geometry, config):
    """The whole pipeline in numpy/scipy: crop, z-score in the mask, zoom (order 3 / one-hot 1)."""
    nz = np.argwhere(np.any(image != 0, axis=0))
    box = tuple((int(lo), int(hi) + 1) for lo, hi in zip(nz.min(0), nz.max(0), strict=True))
    sl = tuple(slice(a, b) for a, b in box)
    img, lab = image[(slice(None), *sl)].astype(np.float64), label[sl]
    mask = np.any(img != 0, axis=0)
    sel = img[0][mask]
    img = np.where(mask, (img - sel.mean()) / sel.std(), 0.0).astype(np.float32)
    shape = tuple(
        max(1, round(n * s / t)) for n, s, t in zip(img.shape[1:], geom.spacing_zyx, config.spacing_zyx, strict=True)
    )
    out = zoom_reference(img[0], shape, order=3)[None]
    stack = np.stack([zoom_reference((lab == v).astype(np.float64), shape, order=1) for v in (0, 1, 2)])
    top2 = np.sort(stack, axis=0)[-2:]
    return box, out, np.argmax(stack, axis=0).astype(np.uint8), (top2[1] - top2[0]) < 1e-5


def test_preprocess_case_is_lazy_and_matches_eager_pipeline(rng, helpers) -> None:
    import dask.array as da

    image, label, geom = helpers.small_case(rng)
    config = helpers.make_config(spacing_zyx=(2.0, 1.0, 1.0))
    box, ref_img, ref_lab, ties = _eager(image, label, geom, config)
    with raise_if_computes():
        pc = preprocess_case(
            da.from_array(image, chunks=(1, 5, 7, 6)),
            geom,
            config,
            label=da.from_array(label, chunks=(5, 7, 6)),
            bbox_zyx=box,
            label_values=(0, 1, 2),
        )
    assert pc.crop_bbox_zyx == box
    assert pc.shape_after_crop_zyx == tuple(b - a for a, b in box)
    assert pc.image.shape == ref_img.shape
    assert pc.geometry.shape_zyx == ref_img.shape[1:]
    np.testing.assert_allclose(pc.image.compute(), ref_img, atol=1e-4 * np.ptp(ref_img))
    got_lab = pc.label.compute()
    assert np.array_equal(got_lab[~ties], ref_lab[~ties])
    # the grid: spacing scales with the shape ratio; voxel centres stay inside the cropped extent
    np.testing.assert_allclose(
        np.asarray(pc.geometry.spacing_zyx) * pc.geometry.shape_zyx,
        np.asarray(geom.spacing_zyx) * pc.shape_after_crop_zyx,
    )
    lo_mm = geom.index_to_physical([b[0] - 0.5 for b in box])
    np.testing.assert_allclose(pc.geometry.index_to_physical([-0.5] * 3), lo_mm)


def test_preprocess_case_computes_box_when_not_given(rng, helpers) -> None:
    import dask.array as da

    image, label, geom = helpers.small_case(rng, pad=3)
    config = helpers.make_config(spacing_zyx=geom.spacing_zyx)
    pc = preprocess_case(da.from_array(image, chunks=5), geom, config)
    assert pc.crop_bbox_zyx == tuple((3, n - 3) for n in geom.shape_zyx)
    assert pc.label is None
    assert pc.fg_index is None


def test_run_preprocess_store_layout_and_values(tmp_path, rng, helpers) -> None:
    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng), "b": helpers.small_case(rng)})
    config = helpers.make_config()
    plan = helpers.make_plan(config)
    out = run_preprocess(src.path, plan, "3d_fullres", tmp_path / "pp.zarr", progress=False)
    assert out.meta.kind == "preprocessed"
    assert out.meta.extra["configuration"] == "3d_fullres"
    assert out.meta.extra["configuration_plan"]["patch_size_vox"] == [16, 16, 16]
    assert out.case_ids() == ["a", "b"]
    for cid in ("a", "b"):
        image, label = src.image(cid).compute(), src.label(cid).compute()
        box, ref_img, ref_lab, ties = _eager(image, label, src.geometry(cid), config)
        got = out.image(cid)
        assert got.dtype == np.float32
        assert out.zarr_array(cid, "image").chunks == (1, 8, 8, 8)
        np.testing.assert_allclose(got.compute(), ref_img, atol=1e-4 * np.ptp(ref_img))
        lab = out.label(cid).compute()
        assert lab.dtype == np.uint8
        assert np.array_equal(lab[~ties], ref_lab[~ties])
        attrs = out.case_attrs(cid)
        assert attrs["crop_bbox_zyx"] == [list(b) for b in box]
        assert attrs["classes_present"] == sorted(np.unique(lab).tolist())
        assert Geometry.from_dict(attrs["original_geometry"]) == src.geometry(cid)
        fg = out.zarr_array(cid, "fg_index")[...]
        assert fg.dtype == np.int32
        assert fg.shape[1] == 4
        assert len(fg) > 0
        assert (lab[fg[:, 1], fg[:, 2], fg[:, 3]] == fg[:, 0]).all()


def test_run_preprocess_resumes_and_overwrites(tmp_path, rng, helpers) -> None:
    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng), "b": helpers.small_case(rng)})
    plan = helpers.make_plan(helpers.make_config())
    out = run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", progress=False)
    before = out.image("a").compute()
    out.update_case_attrs("b", complete=False)  # as if interrupted while writing b
    marker = out.case_group("a").attrs["voxflow"]
    out = run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", progress=False)
    assert out.case_ids() == ["a", "b"]
    assert out.case_group("a").attrs["voxflow"] == marker  # a was skipped, b redone
    out = run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", progress=False, overwrite=True)
    np.testing.assert_array_equal(out.image("a").compute(), before)


def test_interrupted_case_is_not_complete(tmp_path, rng, helpers, monkeypatch) -> None:
    from voxflow import cluster
    from voxflow.preprocess import _run

    monkeypatch.setattr(cluster, "SMALL_CASE_VOXELS", 1)  # the chunked path of a big case
    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng)})
    plan = helpers.make_plan(helpers.make_config())

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(
        _run,
        "compute",
        lambda *a, **k: (
            boom()
            if "preprocess" in k.get("desc", "")
            else __import__("voxflow.cluster", fromlist=["compute"]).compute(*a, **k)
        ),
    )
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", progress=False)
    out = Store.open(tmp_path / "pp.zarr")
    assert out.case_ids() == []
    assert out.incomplete_case_ids() == ["a"]


def test_small_case_interrupted_before_its_marker_is_not_complete(tmp_path, rng, helpers, monkeypatch) -> None:
    from voxflow.preprocess import _run

    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng), "b": helpers.small_case(rng)})
    plan = helpers.make_plan(helpers.make_config())
    finish = _run._finish_case

    def killed_at_b(out, case_id, fg):
        if case_id == "b":
            raise RuntimeError("killed")
        finish(out, case_id, fg)

    monkeypatch.setattr(_run, "_finish_case", killed_at_b)
    with pytest.raises(RuntimeError, match="killed"):
        run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", progress=False, scheduler="sync")
    out = Store.open(tmp_path / "pp.zarr")
    assert "b" not in out.case_ids()  # its arrays may be written, its marker is not
    assert "b" in out.incomplete_case_ids()
    monkeypatch.setattr(_run, "_finish_case", finish)
    run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", progress=False)  # resumes: redoes b only
    assert Store.open(tmp_path / "pp.zarr").case_ids() == ["a", "b"]


def test_anisotropic_separate_axis_and_2d_configuration(tmp_path, rng, helpers) -> None:
    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng, spacing=(4.0, 0.9, 0.9))})
    sep = helpers.make_config(
        spacing_zyx=(3.0, 1.2, 1.2), resampling=ResamplingSpec(separate_z=True, separate_axis=0, separate_order=0)
    )
    out = run_preprocess(src, helpers.make_plan(sep), "3d_fullres", tmp_path / "sep.zarr", progress=False)
    image = src.image("a").compute()
    box = out.case_attrs("a")["crop_bbox_zyx"]
    crop = image[(slice(None), *(slice(a, b) for a, b in box))][0].astype(np.float64)
    mask = crop != 0
    crop = np.where(mask, (crop - crop[mask].mean()) / crop[mask].std(), 0).astype(np.float32)
    shape = out.geometry("a").shape_zyx
    ref = zoom_reference(zoom_reference(crop, (crop.shape[0], *shape[1:]), order=3), shape, order=0)
    np.testing.assert_allclose(out.image("a").compute()[0], ref, atol=1e-4 * np.ptp(ref))

    net2d = dict(
        n_stages=2,
        features_per_stage=(4, 8),
        kernel_sizes=((3, 3), (3, 3)),
        strides=((1, 1), (2, 2)),
        n_blocks_per_stage=(1, 1),
        n_conv_per_stage_decoder=(1,),
        spatial_dims=2,
    )
    from voxflow.plan.schema import NetworkSpec

    cfg2d = helpers.make_config(spacing_zyx=(1.0, 1.2, 1.2), patch=(1, 16, 16), name="2d", network=NetworkSpec(**net2d))
    out2 = run_preprocess(src, helpers.make_plan(cfg2d), "2d", tmp_path / "2d.zarr", progress=False)
    assert out2.geometry("a").shape_zyx[0] == len(range(*box[0]))  # z is never resampled in 2D
    assert out2.zarr_array("a", "image").chunks[1] == 1


def test_run_preprocess_rejects_plan_of_other_dataset(tmp_path, rng, helpers) -> None:
    from voxflow.errors import VoxflowError

    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng)})
    cfg = helpers.make_config(norms=(ChannelNormalization(scheme="none"), ChannelNormalization(scheme="none")))
    with pytest.raises(VoxflowError, match="normalises 2 channels"):
        run_preprocess(src, helpers.make_plan(cfg, channels=("T1", "T2")), "3d_fullres", tmp_path / "o.zarr")


def test_cli_preprocess(tmp_path, rng, helpers) -> None:
    from voxflow.cli import main

    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng)})
    helpers.make_plan(helpers.make_config()).save(tmp_path / "plans.json")
    result = CliRunner().invoke(
        main,
        [
            "preprocess",
            str(src.path),
            "--plans",
            str(tmp_path / "plans.json"),
            "-c",
            "3d_fullres",
            "-o",
            str(tmp_path / "pp.zarr"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert Store.open(tmp_path / "pp.zarr").case_ids() == ["a"]
    bad = CliRunner().invoke(
        main, ["preprocess", str(src.path), "--plans", str(tmp_path / "plans.json"), "-c", "3d_fulres"]
    )
    assert bad.exit_code != 0
    assert "Did you mean '3d_fullres'" in bad.output


def test_run_preprocess_refuses_a_preprocessed_store_as_input(tmp_path, rng, helpers) -> None:
    from voxflow.errors import VoxflowError

    src = helpers.write_store(tmp_path / "ds.zarr", {"a": helpers.small_case(rng)})
    plan = helpers.make_plan(helpers.make_config())
    out = run_preprocess(src, plan, "3d_fullres", tmp_path / "pp.zarr", progress=False)
    with pytest.raises(VoxflowError, match="dataset store"):
        run_preprocess(out, plan, "3d_fullres", tmp_path / "pp2.zarr", progress=False)
