"""Every public function and method of the worker says what it takes and returns.

The worker runs in GPU pods, far from the operator's tests; its signatures are the
contract between its modules (and with the tests). This walks finetune_worker's source
with `ast` (nothing is imported, so nothing heavy loads) and names each public function or
method, module-level or in a public class, whose parameters (bar self/cls) or return lack
an annotation. Functions nested in functions are implementation detail and not checked.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "worker" / "finetune_worker"

Function = ast.FunctionDef | ast.AsyncFunctionDef


def public_functions(tree: ast.Module) -> Iterator[tuple[str, Function]]:
    """(qualified name, node) of the module's public functions and public classes' methods."""

    def walk(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, Function]]:
        for node in body:
            if node.name.startswith("_") if hasattr(node, "name") else True:
                continue
            if isinstance(node, Function):
                yield f"{prefix}{node.name}", node
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, f"{prefix}{node.name}.")

    yield from walk(tree.body, "")


def missing_annotations(node: Function, *, method: bool) -> list[str]:
    args = node.args
    positional = args.posonlyargs + args.args
    if (
        method
        and positional
        and positional[0].arg in ("self", "cls")
        and not any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)
    ):
        positional = positional[1:]
    params = positional + args.kwonlyargs + [a for a in (args.vararg, args.kwarg) if a]
    missing = [a.arg for a in params if a.annotation is None]
    if node.returns is None:
        missing.append("return")
    return missing


def test_the_walk_finds_public_functions_and_methods_only():
    tree = ast.parse(
        "def f(a): pass\n"
        "def _private(a): pass\n"
        "class C:\n"
        "    def m(self, b) -> None: pass\n"
        "    def _h(self): pass\n"
        "    @staticmethod\n"
        "    def s(x: int): pass\n"
        "class _Hidden:\n"
        "    def m(self): pass\n"
        "def outer() -> None:\n"
        "    def inner(z): pass\n"
    )
    found = {
        name: missing_annotations(node, method="." in name) for name, node in public_functions(tree)
    }
    assert found == {"f": ["a", "return"], "C.m": ["b"], "C.s": ["return"], "outer": []}


def test_every_public_worker_function_is_annotated():
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, node in public_functions(tree):
            missing = missing_annotations(node, method="." in name)
            if missing:
                offenders.append(f"{path.name}:{node.lineno} {name}: {', '.join(missing)}")
    assert offenders == [], "unannotated public functions:\n" + "\n".join(offenders)
