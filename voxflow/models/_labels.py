"""What the network predicts, derived from the dataset's label declaration (``DatasetMeta.labels``).

* Plain labels ``{"background": 0, "organ": 1, "lesion": 2}``: softmax over ``max + 1`` classes.
* An ``"ignore"`` label (nnU-Net convention: the highest value): voxels carrying it are excluded from
  the loss and from the pseudo-Dice; it is not a network output.
* Regions ``{"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": [3]}``: one sigmoid output
  per non-background region (overlapping regions allowed, BraTS style).
"""

from __future__ import annotations

from dataclasses import dataclass

from voxflow.errors import PlanError
from voxflow.store import DatasetMeta

__all__ = ["LabelSpec", "previous_stage_labels"]


@dataclass(frozen=True)
class LabelSpec:
    """Outputs of a segmentation network: ``names`` of the foreground outputs scored by the
    pseudo-Dice, the softmax class values or the sigmoid regions, and the ignore value."""

    num_outputs: int
    names: tuple[str, ...]
    regions: tuple[tuple[int, ...], ...] | None = None
    ignore_label: int | None = None

    @property
    def uses_regions(self) -> bool:
        return self.regions is not None

    @classmethod
    def from_meta(cls, meta: DatasetMeta) -> LabelSpec:
        labels = dict(meta.labels)
        ignore = labels.pop("ignore", None)
        if ignore is not None and not isinstance(ignore, int):
            raise PlanError(
                f"the 'ignore' label must be one integer value; got {ignore!r} in dataset "
                f"{meta.name!r}. Fix dataset.json."
            )
        if meta.has_regions:
            regions = {k: (v if isinstance(v, tuple) else (v,)) for k, v in labels.items() if v != 0}
            return cls(len(regions), tuple(regions), tuple(regions.values()), ignore)
        values = sorted(int(v) for v in labels.values())
        if values != list(range(len(values))):
            raise PlanError(
                f"label values must be consecutive integers from 0; got {values} in dataset "
                f"{meta.name!r}. Relabel the dataset."
            )
        if ignore is not None and ignore < len(values):
            raise PlanError(
                f"the 'ignore' label must be larger than every class value; got {ignore} with "
                f"classes {values} in dataset {meta.name!r}."
            )
        by_value = {int(v): k for k, v in labels.items()}
        return cls(len(values), tuple(by_value[v] for v in range(1, len(values))), None, ignore)


def previous_stage_labels(meta: DatasetMeta) -> tuple[int, ...]:
    """Label values a cascade's second stage receives as one-hot input channels, in order.

    nnU-Net's ``foreground_labels``: every value the dataset declares (region members included)
    except the background 0 and the ``"ignore"`` value; one channel per value.
    """
    labels = dict(meta.labels)
    ignore = labels.pop("ignore", None)
    values: set[int] = set()
    for v in labels.values():
        values.update(int(x) for x in (v if isinstance(v, (tuple, list)) else (v,)))
    return tuple(sorted(values - {0, ignore} if ignore is not None else values - {0}))
