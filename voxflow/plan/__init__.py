"""Planning: the Plan schema (JSON-backed dataclasses) and the planner Fingerprint -> Plan."""

from voxflow.plan._cost import estimate_iteration_seconds, estimate_memory_bytes
from voxflow.plan.planner import PRESETS, plan_experiment
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
    "PRESETS",
    "ChannelNormalization",
    "Configuration",
    "NetworkSpec",
    "Plan",
    "ResamplingSpec",
    "TrainSpec",
    "atomic_write_json",
    "estimate_iteration_seconds",
    "estimate_memory_bytes",
    "plan_experiment",
]
