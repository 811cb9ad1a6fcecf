"""Safe arithmetic: a tiny parser over Python's AST that admits numbers and + - * / // % **.

Nothing is evaluated except the whitelisted node types, so "__import__('os')" or a name is a
clear refusal, not code execution. Spoken operators ("7 times 8") are rewritten first.
"""

from __future__ import annotations

import ast
import math
import operator
import re

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_WORDS = ((r"\bdivided by\b", "/"), (r"\bmultiplied by\b", "*"), (r"\btimes\b", "*"),
          (r"\bplus\b", "+"), (r"\bminus\b", "-"), (r"\btake away\b", "-"), (r"\bx\b", "*"))
# Bounds that keep one request cheap: 10**10000 would stall the worker thread for no answer.
_MAX_EXPONENT = 64
_MAX_ABS = 1e18
_MAX_CHARS = 200


class CalculatorError(ValueError):
  pass


def _eval(node):
  if isinstance(node, ast.Expression):
    return _eval(node.body)
  if isinstance(node, ast.Constant) and type(node.value) in (int, float):
    return node.value
  if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
    return _UNARY[type(node.op)](_eval(node.operand))
  if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
    a, b = _eval(node.left), _eval(node.right)
    if isinstance(node.op, ast.Pow) and abs(b) > _MAX_EXPONENT:
      raise CalculatorError(f"exponent {b} is larger than {_MAX_EXPONENT}")
    if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
      raise CalculatorError("division by zero")
    out = _BINARY[type(node.op)](a, b)
    if isinstance(out, complex) or abs(out) > _MAX_ABS:
      raise CalculatorError(f"result out of range (|x| > {_MAX_ABS:g} or complex)")
    return out
  raise CalculatorError(f"not arithmetic: {type(node).__name__} is not allowed (only numbers, "
                        "+ - * / // % ** and parentheses)")


def evaluate(expression: str):
  """Value of an arithmetic expression; CalculatorError for anything else."""
  expr = str(expression).strip().lower()
  if len(expr) > _MAX_CHARS:
    raise CalculatorError(f"expression of {len(expr)} characters; at most {_MAX_CHARS}")
  for pattern, sym in _WORDS:
    expr = re.sub(pattern, sym, expr)
  expr = expr.rstrip("?=. ")
  try:
    tree = ast.parse(expr, mode="eval")
  except SyntaxError as e:
    raise CalculatorError(f"cannot parse {expression!r} as arithmetic ({e.msg})") from None
  value = _eval(tree)
  if isinstance(value, float) and math.isfinite(value) and value.is_integer():
    value = int(value)
  return value


def calculator(args: str, ctx=None) -> str:
  """Tool entry: 'a * b' -> 'a * b = c' (the result text format of the training data)."""
  del ctx
  value = evaluate(args)
  if isinstance(value, float):
    value = round(value, 6)
  return f"{str(args).strip().rstrip('?=. ')} = {value}"
