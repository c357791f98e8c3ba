"""nnU-Net plans -> voxflow translation, separate-z rule, logit tile predictor (no nnunetv2 needed)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import scipy.special
import torch

from voxflow.nnunet import (
    NnunetModelError,
    NnunetTilePredictor,
    case_configuration,
    dataset_meta,
    load_nnunet_model,
    separate_z_axis,
    translate_configuration,
)
from voxflow.nnunet._predict import _activate
from voxflow.testing import raise_if_computes

DATASET = {
    "channel_names": {"0": "CT"},
    "labels": {"background": 0, "organ": 1, "lesion": 2},
    "numTraining": 2,
    "file_ending": ".nii.gz",
}
_KW = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}


def _plans(transpose: list[int] | None = None) -> dict[str, Any]:
    arch = {
        "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
        "arch_kwargs": {
            "n_stages": 3,
            "features_per_stage": [8, 16, 32],
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
            "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
            "n_conv_per_stage": [2, 2, 2],
            "n_conv_per_stage_decoder": [2, 2],
            "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }
    full = {
        "data_identifier": "x",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [8, 16, 24],
        "median_image_size_in_voxels": [10.0, 20.0, 30.0],
        "spacing": [2.5, 0.8, 0.7],
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": dict(_KW),
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_seg_kwargs": {**_KW, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**_KW, "order": 1},
        "architecture": arch,
        "batch_dice": False,
    }
    return {
        "dataset_name": "Dataset001_Syn",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.5, 0.8, 0.7],
        "original_median_shape_after_transp": [10, 20, 30],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": transpose or [0, 1, 2],
        "transpose_backward": [int(i) for i in np.argsort(transpose or [0, 1, 2])],
        "configurations": {
            "3d_fullres": full,
            "3d_lowres": {
                "inherits_from": "3d_fullres",
                "spacing": [5.0, 1.6, 1.4],
                "next_stage": "3d_cascade_fullres",
            },
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 900.0,
                "mean": 120.0,
                "median": 110.0,
                "min": -1000.0,
                "percentile_00_5": -200.0,
                "percentile_99_5": 400.0,
                "std": 80.0,
            }
        },
    }


def test_translate_fullres_matches_plans() -> None:
    spec = translate_configuration(_plans(), DATASET, "3d_fullres", mirror_axes_net=(0, 1, 2))
    cfg = spec.configuration
    assert cfg.spacing_zyx == (2.5, 0.8, 0.7)
    assert cfg.patch_size_vox == (8, 16, 24)
    (norm,) = cfg.normalization
    assert (norm.scheme, norm.mean, norm.std, norm.lower, norm.upper) == ("ct", 120.0, 80.0, -200.0, 400.0)
    assert (cfg.resampling.image_order, cfg.resampling.label_order, cfg.resampling.separate_order) == (3, 1, 0)
    assert cfg.network.kernel_sizes[0] == (1, 3, 3)
    assert cfg.network.total_stride == (2, 4, 4)
    assert cfg.train.mirror_axes == (0, 1, 2)
    assert (spec.num_outputs, spec.num_input_channels) == (3, 1)
    assert (spec.probabilities_order, spec.probabilities_order_z) == (1, 0)


def test_translate_undoes_transpose_forward() -> None:
    # network axes (a, b, c) = image axes (x, z, y): transpose_forward [2, 0, 1]
    spec = translate_configuration(_plans([2, 0, 1]), DATASET, "3d_fullres", mirror_axes_net=(0,))
    cfg = spec.configuration
    assert cfg.spacing_zyx == (0.8, 0.7, 2.5)  # network spacing (2.5, 0.8, 0.7) put back
    assert cfg.patch_size_vox == (16, 24, 8)
    assert cfg.network.kernel_sizes[0] == (3, 3, 1)
    assert cfg.train.mirror_axes == (2,)  # network axis 0 is image axis x
    assert spec.transpose_backward == (1, 2, 0)


def test_inherited_configuration_and_unknown_name() -> None:
    low = translate_configuration(_plans(), DATASET, "3d_lowres").configuration
    assert low.spacing_zyx == (5.0, 1.6, 1.4)
    assert low.patch_size_vox == (8, 16, 24)
    with pytest.raises(NnunetModelError, match="must define configuration '2d'"):
        translate_configuration(_plans(), DATASET, "2d")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            lambda p: p["configurations"]["3d_fullres"].update(normalization_schemes=["RGBTo01Normalization"]),
            "normalization scheme 'RGBTo01Normalization'",
        ),
        (
            lambda p: p["configurations"]["3d_fullres"]["architecture"].update(
                network_class_name="my_pkg.nets.FancyNet"
            ),
            "'my_pkg.nets.FancyNet' is not supported",
        ),
        (
            lambda p: p["configurations"]["3d_fullres"].update(resampling_fn_data="resample_torch_fornnunet"),
            "resampling_fn_data .* got 'resample_torch_fornnunet'",
        ),
        (lambda p: p.update(image_reader_writer="Tiff3DIO"), "image_reader_writer 'Tiff3DIO'"),
        (lambda p: p["configurations"]["3d_fullres"].pop("architecture"), "nnU-Net >= 2.4 plans"),
    ],
)
def test_unsupported_settings_are_named(edit: Any, match: str, tmp_path: Path) -> None:
    plans = copy.deepcopy(_plans())
    edit(plans)
    if "FancyNet" in match:  # the class is only resolved (and refused before any import) when the network is built
        folder = tmp_path / "m"
        (folder / "fold_0").mkdir(parents=True)
        (folder / "plans.json").write_text(json.dumps(plans))
        (folder / "dataset.json").write_text(json.dumps(DATASET))
        torch.save(
            {
                "network_weights": {},
                "init_args": {"configuration": "3d_fullres"},
                "trainer_name": "MyTrainer",
                "inference_allowed_mirroring_axes": (0, 1, 2),
            },
            folder / "fold_0" / "checkpoint_final.pth",
        )
        with pytest.raises(NnunetModelError, match=match):
            load_nnunet_model(folder)
        return
    with pytest.raises(NnunetModelError, match=match):
        translate_configuration(plans, DATASET, "3d_fullres")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(NnunetModelError, match="plans.json must exist"):
        load_nnunet_model(tmp_path)
    (tmp_path / "plans.json").write_text(json.dumps(_plans()))
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET))
    with pytest.raises(NnunetModelError, match="checkpoint_best.pth"):
        load_nnunet_model(tmp_path, checkpoint="checkpoint_best.pth")


def test_region_dataset_meta() -> None:
    ds = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": [3]},
        "regions_class_order": [1, 2, 3],
        "file_ending": ".nii.gz",
    }
    meta = dataset_meta(ds, {"dataset_name": "Dataset002_Reg"})
    assert meta.channel_names == ("T1", "T2")
    assert meta.regions_class_order == (1, 2, 3)
    assert meta.has_regions


@pytest.mark.parametrize(
    ("current", "new", "force", "expected"),
    [
        ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), None, None),
        ((5.0, 1.0, 1.0), (1.0, 1.0, 1.0), None, 0),  # current spacing anisotropic: its coarse axis
        ((1.0, 1.0, 1.0), (1.0, 4.0, 1.0), None, 1),  # else the new spacing's coarse axis
        ((4.0, 4.0, 1.0), (1.0, 1.0, 1.0), None, None),  # two coarse axes: no separate axis
        ((2.9, 1.0, 1.0), (1.0, 1.0, 1.0), None, None),  # ratio 2.9 <= 3
        ((2.0, 1.0, 1.0), (1.0, 1.0, 1.0), True, 0),
        ((5.0, 1.0, 1.0), (1.0, 1.0, 1.0), False, None),
    ],
)
def test_separate_z_rule(
    current: tuple[float, ...], new: tuple[float, ...], force: bool | None, expected: int | None
) -> None:
    assert separate_z_axis(current, new, force=force) == expected


def test_case_configuration_sets_separate_axis() -> None:
    spec = translate_configuration(_plans(), DATASET, "3d_fullres")
    assert case_configuration(spec, (0.7, 0.8, 5.0)).resampling.separate_axis == 2  # the case's coarse axis
    assert case_configuration(spec, (1.0, 0.8, 0.7)).resampling.separate_axis == 0  # target 2.5/0.7 > 3
    assert not case_configuration(replace(spec, force_separate_z=False), (5.0, 0.8, 0.7)).resampling.separate_z


class _Net(torch.nn.Module):
    """Position-dependent so that transposes and flips matter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 2, (1, 3, 5), padding=(0, 1, 2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        ramp = torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)
        return [self.conv(x) * (1 + ramp), x[:, :1]]


def test_tile_predictor_permutes_and_mirrors_like_nnunet(rng: np.random.Generator) -> None:
    net = _Net().eval()
    tiles = rng.normal(size=(2, 1, 4, 5, 6)).astype(np.float32)
    pred = NnunetTilePredictor([net], transpose_forward=(2, 0, 1), mirror_axes_net=(0, 2), spatial_dims=3)
    got = pred(tiles).numpy()
    x = torch.from_numpy(tiles).permute(0, 1, 4, 2, 3)  # network order (x, z, y)
    with torch.no_grad():
        ref = net(x)[0]
        for axes in [(2,), (4,), (2, 4)]:  # nnU-Net: every non-empty combination, dims + 2
            ref = ref + torch.flip(net(torch.flip(x, axes))[0], axes)
        ref = (ref / 4).permute(0, 1, 3, 4, 2).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunks", [(3, 7, 6, 5), (3, 24, 20, 16)])
def test_activation_is_lazy_and_matches_scipy(chunks: tuple[int, ...], rng: np.random.Generator) -> None:
    x = rng.normal(size=(3, 24, 20, 16)).astype(np.float32) * 4
    with raise_if_computes():
        soft = _activate(da.from_array(x, chunks=chunks), "softmax")
        sig = _activate(da.from_array(x, chunks=chunks), "sigmoid")
    np.testing.assert_allclose(soft.compute(), scipy.special.softmax(x, axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sig.compute(), scipy.special.expit(x), rtol=1e-5, atol=1e-7)


def test_cli_nnunet_model_wiring(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from voxflow.cli import main

    (tmp_path / "img").mkdir()
    (tmp_path / "model").mkdir()
    runner = CliRunner()
    both = runner.invoke(
        main,
        [
            "predict",
            "-i",
            str(tmp_path / "img"),
            "-o",
            str(tmp_path / "out"),
            "-m",
            str(tmp_path / "model"),
            "--nnunet-model",
            str(tmp_path / "model"),
        ],
    )
    assert both.exit_code != 0
    assert "exactly one" in both.output
    empty = runner.invoke(
        main,
        [
            "predict",
            "-i",
            str(tmp_path / "img"),
            "-o",
            str(tmp_path / "out"),
            "--nnunet-model",
            str(tmp_path / "model"),
        ],
    )
    assert empty.exit_code != 0
    assert "plans.json must exist" in empty.output
