"""voxflow: self-configuring, out-of-core medical image segmentation on Zarr and Dask."""

from voxflow.errors import VoxflowError, VoxflowWarning
from voxflow.geometry import Geometry
from voxflow.store import DatasetMeta, Store, open_case
from voxflow.workspace import Workspace

__all__ = ["DatasetMeta", "Geometry", "Store", "VoxflowError", "VoxflowWarning", "Workspace", "open_case"]
__version__ = "0.1.0"
