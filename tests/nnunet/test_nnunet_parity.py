"""voxflow's predictor vs nnU-Net's own (nnunetv2, in-process) on a model folder nnU-Net planned.

Runs only with nnunetv2 installed (``make test-nnunet``). nnU-Net extracts the fingerprint, plans
and preprocesses a tiny synthetic dataset; the plans are shrunk (3 stages, few features, small
patch, a target spacing that forces resampling) and two folds of seeded random weights are saved
in nnU-Net's checkpoint format. Both predictors then segment the same test cases.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from voxflow.testing import write_nnunet_model_folder

pytestmark = pytest.mark.nnunet

DATASET_ID = 901


def _point_nnunet_at(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nnU-Net reads its folders from environment variables (current versions when used, older ones at
    import): set them, and patch plain values copied by modules already imported."""
    paths = {
        "nnUNet_raw": root / "raw",
        "nnUNet_preprocessed": root / "preprocessed",
        "nnUNet_results": root / "results",
    }
    for name, p in paths.items():
        p.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, str(p))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    pytest.importorskip("nnunetv2")
    values: dict[str, Any] = {name: str(p) for name, p in paths.items()}
    values["default_num_processes"] = 1
    for mod in [m for n, m in sys.modules.items() if n.startswith("nnunetv2") and m is not None]:
        for name, value in values.items():
            if isinstance(getattr(mod, name, None), (str, int)):  # nnU-Net < 2.6 copied them at import
                monkeypatch.setattr(mod, name, value)


def _shrink(cfg: dict[str, Any], patch_net: list[int], spacing_net: list[float]) -> None:
    """Three stages with few features and a small patch (network axis order) and a new target spacing."""
    kw = cfg["architecture"]["arch_kwargs"]
    n = 3
    kw["n_stages"] = n
    kw["features_per_stage"] = [4, 8, 16]
    kw["kernel_sizes"] = [[3] * len(patch_net)] * n
    kw["strides"] = [[1] * len(patch_net), [2] * len(patch_net), [2] * len(patch_net)]
    for key in ("n_conv_per_stage", "n_blocks_per_stage"):
        if key in kw:
            kw[key] = [2] * n
    kw["n_conv_per_stage_decoder"] = [2] * (n - 1)
    cfg["patch_size"] = patch_net
    cfg["spacing"] = spacing_net
    cfg["batch_size"] = 2


def _train_briefly(
    net: Any, cases: list[tuple[np.ndarray, np.ndarray]], patch: list[int], seed: int, steps: int = 25
) -> None:
    """A few Adam steps of cross-entropy on random patches of nnU-Net-preprocessed training cases, so
    that the network's classes are separated by margins like a trained model's (random weights give
    near-ties everywhere, where any rounding flips the argmax)."""
    import torch

    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        xs, ys = [], []
        for _ in range(2):
            data, seg = cases[rng.integers(len(cases))]
            lo = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(data.shape[1:], patch, strict=True)]
            sl = tuple(slice(a, a + p) for a, p in zip(lo, patch, strict=True))
            xs.append(data[(slice(None), *sl)])
            ys.append(np.maximum(seg[(0, *sl)], 0))
        out = net(torch.from_numpy(np.stack(xs)).float())
        out = out[0] if isinstance(out, (list, tuple)) else out
        loss = torch.nn.functional.cross_entropy(out, torch.from_numpy(np.stack(ys)).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()


def _build_model(
    root: Path,
    kind: str,
    spacing_zyx: tuple[float, float, float],
    target_zyx: tuple[float, float, float],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Path, list[Path]]:
    """nnU-Net plans a synthetic dataset; returns the model folder and the test images."""
    import torch

    from voxflow.synthetic import make_dataset

    _point_nnunet_at(root, monkeypatch)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = f"Dataset{DATASET_ID}_Syn{kind}"
    raw = make_dataset(
        root / "raw" / name,
        kind=kind,
        n_cases=3,
        n_test_cases=1,
        shape_zyx=(20, 36, 28),
        spacing_zyx=spacing_zyx,
        seed=3,
    )
    extract_fingerprints([DATASET_ID], num_processes=1, show_progress_bar=False, verbose=False)
    plans_id = plan_experiments([DATASET_ID])
    pre = root / "preprocessed" / name
    plans_file = pre / f"{plans_id}.json"
    plans = json.loads(plans_file.read_text())
    tf = plans["transpose_forward"]
    plans["configurations"] = {"3d_fullres": plans["configurations"]["3d_fullres"]}
    _shrink(
        plans["configurations"]["3d_fullres"],
        patch_net=[[16, 24, 16][i] for i in tf],
        spacing_net=[target_zyx[i] for i in tf],
    )
    plans_file.write_text(json.dumps(plans, indent=2))
    preprocess([DATASET_ID], plans_id, configurations=("3d_fullres",), num_processes=(1,), verbose=False)

    model = root / "results" / name / f"nnUNetTrainer__{plans_id}__3d_fullres"
    dataset = json.loads((raw / "dataset.json").read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    n_out = pm.get_label_manager(dataset).num_segmentation_heads
    n_ch = len(dataset["channel_names"])
    train = []
    for case in sorted(f.name[: -len(".nii.gz")] for f in (raw / "labelsTr").iterdir()):
        data, seg, _ = DefaultPreprocessor(verbose=False).run_case(
            [str(raw / "imagesTr" / f"{case}_{c:04d}.nii.gz") for c in range(n_ch)],
            str(raw / "labelsTr" / f"{case}.nii.gz"),
            pm,
            cm,
            dataset,
        )
        train.append((data, seg))
    weights: dict[int, Any] = {}
    for fold in (0, 1):
        torch.manual_seed(fold)
        net = get_network_from_plans(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
            n_ch,
            n_out,
            allow_init=True,
            deep_supervision=True,
        )
        _train_briefly(net, train, list(cm.patch_size), seed=fold)
        weights[fold] = net.state_dict()
    write_nnunet_model_folder(model, weights, plans=plans, dataset=dataset, configuration="3d_fullres")
    fp = pre / "dataset_fingerprint.json"
    (model / "dataset_fingerprint.json").write_text(fp.read_text())
    return model, sorted((raw / "imagesTs").iterdir())


def _nnunet_predict(model: Path, images: list[Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(
        tile_step_size=0.5,
        use_gaussian=True,
        use_mirroring=True,
        perform_everything_on_device=False,
        device=torch.device("cpu"),
        allow_tqdm=False,
    )
    predictor.initialize_from_trained_model_folder(str(model), use_folds=(0, 1), checkpoint_name="checkpoint_final.pth")
    cases: dict[str, list[Path]] = {}
    for f in images:
        cases.setdefault(f.name[: -len("_0000.nii.gz")], []).append(f)
    out = {}
    for case, files in cases.items():
        img, props = SimpleITKIO().read_images([str(f) for f in sorted(files)])
        seg, probs = predictor.predict_single_npy_array(img, props, None, None, True)
        out[case] = (np.asarray(seg), np.asarray(probs))
    return out


@pytest.mark.parametrize(
    ("kind", "spacing_zyx", "target_zyx"),
    [
        ("ct", (0.8, 0.8, 2.5), (1.0, 0.9, 2.2)),  # x coarsest: transpose_forward [2, 0, 1], separate-z along x
        ("mr", (1.0, 1.0, 1.0), (1.2, 0.9, 1.1)),  # two channels, z-score, order-3 resampling on all axes
    ],
)
def test_voxflow_matches_nnunet_predictor(
    kind: str,
    spacing_zyx: tuple[float, float, float],
    target_zyx: tuple[float, float, float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voxflow.nnunet import load_nnunet_model, predict_nnunet

    model_dir, images = _build_model(tmp_path, kind, spacing_zyx, target_zyx, monkeypatch)
    reference = _nnunet_predict(model_dir, images)
    model = load_nnunet_model(model_dir)
    assert len(model.networks) == 2
    store = predict_nnunet(
        images, tmp_path / "voxflow_out", model, save_probabilities=True, progress=False, export=False
    )
    for case, (seg_ref, probs_ref) in reference.items():
        seg = store.label(case).compute()
        probs = store.array(case, "probs").compute().astype(np.float32)
        assert seg.shape == seg_ref.shape
        assert probs.shape == probs_ref.shape
        agree = float((seg == seg_ref).mean())
        err = np.abs(probs - probs_ref)
        p999 = float(np.quantile(err, 0.999))
        print(
            f"{kind} {case}: agreement {agree:.6f}, |dp| max {err.max():.2e} p99.9 {p999:.2e} mean "
            f"{err.mean():.2e}, classes {np.bincount(seg_ref.ravel(), minlength=3)}"
        )
        assert agree >= 0.999, f"{case}: {agree:.5f} voxel agreement"
        # nnU-Net accumulates tile logits and weights in float16: where only the far tails of its Gaussian
        # cover a voxel (volume corners) its average is off by up to ~0.1; voxflow accumulates in float32
        # and stores probabilities as float16 (error <= 5e-4).
        assert err.mean() < 1e-3
        assert p999 < 0.1
        assert err.max() < 0.25


def test_weights_of_another_architecture_name_the_trainer(tmp_path: Path) -> None:
    """A custom trainer's network (here: other feature counts) does not load strictly: the error names it."""
    pytest.importorskip("dynamic_network_architectures")
    import torch

    from voxflow.nnunet import NnunetModelError, load_nnunet_model

    translate = _import_translate_tests()
    plans, dataset = translate._plans(), translate.DATASET
    folder = tmp_path / "Dataset001_Syn" / "MyTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(dataset))
    other = torch.nn.Conv3d(1, 3, 3)
    torch.save(
        {
            "network_weights": other.state_dict(),
            "init_args": {"configuration": "3d_fullres"},
            "trainer_name": "MyTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        folder / "fold_0" / "checkpoint_final.pth",
    )
    with pytest.raises(NnunetModelError, match="trainer 'MyTrainer'.*PlainConvUNet"):
        load_nnunet_model(folder)


def _import_translate_tests() -> Any:
    from voxflow.testing import import_path

    return import_path(Path(__file__).with_name("test_nnunet_translate.py"), "nnunet_translate_tests")


CASCADE_ID = 902


def _train_and_save(folder: Path, plans: dict[str, Any], dataset: dict[str, Any], config: str, raw: Path) -> None:
    """Two folds of ``config`` trained briefly on nnU-Net-preprocessed training cases, saved in nnU-Net's
    checkpoint format. A cascade's inputs carry the one-hot segmentation as nnU-Net's data loader gives
    it (here of the reference label, run through the same preprocessing as a previous-stage file)."""
    import torch
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import (
        convert_labelmap_to_one_hot,
        determine_num_input_channels,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm, lm = pm.get_configuration(config), pm.get_label_manager(dataset)
    n_ch, n_out = len(dataset["channel_names"]), lm.num_segmentation_heads
    n_in = determine_num_input_channels(pm, cm, dataset)
    train = []
    for case in sorted(f.name[: -len(".nii.gz")] for f in (raw / "labelsTr").iterdir()):
        data, seg, _ = DefaultPreprocessor(verbose=False).run_case(
            [str(raw / "imagesTr" / f"{case}_{c:04d}.nii.gz") for c in range(n_ch)],
            str(raw / "labelsTr" / f"{case}.nii.gz"),
            pm,
            cm,
            dataset,
        )
        if cm.previous_stage_name is not None:
            data = np.vstack((data, convert_labelmap_to_one_hot(seg[0], lm.foreground_labels, data.dtype)))
        train.append((data, seg))
    assert train[0][0].shape[0] == n_in
    weights: dict[int, Any] = {}
    for fold in (0, 1):
        torch.manual_seed(fold)
        net = get_network_from_plans(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
            n_in,
            n_out,
            allow_init=True,
            deep_supervision=True,
        )
        _train_briefly(net, train, list(cm.patch_size), seed=fold)
        weights[fold] = net.state_dict()
    write_nnunet_model_folder(folder, weights, plans=plans, dataset=dataset, configuration=config)


def _build_cascade(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Path], list[Path]]:
    """nnU-Net plans a cascade for images larger than its (small-GPU) full-resolution patch; both stages
    are shrunk and trained briefly. Returns the 3d_lowres and 3d_cascade_fullres folders and the test images."""
    from voxflow.synthetic import make_dataset

    _point_nnunet_at(root, monkeypatch)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments

    name = f"Dataset{CASCADE_ID}_SynCascade"
    raw = make_dataset(
        root / "raw" / name,
        kind="ct",
        n_cases=3,
        n_test_cases=1,
        shape_zyx=(24, 48, 40),
        spacing_zyx=(0.8, 0.8, 2.5),
        seed=5,
    )
    extract_fingerprints([CASCADE_ID], num_processes=1, show_progress_bar=False, verbose=False)
    # a 0.02 GB "GPU" gives a full-resolution patch under 1/4 of the median image: nnU-Net adds the cascade
    plans_id = plan_experiments([CASCADE_ID], gpu_memory_target_in_gb=0.02)
    plans_file = root / "preprocessed" / name / f"{plans_id}.json"
    plans = json.loads(plans_file.read_text())
    cfgs = plans["configurations"]
    assert cfgs["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    assert cfgs["3d_lowres"]["next_stage"] == "3d_cascade_fullres"
    tf = plans["transpose_forward"]

    def net_order(v: list[Any]) -> list[Any]:
        return [v[i] for i in tf]

    plans["configurations"] = {k: cfgs[k] for k in ("3d_fullres", "3d_lowres", "3d_cascade_fullres")}
    _shrink(cfgs["3d_fullres"], patch_net=net_order([16, 24, 16]), spacing_net=net_order([1.0, 0.9, 2.2]))
    _shrink(cfgs["3d_lowres"], patch_net=net_order([12, 16, 16]), spacing_net=net_order([1.5, 1.4, 3.0]))
    plans_file.write_text(json.dumps(plans, indent=2))
    dataset = json.loads((raw / "dataset.json").read_text())
    folders = {
        c: root / "results" / name / f"nnUNetTrainer__{plans_id}__{c}" for c in ("3d_lowres", "3d_cascade_fullres")
    }
    for config, folder in folders.items():
        _train_and_save(folder, plans, dataset, config, raw)
    return folders, sorted((raw / "imagesTs").iterdir())


def _nnunet_cascade_predict(
    folders: dict[str, Path], images: list[Path], out: Path
) -> tuple[dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """nnU-Net's two-stage prediction: 3d_lowres into a folder, then the cascade with
    ``folder_with_segs_from_prev_stage``; the lowres labels and the cascade's (labels, probabilities)."""
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    cases: dict[str, list[str]] = {}
    for f in images:
        cases.setdefault(f.name[: -len("_0000.nii.gz")], []).append(str(f))
    lists = [sorted(v) for v in cases.values()]
    for config, prev in (("3d_lowres", None), ("3d_cascade_fullres", out / "3d_lowres")):
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=True,
            perform_everything_on_device=False,
            device=torch.device("cpu"),
            allow_tqdm=False,
        )
        predictor.initialize_from_trained_model_folder(
            str(folders[config]), use_folds=(0, 1), checkpoint_name="checkpoint_final.pth"
        )
        (out / config).mkdir(parents=True)
        predictor.predict_from_files_sequential(
            lists,
            str(out / config),
            save_probabilities=prev is not None,
            overwrite=True,
            folder_with_segs_from_prev_stage=prev and str(prev),
        )

    def read(p: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))

    low = {c: read(out / "3d_lowres" / f"{c}.nii.gz") for c in cases}
    casc = {
        c: (
            read(out / "3d_cascade_fullres" / f"{c}.nii.gz"),
            np.load(out / "3d_cascade_fullres" / f"{c}.npz")["probabilities"],
        )
        for c in cases
    }
    return low, casc


@pytest.fixture
def one_torch_thread() -> Any:
    """One intra-op thread: the networks are tiny, and two OpenMP threads on a busy 2-core machine spin
    (measured: a 4-8-16 U-Net forward of 0.3-0.8 s with 2 threads under load, 0.05 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_torch_thread")
def test_voxflow_matches_nnunet_cascade(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3d_cascade_fullres folder (its 3d_lowres found beside it) gives nnU-Net's two-stage result."""
    from voxflow.nnunet import predict_nnunet
    from voxflow.store import Store

    folders, images = _build_cascade(tmp_path, monkeypatch)
    low_ref, casc_ref = _nnunet_cascade_predict(folders, images, tmp_path / "nnunet_out")
    store = predict_nnunet(
        images,
        tmp_path / "voxflow_out",
        folders["3d_cascade_fullres"],
        save_probabilities=True,
        progress=False,
        export=False,
    )
    stage = Store.open(tmp_path / "voxflow_out" / "stages" / "3d_lowres.zarr")
    for case, (seg_ref, probs_ref) in casc_ref.items():
        low = stage.label(case).compute()
        seg = store.label(case).compute()
        probs = store.array(case, "probs").compute().astype(np.float32)
        assert low.shape == low_ref[case].shape
        assert seg.shape == seg_ref.shape
        assert probs.shape == probs_ref.shape
        agree_low = float((low == low_ref[case]).mean())
        agree = float((seg == seg_ref).mean())
        err = np.abs(probs - probs_ref)
        print(
            f"cascade {case}: 3d_lowres agreement {agree_low:.6f}, cascade agreement {agree:.6f}, |dp| max "
            f"{err.max():.2e} mean {err.mean():.2e}, classes {np.bincount(seg_ref.ravel(), minlength=3)}"
        )
        assert agree_low >= 0.999, f"{case}: 3d_lowres {agree_low:.5f} voxel agreement"
        assert agree >= 0.999, f"{case}: cascade {agree:.5f} voxel agreement"
        assert np.bincount(seg_ref.ravel(), minlength=3)[1:].min() > 0  # both foreground classes predicted
        assert err.mean() < 1e-3
        assert float(np.quantile(err, 0.999)) < 0.1
