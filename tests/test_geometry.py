from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from voxflow.errors import GeometryMismatchError
from voxflow.geometry import Geometry


def _oblique_image() -> sitk.Image:
    img = sitk.Image(7, 5, 3, sitk.sitkFloat32)  # x, y, z
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetOrigin((-10.0, 20.0, 5.5))
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return img


def test_from_sitk_reverses_axes_and_round_trips() -> None:
    img = _oblique_image()
    g = Geometry.from_sitk(img)
    assert g.shape_zyx == (3, 5, 7)
    assert g.spacing_zyx == (2.5, 0.9, 0.8)
    assert g.origin_zyx == (5.5, 20.0, -10.0)
    out = g.apply_to_sitk(sitk.Image(7, 5, 3, sitk.sitkFloat32))
    assert out.GetSpacing() == img.GetSpacing()
    assert out.GetOrigin() == img.GetOrigin()
    np.testing.assert_allclose(out.GetDirection(), img.GetDirection())


def test_index_to_physical_matches_sitk() -> None:
    img = _oblique_image()
    g = Geometry.from_sitk(img)
    for idx_xyz in [(0, 0, 0), (6, 4, 2), (3, 1, 2)]:
        expected_xyz = img.TransformIndexToPhysicalPoint(idx_xyz)
        got_zyx = g.index_to_physical(idx_xyz[::-1])
        np.testing.assert_allclose(got_zyx[::-1], expected_xyz, atol=1e-9)


def test_2d_image_becomes_single_slice_and_round_trips() -> None:
    img = sitk.Image(6, 4, sitk.sitkUInt8)
    img.SetSpacing((0.5, 0.25))
    img.SetOrigin((1.0, 2.0))
    g = Geometry.from_sitk(img)
    assert g.shape_zyx == (1, 4, 6)
    assert g.is_2d
    assert g.spacing_zyx == (1.0, 0.25, 0.5)
    out = g.apply_to_sitk(sitk.Image(6, 4, sitk.sitkUInt8))
    assert out.GetSpacing() == (0.5, 0.25)
    assert out.GetOrigin() == (1.0, 2.0)


def test_dict_round_trip_and_crop() -> None:
    g = Geometry.from_sitk(_oblique_image())
    assert Geometry.from_dict(g.to_dict()) == g
    c = g.cropped([(1, 3), (2, 5), (0, 7)])
    assert c.shape_zyx == (2, 3, 7)
    np.testing.assert_allclose(c.origin_zyx, g.index_to_physical((1, 2, 0)))


def test_check_matches_names_case_and_field() -> None:
    g = Geometry(shape_zyx=(3, 4, 5), spacing_zyx=(1, 1, 1))
    g.check_matches(Geometry(shape_zyx=(3, 4, 5), spacing_zyx=(1.00001, 1, 1)))
    with pytest.raises(GeometryMismatchError, match="shape.*case 'c1'"):
        g.check_matches(Geometry(shape_zyx=(3, 4, 6), spacing_zyx=(1, 1, 1)), case="c1")
    with pytest.raises(GeometryMismatchError, match="origin"):
        g.check_matches(Geometry(shape_zyx=(3, 4, 5), spacing_zyx=(1, 1, 1), origin_zyx=(0, 0, 3)))


def test_invalid_geometry_rejected() -> None:
    with pytest.raises(ValueError, match="spacing_zyx"):
        Geometry(shape_zyx=(1, 2, 3), spacing_zyx=(0, 1, 1))
