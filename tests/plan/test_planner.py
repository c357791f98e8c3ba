from __future__ import annotations

import math

import numpy as np
import pytest

from voxflow.errors import PlanError
from voxflow.fingerprint import AxisStats, CaseFingerprint, Fingerprint, IntensityStats
from voxflow.plan import PRESETS, Plan, plan_experiment
from voxflow.plan._cost import estimate_iteration_seconds, estimate_memory_bytes, parameter_count
from voxflow.plan._topology import pool_and_conv_props
from voxflow.plan.planner import GIB, target_spacing

LABELS = {"background": 0, "organ": 1, "lesion": 2}


def make_fp(shapes, spacings, *, channels=("CT",), kept=1.0, is_2d=False, labels=LABELS) -> Fingerprint:
    cases = tuple(
        CaseFingerprint(
            case_id=f"c{i:03d}",
            shape_zyx=sh,
            spacing_zyx=sp,
            source_ndim=2 if is_2d else 3,
            nonzero_bbox_zyx=tuple((0, n) for n in sh),
            shape_after_crop_zyx=sh,
            fraction_kept_by_crop=kept,
            n_foreground_voxels=100,
            class_voxel_counts={0: 900, 1: 100},
        )
        for i, (sh, sp) in enumerate(zip(shapes, spacings, strict=True))
    )
    stats = tuple(
        IntensityStats(
            channel=c,
            n_samples=1000,
            mean=100.0 + i,
            std=50.0,
            median=90.0,
            min=-900.0,
            max=2000.0,
            percentile_00_5=-500.0,
            percentile_99_5=1500.0,
        )
        for i, c in enumerate(channels)
    )
    return Fingerprint(
        channel_names=channels,
        labels=labels,
        samples_per_case=1000,
        seed=0,
        cases=cases,
        intensity=stats,
        classes=(),
        spacing=AxisStats.of(np.array(spacings)),
        shape=AxisStats.of(np.array(shapes)),
        shape_after_crop=AxisStats.of(np.array(shapes)),
    )


def check_plan(plan: Plan, budget_gb: float) -> None:
    """Invariants every plan must satisfy."""
    for cfg in plan.configurations.values():
        net = cfg.network
        spatial = cfg.patch_size_vox[-net.spatial_dims :]
        assert all(p % t == 0 for p, t in zip(spatial, net.total_stride, strict=True)), cfg.name
        mem = estimate_memory_bytes(
            net, cfg.patch_size_vox, cfg.batch_size, len(plan.channel_names), 3, amp=cfg.train.amp
        )
        assert mem <= budget_gb * GIB, cfg.name
        assert cfg.estimated_memory_gb == pytest.approx(mem / GIB, abs=1e-3)
        assert cfg.batch_size >= 2
        assert cfg.train.mirror_axes == ((1, 2) if net.spatial_dims == 2 else (0, 1, 2))
    assert Plan.from_dict(plan.to_dict()) == plan


def test_isotropic_3d() -> None:
    fp = make_fp([(160, 160, 160), (140, 150, 170), (150, 160, 160), (170, 180, 150)], [(1.0, 1.0, 1.0)] * 4)
    plan = plan_experiment(fp, gpu_memory_gb=8)
    check_plan(plan, 8)
    assert set(plan.configurations) == {"2d", "3d_fullres"}  # the patch covers > 1/4 of the image
    full = plan.configuration("3d_fullres")
    assert full.spacing_zyx == (1.0, 1.0, 1.0)
    assert full.median_shape_vox == (155, 160, 160)
    assert full.network.n_stages == 6
    assert full.network.total_stride == (32, 32, 32)
    assert full.network.kernel_sizes == ((3, 3, 3),) * 6
    assert full.network.features_per_stage == (32, 64, 128, 256, 320, 320)
    assert not full.resampling.separate_z
    assert plan.configuration("2d").network.features_per_stage[-1] == 512
    assert [n.scheme for n in full.normalization] == ["ct"]
    assert full.normalization[0].lower == -500.0
    assert full.normalization[0].upper == 1500.0


def test_anisotropic_coarse_z() -> None:
    spacings = [(5.0, 0.8, 0.8), (3.0, 0.7, 0.7), (6.0, 0.9, 0.9), (5.0, 0.8, 0.8), (4.0, 0.75, 0.75)]
    fp = make_fp([(60, 512, 512), (100, 512, 512), (50, 512, 512), (60, 512, 512), (75, 512, 512)], spacings)
    plan = plan_experiment(fp, gpu_memory_gb=8)
    check_plan(plan, 8)
    full = plan.configuration("3d_fullres")
    assert full.spacing_zyx == (pytest.approx(np.percentile([5, 3, 6, 5, 4], 10)), 0.8, 0.8)  # 3.4 mm, not 5
    assert full.spacing_zyx[0] == pytest.approx(3.4)
    assert full.network.kernel_sizes[0] == (1, 3, 3)  # thick slices: no conv across z at full resolution
    assert full.network.strides[1] == (1, 2, 2)  # in-plane pooling first
    assert full.patch_size_vox[0] < full.patch_size_vox[1]
    assert full.resampling.separate_z
    assert full.resampling.separate_axis == 0
    assert full.resampling.separate_order == 0
    assert plan.extra["anisotropic"] is True


def test_anisotropic_spacing_with_many_slices_keeps_the_median() -> None:
    # coarse z but as many z voxels as in-plane: nnU-Net's rule needs both conditions
    fp = make_fp([(400, 128, 128)] * 3, [(4.0, 1.0, 1.0), (5.0, 1.0, 1.0), (6.0, 1.0, 1.0)])
    assert target_spacing(fp) == (5.0, 1.0, 1.0)


def test_multichannel_mr_zscore_per_channel() -> None:
    fp = make_fp([(128, 128, 128)] * 3, [(1.0, 1.0, 1.0)] * 3, channels=("T1", "T2", "FLAIR"), kept=0.5)
    plan = plan_experiment(fp)
    check_plan(plan, 8)
    norm = plan.configuration("3d_fullres").normalization
    assert [n.scheme for n in norm] == ["zscore"] * 3
    assert all(n.use_mask for n in norm)  # cropping removed half of the image: normalise inside the mask
    fp_full = make_fp([(128, 128, 128)] * 3, [(1.0, 1.0, 1.0)] * 3, channels=("T1", "noNorm", "rescale_to_0_1"))
    norm = plan_experiment(fp_full).configuration("3d_fullres").normalization
    assert [(n.scheme, n.use_mask) for n in norm] == [("zscore", False), ("none", False), ("rescale_0_1", False)]


def test_2d_dataset() -> None:
    fp = make_fp([(1, 512, 480)] * 10, [(1.0, 0.5, 0.5)] * 10, is_2d=True)
    plan = plan_experiment(fp)
    check_plan(plan, 8)
    assert list(plan.configurations) == ["2d"]
    cfg = plan.configuration("2d")
    assert cfg.spacing_zyx == (1.0, 0.5, 0.5)
    assert cfg.patch_size_vox == (1, 512, 512)  # 480 padded up to a multiple of the total stride 128
    assert cfg.network.spatial_dims == 2
    assert cfg.network.n_stages == 8
    assert all(len(k) == 2 for k in cfg.network.kernel_sizes)
    assert cfg.network.features_per_stage[-1] == 512


def test_large_images_get_lowres_and_cascade() -> None:
    fp = make_fp([(500, 512, 512)] * 10, [(1.0, 0.8, 0.8)] * 10)
    plan = plan_experiment(fp)
    check_plan(plan, 8)
    assert set(plan.configurations) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    full, low = plan.configuration("3d_fullres"), plan.configuration("3d_lowres")
    casc = plan.configuration("3d_cascade_fullres")
    assert math.prod(full.patch_size_vox) < 0.25 * math.prod(full.median_shape_vox)
    assert math.prod(low.patch_size_vox) >= 0.25 * math.prod(low.median_shape_vox)
    assert all(lo > fu for lo, fu in zip(low.spacing_zyx, full.spacing_zyx, strict=True))
    assert low.next_stage == "3d_cascade_fullres"
    assert casc.previous_stage == "3d_lowres"
    assert casc.patch_size_vox == full.patch_size_vox
    assert full.previous_stage is None


def test_memory_estimate_is_monotone() -> None:
    cfg = plan_experiment(make_fp([(128, 128, 128)] * 3, [(1.0, 1.0, 1.0)] * 3)).configuration("3d_fullres")
    net = cfg.network
    patches = [(32, 32, 32), (32, 32, 64), (64, 64, 64), (96, 96, 96), (128, 128, 128)]
    mems = [estimate_memory_bytes(net, p, 2, 1, 3) for p in patches]
    assert mems == sorted(mems)
    assert len(set(mems)) == len(mems)
    by_batch = [estimate_memory_bytes(net, (64, 64, 64), b, 1, 3) for b in (1, 2, 4)]
    assert by_batch[0] < by_batch[1] < by_batch[2]
    assert estimate_memory_bytes(net, (64, 64, 64), 2, 1, 3, amp=False) > by_batch[1]
    times = [estimate_iteration_seconds(net, p, 2, 1, 3) for p in patches]
    assert times == sorted(times)


def test_bigger_budget_gives_bigger_patch_or_batch() -> None:
    fp = make_fp([(300, 400, 400)] * 5, [(1.0, 1.0, 1.0)] * 5)
    small, large = (plan_experiment(fp, gpu_memory_gb=g).configuration("3d_fullres") for g in (4, 16))
    check_plan(plan_experiment(fp, gpu_memory_gb=4), 4)
    assert math.prod(small.patch_size_vox) * small.batch_size < math.prod(large.patch_size_vox) * large.batch_size


def test_batch_grows_up_to_five_percent_of_the_data() -> None:
    fp = make_fp([(40, 56, 40)] * 200, [(1.0, 1.0, 1.0)] * 200)  # hippocampus-like: small images, many cases
    cfg = plan_experiment(fp).configuration("3d_fullres")
    assert cfg.patch_size_vox == (40, 56, 40)
    dataset = 40 * 56 * 40 * 200
    assert cfg.batch_size > 2
    assert cfg.batch_size * math.prod(cfg.patch_size_vox) <= 0.05 * dataset


@pytest.mark.parametrize("preset", ["resenc-m", "resenc-l"])
def test_residual_presets(preset: str) -> None:
    fp = make_fp([(200, 256, 256)] * 4, [(1.0, 1.0, 1.0)] * 4)
    plan = plan_experiment(fp, preset=preset)
    budget = PRESETS[preset].gpu_memory_gb
    check_plan(plan, budget)
    net = plan.configuration("3d_fullres").network
    assert net.architecture == "resenc_unet"
    assert net.n_blocks_per_stage[:4] == (1, 3, 4, 6)
    assert set(net.n_conv_per_stage_decoder) == {1}
    assert plan.gpu_memory_gb == budget


def test_cpu_preset_is_small_and_fast() -> None:
    fp = make_fp([(500, 512, 512)] * 5, [(2.5, 0.8, 0.8)] * 5)
    plan = plan_experiment(fp, preset="cpu")
    check_plan(plan, 4)
    for cfg in plan.configurations.values():
        net = cfg.network
        assert cfg.batch_size == 2
        assert not cfg.train.amp
        assert max(net.features_per_stage) <= 128
        assert net.features_per_stage[0] <= 16
        assert estimate_iteration_seconds(net, cfg.patch_size_vox, 2, 1, 3) <= PRESETS["cpu"].seconds_per_iteration
        assert (cfg.train.epochs, cfg.train.iters_per_epoch) == (50, 25)


def test_parameter_count_matches_built_networks() -> None:
    from voxflow.nets import build_network, count_parameters

    fp = make_fp([(64, 64, 64)] * 2, [(3.0, 1.0, 1.0)] * 2, channels=("T1", "T2"))
    for preset in ("cpu", "resenc-m"):
        for cfg in plan_experiment(fp, preset=preset).configurations.values():
            net = cfg.network
            assert parameter_count(net, 2, 3) == count_parameters(build_network(net, 2, 3)), (preset, cfg.name)


def test_topology_matches_nnunet() -> None:
    topo = pool_and_conv_props((1.0, 1.0, 1.0), (128, 128, 128))
    assert topo.n_stages == 6
    assert topo.total_stride == (32, 32, 32)
    assert topo.patch_size == (128, 128, 128)
    topo = pool_and_conv_props((3.0, 0.8, 0.8), (20, 160, 160))
    assert topo.strides[:3] == ((1, 1, 1), (1, 2, 2), (2, 2, 2))  # z pooled once x/y spacing reaches 1.6 mm
    assert topo.kernel_sizes[:2] == ((1, 3, 3), (3, 3, 3))
    assert topo.patch_size[0] % topo.total_stride[0] == 0
    # y (6 voxels) never pools; x pools alone while >= 3 * 4 voxels: 100, 50, 25, 13 -> 7
    assert pool_and_conv_props((1.0, 1.0), (6, 100)).strides[1:] == ((1, 2),) * 4


def test_bad_arguments_are_named() -> None:
    fp = make_fp([(64, 64, 64)] * 2, [(1.0, 1.0, 1.0)] * 2)
    with pytest.raises(PlanError, match="resenc-m"):
        plan_experiment(fp, preset="resenc_m")
    with pytest.raises(PlanError, match="gpu_memory_gb"):
        plan_experiment(fp, gpu_memory_gb=0)


def test_custom_memory_estimator_is_used() -> None:
    fp = make_fp([(256, 256, 256)] * 3, [(1.0, 1.0, 1.0)] * 3)
    calls = []

    def per_voxel(spec, patch, batch, in_ch, n_out):  # 1 KiB per voxel and sample
        calls.append(patch)
        return math.prod(patch[-spec.spatial_dims :]) * batch * 1024

    cfg = plan_experiment(fp, gpu_memory_gb=1, memory_estimator=per_voxel).configuration("3d_fullres")
    assert calls
    assert math.prod(cfg.patch_size_vox) * cfg.batch_size * 1024 <= GIB


def test_large_isotropic_data_gets_nnunets_default_patch() -> None:
    fp = make_fp([(256, 256, 256)] * 6, [(1.0, 1.0, 1.0)] * 6)
    cfg = plan_experiment(fp).configuration("3d_fullres")
    assert cfg.patch_size_vox == (128, 128, 128)
    assert cfg.batch_size == 2
    assert 6.0 < cfg.estimated_memory_gb <= 8.0
