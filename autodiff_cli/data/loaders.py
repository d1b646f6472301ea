"""Load examples from JSONL or CSV files, give them stable ids, and select subsets."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from autodiff_cli.errors import DataError, describe
from autodiff_cli.io.files import jsonl_rows

SPLITS = ("train", "val", "test")
SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class Example:
    """One row of a dataset. `fields` is the whole row, id included when the row has one."""

    id: str
    fields: dict
    # Where the row came from, for error messages; not part of the example's identity.
    line: int = field(default=0, compare=False)


# ---------------------------------------------------------------------------
# Loading


def load_examples(path: Path, *, id_field: str = "id", display_path: str | None = None) -> list[Example]:
    """Read a `.jsonl` or `.csv` file into examples with stable, unique ids."""
    path = Path(path)
    shown = display_path or str(path)
    data = _read_bytes(path, shown)
    text = decode_utf8(data, shown)
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(text, shown)
    else:
        rows = jsonl_rows(text, shown)
    examples = [_to_example(row, line, id_field, shown) for line, row in rows]
    if not examples:
        raise DataError(file=shown, expected="at least one example", got="an empty file")
    _check_unique_ids(examples, shown, id_field)
    return examples


def _read_bytes(path: Path, shown: str) -> bytes:
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(file=shown, expected="a .jsonl or .csv file", got=repr(path.suffix or path.name))
    if not path.exists():
        raise DataError(file=shown, expected="an existing file", got="no such file", hint=_missing_file_hint(path))
    if path.is_dir():
        raise DataError(file=shown, expected="a file", got="a directory")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(file=shown, expected="a readable file", got=exc.strerror or str(exc)) from None


# the datasets `autodiff data fetch` knows (data/fetch.py, which reads data through this module)
DATASETS = ("object_counting", "trec", "hotpotqa", "gsm8k")


def _missing_file_hint(path: Path) -> str:
    name, split = path.parent.name, path.stem
    if path.suffix == ".jsonl" and split in SPLITS and name:
        if name in DATASETS:
            return f"hint: download it with `autodiff data fetch {name}` (or `--from DIR` for a local copy)"
    return "hint: paths in a spec are relative to the config file or to AUTODIFF_DATA"


def decode_utf8(data: bytes, shown: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - line_start + 1
        raise DataError(
            file=shown,
            line=line,
            expected="UTF-8 text",
            got=f"byte 0x{data[exc.start]:02x} at column {column}",
            hint="hint: re-save the file as UTF-8",
        ) from None
    return text.removeprefix("\ufeff")  # tolerate a byte-order mark from spreadsheet exports


def _csv_rows(text: str, shown: str) -> Iterator[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return
        _check_header(header, shown)
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            # reader.line_num is the last physical line of the record (quoted newlines span lines).
            if len(values) != len(header):
                raise DataError(
                    file=shown, line=reader.line_num,
                    expected=f"{len(header)} columns (as in the header)", got=f"{len(values)} columns",
                )
            yield reader.line_num, dict(zip(header, values))
    except csv.Error as exc:
        raise DataError(file=shown, line=reader.line_num, expected="valid CSV", got=str(exc)) from None


def _check_header(header: list[str], shown: str) -> None:
    seen: set[str] = set()
    for name in header:
        if not name.strip():
            raise DataError(file=shown, line=1, key="header", expected="a name for every column", got="an empty name")
        if name in seen:
            raise DataError(file=shown, line=1, key="header", expected="unique column names", got=f"{name!r} twice")
        seen.add(name)


def _to_example(row: dict, line: int, id_field: str, shown: str) -> Example:
    value = row.get(id_field)
    if value is None or value == "":
        return Example(id=row_hash_id(row), fields=row, line=line)
    if isinstance(value, (dict, list)):
        raise DataError(file=shown, line=line, key=id_field, expected="a string or number", got=describe(value))
    return Example(id=str(value), fields=row, line=line)


def row_hash_id(row: dict) -> str:
    """The id of a row without one: a hash of its canonical JSON, stable across runs and machines."""
    canonical = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "h-" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def _check_unique_ids(examples: Sequence[Example], shown: str, id_field: str) -> None:
    first_line: dict[str, int] = {}
    for ex in examples:
        if ex.id in first_line:
            earlier = first_line[ex.id]
            hashed = ex.id.startswith("h-") and not ex.fields.get(id_field)
            raise DataError(
                file=shown, line=ex.line, key=id_field, expected="a unique id",
                got=f"{ex.id!r}, already used on line {earlier}",
                hint=f"hint: lines {earlier} and {ex.line} are identical rows; give each an {id_field!r} field"
                if hashed else None,
            )
        first_line[ex.id] = ex.line


# ---------------------------------------------------------------------------
# Selecting


def select(
    examples: Sequence[Example],
    *,
    start: int | None = None,
    stop: int | None = None,
    sample: int | None = None,
    stratify: str | None = None,
    seed: int = 0,
) -> list[Example]:
    """Slice (Python slice semantics), then optionally take a seeded sample, kept in original order."""
    pool = list(examples)[start:stop]
    if sample is None:
        return pool
    if sample < 0 or sample > len(pool):
        raise DataError(
            key="sample", expected=f"a sample size between 0 and {len(pool)} (the examples available)", got=str(sample)
        )
    rng = random.Random(seed)
    if stratify is None:
        picked = rng.sample(range(len(pool)), sample)
    else:
        picked = _stratified_positions(pool, sample, stratify, rng)
    return [pool[i] for i in sorted(picked)]


def _stratified_positions(pool: list[Example], sample: int, key: str, rng: random.Random) -> list[int]:
    classes = _group_by(pool, key)
    allocation = allocate_proportionally({c: len(p) for c, p in classes.items()}, sample)
    picked: list[int] = []
    for cls, positions in classes.items():  # insertion order = first appearance: deterministic
        picked.extend(rng.sample(positions, allocation[cls]))
    return picked


def _group_by(pool: list[Example], key: str) -> dict[str, list[int]]:
    classes: dict[str, list[int]] = {}
    for i, ex in enumerate(pool):
        if key not in ex.fields:
            raise DataError(
                line=ex.line or None, key=f"stratify: {key}",
                expected=f"every example to have a field {key!r}", got=f"example {ex.id!r} without it",
            )
        classes.setdefault(_class_label(ex.fields[key]), []).append(i)
    return classes


def _class_label(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def allocate_proportionally(sizes: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` over classes in proportion to `sizes` (largest remainder), each class >= 1 if possible."""
    population = sum(sizes.values())
    if population == 0:
        return {c: 0 for c in sizes}
    # Exact integer arithmetic: quota = total * size / population.
    alloc = {c: total * n // population for c, n in sizes.items()}
    remainders = {c: total * n % population for c, n in sizes.items()}
    order = list(sizes)
    leftover = total - sum(alloc.values())
    for c in sorted(order, key=lambda c: (-remainders[c], order.index(c)))[:leftover]:
        alloc[c] += 1
    if total >= len(sizes):
        _give_each_class_one(alloc, sizes, total, population)
    return alloc


def _give_each_class_one(alloc: dict[str, int], sizes: dict[str, int], total: int, population: int) -> None:
    order = list(sizes)
    for c in order:
        if alloc[c] > 0 or sizes[c] == 0:
            continue
        # Take from the class most over its exact quota (ties: first appearing); it has >= 2 here.
        donors = [d for d in order if alloc[d] > 1]
        donor = max(donors, key=lambda d: (alloc[d] * population - total * sizes[d], -order.index(d)))
        alloc[donor] -= 1
        alloc[c] = 1


# ---------------------------------------------------------------------------
# Checking


def check_fields(examples: Iterable[Example], fields: set[str], file: str | Path | None) -> None:
    """Raise a DataError naming the first example that lacks one of `fields` (used by `input.X`)."""
    needed = sorted(fields)
    for ex in examples:
        missing = [name for name in needed if name not in ex.fields]
        if missing:
            have = ", ".join(sorted(ex.fields)) or "no fields"
            raise DataError(
                file=file, line=ex.line or None, key=f"input.{missing[0]}",
                expected=f"a field {missing[0]!r} in every example",
                got=f"example {ex.id!r} with fields {have}",
            )
