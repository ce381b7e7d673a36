"""The built-in `calculator` tool: arithmetic on a model's expression, never Python's `eval`.

The expression is parsed by `ast` and walked over a whitelist of nodes: numbers, + - * / // % **,
unary + and -, parentheses, and a few functions and constants of `math`. Everything else (names,
attributes, subscripts, comprehensions, strings, keyword arguments) is refused. Hostile input is
cut short before it costs anything: the text is capped in length, the tree in depth, integers in
bits (so `9**9**9` is refused at once instead of computed), and factorial in its argument.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable
from typing import Any

from contracts.policy import WorkerSettings
from contracts.state import tool_key
from services.workers.conversation import ToolSpec
from services.workers.errors import ToolError

NAME = "calculator"
MAX_EXPRESSION_CHARS = 1_000
MAX_DEPTH = 100
"""Nesting of operands, calls and unary operators (a chain like `1 + 2 + 3` counts once; parentheses add
nothing of their own, the operators inside them do)."""
MAX_INT_BITS = 4_096
"""Largest integer an operation may produce (about 1,233 decimal digits)."""
MAX_FACTORIAL = 1_000

Number = int | float


def _factorial(n: Number) -> int:
    if isinstance(n, float):
        if not n.is_integer():
            raise ToolError("factorial takes a whole number")
        n = int(n)
    if not 0 <= n <= MAX_FACTORIAL:
        raise ToolError(f"factorial takes a whole number within 0..{MAX_FACTORIAL}")
    return math.factorial(n)


def _round(x: Number, digits: Number = 0) -> Number:
    if not isinstance(digits, int) or abs(digits) > 100:
        raise ToolError("round's digits are a whole number within -100..100")
    return round(x, digits) if digits else round(x)


FUNCTIONS: dict[str, Callable[..., Number]] = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log, "log2": math.log2, "log10": math.log10,
    "sin": math.sin, "cos": math.cos, "tan": math.tan, "asin": math.asin, "acos": math.acos, "atan": math.atan,
    "atan2": math.atan2, "hypot": math.hypot, "degrees": math.degrees, "radians": math.radians,
    "abs": abs, "floor": math.floor, "ceil": math.ceil, "round": _round, "min": min, "max": max,
    "factorial": _factorial,
}
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _bits(x: Number) -> float:
    """Bits of the integer part of |x| (0 for |x| < 1)."""
    return x.bit_length() if isinstance(x, int) else math.log2(abs(x)) if abs(x) >= 1 else 0.0


def _checked_int(x: Number) -> Number:
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise ToolError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    return x


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if abs(base) > 1 and exponent * math.log2(abs(base)) > MAX_INT_BITS:
            raise ToolError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    result = base ** exponent
    if isinstance(result, complex):
        raise ToolError("the result is a complex number (a negative number to a fractional power)")
    return result


def _multiply(a: Number, b: Number) -> Number:
    if isinstance(a, int) and isinstance(b, int) and _bits(a) + _bits(b) > MAX_INT_BITS + 1:
        raise ToolError(f"the result is too large (more than {MAX_INT_BITS} bits)")
    return a * b


BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: _multiply, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: _power,
}
UNARY: dict[type[ast.unaryop], Callable[[Number], Number]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


def evaluate(expression: str) -> Number:
    """The value of `expression`; ToolError, with what is wrong, for anything else."""
    if not isinstance(expression, str):
        raise ToolError(f"expression must be a string, not {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is too long ({len(expression)} characters; at most {MAX_EXPRESSION_CHARS})")
    if not expression.strip():
        raise ToolError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not an arithmetic expression: {exc.msg}") from None
    except ValueError as exc:  # e.g. a NUL character
        raise ToolError(f"not an arithmetic expression: {exc}") from None
    except (RecursionError, MemoryError):
        raise ToolError("the expression is too deeply nested") from None
    try:
        value = _eval(tree.body, 1)
    except ZeroDivisionError:
        raise ToolError("division by zero") from None
    except OverflowError:
        raise ToolError("the result is too large for a floating-point number") from None
    except (ValueError, TypeError) as exc:  # math domain errors, wrong argument counts
        raise ToolError(f"cannot compute it: {exc}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError("the result is not a finite number")
    return value


def _eval(node: ast.AST, depth: int) -> Number:
    if depth > MAX_DEPTH:
        raise ToolError(f"the expression is too deeply nested (more than {MAX_DEPTH} levels)")
    match node:
        case ast.Constant(value=value) if type(value) in (int, float):
            return _checked_int(value)
        case ast.Constant(value=value):
            raise ToolError(f"only numbers are allowed, not {type(value).__name__} {value!r:.40}")
        case ast.Name(id=name) if name in CONSTANTS:
            return CONSTANTS[name]
        case ast.Name(id=name):
            raise ToolError(f"unknown name {name!r:.40}; constants: {', '.join(CONSTANTS)}")
        case ast.UnaryOp(op=op, operand=operand) if type(op) in UNARY:
            return UNARY[type(op)](_eval(operand, depth + 1))
        case ast.BinOp(op=op) if type(op) in BINARY:
            # `1 + 2 + ... + 9` is a left spine as deep as it is long: walk it in a loop, not by recursion
            spine: list[ast.BinOp] = []
            while isinstance(node, ast.BinOp) and type(node.op) in BINARY:
                spine.append(node)
                node = node.left
            value = _eval(node, depth + 1)
            for step in reversed(spine):
                value = _checked_int(BINARY[type(step.op)](value, _eval(step.right, depth + 1)))
            return value
        case ast.Call(func=ast.Name(id=name), args=args, keywords=[]) if name in FUNCTIONS and not any(
                isinstance(arg, ast.Starred) for arg in args):
            return _checked_int(FUNCTIONS[name](*(_eval(arg, depth + 1) for arg in args)))
        case ast.Call(func=ast.Name(id=name)) if name in FUNCTIONS:
            raise ToolError(f"{name} takes plain positional arguments")
        case ast.Call(func=ast.Name(id=name)):
            raise ToolError(f"unknown function {name!r:.40}; functions: {', '.join(FUNCTIONS)}")
        case ast.Call():
            raise ToolError(f"only these functions can be called, by name: {', '.join(FUNCTIONS)}")
        case ast.Attribute():
            raise ToolError("attribute access is not allowed")
        case _:
            raise ToolError(f"{type(node).__name__} is not allowed: only numbers, "
                            f"{' '.join(SYMBOLS.values())}, parentheses, functions and constants")


def format_number(value: Number) -> str:
    """Integers in full; floats as Python's shortest round-tripping repr (`0.1 + 0.2` → 0.30000000000000004)."""
    return str(value) if isinstance(value, int) else repr(value)


class Calculator:
    spec = ToolSpec(
        name=NAME,
        description=("Evaluate an arithmetic expression: numbers, + - * / // % ** and parentheses, the functions "
                     f"{', '.join(FUNCTIONS)} and the constants {', '.join(CONSTANTS)}."),
        parameters={"type": "object", "properties": {"expression": {
            "type": "string", "maxLength": MAX_EXPRESSION_CHARS, "description": "e.g. (2 + 3) * sqrt(16)"}},
            "required": ["expression"], "additionalProperties": False},
    )
    dependency = tool_key(NAME)

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Calculator:
        return cls()

    async def run(self, arguments: dict[str, Any]) -> str:
        if not isinstance(arguments, dict) or "expression" not in arguments:
            raise ToolError('calculator takes {"expression": "..."}')
        return format_number(evaluate(arguments["expression"]))
