import json
import os
import threading

import pytest

from autodiff_cli.errors import DataError, SpecError
from autodiff_cli.nodes import builtins as B
from autodiff_cli.nodes.builtins import (
    BUILTINS,
    Builtin,
    answer_after,
    bm25,
    bm25_cache_clear,
    bm25_cache_info,
    dedup_extend,
    join,
    json_field,
    label,
    last_integer,
    resolve_function,
)

TREC = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


# --- last_integer -------------------------------------------------------------------------

COT = """Let me count the objects. I have a flute (1), a piano (2), two trombones (4),
and 3 violins, so 4 + 3 = 7. Then adding the 2 drums gives 9.
Answer: 9"""


@pytest.mark.parametrize("text, expected", [
    (COT, "9"),
    ("Answer: 7", "7"),
    ("Answer: 12", "12"),
    ("So there are 12.", "12"),
    ("The total is 1,234 apples.", "1234"),
    ("It went from 5 to 1,000,000", "1000000"),
    ("The temperature is -5 degrees.", "-5"),
    ("Answer: \u22124", "-4"),
    ("pages 3-5", "5"),
    ("1,2,3", "3"),
    ("I owe 12.50 dollars, so 3 left", "3"),
    ("Answer: 8.0", "8"),
    ("0007", "7"),
    ("I think so...5", "5"),
    ("There are twelve.", None),
    ("", None),
    (None, None),
    (42, "42"),
    (["a 1", "b 2"], "2"),
])
def test_last_integer(text, expected):
    assert last_integer(text) == expected


# --- answer_after -------------------------------------------------------------------------

def test_answer_after():
    text = "Reasoning: the answer could be 3.\nAnswer: 7 objects\nDone."
    assert answer_after(text) == "7 objects"
    assert answer_after("Answer: 1\nlater ANSWER: 2") == "2"
    assert answer_after("**Answer:** Paris") == "Paris"
    assert answer_after("Answer:\n\n  Lyon  \nmore") == "Lyon"
    assert answer_after("Final: yes", marker="Final:") == "yes"
    assert answer_after("no marker here") is None
    assert answer_after("Answer:   ") is None
    assert answer_after(None) is None


# --- label --------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("LOC", "LOC"),
    ("  loc. ", "LOC"),
    ("**HUM**", "HUM"),
    ("The answer is LOC.", "LOC"),
    ("Answer: NUM", "NUM"),
    ("label: desc", "DESC"),
    # label words appear earlier in the reasoning; the marker decides
    ("It could be HUM since it mentions a person, or LOC since it mentions a city, "
     "but it asks for a description.\nAnswer: DESC", "DESC"),
    ("Not ENTY and not NUM. Label: HUM (not LOC)", "HUM"),
    ("Answer: the question is about a place, so the category is LOC", "LOC"),
    # no marker: the last whole-word mention wins; substrings do not count
    ("It is not NUM. I would say ENTY", "ENTY"),
    ("LOCATION and NUMBERS are not labels; HUM is", "HUM"),
    ("nothing relevant here", None),
    ("", None),
    (None, None),
])
def test_label_trec(text, expected):
    assert label(text, TREC) == expected


def test_label_default_and_canonical_spelling():
    assert label("no idea", TREC, default="DESC") == "DESC"
    assert label("I'd say Positive.", ["negative", "positive"]) == "positive"
    assert label("answer: very positive", ["positive", "very positive"]) == "very positive"
    assert label("not_entailment", ["entailment", "not_entailment"]) == "not_entailment"
    assert label("text", []) is None
    assert label("text", None, default="x") == "x"


# --- json_field ---------------------------------------------------------------------------

def test_json_field():
    fenced = 'Here you go:\n```json\n{"action": "search", "args": {"query": "Paris", "k": [1, 2]}}\n```\nThanks'
    assert json_field(fenced, "action") == "search"
    assert json_field(fenced, "args.query") == "Paris"
    assert json_field(fenced, "args.k.1") == 2
    assert json_field(fenced, "args.missing", default="d") == "d"
    assert json_field('I think {not json} but {"a": 1} and {"a": 2}', "a") == 1
    assert json_field('{"a": {"b": null}}', "a.b", default=5) is None
    assert json_field("no json at all", "a", default=0) == 0
    assert json_field('{"a": 1', "a", default="bad") == "bad"
    assert json_field(None, "a") is None
    assert json_field({"a": {"b": 3}}, "a.b") == 3
    assert json_field('{"a": 1}', "") == {"a": 1}


# --- list helpers -------------------------------------------------------------------------

def test_dedup_extend():
    assert dedup_extend(["a", "b"], ["b", "c", "a", "d", "c"]) == ["a", "b", "c", "d"]
    assert dedup_extend(None, ["x", "x"]) == ["x"]
    assert dedup_extend(["x"], None) == ["x"]
    assert dedup_extend(None, None) == []
    assert dedup_extend("one passage", "two passage") == ["one passage", "two passage"]
    assert dedup_extend([{"a": 1}], [{"a": 1}, {"b": 2}]) == [{"a": 1}, {"b": 2}]
    items = ["a"]
    dedup_extend(items, ["b"])
    assert items == ["a"]  # pure


def test_join():
    assert join(["a", None, "b"]) == "a\n\nb"
    assert join(["a", 1], sep=", ") == "a, 1"
    assert join(None) == ""
    assert join("already text") == "already text"


# --- bm25 ---------------------------------------------------------------------------------

ROWS = [
    {"title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"title": "Berlin", "text": "Berlin is the capital of Germany and its largest city."},
    {"title": "Python", "text": "Python is a programming language created by Guido van Rossum."},
    {"title": "Eiffel Tower", "text": "The Eiffel Tower is a wrought-iron tower in Paris, France."},
    {"text": "Bananas are yellow fruit rich in potassium."},
]


@pytest.fixture
def corpus(tmp_path):
    bm25_cache_clear()
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    yield path
    bm25_cache_clear()


def test_bm25_ranks_right_passage_first_and_caches(corpus):
    hits = bm25("Who created the Python programming language?", corpus=str(corpus), k=2)
    assert hits[0] == "Python: Python is a programming language created by Guido van Rossum."
    assert bm25_cache_info() == {"hits": 0, "misses": 1, "size": 1}

    hits = bm25("capital of Germany", corpus=str(corpus), k=3)
    assert hits[0].startswith("Berlin: ")
    assert bm25_cache_info()["hits"] == 1 and bm25_cache_info()["misses"] == 1

    # same file through another spelling of the path still hits the cache
    other = os.path.join(str(corpus.parent), ".", corpus.name)
    bm25("bananas", corpus=other)
    assert bm25_cache_info()["misses"] == 1


def test_bm25_passage_without_title_and_k(corpus):
    assert bm25("yellow potassium", corpus=str(corpus), k=1) == ["Bananas are yellow fruit rich in potassium."]
    assert len(bm25("capital city largest tower", corpus=str(corpus), k=2)) == 2
    assert bm25("capital", corpus=str(corpus), k=0) == []


def test_bm25_no_title_field(corpus):
    hits = bm25("Guido Rossum", corpus=str(corpus), k=1, title_field=None)
    assert hits == ["Python is a programming language created by Guido van Rossum."]
    assert bm25_cache_info()["misses"] == 1  # a different field set is a different index


def test_bm25_empty_queries(corpus):
    assert bm25(None, corpus=str(corpus)) == []
    assert bm25("", corpus=str(corpus)) == []
    assert bm25("   ", corpus=str(corpus)) == []
    assert bm25("the of and", corpus=str(corpus)) == []  # stopwords only
    assert bm25("zzzz qqqq", corpus=str(corpus)) == []
    assert bm25([], corpus=str(corpus)) == []


def test_bm25_query_list_merges_in_order(corpus):
    hits = bm25(["Germany capital", "capital of France", None, ""], corpus=str(corpus), k=2)
    assert hits[0].startswith("Berlin: ")
    assert len(hits) == len(set(hits))
    assert any(h.startswith("Paris: ") for h in hits)
    assert hits.index(next(h for h in hits if h.startswith("Paris: "))) > 0


def test_bm25_deterministic_ties(tmp_path):
    bm25_cache_clear()
    path = tmp_path / "ties.jsonl"
    rows = [{"text": "apples one"}, {"text": "apples two"}, {"text": "apples three"}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    first = bm25("apples", corpus=str(path), k=3)
    assert first == ["apples one", "apples two", "apples three"]
    assert bm25("apples", corpus=str(path), k=3) == first
    bm25_cache_clear()


def test_bm25_rebuilds_when_file_changes(corpus):
    bm25("Paris", corpus=str(corpus))
    with corpus.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"title": "Zebra", "text": "Zebras have stripes."}) + "\n")
    os.utime(corpus, ns=(1, 1))  # make sure the mtime differs even on coarse clocks
    assert bm25("stripes", corpus=str(corpus), k=1) == ["Zebra: Zebras have stripes."]
    info = bm25_cache_info()
    assert info["misses"] == 2 and info["size"] == 1  # the stale index was dropped


def test_bm25_threads_build_once(corpus):
    results = []

    def worker():
        results.append(bm25("capital of France", corpus=str(corpus), k=1))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == results[0] for r in results) and len(results) == 8
    assert bm25_cache_info()["misses"] == 1


def test_bm25_bad_corpus(tmp_path):
    with pytest.raises(DataError, match="cannot read BM25 corpus"):
        bm25("q", corpus=str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError) as info:
        bm25("q", corpus=str(bad))
    assert info.value.line == 2
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(DataError, match="string `text` field"):
        bm25("q", corpus=str(nofield))
    with pytest.raises(DataError):
        bm25("q", corpus=None)


# --- registry and resolve_function -------------------------------------------------------

def test_registry():
    assert set(BUILTINS) == {"last_integer", "answer_after", "label", "json_field", "bm25",
                             "dedup_extend", "join", "first_of", "react_act", "react_answer"}
    assert all(isinstance(b, Builtin) for b in BUILTINS.values())
    assert BUILTINS["bm25"].path_args == frozenset({"corpus"})
    assert BUILTINS["label"].path_args == frozenset()
    assert BUILTINS["react_act"].path_args == frozenset({"corpus"})


def test_first_of_takes_the_first_branch_that_ran():
    from autodiff_cli.nodes.builtins import first_of

    assert first_of(counted=None, computed="7") == "7"
    assert first_of(counted="", computed="7") == ""  # an empty answer is an answer; only None is "did not run"
    assert first_of(counted=None, computed=None) is None
    assert first_of(default="none", counted=None) == "none"


def test_resolve_function_builtins():
    assert resolve_function("last_integer") == (last_integer, frozenset())
    assert resolve_function("bm25") == (bm25, frozenset({"corpus"}))
    assert resolve_function("autodiff_cli.nodes.builtins:bm25") == (bm25, frozenset({"corpus"}))
    assert resolve_function("autodiff_cli.builtins:label") == (label, frozenset())


def test_resolve_function_imports_modules():
    fn, paths = resolve_function("json:dumps")
    assert fn is json.dumps and paths == frozenset()
    fn, _ = resolve_function("os.path:join")
    assert fn is os.path.join
    fn, _ = resolve_function("json:JSONDecoder.decode")
    assert fn is json.JSONDecoder.decode


@pytest.mark.parametrize("ref, fragment", [
    ("no_such_builtin", "'no_such_builtin'"),
    ("mypkg.module.function", "'mypkg.module.function'"),
    ("definitely_missing_module_xyz:fn", "ModuleNotFoundError"),
    ("json:no_such_function", "AttributeError"),
    ("json:__name__", "not callable"),
    ("autodiff_cli.nodes.builtins:nope", "'autodiff_cli.nodes.builtins:nope'"),
    (":fn", "':fn'"),
    ("json:", "'json:'"),
    ("", "''"),
])
def test_resolve_function_errors(ref, fragment):
    with pytest.raises(SpecError) as info:
        resolve_function(ref)
    err = info.value
    assert err.expected is not None and "module:function" in err.expected
    assert "last_integer" in err.expected and "bm25" in err.expected
    assert err.got is not None and fragment in err.got
    assert err.file is None and err.line is None  # the caller fills in the location


def test_resolve_function_module_raising_on_import(tmp_path, monkeypatch):
    (tmp_path / "explodes_on_import.py").write_text("raise RuntimeError('kaboom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError) as info:
        resolve_function("explodes_on_import:fn")
    assert "RuntimeError: kaboom" in info.value.got


def test_resolve_dotted_hint():
    with pytest.raises(SpecError) as info:
        resolve_function("mypkg.module.function")
    assert "package.module:function" in (info.value.hint or "")


def test_builtins_called_with_keyword_args():
    # function nodes call fn(**args, **with_)
    fn, _ = resolve_function("label")
    assert fn(text="Answer: LOC", labels=TREC, default=None) == "LOC"
    fn, _ = resolve_function("json_field")
    assert fn(text='{"a": 1}', field="a") == 1
    assert B.last_integer(text="Answer: 3") == "3"


# --- ReAct agent: react_act, react_answer ---------------------------------------------------

from autodiff_cli.nodes.builtins import react_act, react_answer


def plan(action, argument, thought="I should act."):
    return {"thought": thought, "action": action, "argument": argument}


def test_react_search_returns_top_k_passages(corpus):
    out = react_act(plan("search", "Who created the Python programming language?"), corpus=str(corpus), k=1)
    assert out["action"] == "search" and out["argument"].startswith("Who created")
    assert out["observation"] == "Python: Python is a programming language created by Guido van Rossum."
    assert out["step"] == ("Thought: I should act.\nAction: search[Who created the Python programming language?]\n"
                           "Observation: Python: Python is a programming language created by Guido van Rossum.")
    two = react_act(plan("search", "capital city"), corpus=str(corpus), k=2)["observation"].splitlines()
    assert len(two) == 2 and all(": " in line for line in two)
    assert bm25_cache_info()["misses"] == 1  # one index shared with bm25


def test_react_search_without_a_match(corpus):
    out = react_act(plan("search", "zzzz qqqq"), corpus=str(corpus))
    assert out["action"] == "search" and "No passage matches" in out["observation"]


def test_react_lookup_by_title_case_insensitive_else_best_hit(corpus):
    out = react_act(plan("lookup", "eiffel tower"), corpus=str(corpus))
    assert out["observation"] == "Eiffel Tower: The Eiffel Tower is a wrought-iron tower in Paris, France."
    # the title "Paris" wins over a passage that merely mentions Paris
    assert react_act(plan("lookup", "PARIS"), corpus=str(corpus))["observation"].startswith("Paris: Paris is")
    fallback = react_act(plan("lookup", "Guido van Rossum"), corpus=str(corpus))
    assert fallback["observation"].startswith("Python: ")
    missing = react_act(plan("lookup", "zzzz"), corpus=str(corpus))
    assert "No passage titled `zzzz`" in missing["observation"]


def test_react_finish_returns_the_argument(corpus):
    out = react_act(plan("finish", "Guido van Rossum"), corpus=str(corpus))
    assert out == {"action": "finish", "argument": "Guido van Rossum", "observation": "Guido van Rossum",
                   "step": "Thought: I should act.\nAction: finish[Guido van Rossum]\nObservation: Guido van Rossum"}
    assert bm25_cache_info()["misses"] == 0  # finish never touches the corpus


@pytest.mark.parametrize("raw", [
    '{"thought": "t", "action": "Search", "argument": "Python language"}',
    'Sure! ```json\n{"thought": "t", "action": "search", "argument": "Python language"}\n```',
    "I will look it up.\nsearch[Python language]",
    {"thought": "t", "action": "search[Python language]", "argument": ""},
    {"action": " SEARCH ", "argument": "Python language"},
])
def test_react_tolerates_json_text_and_action_call_syntax(corpus, raw):
    out = react_act(raw, corpus=str(corpus), k=1)
    assert out["action"] == "search" and out["argument"] == "Python language"
    assert out["observation"].startswith("Python: ")


@pytest.mark.parametrize("raw", [None, "", "garbage without json", 42, ["search", "x"], {"thought": "hm"},
                                 {"action": None, "argument": "x"}, '{"action": 3}', "{not json"])
def test_react_unreadable_plan_gives_an_observation_not_an_error(corpus, raw):
    out = react_act(raw, corpus=str(corpus))
    assert out["action"] is None
    assert "could not be read" in out["observation"] and out["observation"] in out["step"]


def test_react_unknown_action_and_missing_argument(corpus):
    out = react_act(plan("browse", "x"), corpus=str(corpus))
    assert out["action"] is None and "Unknown action `browse`" in out["observation"]
    assert "search, lookup, finish" in out["observation"]
    empty = react_act(plan("search", "  "), corpus=str(corpus))
    assert empty["action"] == "search" and "needs an argument" in empty["observation"]
    odd = react_act({"action": "finish", "argument": None}, corpus=str(corpus))
    assert odd["action"] == "finish" and odd["argument"] == "" and odd["step"] == "Action: finish[]\nObservation: "


def test_react_act_is_pure_and_keyword_callable(corpus):
    p = plan("search", "capital of Germany")
    snapshot = dict(p)
    fn, paths = resolve_function("react_act")
    assert paths == frozenset({"corpus"})
    first = fn(plan=p, corpus=str(corpus), k=2)
    assert p == snapshot and fn(plan=p, corpus=str(corpus), k=2) == first
    assert react_act(p, corpus=str(corpus), k=0)["observation"].startswith("No passage matches")


def test_react_act_needs_a_corpus_for_retrieval():
    with pytest.raises(DataError):
        react_act(plan("search", "x"), corpus=None)
    with pytest.raises(DataError):
        react_act(plan("lookup", "x"), corpus=None)
    assert react_act(plan("finish", "x"), corpus=None)["observation"] == "x"


def test_react_answer():
    assert react_answer({"action": "finish", "argument": "Paris", "observation": "Paris"}) == "Paris"
    assert react_answer({"action": "finish", "argument": None}) == ""
    assert react_answer({"action": "search", "argument": "x", "observation": "P: text"}) == "P: text"
    steps = ["Thought: a\nAction: search[x]\nObservation: first", "Action: lookup[y]\nObservation: last one"]
    assert react_answer({}, steps) == "last one"
    assert react_answer(None, steps) == "last one"
    assert react_answer(None, "just text") == "just text"
    assert react_answer(None, None) == "" and react_answer("junk", []) == ""
    fn, paths = resolve_function("react_answer")
    assert fn is react_answer and paths == frozenset()
