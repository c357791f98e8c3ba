"""Postprocessing: chunked connected components and the label-map operations built on them.

* :func:`label_components` -- ``scipy.ndimage.label`` for dask arrays (same partition), block-wise
  with a union-find over block faces; :func:`component_sizes` -- sizes in voxels / mm3.
* :func:`keep_largest_component`, :func:`remove_small_components`, :func:`fill_holes` -- lazy.
* :class:`PostprocessingSpec` (``postprocessing.json``), :func:`apply_postprocessing`,
  :func:`determine_postprocessing` (chosen by cross-validation, as nnU-Net), :func:`run_postprocess`.
"""

from voxflow.errors import PostprocessingError
from voxflow.postprocess._components import (
    ComponentTables,
    component_sizes,
    connectivity_structure,
    label_components,
    select_components,
)
from voxflow.postprocess._ops import (
    fill_holes,
    fill_holes_mask,
    keep_largest_component,
    remove_small_components,
    target_mask,
)
from voxflow.postprocess._run import run_postprocess
from voxflow.postprocess._select import (
    determine_for_configuration,
    determine_postprocessing,
    load_model_postprocessing,
)
from voxflow.postprocess._spec import Operation, PostprocessingSpec, apply_postprocessing

__all__ = [
    "ComponentTables",
    "Operation",
    "PostprocessingError",
    "PostprocessingSpec",
    "apply_postprocessing",
    "component_sizes",
    "connectivity_structure",
    "determine_for_configuration",
    "determine_postprocessing",
    "fill_holes",
    "fill_holes_mask",
    "keep_largest_component",
    "label_components",
    "load_model_postprocessing",
    "remove_small_components",
    "run_postprocess",
    "select_components",
    "target_mask",
]
