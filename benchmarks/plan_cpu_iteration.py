"""Measure seconds per training iteration of CPU-preset networks and fit the planner's throughput.

Builds the networks that ``plan_experiment(..., preset="cpu")`` plans for a few dataset shapes,
times forward + backward + SGD step at the planned batch (after one warm-up iteration) and prints
JSON: per configuration the measured seconds, the planner's estimate and the implied FLOP/s.
``--quick`` times one configuration with fewer repeats. Used to set
``voxflow.plan._cost.CPU_FLOPS_PER_SECOND``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from voxflow.fingerprint import AxisStats, CaseFingerprint, Fingerprint, IntensityStats
from voxflow.nets import build_network
from voxflow.plan._cost import CPU_FLOPS_PER_SECOND, conv_flops, estimate_iteration_seconds
from voxflow.plan.planner import plan_experiment


def _fingerprint(shape: tuple[int, int, int], spacing: tuple[float, float, float], is_2d: bool) -> Fingerprint:
    cases = tuple(
        CaseFingerprint(
            case_id=f"c{i}",
            shape_zyx=shape,
            spacing_zyx=spacing,
            source_ndim=2 if is_2d else 3,
            nonzero_bbox_zyx=tuple((0, n) for n in shape),
            shape_after_crop_zyx=shape,
            fraction_kept_by_crop=1.0,
        )
        for i in range(20)
    )
    st = IntensityStats(
        channel="CT",
        n_samples=10,
        mean=0.0,
        std=1.0,
        median=0.0,
        min=-1.0,
        max=1.0,
        percentile_00_5=-1.0,
        percentile_99_5=1.0,
    )
    ax = AxisStats.of(np.array([shape]))
    return Fingerprint(
        channel_names=("CT",),
        labels={"background": 0, "a": 1, "b": 2},
        samples_per_case=10,
        seed=0,
        cases=cases,
        intensity=(st,),
        classes=(),
        spacing=AxisStats.of(np.array([spacing])),
        shape=ax,
        shape_after_crop=ax,
    )


def _time_iteration(cfg, repeats: int) -> float:  # type: ignore[no-untyped-def]
    net = build_network(cfg.network, 1, 3)
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    spatial = cfg.patch_size_vox[-cfg.network.spatial_dims :]
    x = torch.randn(cfg.batch_size, 1, *spatial)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out = net(x)
        loss = sum(o.float().square().mean() for o in (out if isinstance(out, list) else [out]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times[1:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    datasets = {
        "iso_3d": ((128, 128, 128), (1.0, 1.0, 1.0), False),
        "aniso_3d": ((60, 256, 256), (3.0, 0.8, 0.8), False),
        "demo_3d": ((32, 64, 64), (2.5, 0.8, 0.8), False),
    }
    if args.quick:
        datasets = {"iso_3d": datasets["iso_3d"]}
    rows = []
    for name, (shape, spacing, is_2d) in datasets.items():
        plan = plan_experiment(_fingerprint(shape, spacing, is_2d), preset="cpu")
        for cfg in plan.configurations.values():
            if cfg.name == "3d_cascade_fullres":
                continue
            measured = _time_iteration(cfg, 1 if args.quick else 3)
            flops = 3 * cfg.batch_size * conv_flops(cfg.network, cfg.patch_size_vox, 1, 3)
            rows.append(
                {
                    "dataset": name,
                    "configuration": cfg.name,
                    "patch": list(cfg.patch_size_vox),
                    "batch": cfg.batch_size,
                    "measured_s": round(measured, 3),
                    "estimated_s": round(
                        estimate_iteration_seconds(cfg.network, cfg.patch_size_vox, cfg.batch_size, 1, 3), 3
                    ),
                    "implied_flops_per_s": float(f"{flops / measured:.3g}"),
                }
            )
    print(
        json.dumps(
            {"cpu_flops_per_second": CPU_FLOPS_PER_SECOND, "threads": torch.get_num_threads(), "rows": rows}, indent=1
        )
    )


if __name__ == "__main__":
    main()
