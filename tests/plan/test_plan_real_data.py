from __future__ import annotations

import numpy as np


# ~8 s: converts the 24 real hippocampus cases, fingerprints and plans them
def test_hippocampus_plan_matches_nnunet(shared_data, tmp_path) -> None:
    """MSD Hippocampus: nnU-Net v2 plans 3d_fullres at 1 mm with patch (40, 56, 40), 4 stages, z-score;
    2d with patch (56, 40). The fingerprint must see every foreground voxel's class."""
    import SimpleITK as sitk

    from voxflow.fingerprint import compute_fingerprint
    from voxflow.io import convert
    from voxflow.plan import plan_experiment

    src = shared_data / "hippocampus-dev"
    store = convert(src, tmp_path / "ds.zarr", progress=False)
    fp = compute_fingerprint(store, progress=False)
    assert fp.n_cases == 24
    assert fp.spacing.median_zyx == (1.0, 1.0, 1.0)
    counts = np.zeros(3, np.int64)
    for path in sorted((src / "labels").glob("*.nii.gz")):
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int64)
        counts += np.bincount(lab.ravel(), minlength=3)[:3]
    assert [c.voxel_count for c in fp.classes] == counts.tolist()
    plan = plan_experiment(fp)
    full, flat = plan.configuration("3d_fullres"), plan.configuration("2d")
    assert full.spacing_zyx == (1.0, 1.0, 1.0)
    assert full.patch_size_vox == (40, 56, 40)
    assert full.network.n_stages == 4
    assert flat.patch_size_vox == (1, 56, 40)
    assert [n.scheme for n in full.normalization] == ["zscore"]
    assert "3d_lowres" not in plan.configurations
