"""Planning: the Plan schema (JSON-backed dataclasses) and the planner Fingerprint -> Plan."""

from voxflow.plan.schema import (
    ChannelNormalization,
    Configuration,
    NetworkSpec,
    Plan,
    ResamplingSpec,
    TrainSpec,
    atomic_write_json,
)

__all__ = [
    "ChannelNormalization",
    "Configuration",
    "NetworkSpec",
    "Plan",
    "ResamplingSpec",
    "TrainSpec",
    "atomic_write_json",
]
