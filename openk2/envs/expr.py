"""A small, safe arithmetic evaluator for the `compute` operations of domain specs.

Domain files write formulas as Python expressions (`value * src.factor / dst.factor`); this walks
their syntax tree and allows only numbers, strings, names bound by the caller, `a.field` lookups into
records, arithmetic, comparisons, `and`/`or`/`not` and the functions in FUNCTIONS. Nothing else
(no attribute of a non-record, no subscripts, no lambdas), so a spec file cannot run code.
"""

from __future__ import annotations

import ast
import math
import operator

FUNCTIONS = {"sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "asin": math.asin, "atan2": math.atan2,
             "radians": math.radians, "abs": abs, "round": round, "min": min, "max": max}
BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
          ast.Pow: operator.pow, ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}
COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge}


def parse(text: str) -> ast.Expression:
    """The expression's tree; ValueError for syntax this evaluator does not allow."""
    tree = ast.parse(text, mode="eval")
    allowed = (ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Attribute, ast.BinOp, ast.UnaryOp,
               ast.USub, ast.UAdd, ast.Not, ast.Compare, ast.BoolOp, ast.And, ast.Or, ast.Call,
               *BINARY, *COMPARE)
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            raise ValueError(f"{text!r}: {type(node).__name__} is not allowed in a formula")
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS):
            raise ValueError(f"{text!r}: only {sorted(FUNCTIONS)} may be called")
    return tree


def evaluate(text: str, names: dict):
    """The value of `text` with `names` bound (records are dicts, read as `name.field`)."""
    return _eval(parse(text).body, names)


def _eval(node, names):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"unknown name {node.id!r} in a formula")
        return names[node.id]
    if isinstance(node, ast.Attribute):
        record = _eval(node.value, names)
        if not isinstance(record, dict) or node.attr not in record:
            raise ValueError(f"no field {node.attr!r} in a formula's record")
        return record[node.attr]
    if isinstance(node, ast.BinOp):
        return BINARY[type(node.op)](_eval(node.left, names), _eval(node.right, names))
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, names)
        return {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}[type(node.op)](value)
    if isinstance(node, ast.Compare):
        left = _eval(node.left, names)
        for op, right_node in zip(node.ops, node.comparators):
            right = _eval(right_node, names)
            if not COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.BoolOp):
        values = (_eval(v, names) for v in node.values)
        return all(values) if isinstance(node.op, ast.And) else any(values)
    return FUNCTIONS[node.func.id](*(_eval(a, names) for a in node.args))  # ast.Call, checked by parse
