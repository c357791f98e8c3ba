"""The architecture registry: names and cost models without torch; registered networks are planned and built."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint

import numpy as np
import pytest

import voxflow.architectures as arch
from voxflow.errors import PlanError
from voxflow.fingerprint import AxisStats, CaseFingerprint, Fingerprint, IntensityStats
from voxflow.plan import NetworkSpec, plan_experiment


def _fingerprint() -> Fingerprint:
    shapes, spacings = [(40, 56, 40)] * 4, [(1.0, 1.0, 1.0)] * 4
    cases = tuple(
        CaseFingerprint(
            case_id=f"c{i}",
            shape_zyx=s,
            spacing_zyx=sp,
            shape_after_crop_zyx=s,
            nonzero_bbox_zyx=tuple((0, n) for n in s),
            fraction_kept_by_crop=1.0,
        )
        for i, (s, sp) in enumerate(zip(shapes, spacings, strict=True))
    )
    st = IntensityStats(
        channel="MR",
        n_samples=10,
        mean=40.0,
        std=30.0,
        median=35.0,
        min=0.0,
        max=200.0,
        percentile_00_5=1.0,
        percentile_99_5=180.0,
    )
    return Fingerprint(
        channel_names=("MR",),
        labels={"background": 0, "a": 1, "b": 2},
        samples_per_case=10,
        seed=0,
        cases=cases,
        intensity=(st,),
        classes=(),
        spacing=AxisStats.of(np.array(spacings)),
        shape=AxisStats.of(np.array(shapes)),
        shape_after_crop=AxisStats.of(np.array(shapes)),
    )


def _spec(architecture: str) -> NetworkSpec:
    return NetworkSpec(
        architecture=architecture,
        spatial_dims=3,
        n_stages=2,
        features_per_stage=(4, 8),
        kernel_sizes=((3, 3, 3),) * 2,
        strides=((1, 1, 1), (2, 2, 2)),
        n_blocks_per_stage=(1, 1),
        n_conv_per_stage_decoder=(1,),
    )


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Architectures and networks registered by a test are gone after it."""
    monkeypatch.setattr(arch, "_COSTS", dict(arch._COSTS))
    if "voxflow.nets" in sys.modules:
        nets = sys.modules["voxflow.nets"]
        monkeypatch.setattr(nets, "NETWORKS", dict(nets.NETWORKS))


def test_planning_imports_no_torch(tmp_path) -> None:
    """The fingerprint, the schema and the planner load and plan without torch (and the fingerprint
    without the planner)."""
    _fingerprint().save(tmp_path / "fingerprint.json")
    code = textwrap.dedent(f"""
        import sys
        from voxflow.fingerprint import Fingerprint
        assert "voxflow.plan" not in sys.modules, "the fingerprint imports the planner"
        from voxflow.plan import Plan, plan_experiment
        fp = Fingerprint.load({str(tmp_path / "fingerprint.json")!r})
        for preset in ("default", "resenc-m", "cpu"):
            plan = plan_experiment(fp, preset=preset)
        plan.save({str(tmp_path / "plans.json")!r})
        assert Plan.load({str(tmp_path / "plans.json")!r}) == plan
        leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "voxflow.nets")))
        assert not leaked, leaked
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


def test_unknown_architecture_suggests_the_closest() -> None:
    with pytest.raises(PlanError, match=r"architecture must be one of .*'unet'.*got 'resenc'\. Did you mean"):
        _spec("resenc")


def test_registered_network_is_planned_and_built(scratch_registry: None) -> None:
    torch = pytest.importorskip("torch")
    from voxflow.nets import UNet, build_network, register_network

    @register_network("my_unet", cost="unet")
    def _factory(spec: NetworkSpec, in_channels: int, num_outputs: int) -> torch.nn.Module:
        return UNet(spec, in_channels, num_outputs)

    fp = _fingerprint()
    plan = plan_experiment(fp, preset="cpu", architecture="my_unet")
    reference = plan_experiment(fp, preset="cpu")
    for name, cfg in plan.configurations.items():
        assert cfg.network.architecture == "my_unet"
        # priced like the plain U-Net, so planned like it
        assert cfg.patch_size_vox == reference.configuration(name).patch_size_vox
        assert cfg.batch_size == reference.configuration(name).batch_size
    assert (
        plan.with_overrides({"3d_fullres.train.epochs": "3"}).configuration("3d_fullres").network
        == plan.configuration("3d_fullres").network
    )  # survives JSON
    cfg = plan.configuration("3d_fullres")
    net = build_network(cfg.network, 1, 3).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 1, *cfg.patch_size_vox)).shape == (1, 3, *cfg.patch_size_vox)


def test_cost_model_decides_the_plan(scratch_registry: None) -> None:
    unet = arch.cost_model("unet")
    heavy = arch.CostModel(layers=unet.layers, activation_elements=lambda *a: 8 * unet.activation_elements(*a))
    arch.register_architecture("heavy_unet", heavy)
    fp = _fingerprint()
    light = plan_experiment(fp, gpu_memory_gb=0.25).configuration("3d_fullres")
    dense = plan_experiment(fp, gpu_memory_gb=0.25, architecture="heavy_unet").configuration("3d_fullres")
    assert dense.network.architecture == "heavy_unet"
    assert np.prod(dense.patch_size_vox) * dense.batch_size < np.prod(light.patch_size_vox) * light.batch_size
    assert arch.activation_elements(dense.network, (8, 8, 8), 1, 3) == 8 * unet.activation_elements(
        dense.network, (8, 8, 8), 1, 3
    )


def test_name_without_cost_model_is_valid_but_not_plannable(scratch_registry: None) -> None:
    arch.register_architecture("opaque_net")
    assert _spec("opaque_net").architecture == "opaque_net"
    with pytest.raises(PlanError, match="'opaque_net' has no cost model"):
        plan_experiment(_fingerprint(), architecture="opaque_net")
    with pytest.raises(PlanError, match="has no cost model"):
        arch.parameter_count(_spec("opaque_net"), 1, 2)
    with pytest.raises(PlanError, match="Did you mean 'opaque_net'"):
        plan_experiment(_fingerprint(), architecture="opaque_nett")


def test_entry_point_names_are_valid_without_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = {
        "voxflow.networks": [EntryPoint("ep_net", "not_installed.module:factory", "voxflow.networks")],
        "voxflow.architectures": [
            EntryPoint("ep_costed", "voxflow.architectures:_ep_test_cost", "voxflow.architectures")
        ],
    }
    monkeypatch.setattr(arch, "entry_points", lambda group: eps.get(group, []))
    monkeypatch.setattr(arch, "_COSTS", dict(arch._COSTS))
    assert _spec("ep_net").architecture == "ep_net"  # the module is never imported
    assert "ep_net" in arch.architecture_names()
    monkeypatch.setattr(arch, "_ep_test_cost", arch.cost_model("unet"), raising=False)
    assert arch.parameter_count(_spec("ep_costed"), 1, 2) == arch.parameter_count(_spec("unet"), 1, 2)
