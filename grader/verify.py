"""Student code reduced to its definitions, for the judge's worker (:mod:`grader.judge`).

The worker runs the lesson's setup, then each exercise cell of the submission reduced to what it
defines (imports, ``def``, ``class``, plain ``name = value``), so that a cell's top-level side
effects (a call that trains for an hour, a loop that prints) do not run when the tests call the
student's functions.
"""
from __future__ import annotations

import ast

KEEP = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def definitions_only(source: str) -> str:
    """The definitions in a student's exercise cell, without its top-level side effects.

    Keeps imports, ``def``, ``class`` and assignments to plain names; drops every other top-level
    statement (calls, loops, ``with``, attribute and item assignments, ``del``...). IPython magics
    and code that does not parse are dropped too (it would fail in phase 1 anyway).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        try:
            from IPython.core.inputtransformer2 import TransformerManager
            tree = ast.parse(TransformerManager().transform_cell(source))
        except Exception:
            return ""
    kept = []
    for node in tree.body:
        if isinstance(node, KEEP):
            kept.append(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if all(_plain_names(t) for t in targets) and node.value is not None:
                kept.append(node)
    return ast.unparse(ast.Module(body=kept, type_ignores=[]))


def _plain_names(target) -> bool:
    if isinstance(target, ast.Name):
        return True
    if isinstance(target, (ast.Tuple, ast.List)):
        return all(_plain_names(t) for t in target.elts)
    return False
