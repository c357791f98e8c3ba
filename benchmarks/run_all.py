"""Run every stage's benchmark and print one JSON document plus a markdown table.

Each stage runs as its own subprocess (``benchmarks/<stage>.py``), so peak RSS figures are per stage.
``--quick`` passes ``--quick`` to each (about a few minutes in all on 2 cores); without it the
scripts' own defaults are used (the sizes the issues ask for; tens of minutes and several GB of disk).

    python benchmarks/run_all.py --quick -o bench.json
    python benchmarks/run_all.py --only preprocess predict
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
STAGES = ["convert", "fingerprint", "preprocess", "dataloader", "train", "predict", "postprocess", "evaluate"]
# arguments per stage for --quick (default: the script's own --quick)
QUICK = {"train": ["--epochs", "1", "--iters", "3"], "predict": ["--quick", "--no-baseline"]}


def _last_json(text: str) -> Any:
    """The last top-level JSON object printed by a script."""
    start = text.rfind("\n{")
    start = 0 if start < 0 and text.startswith("{") else start + 1
    for s in [start] + [i + 1 for i in range(len(text) - 1, -1, -1) if text[i] == "\n" and text[i + 1 : i + 2] == "{"]:
        try:
            return json.loads(text[s:])
        except json.JSONDecodeError:
            continue
    raise ValueError("no JSON object found in the benchmark output")


def _headline(stage: str, r: Any) -> str:
    """A one-line figure for the markdown table, from whatever keys the stage printed."""
    found: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
        elif (
            isinstance(node, (int, float))
            and not isinstance(node, bool)
            and path.split(".")[-1]
            .lower()
            .endswith(("_per_s", "per_iter", "peak_rss_mb", "peak_rss_mib", "wall_s", "ratio", "speedup_vs_baseline"))
        ):
            found.append(f"{path}={node:.4g}")

    walk(r, "")
    return "; ".join(found[:6])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for every stage")
    ap.add_argument("--only", nargs="+", choices=STAGES, default=STAGES, help="stages to run")
    ap.add_argument("-o", "--output", default=None, help="also write the JSON document here")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    for stage in args.only:
        cmd = [sys.executable, str(HERE / f"{stage}.py")]
        if args.quick:
            cmd += QUICK.get(stage, ["--quick"])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            results[stage] = {"error": proc.stderr[-2000:], "wall_s": round(wall, 1)}
        else:
            try:
                results[stage] = {"result": _last_json(proc.stdout), "wall_s": round(wall, 1)}
            except ValueError as e:
                results[stage] = {"error": f"{e}: {proc.stdout[-500:]}", "wall_s": round(wall, 1)}
        print(f"{stage}: {'ok' if 'result' in results[stage] else 'FAILED'} in {wall:.0f} s", file=sys.stderr)
    doc = {
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": __import__("os").cpu_count(),
        },
        "quick": args.quick,
        "stages": results,
    }
    print(json.dumps(doc, indent=1))
    print("\n| stage | wall s | headline figures |\n|---|---|---|")
    for stage, r in results.items():
        print(f"| {stage} | {r['wall_s']} | {'FAILED' if 'error' in r else _headline(stage, r['result'])} |")
    if args.output:
        Path(args.output).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
