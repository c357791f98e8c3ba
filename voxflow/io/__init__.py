"""Input/output: convert any supported source into a voxflow store, export a store back to files.

* :func:`files_source` -- image files given one by one -> a source :func:`convert` reads in place.
* :func:`convert` -- nnU-Net v2 raw, MSD, images/+labels/ folders, DICOM series (with TCIA mask
  series), single files, TIFF stacks and 2D-slice folders -> dataset store; cases in parallel with
  Dask, large volumes slab by slab (gzip NIfTI cannot stream: it must fit in memory).
* :func:`export_store` -- store arrays -> NIfTI/NRRD/MHA/... files with the original geometry, or
  DICOM SEG (``.dcm``) for cases converted from DICOM.
* :func:`write_dicom_seg` -- one label volume -> a DICOM SEG referencing its source series
  (:func:`dicom_reference` finds the source record in a case's attributes).
* :func:`store_info` / :func:`format_info` -- a readable summary of a store.
* :func:`register_format` -- add a source format (or use the ``voxflow.readers`` entry points).
"""

from voxflow.io._convert import convert, default_max_memory, file_stats
from voxflow.io._dicom_seg import dicom_reference, write_dicom_seg
from voxflow.io._export import export_store, format_info, store_info, to_xarray
from voxflow.io._sources import (
    IMAGE_SUFFIXES,
    CaseSpec,
    DatasetSource,
    detect_source,
    files_source,
    load_source,
    register_format,
    split_suffix,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "CaseSpec",
    "DatasetSource",
    "convert",
    "default_max_memory",
    "detect_source",
    "dicom_reference",
    "export_store",
    "file_stats",
    "files_source",
    "format_info",
    "load_source",
    "register_format",
    "split_suffix",
    "store_info",
    "to_xarray",
    "write_dicom_seg",
]
