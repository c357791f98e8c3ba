"""Compatibility alias: :class:`LabelSpec` lives in :mod:`voxflow.models`."""

from voxflow.models import LabelSpec

__all__ = ["LabelSpec"]
