"""The 60-line rule: no function in voxflow/ has a body longer than 60 lines (its first statement after
the docstring to its last line; the signature, which ``ruff format`` may spread over one line per
parameter, and the docstring do not count) unless its docstring says why, in a line holding "Long because"."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "voxflow"
MAX_LINES = 60
REASON = "Long because"


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int, int]]:
    """(qualified name, first line, length in lines) of each function over ``limit`` lines with no reason."""
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = child.body[1:] if ast.get_docstring(child) is not None and len(child.body) > 1 else child.body
                length = (child.end_lineno or child.lineno) - body[0].lineno + 1
                if length > limit and REASON not in (ast.get_docstring(child) or ""):
                    out.append((name, child.lineno, length))
            visit(
                child,
                f"{name}." if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) else prefix,
            )

    visit(ast.parse(source), "")
    return out


def test_the_checker_counts_nested_functions_and_honours_a_reason() -> None:
    body = "\n".join(f"x{i} = {i}" for i in range(61))
    deep, top = body.replace("x", "        x"), body.replace("x", "    x")
    src = (
        f"class A:\n    def f(self):\n{deep}\n"
        f'def g():\n    "Long because: a table."\n{top}\n'
        f"def h():\n    def inner():\n{deep}\n    return inner\n"
    )
    found = {name: length for name, _, length in long_functions(src)}
    assert found == {"A.f": 61, "h": 63, "h.inner": 61}
    assert long_functions(src, limit=70) == []
    signature = "def k(\n" + "".join(f"    a{i},\n" for i in range(30)) + '):\n    """Doc."""\n    return 1\n'
    assert long_functions(signature) == []  # a long signature and a docstring are not the body


def test_no_function_in_voxflow_is_over_60_lines_without_a_reason() -> None:
    too_long = [
        f"{path.relative_to(PACKAGE.parent)}:{line} {name} ({length} lines)"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, line, length in long_functions(path.read_text(encoding="utf-8"))
    ]
    assert not too_long, f"split these functions, or say in their docstring why they are long ({REASON!r}): {too_long}"
