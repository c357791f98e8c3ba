"""Benchmark: nnU-Net 2.8.1 vs voxflow, one run, the same data and the same nnU-Net model; JSON + ratios.

Run it with the venv of ``make test-nnunet`` (nnunetv2 installed beside voxflow)::

    PYTHONPATH=. .venv-nnunet/bin/python benchmarks/vs_nnunet.py --cases 6 --threads 2

Steps, in a temporary folder: the hippocampus dev cases (``../shared/data/hippocampus-dev``, MSD
layout) are written as an nnU-Net raw dataset; nnU-Net extracts the fingerprint and plans (its own
3d_fullres plan, unchanged: for this data 4 stages 32-256, patch 40x56x40); one fold of **seeded
random weights** is saved in nnU-Net's checkpoint format (speed does not depend on training; voxel
agreement of random weights is a harder test than of a trained model, whose classes have margins).
Then the first ``--cases`` cases are predicted with mirroring (TTA) on, in two subprocesses one after
the other: ``nnUNetPredictor.predict_from_files`` (nnU-Net's own predictor, 1 preprocessing and 1
export process) and ``voxflow.nnunet.predict_nnunet`` (``voxflow predict --nnunet-model``). Each
reports wall seconds and peak RSS (VmHWM); voxel agreement compares their label files. Not
measured here (yet): plan + preprocess and training s/iteration side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from voxflow.testing import run_with_memory_cap, write_nnunet_model_folder

log = logging.getLogger("voxflow.benchmarks.vs_nnunet")
DATASET_ID = 903
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus-dev"

NNUNET = textwrap.dedent("""
    import time, torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    torch.set_num_threads({threads})
    t = time.perf_counter()
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, perform_everything_on_device=False,
                        device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder({model!r}, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    p.predict_from_files({inp!r}, {out!r}, save_probabilities=False, overwrite=True,
                         num_processes_preprocessing=1, num_processes_segmentation_export=1)
    print("WALL", time.perf_counter() - t)
""")

VOXFLOW = textwrap.dedent("""
    import time, torch
    from voxflow.nnunet import predict_nnunet
    torch.set_num_threads({threads})
    t = time.perf_counter()
    predict_nnunet({inp!r}, {out!r}, {model!r}, tta=True, progress=False, postprocessing=None)
    print("WALL", time.perf_counter() - t)
""")


def _raw_dataset(root: Path, n_test: int) -> tuple[Path, list[str]]:
    """The dev cases as nnU-Net raw data (``imagesTr/X_0000.nii.gz``, ``labelsTr``, ``dataset.json``); the
    first ``n_test`` images are also copied to ``imagesTs`` for prediction. Returns (imagesTs, case ids)."""
    import SimpleITK as sitk

    raw = root / "nnUNet_raw" / f"Dataset{DATASET_ID}_Hippocampus"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (DATA / "images").glob("*.nii.gz"))
    for cid in ids:
        shutil.copy(DATA / "images" / f"{cid}.nii.gz", raw / "imagesTr" / f"{cid}_0000.nii.gz")
        lab = sitk.ReadImage(str(DATA / "labels" / f"{cid}.nii.gz"))
        sitk.WriteImage(sitk.Cast(lab, sitk.sitkUInt8), str(raw / "labelsTr" / f"{cid}.nii.gz"))
    for cid in ids[:n_test]:
        shutil.copy(DATA / "images" / f"{cid}.nii.gz", raw / "imagesTs" / f"{cid}_0000.nii.gz")
    (raw / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "MRI"},
                "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                "numTraining": len(ids),
                "file_ending": ".nii.gz",
            }
        )
    )
    return raw / "imagesTs", ids[:n_test]


def build_model(root: Path, n_test: int) -> tuple[Path, Path, list[str], dict[str, Any]]:
    """nnU-Net fingerprints and plans the dev data; one fold of seeded random weights."""
    import torch

    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / name)  # nnunetv2 reads its folders from the environment
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    test_dir, ids = _raw_dataset(root, n_test)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = f"Dataset{DATASET_ID}_Hippocampus"
    extract_fingerprints(
        [DATASET_ID], num_processes=1, check_dataset_integrity=False, show_progress_bar=False, verbose=False
    )
    plans_id = plan_experiments([DATASET_ID])
    plans = json.loads((root / "nnUNet_preprocessed" / name / f"{plans_id}.json").read_text())
    dataset = json.loads((root / "nnUNet_raw" / name / "dataset.json").read_text())
    cm = PlansManager(plans).get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = get_network_from_plans(
        cm.network_arch_class_name,
        cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import,
        1,
        3,
        deep_supervision=True,
    )
    model = root / "nnUNet_results" / name / f"nnUNetTrainer__{plans_id}__3d_fullres"
    write_nnunet_model_folder(model, {0: net.state_dict()}, plans=plans, dataset=dataset, configuration="3d_fullres")
    kw = cm.network_arch_init_kwargs
    plan = {"patch_size": cm.patch_size, "batch_size": cm.batch_size, "features_per_stage": kw["features_per_stage"]}
    return model, test_dir, ids, plan


def agreement(a_dir: Path, b_dir: Path, ids: list[str]) -> float:
    """Fraction of voxels with the same label in both tools' label files."""
    import SimpleITK as sitk

    same = total = 0
    for cid in ids:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(a_dir / f"{cid}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(b_dir / f"{cid}.nii.gz")))
        same += int((a == b).sum())
        total += a.size
    return same / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=6, help="cases to predict (of the 24 dev cases)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per tool")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(dir=args.work) as d:
        tmp = Path(d)
        model, test_dir, ids, plan = build_model(tmp / "nnunet", args.cases)
        res: dict[str, Any] = {}
        for tool, template in (("nnunet", NNUNET), ("voxflow", VOXFLOW)):
            out = tmp / f"out_{tool}"
            code = template.format(threads=args.threads, model=str(model), inp=str(test_dir), out=str(out))
            peak, stdout = run_with_memory_cap(code, timeout=3 * 3600, env=dict(os.environ))
            wall = float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("WALL")))
            res[tool] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20, 1)}
            log.info("%s: %s", tool, res[tool])
        agree = agreement(tmp / "out_nnunet", tmp / "out_voxflow", ids)
    ratio = res["nnunet"]["wall_s"] / res["voxflow"]["wall_s"]
    report = {
        "benchmark": "vs_nnunet",
        "data": "hippocampus-dev",
        "cases": len(ids),
        "tta": True,
        "weights": "seeded random (not trained)",
        "nnunet_plan": plan,
        "threads": args.threads,
        "predict": {**res, "speed_ratio_voxflow_over_nnunet": round(ratio, 2), "voxel_agreement": round(agree, 5)},
    }
    print(json.dumps(report, indent=2))
    print("\n| stage | nnU-Net | voxflow | voxflow speed vs nnU-Net | voxel agreement |\n|---|---|---|---|---|")
    print(
        f"| predict {len(ids)} cases, TTA, same model | {res['nnunet']['wall_s']} s, {res['nnunet']['peak_rss_mb']} MB "
        f"| {res['voxflow']['wall_s']} s, {res['voxflow']['peak_rss_mb']} MB | {ratio:.2f}x | {100 * agree:.3f}% |"
    )


if __name__ == "__main__":
    main()
