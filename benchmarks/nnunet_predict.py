"""Benchmark: nnU-Net v2's own predictor vs voxflow's out-of-core predictor on the same nnU-Net model.

Needs nnunetv2 (run it with the venv of ``make test-nnunet``)::

    .venv-nnunet/bin/python benchmarks/nnunet_predict.py --quick            # 2M and 8M voxels
    .venv-nnunet/bin/python benchmarks/nnunet_predict.py --sizes 64M 256M   # larger volumes (slow on CPU)

Steps: nnU-Net fingerprints and plans a tiny synthetic dataset (in-process, its folders in a
temporary directory); the plan is shrunk (3 stages, ``--features``, ``--patch``) and one fold of
seeded random weights is saved in nnU-Net's checkpoint format. For each size, one CT-like int16
volume (spacing = the plan's, so no resampling unless ``--resample``) is written as ``.mha`` slab
by slab; then one subprocess runs ``nnUNetPredictor.predict_single_npy_array`` on it (read, predict,
write the segmentation file) and another runs ``voxflow.nnunet.predict_nnunet`` (convert to Zarr,
predict, write the segmentation file). Each reports wall seconds and peak RSS (the child's VmHWM);
the script prints one JSON document. Mirroring is off unless ``--tta`` (8x the network time).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from voxflow.testing import run_with_memory_cap, write_nnunet_model_folder

log = logging.getLogger("voxflow.benchmarks.nnunet_predict")
DATASET_ID = 902

NNUNET = textwrap.dedent("""
    import time, torch
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    torch.set_num_threads({threads})
    t = time.perf_counter()
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring={tta}, perform_everything_on_device=False,
                        device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder({model!r}, use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    img, props = SimpleITKIO().read_images([{image!r}])
    p.predict_single_npy_array(img, props, None, {out!r}, False)
    print("WALL", time.perf_counter() - t)
""")

VOXFLOW = textwrap.dedent("""
    import time, torch
    from voxflow.nnunet import predict_nnunet
    torch.set_num_threads({threads})
    t = time.perf_counter()
    predict_nnunet([{image!r}], {out!r}, {model!r}, tta={tta}, progress=False, cache_bytes={cache})
    print("WALL", time.perf_counter() - t)
""")


def _voxels(text: str) -> int:
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * mult[text[-1].upper()]) if text[-1].upper() in mult else int(text)


def _shape(n: int) -> tuple[int, int, int]:
    """A CT-like shape (z about a quarter of y and x) with about ``n`` voxels."""
    side = round((4 * n) ** (1 / 3))
    return max(8, round(n / side**2)), side, side


def _set_nnunet_paths(root: Path) -> None:
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / name).mkdir(parents=True, exist_ok=True)
        os.environ[name] = str(root / name)  # nnunetv2 reads its folders from the environment
    os.environ.setdefault("nnUNet_def_n_proc", "1")


def build_model(root: Path, *, features: int, patch: int, spacing: float, resample: bool) -> Path:
    """nnU-Net plans a tiny synthetic dataset; one fold of seeded random weights. Returns the model folder."""
    import torch

    from voxflow.synthetic import make_dataset

    _set_nnunet_paths(root)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    name = f"Dataset{DATASET_ID}_Bench"
    raw = make_dataset(
        root / "nnUNet_raw" / name,
        kind="ct",
        n_cases=2,
        shape_zyx=(24, 48, 48),
        spacing_zyx=(spacing,) * 3,
        file_ending=".mha",
        seed=5,
    )
    extract_fingerprints([DATASET_ID], num_processes=1, show_progress_bar=False, verbose=False)
    plans_id = plan_experiments([DATASET_ID])
    plans_file = root / "nnUNet_preprocessed" / name / f"{plans_id}.json"
    plans = json.loads(plans_file.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    plans["configurations"] = {"3d_fullres": cfg}
    kw = cfg["architecture"]["arch_kwargs"]
    kw.update(
        n_stages=3,
        features_per_stage=[features, 2 * features, 4 * features],
        kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        n_conv_per_stage=[2, 2, 2],
        n_conv_per_stage_decoder=[2, 2],
    )
    cfg.update(patch_size=[patch] * 3, spacing=[spacing * (1.25 if resample else 1.0)] * 3)
    plans_file.write_text(json.dumps(plans, indent=2))
    dataset = json.loads((raw / "dataset.json").read_text())
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(0)
    net = get_network_from_plans(
        cm.network_arch_class_name,
        cm.network_arch_init_kwargs,
        cm.network_arch_init_kwargs_req_import,
        1,
        pm.get_label_manager(dataset).num_segmentation_heads,
        deep_supervision=True,
    )
    model = root / "nnUNet_results" / name / f"nnUNetTrainer__{plans_id}__3d_fullres"
    write_nnunet_model_folder(model, {0: net.state_dict()}, plans=plans, dataset=dataset, configuration="3d_fullres")
    return model


def run(size: int, model: Path, tmp: Path, *, tta: bool, threads: int, spacing: float, cache_mb: int) -> dict[str, Any]:
    from voxflow.synthetic import write_large_volume

    shape = _shape(size)
    image = tmp / f"big_{size}_0000.mha"
    write_large_volume(image, shape, spacing_zyx=(spacing,) * 3)
    result: dict[str, Any] = {
        "shape_zyx": list(shape),
        "voxels": int(shape[0] * shape[1] * shape[2]),
        "input_mb": round(image.stat().st_size / 2**20, 1),
    }
    for tool, template, out in (
        ("nnunet", NNUNET, str(tmp / f"nnunet_{size}")),
        ("voxflow", VOXFLOW, str(tmp / f"voxflow_{size}")),
    ):
        code = template.format(
            threads=threads, tta=tta, model=str(model), image=str(image), out=out, cache=cache_mb * 2**20
        )
        try:
            peak, stdout = run_with_memory_cap(code, timeout=6 * 3600, env=dict(os.environ))
            wall = float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("WALL")))
            result[tool] = {"wall_s": round(wall, 1), "peak_rss_mb": round(peak / 2**20, 1)}
        except RuntimeError as e:  # e.g. killed for memory: report, keep going
            result[tool] = {"error": str(e).splitlines()[0][:200]}
        log.info("%s %s: %s", shape, tool, result[tool])
    image.unlink(missing_ok=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["8M", "32M"], help="volume sizes in voxels (K/M/G suffixes)")
    ap.add_argument("--quick", action="store_true", help="2M and 8M voxels")
    ap.add_argument("--features", type=int, default=8, help="features of the first stage (x2 per stage)")
    ap.add_argument("--patch", type=int, default=64, help="patch edge in voxels (multiple of 4)")
    ap.add_argument("--spacing", type=float, default=1.0, help="voxel spacing of the volume (mm, isotropic)")
    ap.add_argument("--resample", action="store_true", help="plan 1.25x the spacing: both tools resample")
    ap.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (8x slower)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per run")
    ap.add_argument("--cache-mb", type=int, default=256, help="voxflow accumulator cache")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sizes = ["2M", "8M"] if args.quick else args.sizes
    with tempfile.TemporaryDirectory(dir=args.work) as d:
        tmp = Path(d)
        model = build_model(
            tmp / "nnunet", features=args.features, patch=args.patch, spacing=args.spacing, resample=args.resample
        )
        results = [
            run(
                _voxels(s), model, tmp, tta=args.tta, threads=args.threads, spacing=args.spacing, cache_mb=args.cache_mb
            )
            for s in sizes
        ]
    print(
        json.dumps(
            {
                "benchmark": "nnunet_predict",
                "features": args.features,
                "patch": args.patch,
                "tta": args.tta,
                "resample": args.resample,
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
