"""The run layout lives in one place (Workspace / ConfigurationDir / FoldDir), and stages import each
other only through their public packages."""

from __future__ import annotations

import ast
from pathlib import Path

from voxflow.workspace import ConfigurationDir, FoldDir, Workspace

PACKAGE = Path(__file__).resolve().parents[1] / "voxflow"


def test_run_layout(tmp_path: Path) -> None:
    work = Workspace(tmp_path)
    run = work.fold("3d_fullres", 0)
    assert run.path == work.run_dir("3d_fullres", 0) == tmp_path / "runs" / "3d_fullres" / "fold_0"
    assert run.checkpoint_final == run.path / "checkpoint_final.pt" == run.checkpoint("final")
    assert run.checkpoint_latest.name == "checkpoint_latest.pt"
    assert run.fold == "0"
    assert run.validation_summary == run.path / "validation" / "summary.json"
    assert run.validation_predictions == run.path / "validation" / "prediction.zarr"
    assert run.configuration == work.configuration("3d_fullres")
    cfg = ConfigurationDir(work.configuration_dir("3d_fullres"))
    assert cfg.postprocessing == tmp_path / "runs" / "3d_fullres" / "postprocessing.json"
    assert work.best_configuration == tmp_path / "best_configuration.json"
    assert cfg.folds() == []
    assert work.configuration_names() == []
    for k in (1, 0, "all"):
        cfg.fold(k).path.mkdir(parents=True)
    cfg.fold(1).checkpoint_final.write_bytes(b"")
    assert [f.fold for f in cfg.folds()] == ["0", "1", "all"]
    assert cfg.trained_folds() == [FoldDir(cfg.path / "fold_1")]
    assert work.configuration_names() == ["3d_fullres"]


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return out


def test_no_private_imports_across_subpackages_and_prediction_needs_no_training() -> None:
    bad, back_edges = [], []
    for path in PACKAGE.rglob("*.py"):
        own = path.relative_to(PACKAGE).parts[0]
        for module in _imports(path):
            parts = module.split(".")
            if parts[0] != "voxflow" or len(parts) < 3:
                continue
            if parts[1] != own and parts[2].startswith("_"):
                bad.append(f"{path.relative_to(PACKAGE)} imports {module}")
            if own in ("infer", "nnunet", "models") and parts[1] in ("train", "pipeline"):
                back_edges.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not bad, bad
    assert not back_edges, back_edges
