"""Helpers of ``benchmarks/vs_nnunet.py``: process-tree measurement, nnU-Net raw data, random-weight models.

Kept apart so that the benchmark script holds only its rows. No voxflow internals: only public APIs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from voxflow.testing import write_nnunet_model_folder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hippocampus-dev"
NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def load_now() -> list[float]:
    """``os.getloadavg()`` rounded: 1, 5 and 15 minute load averages (this machine has 2 cores)."""
    return [round(x, 2) for x in os.getloadavg()]


def _tree_memory(pid: int) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over ``pid`` and all its descendants (psutil reads smaps_rollup)."""
    import psutil

    pss = rss = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            info = p.memory_full_info()
        except psutil.Error:
            continue  # exited between listing and reading
        pss += int(getattr(info, "pss", info.rss))
        rss += int(info.rss)
    return pss, rss


def run_measured(argv: list[str], *, env: dict[str, str], timeout: float, period_s: float = 0.1) -> dict[str, Any]:
    """Run ``argv``; return its wall seconds, peak summed PSS and peak summed RSS of its process tree
    (sampled every ``period_s`` s, or less often where a sample's own CPU time would exceed 5% of a
    core: peaks shorter than the period can be missed), its stdout and stderr.

    Raises RuntimeError with the output's tail when the command fails.
    """
    peaks = [0, 0]
    with (
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as out,
        tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err,
    ):
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                c = time.thread_time()
                pss, rss = _tree_memory(proc.pid)
                peaks[0], peaks[1] = max(peaks[0], pss), max(peaks[1], rss)
                # reading smaps costs the kernel ~0.1 s of CPU per 2 GB process: at a fixed 0.1 s period
                # the sampler took ~half a core from the 2-core machine's measured tools; cap it at ~5%
                done.wait(max(period_s, 20 * (time.thread_time() - c)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        finally:
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
            if proc.poll() is None:
                proc.kill()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if rc != 0:
        raise RuntimeError(f"{argv[:4]} failed ({rc}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return {
        "process_wall_s": round(wall, 1),
        "peak_pss_mb": round(peaks[0] / 1e6, 1),
        "peak_rss_sum_mb": round(peaks[1] / 1e6, 1),
        "stdout": stdout,
        "stderr": stderr,
    }


def run_python(code: str, *, env: dict[str, str], timeout: float) -> dict[str, Any]:
    """:func:`run_measured` of ``python -c code`` (this interpreter); a ``WALL <s>`` line it prints
    becomes ``wall_s`` (the timed part, imports excluded), else ``wall_s`` is the process wall."""
    res = run_measured([sys.executable, "-c", code], env=env, timeout=timeout)
    walls = [float(line.split()[1]) for line in res["stdout"].splitlines() if line.startswith("WALL ")]
    res["wall_s"] = round(walls[-1], 1) if walls else res["process_wall_s"]
    return res


def nnunet_env(root: Path, **extra: str) -> dict[str, str]:
    """This process's environment plus nnU-Net's three folders under ``root`` (created)."""
    env = dict(os.environ)
    for name in NNUNET_FOLDERS:
        (root / name).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / name)
    env.update(extra)
    return env


def nnunet_bin(name: str) -> str:
    """An nnU-Net console script beside this interpreter (the ``.venv-nnunet``), e.g. ``nnUNetv2_train``."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise SystemExit(f"{path} not found: run this benchmark with the python of the nnU-Net venv (make test-nnunet)")
    return str(path)


def hippocampus_raw(raw: Path, n_test: int) -> list[str]:
    """The dev cases (MSD layout) as nnU-Net raw data under ``raw`` (``imagesTr/X_0000.nii.gz``,
    ``labelsTr`` as uint8, ``dataset.json``); the first ``n_test`` images also in ``imagesTs``.
    Returns the test case ids."""
    import SimpleITK as sitk

    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (raw / sub).mkdir(parents=True, exist_ok=True)
    ids = sorted(p.name[: -len(".nii.gz")] for p in (DATA / "images").glob("*.nii.gz"))
    if not ids:
        raise SystemExit(f"no images in {DATA / 'images'}: this benchmark needs ../shared/data/hippocampus-dev")
    for cid in ids:
        shutil.copy(DATA / "images" / f"{cid}.nii.gz", raw / "imagesTr" / f"{cid}_0000.nii.gz")
        lab = sitk.ReadImage(str(DATA / "labels" / f"{cid}.nii.gz"))
        sitk.WriteImage(sitk.Cast(lab, sitk.sitkUInt8), str(raw / "labelsTr" / f"{cid}.nii.gz"))
    for cid in ids[:n_test]:
        shutil.copy(DATA / "images" / f"{cid}.nii.gz", raw / "imagesTs" / f"{cid}_0000.nii.gz")
    dataset = {
        "channel_names": {"0": "MRI"},
        "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
        "numTraining": len(ids),
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset))
    return ids[:n_test]


def random_nnunet_model(root: Path, dataset_name: str, *, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """One fold of seeded random weights for nnU-Net's own ``3d_fullres`` plan of ``dataset_name``
    (planned beforehand into ``root/nnUNet_preprocessed``), saved as an nnU-Net model folder under
    ``root/nnUNet_results``. Returns (model folder, a summary of the plan)."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((root / "nnUNet_preprocessed" / dataset_name / "nnUNetPlans.json").read_text())
    dataset = json.loads((root / "nnUNet_raw" / dataset_name / "dataset.json").read_text())
    cm = PlansManager(plans).get_configuration("3d_fullres")
    torch.manual_seed(seed)
    kw = cm.network_arch_init_kwargs
    n_in, n_out = len(dataset["channel_names"]), len(dataset["labels"])
    net = get_network_from_plans(
        cm.network_arch_class_name, kw, cm.network_arch_init_kwargs_req_import, n_in, n_out, deep_supervision=True
    )
    model = root / "nnUNet_results" / dataset_name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    write_nnunet_model_folder(model, {0: net.state_dict()}, plans=plans, dataset=dataset, configuration="3d_fullres")
    summary = {
        "patch_size": list(cm.patch_size),
        "batch_size": cm.batch_size,
        "spacing": list(cm.spacing),
        "n_stages": kw["n_stages"],
        "features_per_stage": list(kw["features_per_stage"]),
    }
    return model, summary


def agreement(a_dir: Path, b_dir: Path, ids: list[str]) -> float:
    """Fraction of voxels with the same label in both tools' label files ``<id>.nii.gz``."""
    import SimpleITK as sitk

    same = total = 0
    for cid in ids:
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(a_dir / f"{cid}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(b_dir / f"{cid}.nii.gz")))
        if a.shape != b.shape:
            raise RuntimeError(f"case {cid!r}: label shapes differ, {a.shape} vs {b.shape}")
        same += int((a == b).sum())
        total += a.size
    return same / total


def n_voxels(folder: Path) -> int:
    """Voxels in all ``*.nii.gz`` images of ``folder`` (header only)."""
    import SimpleITK as sitk

    total = 0
    for p in sorted(folder.glob("*.nii.gz")):
        r = sitk.ImageFileReader()
        r.SetFileName(str(p))
        r.ReadImageInformation()
        n = 1
        for s in r.GetSize():
            n *= s
        total += n
    return total
