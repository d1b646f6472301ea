"""Loading, ids, selection and field checks of datasets; the object-counting generator."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from autodiff_cli.data.generators import (
    CATEGORIES,
    GENERATORS,
    generate,
    object_counting,
)
from autodiff_cli.data.loaders import (
    Example,
    allocate_proportionally,
    check_fields,
    load_examples,
    select,
)
from autodiff_cli.errors import DataError


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    return str(info.value)


# --- load_examples: happy paths -------------------------------------------------------------


def test_jsonl_keeps_full_row_and_uses_id_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 7, "q": "a"}, {"id": "x", "q": "b"}])
    examples = load_examples(path)
    assert [e.id for e in examples] == ["7", "x"]
    assert examples[0].fields == {"id": 7, "q": "a"}
    assert [e.line for e in examples] == [1, 2]


def test_blank_lines_are_skipped_but_line_numbers_stay_true(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a"}\n\n   \n{"id": "b"}\n', encoding="utf-8")
    examples = load_examples(path)
    assert [(e.id, e.line) for e in examples] == [("a", 1), ("b", 4)]


def test_custom_id_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"qid": "q1", "id": "same"}, {"qid": "q2", "id": "same"}])
    assert [e.id for e in load_examples(path, id_field="qid")] == ["q1", "q2"]


def test_rows_without_id_get_stable_content_hash_ids(tmp_path):
    rows = [{"q": "2+2", "a": "4"}, {"q": "3+3", "a": "6"}]
    first = load_examples(write_jsonl(tmp_path / "one.jsonl", rows))
    # Same content, other key order and file: same ids.
    second = load_examples(write_jsonl(tmp_path / "two.jsonl", [{"a": "4", "q": "2+2"}, {"a": "6", "q": "3+3"}]))
    assert [e.id for e in first] == [e.id for e in second]
    assert all(re.fullmatch(r"h-[0-9a-f]{12}", e.id) for e in first)
    assert first[0].id != first[1].id
    # Pinned: the hash is over canonical JSON, so it never changes between versions or machines.
    assert first[0].id == "h-" + __import__("hashlib").sha256(b'{"a":"4","q":"2+2"}').hexdigest()[:12]


def test_csv_values_are_strings_and_quoted_newlines_work(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,question,answer\n1,"two\nlines",3\nb,plain,"x,y"\n', encoding="utf-8")
    examples = load_examples(path)
    assert [e.id for e in examples] == ["1", "b"]
    assert examples[0].fields == {"id": "1", "question": "two\nlines", "answer": "3"}
    assert examples[1].fields["answer"] == "x,y"
    assert examples[1].line == 4


def test_csv_with_bom_and_no_id_column(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufeffquestion,answer\nq,a\n".encode("utf-8"))
    (example,) = load_examples(path)
    assert example.fields == {"question": "q", "answer": "a"}
    assert example.id.startswith("h-")


def test_example_equality_ignores_line():
    assert Example("a", {"x": 1}, line=3) == Example("a", {"x": 1}, line=9)


# --- load_examples: errors name the file and the line ---------------------------------------


def test_invalid_json_names_file_line_and_reason(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b",,}\n', encoding="utf-8")
    message = error_of(load_examples, path, display_path="data/d.jsonl")
    assert message.startswith("error: data/d.jsonl:2: expected a JSON object, got invalid JSON (")
    assert "Expecting" in message and "column" in message
    assert "Traceback" not in message


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a"}\n[1, 2]\n', encoding="utf-8")
    message = error_of(load_examples, path)
    assert message.startswith(f"error: {path}:2: expected a JSON object, got list")


def test_non_utf8_byte_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"q": "sister\xf0city"}\n')
    message = error_of(load_examples, path, display_path="d.jsonl")
    assert message.startswith("error: d.jsonl:3: expected UTF-8 text, got byte 0xf0 at column 14")


def test_duplicate_id_names_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a"}, {"id": "b"}, {"id": "a"}])
    message = error_of(load_examples, path, display_path="d.jsonl")
    assert message.startswith("error: d.jsonl:3: id: expected a unique id, got 'a', already used on line 1")


def test_identical_rows_without_ids_are_duplicates_with_a_hint(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": 1}, {"q": 1}])
    message = error_of(load_examples, path)
    assert ":2: id: expected a unique id" in message and "already used on line 1" in message
    assert "identical rows" in message


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    assert error_of(load_examples, path, display_path="d.jsonl") == (
        "error: d.jsonl: expected at least one example, got an empty file"
    )


def test_missing_dataset_file_suggests_fetch(tmp_path):
    message = error_of(load_examples, tmp_path / "trec" / "train.jsonl", display_path="datasets/trec/train.jsonl")
    first, hint = message.split("\n", 1)
    assert first == "error: datasets/trec/train.jsonl: expected an existing file, got no such file"
    assert "autodiff data fetch trec" in hint


def test_missing_other_file_has_no_fetch_hint(tmp_path):
    message = error_of(load_examples, tmp_path / "mine.jsonl")
    assert "no such file" in message and "data fetch" not in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("x", encoding="utf-8")
    assert "expected a .jsonl or .csv file" in error_of(load_examples, path)


def test_csv_row_with_wrong_column_count(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,q\n1,a\n2,b,extra\n", encoding="utf-8")
    assert error_of(load_examples, path, display_path="d.csv").startswith(
        "error: d.csv:3: expected 2 columns (as in the header), got 3 columns"
    )


def test_csv_header_only_is_empty(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,q\n", encoding="utf-8")
    assert "expected at least one example, got an empty file" in error_of(load_examples, path)


def test_non_scalar_id_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": ["x"]}])
    assert error_of(load_examples, path, display_path="d.jsonl").startswith(
        "error: d.jsonl:1: id: expected a string or number"
    )


# --- select --------------------------------------------------------------------------------


def make(n: int, labels: list[str] | None = None) -> list[Example]:
    return [Example(f"e{i}", {"id": f"e{i}", "label": labels[i] if labels else "x"}, line=i + 1) for i in range(n)]


def test_select_slices_like_python():
    examples = make(10)
    assert select(examples) == examples
    assert select(examples, start=2, stop=5) == examples[2:5]
    assert select(examples, start=-3) == examples[-3:]
    assert select(examples, stop=100) == examples


def test_sample_is_seeded_sorted_and_distinct():
    examples = make(50)
    a = select(examples, sample=10, seed=3)
    assert a == select(examples, sample=10, seed=3)
    assert a != select(examples, sample=10, seed=4)
    positions = [examples.index(e) for e in a]
    assert positions == sorted(positions) and len(set(positions)) == 10


def test_sample_applies_after_slice():
    examples = make(50)
    picked = select(examples, start=40, sample=5, seed=0)
    assert all(examples.index(e) >= 40 for e in picked) and len(picked) == 5
    assert select(examples, start=40, sample=10) == examples[40:]


def test_sample_larger_than_available():
    message = error_of(select, make(5), start=2, sample=4)
    assert "sample" in message and "between 0 and 3" in message and "got 4" in message


def test_stratified_sample_is_proportional_with_every_class():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 9 + ["d"] * 1
    examples = make(100, labels)
    picked = select(examples, sample=10, stratify="label", seed=1)
    counts = Counter(e.fields["label"] for e in picked)
    # Quotas 6, 3, 0.9, 0.1: c gets the largest remainder; d, the rare class, takes one from a.
    assert counts == {"a": 5, "b": 3, "c": 1, "d": 1}
    assert picked == select(examples, sample=10, stratify="label", seed=1)
    positions = [examples.index(e) for e in picked]
    assert positions == sorted(positions)


def test_stratify_on_missing_field():
    assert "stratify: topic" in error_of(select, make(5), sample=2, stratify="topic")


def test_largest_remainder_allocation():
    assert allocate_proportionally({"a": 5, "b": 3, "c": 2}, 5) == {"a": 3, "b": 1, "c": 1}
    assert allocate_proportionally({"a": 98, "b": 1, "c": 1}, 3) == {"a": 1, "b": 1, "c": 1}
    # Fewer picks than classes: no minimum, largest classes first.
    assert allocate_proportionally({"a": 98, "b": 1, "c": 1}, 1) == {"a": 1, "b": 0, "c": 0}
    alloc = allocate_proportionally({"x": 7, "y": 7, "z": 7}, 20)
    assert sum(alloc.values()) == 20 and max(alloc.values()) - min(alloc.values()) <= 1


# --- check_fields ---------------------------------------------------------------------------


def test_check_fields_names_first_example_missing_a_field(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "question": "q"}, {"id": "b"}, {"id": "c"}])
    examples = load_examples(path)
    check_fields(examples, {"question"} - {"question"}, "d.jsonl")  # nothing needed: fine
    check_fields(examples[:1], {"question", "id"}, "d.jsonl")
    message = error_of(check_fields, examples, {"question"}, "d.jsonl")
    assert message.startswith("error: d.jsonl:2: input.question: expected a field 'question' in every example")
    assert "'b'" in message


# --- generator ------------------------------------------------------------------------------

WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}


def count_answer(question: str) -> int:
    """Recompute the answer from the text, independently of the generator's bookkeeping."""
    listing, asked = re.fullmatch(r"I have (.+)\. How many (.+) do I have\?", question).groups()
    phrases = re.split(r", and |, | and ", listing)
    wanted = {noun for pair in CATEGORIES[asked] for noun in pair}
    total = 0
    for phrase in phrases:
        word, noun = phrase.split(" ", 1)
        assert noun in {n for items in CATEGORIES.values() for pair in items for n in pair}, phrase
        if asked == "objects" or noun in wanted:
            total += WORDS[word]
    return total


def test_object_counting_rows_are_well_formed_and_correct():
    rows = object_counting(200, seed=5)
    assert [r["id"] for r in rows] == [f"gen-oc-5-{i}" for i in range(200)]
    for row in rows:
        assert set(row) == {"id", "question", "answer"}
        assert row["answer"].isdigit()
        assert count_answer(row["question"]) == int(row["answer"])
    asked = Counter(re.search(r"How many (.+) do I have", r["question"]).group(1) for r in rows)
    assert set(asked) == set(CATEGORIES)
    assert any(count_answer(r["question"]) < len(re.split(r", and |, | and ", r["question"])) for r in rows)


def test_object_counting_is_deterministic_and_prefix_stable():
    assert object_counting(30, seed=1) == object_counting(30, seed=1)
    assert object_counting(30, seed=1)[:10] == object_counting(10, seed=1)
    assert [r["question"] for r in object_counting(10, seed=1)] != [r["question"] for r in object_counting(10, seed=2)]
    assert object_counting(2, seed=0, id_prefix="x")[1]["id"] == "x-0-1"


def test_counting_or_arithmetic_alternates_kinds_with_right_answers():
    from autodiff_cli.data.generators import counting_or_arithmetic

    rows = counting_or_arithmetic(8, seed=3)
    assert rows == counting_or_arithmetic(8, seed=3) and rows[:4] == counting_or_arithmetic(4, seed=3)
    assert [r["kind"] for r in rows] == ["counting", "arithmetic"] * 4
    for row in rows:
        if row["kind"] == "arithmetic":
            a, op, b = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", row["question"]).groups()
            assert int(row["answer"]) == {"plus": int(a) + int(b), "minus": int(a) - int(b),
                                          "times": int(a) * int(b)}[op] >= 0
        else:
            assert row["question"].startswith("I have ") and row["answer"].isdigit()


def test_generate_registry_and_unknown_name():
    assert set(GENERATORS) == {"object_counting", "counting_or_arithmetic"}
    assert generate("object_counting", 3, 7) == object_counting(3, 7)
    message = error_of(generate, "sudoku", 3, 0)
    assert "expected one of object_counting" in message and "'sudoku'" in message
    assert "positive number" in error_of(generate, "object_counting", 0, 0)
