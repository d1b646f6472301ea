import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from autodiff_cli.spec.expr import MAX_SOURCE_CHARS, Expr, ExprError, compile_expr

CTX = {
    "plan": {"action": "finish", "args": {"query": "paris"}},
    "state": {"context": ["a", "b", "c", "d"], "done": False, "score": 0.5},
    "step": {"text": "The ANSWER is 4"},
    "iteration": 1,
    "x": {"a": 1, "name": "Ada"},
    "items": [1, 2, 3],
    "nothing": None,
}


def ev(src, ctx=CTX):
    return compile_expr(src).evaluate(ctx)


# --- normal use ---------------------------------------------------------------------------

@pytest.mark.parametrize("src, expected", [
    ("plan.action == 'finish'", True),
    ("plan.action != 'finish'", False),
    ("len(state.context) >= 4", True),
    ("'answer' in lower(step.text)", True),
    ("iteration >= 2 or state.done", False),
    ("iteration >= 1 and not state.done", True),
    ("plan.args.query", "paris"),
    ("plan['action']", "finish"),
    ("state.context[-1]", "d"),
    ("items[0] + items[1] * 2", 5),
    ("-iteration", -1),
    ("nothing is None", True),
    ("plan is not None", True),
    ("0 < iteration < 2", True),
    ("'z' not in state.context", True),
    ("x.name + '!'", "Ada!"),
    ("'ab' * 3", "ababab"),
    ("upper(x.name)", "ADA"),
    ("strip('  hi ')", "hi"),
    ("str(iteration) == '1'", True),
    ("int('12') + 1", 13),
    ("float('0.5') == state.score", True),
    ("contains(step.text, 'ANSWER')", True),
    ("contains(state.context, 'c')", True),
    ("contains(plan, 'action')", True),
    ("startswith(plan.action, 'fin')", True),
    ("endswith(plan.action, 'sh')", True),
    ("[1, 2] == [1, 2]", True),
    ("(1, 'a')", (1, "a")),
    ("len(x)", 2),
    ("state.done or 'fallback'", "fallback"),
    ("'a' < 'b'", True),
    ("1 < 2.5", True),
])
def test_evaluates(src, expected):
    assert ev(src) == expected


def test_names_and_source():
    expr = compile_expr("  len(state.context) >= 4 or plan.action == 'finish' and iteration > 1 ")
    assert isinstance(expr, Expr)
    assert expr.names == frozenset({"state", "plan", "iteration"})
    assert expr.source == "len(state.context) >= 4 or plan.action == 'finish' and iteration > 1"
    assert compile_expr("len('abc')").names == frozenset()


def test_short_circuit_skips_missing_names():
    assert ev("iteration >= 1 or missing.key") is True
    assert ev("iteration > 5 and missing.key") is False


@pytest.mark.parametrize("src, fragment", [
    ("missing == 1", "unknown name `missing`"),
    ("plan.missing", "has no key `missing`"),
    ("plan['missing']", "has no key `missing`"),
    ("plan.action.more", "not a mapping"),
    ("state.context[10]", "out of range"),
    ("state.context['a']", "indexed by integers"),
    ("'a' < 1", "cannot order str and int"),
    ("'a' + 1", "cannot add str and int"),
    ("items + items", "cannot add list and list"),
    ("-'a'", "cannot negate"),
    ("lower(iteration)", "lower() expects a string"),
    ("len(iteration)", "len() expects"),
    ("int('abc')", "int() cannot convert"),
    ("float(nothing)", "float() expects"),
    ("1 in iteration", "to search in"),
    ("1 in 'abc'", "both must be strings"),
])
def test_runtime_errors_are_expr_errors(src, fragment):
    with pytest.raises(ExprError) as info:
        ev(src)
    assert fragment in str(info.value)


def test_error_names_piece_and_column():
    with pytest.raises(ExprError) as info:
        compile_expr("iteration > 1 and x.lower()")
    err = info.value
    assert err.column == 19
    assert err.piece == "x.lower()"
    assert "column 19" in str(err) and "`x.lower()`" in str(err)

    with pytest.raises(ExprError) as info:
        compile_expr("'é' == 1 or x.__class__")
    assert info.value.column == 13  # characters, not UTF-8 bytes

    with pytest.raises(ExprError) as info:
        ev("iteration == 1 and plan.nope")
    assert info.value.piece == "plan.nope" and info.value.column == 20


def test_missing_key_lists_available_keys():
    with pytest.raises(ExprError, match=r"keys: action, args"):
        ev("plan.actoin")


def test_context_must_be_mapping():
    with pytest.raises(ExprError):
        compile_expr("1").evaluate([1])  # type: ignore[arg-type]


def test_attribute_is_key_lookup_only():
    class Obj:
        action = "finish"

    # Attribute access never falls back to getattr on non-mappings.
    with pytest.raises(ExprError, match="not a mapping"):
        ev("plan.action", {"plan": Obj()})
    with pytest.raises(ExprError, match="not a mapping"):
        ev("s.upper", {"s": "text"})


# --- attacks ------------------------------------------------------------------------------

@pytest.mark.parametrize("src, fragment", [
    ("__import__('os')", "starting with `_`"),
    ("().__class__.__bases__", "starting with `_`"),
    ("x.__class__", "starting with `_`"),
    ("x['__class__']", "starting with `_`"),
    ("x._private", "starting with `_`"),
    ("_secret", "starting with `_`"),
    ("open('f')", "unknown function `open`"),
    ("eval('1')", "unknown function `eval`"),
    ("exec('1')", "unknown function `exec`"),
    ("getattr(x, 'y')", "unknown function `getattr`"),
    ("globals()", "unknown function `globals`"),
    ("[c for c in x]", "comprehensions"),
    ("{c: 1 for c in x}", "comprehensions"),
    ("(c for c in x)", "generator"),
    ("lambda: 1", "lambda"),
    ("x.lower()", "write `lower(x)`"),
    ("x.name.upper()", "write `upper(x.name)`"),
    ("x.keys()", "method calls are not supported"),
    ("'a' * 10 ** 9", "operator `**`"),
    ("10 ** 10 ** 10", "operator `**`"),
    ("f'{x}'", "f-strings"),
    ("(y := 1)", ":="),
    ("len(*items)", "starred"),
    ("[*items]", "Starred"),
    ("len(x=1)", "keyword"),
    ("len()", "takes 1 argument"),
    ("contains('a')", "takes 2 arguments"),
    ("len(x)(1)", "only the functions"),
    ("{'a': 1}", "dict"),
    ("{1}", "set"),
    ("1 if x else 2", "conditional"),
    ("items[0:2]", "slices"),
    ("x is 1", "is None"),
    ("1 / 2", "operator `/`"),
    ("~1", "operator `~`"),
    ("b'x'", "bytes"),
    ("1j", "complex"),
    ("...", "ellipsis"),
    ("import os", "invalid syntax"),
    ("x = 1", "invalid syntax"),
    ("9" * 100, "too large"),
    ("", "empty"),
    ("1 +" + " 1 +" * 400 + " 1", "too long"),
    ("-" * 200 + "1", "nested too deeply"),
])
def test_attacks_rejected_at_compile_time(src, fragment):
    with pytest.raises(ExprError) as info:
        compile_expr(src)
    assert fragment.lower() in str(info.value).lower()


def test_source_length_limit():
    assert compile_expr("1" + " " * (MAX_SOURCE_CHARS - 1))
    with pytest.raises(ExprError, match="too long"):
        compile_expr("1" + " " * MAX_SOURCE_CHARS)


def test_string_repetition_is_capped_before_allocating():
    start = time.perf_counter()
    with pytest.raises(ExprError, match="too long"):
        ev("'a' * 1000000000")
    with pytest.raises(ExprError, match="too long"):
        ev("1000000000 * 'a'")
    with pytest.raises(ExprError, match="too long"):
        ev("s * 100000 * 100000", {"s": "ab"})
    with pytest.raises(ExprError, match="too long"):
        ev("s + s", {"s": "a" * 600_000})
    assert time.perf_counter() - start < 1.0
    assert ev("'ab' * -1") == ""


def test_integer_growth_is_capped():
    big = "*".join(["1000000000000000000"] * 30)  # 10**540 if unchecked
    with pytest.raises(ExprError, match="too large"):
        ev(big)
    with pytest.raises(ExprError, match="too large"):
        ev("n * n", {"n": 2 ** 200})
    with pytest.raises(ExprError, match="too long"):
        ev("int(s)", {"s": "9" * 5000})
    with pytest.raises(ExprError):
        ev("n + 1.0", {"n": 10 ** 400})  # OverflowError inside becomes ExprError
    with pytest.raises(ExprError):
        ev("int(f)", {"f": float("inf")})


def test_odd_values_from_user_code_become_expr_errors():
    class Weird:
        def __eq__(self, other):
            raise RuntimeError("boom")

        def __bool__(self):
            raise RuntimeError("no truth")

        __hash__ = object.__hash__

    with pytest.raises(ExprError, match="boom"):
        ev("w == 1", {"w": Weird()})
    with pytest.raises(ExprError, match="no truth"):
        ev("w or 1", {"w": Weird()})
    with pytest.raises(ExprError):
        ev("str(w)", {"w": Weird()})


def test_runtime_key_strings_starting_with_underscore_rejected():
    with pytest.raises(ExprError, match="starting with `_`"):
        ev("d[k]", {"d": {"_x": 1}, "k": "_x"})


def test_not_a_string():
    with pytest.raises(ExprError):
        compile_expr(None)  # type: ignore[arg-type]


# --- property: only ExprError ever escapes -----------------------------------------------

_PIECES = st.sampled_from([
    "x", "y", "items", "plan", "state", "nothing", ".", "[", "]", "(", ")", ",", "'", '"', "0", "1",
    "-1", "10", "2.5", "'a'", "'_'", " ", "+", "-", "*", "**", "/", "==", "<", ">=", " in ", " not ",
    " and ", " or ", " is ", "None", "True", "len", "lower", "str", "int", "float", "contains",
    "action", "context", "__class__", "_x", "lambda", ":", "for", "if", "else", "f'", "{", "}",
    "\\", "\n", "#", "é", "\x00", "999999999999999999999", "`", "@", "~", "yield", "await", "...",
])
_TEXT = st.one_of(st.text(max_size=80), st.lists(_PIECES, max_size=25).map("".join))
_SETTINGS = settings(max_examples=600, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(src=_TEXT)
def test_any_text_compiles_and_evaluates_or_raises_expr_error(src):
    try:
        expr = compile_expr(src)
    except ExprError:
        return
    try:
        expr.evaluate(CTX)
    except ExprError:
        pass


_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@_SETTINGS
@given(src=st.lists(_PIECES, max_size=20).map("".join), x=_VALUES, y=_VALUES)
def test_valid_expressions_on_random_values_only_raise_expr_error(src, x, y):
    try:
        expr = compile_expr(src)
    except ExprError:
        return
    try:
        expr.evaluate({"x": x, "y": y, "items": [x, y], "plan": {"action": x}, "state": {"context": y}})
    except ExprError:
        pass


# --- what an expression reads (compile-time checks and provenance of `when`) ---------------


def test_fields_and_bare_names_are_what_the_expression_reads():
    e = compile_expr("route == 'math' and len(input.q) > 2 or plan['action'] == 'x' or hops.context[0] == plan")
    assert e.names == {"route", "input", "plan", "hops"}
    assert e.fields == {("input", "q"), ("plan", "action"), ("hops", "context")}
    assert e.bare == {"route", "plan"}  # `plan` is also compared whole; `input` and `hops` only through keys
    assert compile_expr("len(x) > 1").bare == {"x"} and compile_expr("len(x) > 1").fields == frozenset()


@pytest.mark.parametrize("source, context, missing", [
    ("plan.action == 'finish'", {"plan": "not json"}, True),  # text where a mapping was expected
    ("plan.action == 'finish'", {"plan": {"thought": "t"}}, True),  # a mapping without the key
    ("plan['action'] == 'finish'", {"plan": None}, True),
    ("plan['action'] == 'finish'", {"plan": "text"}, True),
    ("items[3] == 1", {"items": [1]}, True),
    ("int(plan) > 1", {"plan": "high"}, False),  # the value is there; the expression cannot use it
    ("plan < 3", {"plan": "a"}, False),
    ("nothing == 1", {}, False),  # an unknown name is the expression's fault
])
def test_errors_say_whether_a_value_lacked_what_was_read(source, context, missing):
    with pytest.raises(ExprError) as e:
        compile_expr(source).evaluate(context)
    assert e.value.missing is missing
