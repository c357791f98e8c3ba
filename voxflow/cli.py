"""``voxflow`` command group: one thin command per stage, each loaded on first use.

Each stage keeps its command in ``voxflow/<stage>/_cli.py``; this group only names them, so that
``voxflow --help`` starts fast (torch is imported only by the commands that need it).
"""

from __future__ import annotations

import importlib

import click

from voxflow._cliutil import configure_logging

# command name -> "module:attribute", in pipeline order
COMMANDS: dict[str, str] = {
    "demo": "voxflow.pipeline._cli:demo",
    "run": "voxflow.pipeline._cli:run",
    "convert": "voxflow.io._cli:convert",
    "info": "voxflow.io._cli:info",
    "export": "voxflow.io._cli:export",
    "fingerprint": "voxflow.plan._cli:fingerprint",
    "plan": "voxflow.plan._cli:plan",
    "preprocess": "voxflow.preprocess._cli:preprocess",
    "plan-and-preprocess": "voxflow.pipeline._cli:plan_and_preprocess",
    "train": "voxflow.train._cli:train",
    "predict": "voxflow.infer._cli:predict",
    "postprocess": "voxflow.postprocess._cli:postprocess",
    "evaluate": "voxflow.evaluate._cli:evaluate",
    "export-model": "voxflow.pipeline._cli:export_model",
    "bench": "voxflow._bench:bench",
}


def _load(name: str) -> click.Command:
    module, attr = COMMANDS[name].split(":")
    command: click.Command = getattr(importlib.import_module(module), attr)
    return command


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return _load(cmd_name) if cmd_name in COMMANDS else None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of short error messages.")
@click.version_option(package_name="voxflow")
@click.pass_context
def main(ctx: click.Context, verbose: int, debug: bool) -> None:
    """voxflow: self-configuring, out-of-core medical image segmentation.

    Typical workflow: convert -> fingerprint -> plan -> preprocess -> train -> predict ->
    postprocess -> evaluate, or all of it with `voxflow run SRC --work DIR`.
    `voxflow demo` runs the whole workflow on a built-in synthetic dataset.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    configure_logging(verbose)


if __name__ == "__main__":  # pragma: no cover
    main()
