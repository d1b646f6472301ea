"""`autodiff data fetch NAME`: the public datasets, converted and split as each SOURCE.md describes.

Online, files come from their canonical sources and are split with the documented seeded shuffles,
so the canonical test split is produced too. Offline (`--from DIR`), an already converted copy laid
out like `DIR/<name>/{train,val,test}.jsonl` is validated and copied.
"""
from __future__ import annotations

import http.client
import json
import random
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from autodiff_cli.data.loaders import DATASETS, check_fields, decode_utf8, load_examples
from autodiff_cli.errors import DataError, describe
from autodiff_cli.io.files import atomic_write_bytes, jsonl_rows, jsonl_text

BBH_URL = (
    "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/"
    "9ee07bd481feebf959a6b59d61ea57bdcf30964d/bbh/object_counting.json"
)
TREC_TRAIN_URL = "https://cogcomp.seas.upenn.edu/Data/QA/QC/train_5500.label"
TREC_TEST_URL = "https://cogcomp.seas.upenn.edu/Data/QA/QC/TREC_10.label"
HOTPOT_URL = "http://curtis.ml.cmu.edu/datasets/hotpot/hotpot_dev_distractor_v1.json"
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl"

TREC_LABELS = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
HOTPOT_RECORDS = 500
HOTPOT_FIELDS = ("question", "answer", "type", "level", "supporting_facts", "context")

# Fields every row of a split must have (checked when copying a local directory).
REQUIRED_FIELDS = {
    "object_counting": {"id", "question", "answer"},
    "trec": {"id", "question", "label", "fine_label"},
    "hotpotqa": {"id", "question", "answer", "supporting_facts", "context"},
    "gsm8k": {"id", "question", "answer"},
}
CORPUS_FIELDS = {"id", "title", "text"}

Splits = dict[str, list[dict]]
Download = Callable[[str], bytes]


def fetch(
    name: str,
    *,
    dest: Path,
    from_dir: Path | None = None,
    base_url: str | None = None,
    timeout: float = 60,
) -> dict[str, Path]:
    """Write `<dest>/<name>/{train,val,test}.jsonl` (+ `corpus.jsonl` for hotpotqa); return the paths written."""
    if name not in DATASETS:
        raise DataError(key="dataset", expected=f"one of {', '.join(DATASETS)}", got=repr(name))
    # Everything is downloaded (or read) and checked before the first file is written.
    if from_dir is not None:
        contents = _read_local(name, _local_source_dir(Path(from_dir), name))
    else:
        download = lambda url: _download(_rebase(url, base_url), timeout, name)
        splits = ONLINE_BUILDERS[name](download)
        _check_disjoint_ids({k: [str(r["id"]) for r in v] for k, v in splits.items() if k != "corpus"}, name)
        contents = {split: _jsonl_bytes(rows) for split, rows in splits.items()}
    out_dir = _make_dir(Path(dest) / name)
    return {split: _write_atomic(out_dir / f"{split}.jsonl", data) for split, data in contents.items()}


# ---------------------------------------------------------------------------
# Online: download and convert


def _rebase(url: str, base_url: str | None) -> str:
    """Swap scheme and host for `base_url` (a mirror, or a test server), keeping the path."""
    if not base_url:
        return url
    return base_url.rstrip("/") + urllib.parse.urlsplit(url).path


def _download(url: str, timeout: float, name: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "autodiff-cli"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        else:
            reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"could not download {url}: {reason}",
            hint=f"hint: without network, copy a prepared directory: `autodiff data fetch {name} --from DIR` "
            f"(reads DIR/{name}/train.jsonl, val.jsonl and, if present, test.jsonl)",
        ) from None


def _parse_json(data: bytes, url: str) -> object:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise DataError(file=url, line=line, expected="a JSON document", got=f"invalid JSON ({exc})") from None


def _bbh_object_counting(download: Download) -> Splits:
    """BBH object_counting: 250 examples in file order, [0:50] train, [50:150] val, [150:250] test."""
    data = _parse_json(download(BBH_URL), BBH_URL)
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list):
        raise DataError(file=BBH_URL, key="examples", expected="a list of examples", got=describe(examples))
    rows = []
    for i, ex in enumerate(examples):
        if not (isinstance(ex, dict) and isinstance(ex.get("input"), str) and isinstance(ex.get("target"), str)):
            raise DataError(
                file=BBH_URL, key=f"examples[{i}]", expected="an object with string input and target", got=describe(ex)
            )
        rows.append({"id": f"oc-{i:04d}", "question": ex["input"], "answer": ex["target"]})
    return {"train": rows[0:50], "val": rows[50:150], "test": rows[150:250]}


def _trec(download: Download) -> Splits:
    """TREC-6: all of train_5500 is train; TREC_10 shuffled with Random(0): first 166 val, rest test."""
    train = _parse_trec(download(TREC_TRAIN_URL), TREC_TRAIN_URL, "trec-train")
    test = _parse_trec(download(TREC_TEST_URL), TREC_TEST_URL, "trec-test")
    random.Random(0).shuffle(test)
    return {"train": train, "val": test[:166], "test": test[166:]}


def _parse_trec(data: bytes, url: str, prefix: str) -> list[dict]:
    # The original files are not UTF-8: train_5500 has a stray 0xF0 byte in "sister<0xF0>city".
    text = data.decode("latin-1")
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        label, _, question = _repair_trec(line).partition(" ")
        coarse, colon, fine = label.partition(":")
        if not colon or coarse not in TREC_LABELS or not fine or not question.strip():
            raise DataError(file=url, line=number, expected="'COARSE:fine question text'", got=describe(line))
        rows.append({"id": f"{prefix}-{number:04d}", "question": question.strip(), "label": coarse, "fine_label": fine})
    return rows


def _repair_trec(line: str) -> str:
    # Restore the word break other loaders restore; some copies deleted the byte instead ("sistercity").
    return line.replace("\xf0", " ").replace("sistercity", "sister city")


def _hotpotqa(download: Download) -> Splits:
    """First 500 official dev-distractor records, shuffled with Random(0), thirds; plus their paragraph corpus."""
    data = _parse_json(download(HOTPOT_URL), HOTPOT_URL)
    if not isinstance(data, list) or not data:
        raise DataError(file=HOTPOT_URL, expected="a non-empty JSON list of questions", got=describe(data))
    rows = [_hotpot_row(record, i) for i, record in enumerate(data[:HOTPOT_RECORDS])]
    random.Random(0).shuffle(rows)
    n = len(rows)
    a, b = n // 3, 2 * n // 3
    splits = {"train": rows[:a], "val": rows[a:b], "test": rows[b:]}
    splits["corpus"] = hotpot_corpus(splits["train"] + splits["val"] + splits["test"])
    return splits


def _hotpot_row(record: object, index: int) -> dict:
    needed = ("_id", *HOTPOT_FIELDS)
    missing = [k for k in needed if k not in record] if isinstance(record, dict) else list(needed)
    if missing:
        raise DataError(
            file=HOTPOT_URL, key=f"[{index}]", expected=f"a HotpotQA record with {', '.join(missing)}",
            got=describe(record),
        )
    return {"id": record["_id"], **{k: record[k] for k in HOTPOT_FIELDS}}


def hotpot_corpus(questions: list[dict]) -> list[dict]:
    """Context paragraphs of all questions, deduplicated by title, in order of first appearance."""
    corpus: dict[str, dict] = {}
    for question in questions:
        for title, sentences in question["context"]:
            # Sentences keep their own leading spaces, so "".join restores the paragraph exactly.
            corpus.setdefault(title, {"id": title, "title": title, "text": "".join(sentences).strip()})
    return list(corpus.values())


def _gsm8k(download: Download) -> Splits:
    """GSM8K test: indices shuffled with Random(0); [0:200] train, [200:400] val, [400:700] test."""
    source = _parse_gsm8k(download(GSM8K_URL))
    order = list(range(len(source)))
    random.Random(0).shuffle(order)
    pick = lambda lo, hi: [source[i] for i in order[lo:hi]]
    return {"train": pick(0, 200), "val": pick(200, 400), "test": pick(400, 700)}


def _parse_gsm8k(data: bytes) -> list[dict]:
    text = decode_utf8(data, GSM8K_URL)
    return [_gsm8k_row(record, index, number)
            for index, (number, record) in enumerate(jsonl_rows(text, GSM8K_URL))]


def _gsm8k_row(record: object, index: int, line: int) -> dict:
    rationale = record.get("answer") if isinstance(record, dict) else None
    if not (isinstance(rationale, str) and rationale.count("####") == 1 and isinstance(record.get("question"), str)):
        raise DataError(
            file=GSM8K_URL, line=line, expected="a question and an answer with one '#### N' line", got=describe(record)
        )
    final = rationale.split("####")[1].strip().replace(",", "")  # "2,125" -> "2125"
    return {"id": f"gsm-{index:04d}", "question": record["question"], "answer": final, "rationale": rationale}


ONLINE_BUILDERS: dict[str, Callable[[Download], Splits]] = {
    "object_counting": _bbh_object_counting,
    "trec": _trec,
    "hotpotqa": _hotpotqa,
    "gsm8k": _gsm8k,
}


# ---------------------------------------------------------------------------
# Offline: validate and copy a prepared directory


def _local_source_dir(from_dir: Path, name: str) -> Path:
    if (from_dir / name).is_dir():
        return from_dir / name
    if from_dir.name == name and from_dir.is_dir():  # `--from datasets/trec` also works
        return from_dir
    raise DataError(
        file=str(from_dir / name), expected=f"a directory with the {name} splits", got="no such directory",
        hint=f"hint: --from DIR needs DIR/{name}/train.jsonl and DIR/{name}/val.jsonl",
    )


def _local_files(source: Path, name: str) -> dict[str, Path]:
    """The split files to copy: train and val required (trec ships val as test_public), test optional."""
    files = {"train": source / "train.jsonl"}
    val = source / "val.jsonl"
    files["val"] = val if val.exists() or not (source / "test_public.jsonl").exists() else source / "test_public.jsonl"
    if (source / "test.jsonl").exists():
        files["test"] = source / "test.jsonl"
    if name == "hotpotqa":
        files["corpus"] = source / "corpus.jsonl"
    return files


def _read_local(name: str, source: Path) -> dict[str, bytes]:
    """Each split file's bytes, after validating every row (copied byte for byte, not re-serialised)."""
    files = _local_files(source, name)
    contents: dict[str, bytes] = {}
    ids: dict[str, list[str]] = {}
    for split, path in files.items():
        examples = load_examples(path, display_path=str(path))
        check_fields(examples, CORPUS_FIELDS if split == "corpus" else REQUIRED_FIELDS[name], str(path))
        if split != "corpus":
            ids[split] = [ex.id for ex in examples]
        contents[split] = path.read_bytes()
    _check_disjoint_ids(ids, name)
    return contents


# ---------------------------------------------------------------------------
# Shared helpers


def _check_disjoint_ids(ids: dict[str, list[str]], name: str) -> None:
    """An example in two splits would leak training data into scores."""
    owner: dict[str, str] = {}
    for split, split_ids in ids.items():
        for example_id in split_ids:
            if owner.get(example_id, split) != split:
                raise DataError(
                    key=f"{name}.{split}", expected="ids not shared between splits",
                    got=f"{example_id!r} in both {owner[example_id]} and {split}",
                )
            owner[example_id] = split


def _make_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(file=str(path), expected="a writable directory", got=exc.strerror or str(exc)) from None
    return path


def _jsonl_bytes(rows: list[dict]) -> bytes:
    return jsonl_text(rows).encode("utf-8")


def _write_atomic(path: Path, data: bytes) -> Path:
    try:
        return atomic_write_bytes(path, data)
    except OSError as exc:
        raise DataError(file=str(path), expected="a writable file", got=exc.strerror or str(exc)) from None
