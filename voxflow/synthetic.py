"""Deterministic synthetic datasets in nnU-Net v2 raw format, for demos, tests and benchmarks.

Four kinds, all seeded (case ``i`` depends only on ``(seed, i)``, so adding cases never changes
earlier ones) and learnable by a small U-Net (classes differ in mean intensity and shape, or, for
``"landmark"``, in their distance to a landmark):

* ``"ct"``  -- one channel ``"CT"`` in Hounsfield units (int16): air, an elliptic body with a
  bright spine, an enhancing ellipsoid organ (label 1) holding a hypodense lesion (label 2);
  anisotropic spacing (default 2.5 x 0.8 x 0.8 mm, z y x).
* ``"mr"``  -- two float32 channels ``"T1"``/``"T2"`` with a smooth bias field: a brain-like
  ellipsoid holding a tumour (label 2) inside oedema (label 1); 1 mm isotropic.
* ``"2d"``  -- single 2D slices (one ``"CT"`` channel, organ + lesion), written as 2D images.
* ``"landmark"`` -- one float32 channel ``"MR"``: a bright plate across one y end of the volume and a
  dark one across the other (the landmarks; which end is bright is drawn per case), and two flat
  blobs that look the same (same intensity, same size distribution, same noise): label 1 (``"near"``)
  centred 0.29 of the y extent from the bright plate, label 2 (``"far"``) 0.29 from the dark one.
  Every blob voxel is 0.17-0.31 of the y extent from its plate: only a patch reaching that far tells
  the classes apart (the cascade test data: the first stage's context decides the class).
  Mirror-invariant, unlike "upper half of the volume": nnU-Net's mirroring augmentation keeps the
  rule true. 1 mm isotropic.

:func:`write_large_volume` writes one very large CT-like volume as an uncompressed MHA or NRRD file
slab by slab (never holding the whole volume), for out-of-core conversion tests and benchmarks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from voxflow._types import PathLikeStr
from voxflow.errors import VoxflowError

__all__ = [
    "KINDS",
    "large_volume_slab",
    "make_dataset",
    "synthetic_volume",
    "write_large_volume",
]

log = logging.getLogger(__name__)

KINDS = ("ct", "mr", "2d", "landmark")
_DEFAULT_SPACING = {"ct": (2.5, 0.8, 0.8), "mr": (1.0, 1.0, 1.0), "2d": (1.0, 0.5, 0.5), "landmark": (1.0, 1.0, 1.0)}
_CHANNELS = {"ct": ("CT",), "mr": ("T1", "T2"), "2d": ("CT",), "landmark": ("MR",)}
_LABELS = {
    "ct": {"background": 0, "organ": 1, "lesion": 2},
    "mr": {"background": 0, "edema": 1, "tumor": 2},
    "2d": {"background": 0, "organ": 1, "lesion": 2},
    "landmark": {"background": 0, "near": 1, "far": 2},
}


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        import difflib

        close = difflib.get_close_matches(str(kind), KINDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise VoxflowError(f"kind must be one of {KINDS}; got {kind!r}.{hint}")
    return kind


def _grid(shape_zyx: Sequence[int], lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, ...]:
    """Normalised coordinates in [-1, 1] per axis for z rows ``lo:hi`` of a volume (broadcastable)."""
    z, y, x = (int(s) for s in shape_zyx)
    hi = z if hi is None else hi

    def lin(n: int) -> np.ndarray:
        return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)

    gz = lin(z)[lo:hi].astype(np.float32)[:, None, None]
    gy = lin(y).astype(np.float32)[None, :, None]
    gx = lin(x).astype(np.float32)[None, None, :]
    return gz, gy, gx


def _ellipsoid(g: tuple[np.ndarray, ...], centre: ArrayLike, radii: ArrayLike) -> np.ndarray:
    c, r = np.asarray(centre, float), np.asarray(radii, float)
    return np.asarray(sum(((gi - ci) / ri) ** 2 for gi, ci, ri in zip(g, c, r, strict=True)) <= 1.0)


def _ct_params(rng: np.random.Generator, flat: bool) -> dict[str, Any]:
    organ_c = np.array([0.0 if flat else rng.uniform(-0.2, 0.2), rng.uniform(-0.2, 0.2), rng.uniform(-0.25, 0.1)])
    organ_r = np.array([10.0 if flat else rng.uniform(0.5, 0.65), rng.uniform(0.35, 0.45), rng.uniform(0.35, 0.5)])
    lesion_r_frac = rng.uniform(0.4, 0.55)
    lesion_r = organ_r * lesion_r_frac
    if flat:
        lesion_r[0] = 10.0
    offset = rng.uniform(-1, 1, size=3) * (organ_r - lesion_r) * 0.4
    if flat:
        offset[0] = 0.0
    return {
        "organ_c": organ_c,
        "organ_r": organ_r,
        "lesion_c": organ_c + offset,
        "lesion_r": lesion_r,
        "organ_hu": rng.uniform(130, 170),
        "lesion_hu": rng.uniform(40, 70),
        "noise_hu": rng.uniform(12, 20),
    }


def _ct_slab(
    g: tuple[np.ndarray, ...], p: dict[str, Any], noise: np.ndarray, flat: bool
) -> tuple[np.ndarray, np.ndarray]:
    """CT-like HU slab (int16) and its label (uint8) on grid ``g``; ``noise`` is unit normal noise."""
    gz, gy, gx = g
    shape = np.broadcast_shapes(gz.shape, gy.shape, gx.shape)
    body = np.broadcast_to(((gy / 0.8) ** 2 + (gx / 0.92) ** 2) <= 1.0, shape)
    spine = np.broadcast_to(((gy - 0.55) / 0.12) ** 2 + (gx / 0.12) ** 2 <= 1.0, shape)
    organ = _ellipsoid(g, p["organ_c"], p["organ_r"])
    lesion = _ellipsoid(g, p["lesion_c"], p["lesion_r"]) & organ
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 20.0
    hu[spine] = 700.0
    hu[organ] = p["organ_hu"]
    hu[lesion] = p["lesion_hu"]
    hu += (p["noise_hu"] * noise).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[organ] = 1
    label[lesion] = 2
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), label


def _mr_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    g = _grid(shape)
    brain = _ellipsoid(g, (0.0, 0.0, 0.0), (0.85, 0.85, 0.8))
    tumor_c = rng.uniform(-0.3, 0.3, size=3)
    tumor_r = rng.uniform(0.12, 0.22, size=3)
    edema_r = tumor_r * rng.uniform(1.6, 2.0)
    edema = _ellipsoid(g, tumor_c, edema_r) & brain
    tumor = _ellipsoid(g, tumor_c, tumor_r) & brain
    label = np.zeros(shape, np.uint8)
    label[edema] = 1
    label[tumor] = 2
    bias = 1.0 + 0.15 * (g[0] * rng.uniform(-1, 1) + g[1] * rng.uniform(-1, 1) + g[2] * rng.uniform(-1, 1))
    means = {"T1": (5.0, 100.0, 85.0, 160.0), "T2": (5.0, 80.0, 210.0, 140.0)}  # air, brain, edema, tumor
    chans = []
    for name in ("T1", "T2"):
        air, tissue, ed, tu = means[name]
        img = np.full(shape, air, np.float32)
        img[brain] = tissue
        img[edema] = ed
        img[tumor] = tu
        noisy = img * bias + rng.normal(0.0, 8.0, size=shape)
        chans.append(np.maximum(noisy, 0.0).astype(np.float32))
    return np.stack(chans), label


# landmark kind, as fractions of the y extent measured from the bright plate's side: plate thickness,
# blob centres (near, far: each as far from its own plate) and their jitter, blob radius in y
_PLATE, _NEAR, _FAR, _JITTER, _RADIUS_Y = 0.06, 0.29, 0.71, 0.01, 0.07
_MEANS = {"background": 100.0, "plate": 400.0, "dark_plate": 20.0, "blob": 250.0}  # MR-like units; noise sd 15


def _landmark_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Bright plate at one y end, dark plate at the other, a "near" (1) and a "far" (2) blob identical
    but for which plate they lie next to (each 0.29 of the y extent from its own plate)."""
    gz, gy, gx = _grid(shape)
    flip = bool(rng.integers(2))  # bright plate at y = 0 (False) or at the last y row (True)
    d = (1.0 - gy if flip else gy + 1.0) / 2.0  # distance from the bright plate's side, fraction of y
    plate, dark = np.broadcast_to(d < _PLATE, shape), np.broadcast_to(d > 1.0 - _PLATE, shape)
    label = np.zeros(shape, np.uint8)
    for value, centre in ((1, _NEAR), (2, _FAR)):
        cd = centre + rng.uniform(-_JITTER, _JITTER)
        cy = (1.0 - 2.0 * cd) if flip else (2.0 * cd - 1.0)
        radii = (rng.uniform(0.5, 0.6), 2.0 * _RADIUS_Y * rng.uniform(0.9, 1.1), rng.uniform(0.5, 0.6))  # flat discs
        centre_zyx = (rng.uniform(-0.2, 0.2), cy, rng.uniform(-0.2, 0.2))
        label[_ellipsoid((gz, gy, gx), centre_zyx, radii)] = value
    img = np.full(shape, _MEANS["background"], np.float32)
    img[plate] = _MEANS["plate"]
    img[dark] = _MEANS["dark_plate"]
    img[label > 0] = _MEANS["blob"]
    img += rng.normal(0.0, 15.0, size=shape).astype(np.float32)
    return np.maximum(img, 1.0)[None], label


def synthetic_volume(
    kind: str, shape_zyx: Sequence[int], *, seed: int | Sequence[int] = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: image (C, Z, Y, X) and label (Z, Y, X) uint8.

    CT and 2D images are int16 HU, MR and landmark images float32. For ``"2d"`` the z size is forced to 1.
    """
    _check_kind(kind)
    shape = tuple(int(s) for s in shape_zyx)
    if len(shape) != 3 or min(shape) < 1:
        raise VoxflowError(f"shape_zyx must be three positive sizes (z, y, x); got {shape_zyx!r}")
    rng = np.random.default_rng(seed)
    if kind == "mr":
        return _mr_case(shape, rng)
    if kind == "landmark":
        return _landmark_case(shape, rng)
    flat = kind == "2d"
    if flat:
        shape = (1, shape[1], shape[2])
    params = _ct_params(rng, flat)
    image, label = _ct_slab(_grid(shape), params, rng.standard_normal(shape, dtype=np.float32), flat)
    return image[None], label


def _to_sitk(array: np.ndarray, spacing_zyx: Sequence[float], origin_zyx: Sequence[float], flat: bool) -> Any:
    import SimpleITK as sitk

    if flat:
        img = sitk.GetImageFromArray(np.ascontiguousarray(array[0]))
        img.SetSpacing((float(spacing_zyx[2]), float(spacing_zyx[1])))
        img.SetOrigin((float(origin_zyx[2]), float(origin_zyx[1])))
        return img
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(tuple(float(o) for o in origin_zyx[::-1]))
    return img


def make_dataset(
    out_dir: PathLikeStr,
    *,
    kind: str = "ct",
    n_cases: int = 6,
    shape_zyx: Sequence[int] = (32, 64, 64),
    spacing_zyx: Sequence[float] | None = None,
    seed: int = 0,
    n_test_cases: int = 0,
    file_ending: str = ".nii.gz",
    name: str | None = None,
) -> Path:
    """Write a deterministic nnU-Net v2 raw dataset and return its folder.

    Layout: ``dataset.json``, ``imagesTr/<case>_<CCCC><file_ending>``, ``labelsTr/<case><file_ending>``
    and, when ``n_test_cases > 0``, ``imagesTs/`` + ``labelsTs/``. Case ids are ``syn<kind>_<NNN>``
    (test cases continue the numbering). ``shape_zyx`` is in voxels (z ignored for ``"2d"``),
    ``spacing_zyx`` in mm (default per kind, CT anisotropic).

    >>> p = make_dataset(tmp_path / "ds", kind="ct", n_cases=2, shape_zyx=(8, 16, 16))  # doctest: +SKIP
    """
    import SimpleITK as sitk

    _check_kind(kind)
    if n_cases < 1 or n_test_cases < 0:
        raise VoxflowError(f"n_cases must be >= 1 and n_test_cases >= 0; got {n_cases!r}, {n_test_cases!r}")
    flat = kind == "2d"
    spacing = tuple(float(s) for s in (spacing_zyx or _DEFAULT_SPACING[kind]))
    shape = tuple(int(s) for s in shape_zyx)
    if flat:
        shape = (1, shape[-2], shape[-1])
    origin = tuple(-0.5 * n * s for n, s in zip(shape, spacing, strict=True))
    out = Path(out_dir)
    channels = _CHANNELS[kind]
    prefix = f"syn{kind}"
    splits = [("Tr", i) for i in range(n_cases)] + [("Ts", n_cases + i) for i in range(n_test_cases)]
    for split, i in splits:
        (out / f"images{split}").mkdir(parents=True, exist_ok=True)
        (out / f"labels{split}").mkdir(parents=True, exist_ok=True)
        image, label = synthetic_volume(kind, shape, seed=(seed, i))
        cid = f"{prefix}_{i:03d}"
        for c in range(len(channels)):
            sitk.WriteImage(
                _to_sitk(image[c], spacing, origin, flat),
                str(out / f"images{split}" / f"{cid}_{c:04d}{file_ending}"),
                True,
            )
        sitk.WriteImage(
            _to_sitk(label, spacing, origin, flat), str(out / f"labels{split}" / f"{cid}{file_ending}"), True
        )
    meta = {
        "name": name or f"Synthetic{kind.upper()}",
        "description": f"voxflow synthetic {kind} dataset (seed {seed}, shape_zyx {list(shape)}, "
        f"spacing_zyx {list(spacing)} mm)",
        "channel_names": {str(i): c for i, c in enumerate(channels)},
        "labels": dict(_LABELS[kind]),
        "numTraining": n_cases,
        "file_ending": file_ending,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote synthetic %s dataset with %d+%d cases to %s", kind, n_cases, n_test_cases, out)
    return out


# ---------------------------------------------------------------------- one very large volume
_MET_TYPES = {
    "int16": ("MET_SHORT", "short"),
    "uint8": ("MET_UCHAR", "uint8"),
    "float32": ("MET_FLOAT", "float"),
    "uint16": ("MET_USHORT", "ushort"),
}


def large_volume_slab(
    shape_zyx: Sequence[int], z0: int, z1: int, *, seed: int = 0, dtype: str = "int16"
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``z0:z1`` of the volume :func:`write_large_volume` writes: (image (Z', Y, X), label)."""
    rng_params = np.random.default_rng((seed, 0))
    params = _ct_params(rng_params, flat=False)
    noise = np.stack(
        [
            np.random.default_rng((seed, 1, z)).standard_normal(tuple(shape_zyx[1:]), dtype=np.float32)
            for z in range(z0, z1)
        ]
    )  # seeded per z row: any slab split gives the same volume
    image, label = _ct_slab(_grid(shape_zyx, z0, z1), params, noise, flat=False)
    return image.astype(dtype, copy=False), label


def _header(path: Path, shape: tuple[int, int, int], spacing: Sequence[float], dtype: str) -> bytes:
    nz, ny, nx = shape
    sz, sy, sx = spacing
    if path.suffix == ".mha":
        lines = [
            "ObjectType = Image",
            "NDims = 3",
            "BinaryData = True",
            "BinaryDataByteOrderMSB = False",
            "CompressedData = False",
            "TransformMatrix = 1 0 0 0 1 0 0 0 1",
            "Offset = 0 0 0",
            "CenterOfRotation = 0 0 0",
            "AnatomicalOrientation = RAI",
            f"ElementSpacing = {sx!r} {sy!r} {sz!r}",
            f"DimSize = {nx} {ny} {nz}",
            f"ElementType = {_MET_TYPES[dtype][0]}",
            "ElementDataFile = LOCAL",
        ]
        return ("\n".join(lines) + "\n").encode()
    lines = [
        "NRRD0004",
        f"type: {_MET_TYPES[dtype][1]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {nx} {ny} {nz}",
        f"space directions: ({sx!r},0,0) (0,{sy!r},0) (0,0,{sz!r})",
        "kinds: domain domain domain",
        "endian: little",
        "encoding: raw",
        "space origin: (0,0,0)",
    ]
    return ("\n".join(lines) + "\n\n").encode()


def write_large_volume(
    path: PathLikeStr,
    shape_zyx: Sequence[int],
    *,
    spacing_zyx: Sequence[float] = (1.0, 0.8, 0.8),
    seed: int = 0,
    dtype: str = "int16",
    slab_z: int = 16,
    label_path: PathLikeStr | None = None,
) -> Path:
    """Write one CT-like volume as an uncompressed ``.mha`` or ``.nrrd`` file, ``slab_z`` rows at a time.

    Memory stays at one slab whatever ``shape_zyx`` is, so volumes larger than RAM can be made.
    Optionally writes the matching label (uint8) to ``label_path`` the same way. Voxel values of
    rows ``z0:z1`` are :func:`large_volume_slab` ``(shape_zyx, z0, z1, seed=seed)``.
    """
    p = Path(path)
    if p.suffix not in (".mha", ".nrrd") or dtype not in _MET_TYPES:
        raise VoxflowError(
            f"write_large_volume writes .mha or .nrrd with dtype in {sorted(_MET_TYPES)}; "
            f"got {p.name!r} with {dtype!r}."
        )
    shape = tuple(int(s) for s in shape_zyx)
    lp = Path(label_path) if label_path is not None else None
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "wb") as fi, open(lp, "wb") if lp else open("/dev/null", "wb") as fl:
        fi.write(_header(p, shape, spacing_zyx, dtype))  # type: ignore[arg-type]
        if lp:
            fl.write(_header(lp, shape, spacing_zyx, "uint8"))  # type: ignore[arg-type]
        for z0 in range(0, shape[0], slab_z):
            z1 = min(shape[0], z0 + slab_z)
            image, label = large_volume_slab(shape, z0, z1, seed=seed, dtype=dtype)
            fi.write(np.ascontiguousarray(image).astype(f"<{image.dtype.str[1:]}").tobytes())
            if lp:
                fl.write(np.ascontiguousarray(label).tobytes())
    log.info("wrote large synthetic volume %s %s %s", p, shape, dtype)
    return p
