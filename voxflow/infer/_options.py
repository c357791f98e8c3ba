"""The options of a prediction run, one typed value; and how ``postprocessing`` is resolved."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from voxflow.errors import VoxflowError
from voxflow.infer._accumulator import DEFAULT_CACHE_BYTES
from voxflow.infer._memory import DEFAULT_FORWARD_BYTES

__all__ = ["OUTPUT_FORMATS", "PredictOptions", "resolve_postprocessing"]

log = logging.getLogger(__name__)


#: ``--output-format`` -> file ending of the exported labels (None: the input's)
OUTPUT_FORMATS: dict[str, str | None] = {
    "auto": None,
    "nifti": ".nii.gz",
    "nrrd": ".nrrd",
    "mha": ".mha",
    "dicom-seg": ".dcm",
}


@dataclass(frozen=True, kw_only=True)
class PredictOptions:
    """How to run a prediction (see :func:`voxflow.infer.predict`); every field is also a keyword of it.

    ``postprocessing`` is the resolved :class:`~voxflow.postprocess.PostprocessingSpec` applied to
    each label, or None (``predict`` resolves its ``postprocessing`` argument into it).
    """

    step: float = 0.5
    tta: bool = True
    save_probabilities: bool = False
    batch_size: int | None = None
    cache_bytes: int = DEFAULT_CACHE_BYTES
    amp: bool = True
    #: forward-pass precision: ``auto`` (bf16/fp16 autocast on CUDA; on the CPU bf16 with native
    #: AVX512-BF16/AMX, else fp32), ``fp32``, ``bf16``,
    #: ``fp16`` (CUDA); see :func:`voxflow.precision.resolve_precision`
    precision: str = "auto"
    #: memory (bytes) for the activations of one forward pass: how many mirrored tiles go together
    forward_bytes: int = DEFAULT_FORWARD_BYTES
    #: one tile as large as the image (rounded up to the network's stride) when it fits
    #: ``forward_bytes``, instead of patch-sized tiles with ``step`` overlap (see the README)
    whole_image: bool = False
    progress: bool = True
    postprocessing: Any = None
    device: str | tuple[str, ...] = "cpu"
    scheduler: str = "threads"
    memory_limit: str | None = None
    export: bool = True
    overwrite: bool = False
    #: file format of the exported labels: ``auto`` (the input's file ending), ``nifti``, ``nrrd``,
    #: ``mha`` or ``dicom-seg`` (one DICOM Segmentation per case, for inputs converted from DICOM)
    output_format: str = "auto"
    #: on a Dask cluster (``scheduler`` local:N or tcp://): accumulation memory of one block task
    #: (bytes); bigger blocks predict fewer tiles twice (see :func:`~voxflow.infer.duplicated_tile_overhead`)
    block_bytes: int = 512 * 2**20

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise VoxflowError(f"output_format must be one of {sorted(OUTPUT_FORMATS)}; got {self.output_format!r}")
        if self.block_bytes < 1:
            raise VoxflowError(f"block_bytes (memory of one block task) must be positive; got {self.block_bytes!r}.")
        from voxflow.precision import PRECISIONS

        if self.precision not in PRECISIONS:
            raise VoxflowError(f"precision must be one of {list(PRECISIONS)}; got {self.precision!r}")

    def file_ending(self, input_ending: str) -> str:
        """The ending of the exported label files for inputs of ``input_ending``."""
        return OUTPUT_FORMATS[self.output_format] or input_ending

    @classmethod
    def build(cls, options: PredictOptions | None = None, **overrides: Any) -> PredictOptions:
        """``options`` (default: the defaults) with ``overrides`` replaced; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown prediction option(s) {unknown}; known: {sorted(known)}.")
        if isinstance(overrides.get("device"), (list, tuple)):
            overrides["device"] = tuple(str(d) for d in overrides["device"])
        return replace(options or cls(), **overrides)

    def devices(self) -> list[str]:
        """``device`` as a list: several for ``"cuda:0,cuda:1"``, a list, or ``"cuda"`` with several GPUs."""
        if not isinstance(self.device, str):
            return [str(d) for d in self.device]
        if "," in self.device:
            return [d.strip() for d in self.device.split(",") if d.strip()]
        if self.device == "cuda":
            import torch

            n = torch.cuda.device_count()
            if n > 1:
                return [f"cuda:{i}" for i in range(n)]
        return [self.device]


def resolve_postprocessing(postprocessing: Any, configuration_dirs: Sequence[Path]) -> Any:
    """``"auto"``: the ``postprocessing.json`` of the (single) configuration dir the models come from;
    ``None``: none; a spec, dict or path: that one."""
    from voxflow.postprocess import PostprocessingSpec
    from voxflow.workspace import ConfigurationDir

    if postprocessing is None:
        return None
    if isinstance(postprocessing, str) and postprocessing == "auto":
        dirs = set(configuration_dirs)
        if len(dirs) != 1:
            if dirs:
                log.info("no postprocessing applied: it is chosen per configuration, and %d are ensembled", len(dirs))
            return None
        path = ConfigurationDir(next(iter(dirs))).postprocessing
        return PostprocessingSpec.load(path) if path.is_file() else None
    if isinstance(postprocessing, PostprocessingSpec):
        return postprocessing
    if isinstance(postprocessing, dict):
        return PostprocessingSpec.from_dict(postprocessing)
    return PostprocessingSpec.load(Path(postprocessing))
