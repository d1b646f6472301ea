"""A small, safe expression language for `until` conditions and other config expressions.

Sources are parsed with `ast.parse(mode="eval")` and walked by an interpreter that knows only
a whitelist of node types. Nothing is ever handed to Python's eval/exec/compile, attribute
access is a key lookup in a mapping (never getattr), and only a fixed set of pure functions
can be called. Every failure, at compile or evaluation time, is an `ExprError`.

    compile_expr("len(state.context) >= 4 or plan.action == 'finish'").evaluate(ctx)
"""
from __future__ import annotations

import ast
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["FUNCTIONS", "MAX_SOURCE_CHARS", "Expr", "ExprError", "compile_expr"]

MAX_SOURCE_CHARS = 1_000
MAX_DEPTH = 64  # AST nesting; keeps the recursive walkers far from Python's recursion limit
MAX_INT_BITS = 256
MAX_STR_CHARS = 1_000_000
MAX_STR_FOR_INT = 100  # digits accepted by int()/float() on strings


class ExprError(Exception):
    """A bad expression, or an expression that failed on the given values."""

    def __init__(self, message: str, *, source: str | None = None, column: int | None = None,
                 piece: str | None = None, missing: bool = False) -> None:
        self.message = message
        # the value lacks the key or item read (e.g. a model reply that is not the JSON the expression
        # expects), as opposed to a wrong expression: `until` goes on and `when` is false on such values
        self.missing = missing
        self.source = source
        self.column = column
        self.piece = piece
        super().__init__(self._render())

    def _render(self) -> str:
        text = self.message
        where = []
        if self.piece is not None:
            where.append(f"at `{_clip(self.piece)}`")
        if self.column is not None:
            where.append(f"column {self.column}")
        if where:
            text += f" ({', '.join(where)})"
        if self.source is not None:
            text += f" in expression `{_clip(self.source, 120)}`"
        return text


def _clip(text: str, limit: int = 60) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- whitelisted functions ----------------------------------------------------------------

def _type_name(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def _need_str(fname: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ExprError(f"{fname}() expects a string, got {_type_name(value)}")
    return value


def _fn_len(x: Any) -> int:
    if isinstance(x, (str, list, tuple, Mapping)):
        return len(x)
    raise ExprError(f"len() expects a string, list or mapping, got {_type_name(x)}")


def _fn_lower(s: Any) -> str:
    return _need_str("lower", s).lower()


def _fn_upper(s: Any) -> str:
    return _need_str("upper", s).upper()


def _fn_strip(s: Any) -> str:
    return _need_str("strip", s).strip()


def _fn_str(x: Any) -> str:
    if x is None or isinstance(x, (str, int, float, bool)):
        return _check_str(str(x)) if not isinstance(x, str) else x
    if isinstance(x, (list, tuple, Mapping)):
        try:
            return _check_str(repr(x))
        except RecursionError:
            raise ExprError("str() argument is nested too deeply") from None
    raise ExprError(f"str() does not accept a {_type_name(x)}")


def _fn_int(x: Any) -> int:
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, int):
        return _check_int(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ExprError(f"int() cannot convert {x!r}")
        return _check_int(int(x))
    if isinstance(x, str):
        s = x.strip()
        if len(s) > MAX_STR_FOR_INT:
            raise ExprError(f"int() argument is too long ({len(s)} characters)")
        try:
            return _check_int(int(s))
        except ValueError:
            raise ExprError(f"int() cannot convert {_clip(repr(x))}") from None
    raise ExprError(f"int() expects a number or string, got {_type_name(x)}")


def _fn_float(x: Any) -> float:
    if isinstance(x, (int, float)):
        try:
            return float(x)
        except OverflowError:
            raise ExprError("float() argument is too large") from None
    if isinstance(x, str):
        s = x.strip()
        if len(s) > MAX_STR_FOR_INT:
            raise ExprError(f"float() argument is too long ({len(s)} characters)")
        try:
            return float(s)
        except ValueError:
            raise ExprError(f"float() cannot convert {_clip(repr(x))}") from None
    raise ExprError(f"float() expects a number or string, got {_type_name(x)}")


def _fn_contains(haystack: Any, needle: Any) -> bool:
    return _membership(needle, haystack, "contains()")


def _fn_startswith(s: Any, prefix: Any) -> bool:
    return _need_str("startswith", s).startswith(_need_str("startswith", prefix))


def _fn_endswith(s: Any, suffix: Any) -> bool:
    return _need_str("endswith", s).endswith(_need_str("endswith", suffix))


# name -> (function, number of positional arguments)
FUNCTIONS: dict[str, tuple[Callable[..., Any], int]] = {
    "len": (_fn_len, 1),
    "lower": (_fn_lower, 1),
    "upper": (_fn_upper, 1),
    "strip": (_fn_strip, 1),
    "str": (_fn_str, 1),
    "int": (_fn_int, 1),
    "float": (_fn_float, 1),
    "contains": (_fn_contains, 2),
    "startswith": (_fn_startswith, 2),
    "endswith": (_fn_endswith, 2),
}


# --- value helpers ------------------------------------------------------------------------

def _check_int(value: int) -> int:
    if value.bit_length() > MAX_INT_BITS:
        raise ExprError(f"integer result is too large (over {MAX_INT_BITS} bits)")
    return value


def _check_str(value: str) -> str:
    if len(value) > MAX_STR_CHARS:
        raise ExprError(f"string result is too long (over {MAX_STR_CHARS:,} characters)")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _membership(item: Any, container: Any, what: str) -> bool:
    if isinstance(container, str):
        if not isinstance(item, str):
            raise ExprError(f"{what}: looking for a {_type_name(item)} in a string; both must be strings")
        return item in container
    if isinstance(container, (list, tuple)):
        return any(_equal(item, element) for element in container)
    if isinstance(container, Mapping):
        try:
            return item in container
        except TypeError:
            raise ExprError(f"{what}: a {_type_name(item)} cannot be a mapping key") from None
    raise ExprError(f"{what}: expected a string, list or mapping to search in, got {_type_name(container)}")


def _equal(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception as exc:  # values may come from user functions with odd __eq__
        raise ExprError(f"cannot compare {_type_name(a)} and {_type_name(b)}: {exc}") from None


def _truthy(value: Any) -> bool:
    try:
        return bool(value)
    except Exception as exc:
        raise ExprError(f"cannot use a {_type_name(value)} as a condition: {exc}") from None


def _add(a: Any, b: Any) -> Any:
    if isinstance(a, str) and isinstance(b, str):
        if len(a) + len(b) > MAX_STR_CHARS:
            raise ExprError(f"string result is too long (over {MAX_STR_CHARS:,} characters)")
        return a + b
    if _is_number(a) and _is_number(b):
        return _number_result(a + b)
    raise ExprError(f"cannot add {_type_name(a)} and {_type_name(b)}")


def _sub(a: Any, b: Any) -> Any:
    if _is_number(a) and _is_number(b):
        return _number_result(a - b)
    raise ExprError(f"cannot subtract {_type_name(b)} from {_type_name(a)}")


def _mul(a: Any, b: Any) -> Any:
    if isinstance(a, str) and isinstance(b, int) or isinstance(a, int) and isinstance(b, str):
        s, n = (a, b) if isinstance(a, str) else (b, a)
        if n > 0 and len(s) * n > MAX_STR_CHARS:  # checked before allocating
            raise ExprError(f"string result is too long (over {MAX_STR_CHARS:,} characters)")
        return s * n
    if isinstance(a, int) and isinstance(b, int):
        if a.bit_length() + b.bit_length() > MAX_INT_BITS + 1:
            raise ExprError(f"integer result is too large (over {MAX_INT_BITS} bits)")
        return _check_int(a * b)
    if _is_number(a) and _is_number(b):
        try:
            return _number_result(a * b)
        except OverflowError:
            raise ExprError("number result is too large") from None
    raise ExprError(f"cannot multiply {_type_name(a)} and {_type_name(b)}")


def _number_result(value: Any) -> Any:
    return _check_int(value) if isinstance(value, int) else value


def _order(op: ast.cmpop, a: Any, b: Any) -> bool:
    ok = (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))
    if not ok:
        raise ExprError(f"cannot order {_type_name(a)} and {_type_name(b)}; "
                        "`<`, `<=`, `>`, `>=` need two numbers or two strings")
    if isinstance(op, ast.Lt):
        return a < b
    if isinstance(op, ast.LtE):
        return a <= b
    if isinstance(op, ast.Gt):
        return a > b
    return a >= b


_OP_TEXT = {
    ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    ast.Pow: "**", ast.MatMult: "@", ast.LShift: "<<", ast.RShift: ">>", ast.BitOr: "|",
    ast.BitAnd: "&", ast.BitXor: "^", ast.Invert: "~", ast.UAdd: "unary +",
}

_UNSUPPORTED_NODES = {
    ast.Lambda: "lambda expressions",
    ast.ListComp: "comprehensions", ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions",
    ast.JoinedStr: "f-strings", ast.FormattedValue: "f-strings",
    ast.NamedExpr: "assignment expressions (:=)",
    ast.Starred: "starred arguments",
    ast.IfExp: "conditional expressions (a if c else b)",
    ast.Dict: "dict literals", ast.Set: "set literals",
    ast.Slice: "slices", ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
}


# --- compiled expression ------------------------------------------------------------------

class Expr:
    """A validated expression. Immutable; safe to evaluate from several threads.

    `names` are the top-level names it reads; `fields` the (name, key) pairs it reads as `name.key` or
    `name['key']`; `bare` the names it also reads whole (like a template's, for provenance and checks)."""

    __slots__ = ("_lines", "_tree", "bare", "fields", "names", "source")

    def __init__(self, source: str, tree: ast.Expression, names: frozenset[str],
                 fields: frozenset[tuple[str, str]] = frozenset(), bare: frozenset[str] = frozenset()) -> None:
        self.source = source
        self.names = names
        self.fields = fields
        self.bare = bare
        self._tree = tree
        self._lines = source.splitlines() or [""]

    def __repr__(self) -> str:
        return f"Expr({self.source!r})"

    def evaluate(self, context: Mapping[str, Any]) -> Any:
        """The value of the expression with top-level names taken from `context`."""
        if not isinstance(context, Mapping):
            raise ExprError(f"expressions are evaluated against a mapping, got {_type_name(context)}",
                            source=self.source)
        return self._eval(self._tree.body, context)

    # Errors raised by helpers carry no position; attach the node being evaluated.
    def _fail(self, node: ast.AST, message: str, missing: bool = False) -> ExprError:
        return ExprError(message, source=self.source, column=_column(self._lines, node),
                         piece=_segment(self.source, node), missing=missing)

    def _eval(self, node: ast.expr, ctx: Mapping[str, Any]) -> Any:
        try:
            return self._eval_node(node, ctx)
        except ExprError as exc:
            if exc.source is None:  # first (innermost) node to see it adds the position
                raise self._fail(node, exc.message, exc.missing) from None
            raise
        except Exception as exc:  # e.g. OverflowError, or odd values from user functions
            raise self._fail(node, f"evaluation failed: {type(exc).__name__}: {exc}") from None

    def _eval_node(self, node: ast.expr, ctx: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in ctx:
                known = ", ".join(sorted(str(k) for k in ctx)[:20]) or "none"
                raise ExprError(f"unknown name `{node.id}` (available: {known})")
            return ctx[node.id]
        if isinstance(node, ast.Attribute):
            return self._lookup_key(self._eval(node.value, ctx), node.attr, node.value)
        if isinstance(node, ast.Subscript):
            return self._subscript(self._eval(node.value, ctx), self._eval(node.slice, ctx), node.value)
        if isinstance(node, ast.List):
            return [self._eval(e, ctx) for e in node.elts]
        if isinstance(node, ast.Tuple):
            return tuple(self._eval(e, ctx) for e in node.elts)
        if isinstance(node, ast.BoolOp):
            is_and = isinstance(node.op, ast.And)
            value: Any = None
            for operand in node.values:
                value = self._eval(operand, ctx)
                if _truthy(value) != is_and:
                    return value
            return value
        if isinstance(node, ast.UnaryOp):
            operand = self._eval(node.operand, ctx)
            if isinstance(node.op, ast.Not):
                return not _truthy(operand)
            if not _is_number(operand):
                raise ExprError(f"cannot negate a {_type_name(operand)}")
            return -operand
        if isinstance(node, ast.BinOp):
            left = self._eval(node.left, ctx)
            right = self._eval(node.right, ctx)
            if isinstance(node.op, ast.Add):
                return _add(left, right)
            if isinstance(node.op, ast.Sub):
                return _sub(left, right)
            return _mul(left, right)
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, ctx)
            for op, comparator in zip(node.ops, node.comparators):
                right = self._eval(comparator, ctx)
                if not self._compare(op, left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.Call):
            assert isinstance(node.func, ast.Name)
            fn, _ = FUNCTIONS[node.func.id]
            args = [self._eval(a, ctx) for a in node.args]
            return fn(*args)
        raise ExprError(f"unsupported syntax {type(node).__name__}")  # validated away; defensive

    @staticmethod
    def _compare(op: ast.cmpop, left: Any, right: Any) -> bool:
        if isinstance(op, ast.Eq):
            return _equal(left, right)
        if isinstance(op, ast.NotEq):
            return not _equal(left, right)
        if isinstance(op, ast.In):
            return _membership(left, right, "`in`")
        if isinstance(op, ast.NotIn):
            return not _membership(left, right, "`not in`")
        if isinstance(op, ast.Is):
            return left is None
        if isinstance(op, ast.IsNot):
            return left is not None
        return _order(op, left, right)

    def _lookup_key(self, container: Any, key: str, container_node: ast.expr) -> Any:
        where = _segment(self.source, container_node)
        if not isinstance(container, Mapping):
            raise ExprError(f"`{where}` is not a mapping (it is {_type_name(container)}), so it has no key `{key}`",
                            missing=True)
        try:
            if key in container:
                return container[key]
        except Exception as exc:
            raise ExprError(f"cannot look up `{key}` in `{where}`: {exc}") from None
        known = ", ".join(sorted(str(k) for k in container)[:20]) or "none"
        raise ExprError(f"`{where}` has no key `{key}` (keys: {known})", missing=True)

    def _subscript(self, container: Any, index: Any, container_node: ast.expr) -> Any:
        where = _segment(self.source, container_node)
        if isinstance(container, Mapping):
            if isinstance(index, str):
                if index.startswith("_"):
                    raise ExprError(f"keys starting with `_` are not allowed: {index!r}")
                return self._lookup_key(container, index, container_node)
            try:
                hit = index in container
            except TypeError:
                raise ExprError(f"a {_type_name(index)} cannot be a key of `{where}`") from None
            if not hit:
                raise ExprError(f"`{where}` has no key {_clip(repr(index))}", missing=True)
            return container[index]
        if isinstance(container, (list, tuple, str)):
            if not isinstance(index, int) or isinstance(index, bool):
                raise ExprError(f"`{where}` is indexed by integers, got {_type_name(index)}",
                                missing=isinstance(index, str))  # a key looked up in text, not in a mapping
            if not -len(container) <= index < len(container):
                raise ExprError(f"index {index} is out of range for `{where}` (length {len(container)})",
                                missing=True)
            return container[index]
        raise ExprError(f"`{where}` cannot be indexed (it is {_type_name(container)}); only lists, strings "
                        "and mappings can", missing=container is None)


def _segment(source: str, node: ast.AST) -> str:
    try:
        text = ast.get_source_segment(source, node)
    except Exception:
        text = None
    return text if text is not None else type(node).__name__


def _column(lines: list[str], node: ast.AST) -> int | None:
    """1-based character column (ast offsets count UTF-8 bytes)."""
    lineno = getattr(node, "lineno", None)
    offset = getattr(node, "col_offset", None)
    if lineno is None or offset is None or not 1 <= lineno <= len(lines):
        return None
    return len(lines[lineno - 1].encode("utf-8")[:offset].decode("utf-8", errors="ignore")) + 1


# --- validation ---------------------------------------------------------------------------

class _Validator:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = source.splitlines() or [""]
        self.names: set[str] = set()
        self.bare: set[str] = set()
        self.fields: set[tuple[str, str]] = set()
        self.keyed: set[int] = set()  # ids of Name nodes read through a key (name.key, name['key'])

    def fail(self, node: ast.AST, message: str) -> ExprError:
        return ExprError(message, source=self.source, column=_column(self.lines, node),
                         piece=_segment(self.source, node))

    def check(self, node: ast.AST, depth: int = 0) -> None:
        if depth > MAX_DEPTH:
            raise self.fail(node, f"expression is nested too deeply (over {MAX_DEPTH} levels)")
        d = depth + 1
        if isinstance(node, ast.Constant):
            value = node.value
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise self.fail(node, f"{type(value).__name__} literals are not supported")
            if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
                raise self.fail(node, f"integer literal is too large (over {MAX_INT_BITS} bits)")
            return
        if isinstance(node, ast.Name):
            self._check_identifier(node, node.id, "names")
            self.names.add(node.id)
            if id(node) not in self.keyed:
                self.bare.add(node.id)
            return
        if isinstance(node, ast.Attribute):
            self._check_identifier(node, node.attr, "keys")
            self._note_key(node.value, node.attr)
            self.check(node.value, d)
            return
        if isinstance(node, ast.Subscript):
            if isinstance(node.slice, ast.Slice):
                raise self.fail(node.slice, "slices are not supported; index with a single integer or key")
            if isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
                self._check_identifier(node.slice, node.slice.value, "keys")
                self._note_key(node.value, node.slice.value)
            self.check(node.value, d)
            self.check(node.slice, d)
            return
        if isinstance(node, (ast.List, ast.Tuple)):
            for element in node.elts:
                self.check(element, d)
            return
        if isinstance(node, ast.BoolOp):
            for operand in node.values:
                self.check(operand, d)
            return
        if isinstance(node, ast.UnaryOp):
            if not isinstance(node.op, (ast.Not, ast.USub)):
                raise self.fail(node, f"operator `{_OP_TEXT.get(type(node.op), '?')}` is not supported "
                                      "(only `not` and unary `-`)")
            self.check(node.operand, d)
            return
        if isinstance(node, ast.BinOp):
            if not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
                raise self.fail(node, f"operator `{_OP_TEXT.get(type(node.op), '?')}` is not supported "
                                      "(only `+`, `-` and `*`)")
            self.check(node.left, d)
            self.check(node.right, d)
            return
        if isinstance(node, ast.Compare):
            for op, comparator in zip(node.ops, node.comparators):
                if isinstance(op, (ast.Is, ast.IsNot)) and not (
                        isinstance(comparator, ast.Constant) and comparator.value is None):
                    raise self.fail(node, "`is` is only supported as `is None` / `is not None`; use `==`")
            self.check(node.left, d)
            for comparator in node.comparators:
                self.check(comparator, d)
            return
        if isinstance(node, ast.Call):
            self._check_call(node, d)
            return
        what = _UNSUPPORTED_NODES.get(type(node), type(node).__name__)
        raise self.fail(node, f"unsupported syntax: {what}")

    def _note_key(self, target: ast.AST, key: str) -> None:
        if isinstance(target, ast.Name):
            self.fields.add((target.id, key))
            self.keyed.add(id(target))

    def _check_identifier(self, node: ast.AST, name: str, kind: str) -> None:
        if name.startswith("_"):
            raise self.fail(node, f"{kind} starting with `_` are not allowed: `{name}`")

    def _check_call(self, node: ast.Call, depth: int) -> None:
        func = node.func
        allowed = ", ".join(FUNCTIONS)
        if isinstance(func, ast.Attribute):
            target = _segment(self.source, func.value)
            if func.attr in FUNCTIONS:
                raise self.fail(node, f"method calls are not supported; write `{func.attr}({target})` "
                                      f"instead of `{target}.{func.attr}()`")
            raise self.fail(node, f"method calls are not supported; the functions are {allowed}, "
                                  "called as `f(x)`")
        if isinstance(func, ast.Name):
            self._check_identifier(func, func.id, "names")
        if not isinstance(func, ast.Name):
            raise self.fail(node, f"only the functions {allowed} can be called, by name")
        if func.id not in FUNCTIONS:
            raise self.fail(node, f"unknown function `{func.id}`; the functions are {allowed}")
        if node.keywords:
            raise self.fail(node, f"keyword arguments are not supported in `{func.id}()`")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.fail(arg, "starred arguments are not supported")
        _, arity = FUNCTIONS[func.id]
        if len(node.args) != arity:
            plural = "s" if arity != 1 else ""
            raise self.fail(node, f"`{func.id}()` takes {arity} argument{plural}, got {len(node.args)}")
        for arg in node.args:
            self.check(arg, depth)


def compile_expr(src: str) -> Expr:
    """Parse and validate `src`; raise ExprError for anything outside the language."""
    if not isinstance(src, str):
        raise ExprError(f"an expression must be a string, got {_type_name(src)}")
    if len(src) > MAX_SOURCE_CHARS:
        raise ExprError(f"expression is too long ({len(src)} characters, limit {MAX_SOURCE_CHARS})")
    if not src.strip():
        raise ExprError("expression is empty")
    source = src.strip()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for odd escapes
            tree = ast.parse(source, mode="eval")
    except SyntaxError as exc:
        column = exc.offset if exc.offset and exc.offset > 0 else None
        lines = source.splitlines() or [""]
        piece = lines[exc.lineno - 1] if exc.lineno and 1 <= exc.lineno <= len(lines) else None
        raise ExprError(f"invalid syntax: {exc.msg}", source=source, column=column, piece=piece) from None
    except (ValueError, RecursionError, MemoryError, OverflowError) as exc:
        raise ExprError(f"cannot parse expression: {exc}", source=source) from None
    validator = _Validator(source)
    try:
        validator.check(tree.body)
    except RecursionError:
        raise ExprError("expression is nested too deeply", source=source) from None
    return Expr(source, tree, frozenset(validator.names), frozenset(validator.fields), frozenset(validator.bare))
