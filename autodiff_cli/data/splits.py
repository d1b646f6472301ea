"""The train/val/test examples a spec names: files (with slices and samples) or a generator."""
from __future__ import annotations

from autodiff_cli.data.generators import generate
from autodiff_cli.data.loaders import Example, check_fields, load_examples, select
from autodiff_cli.data.paths import resolve_data_path
from autodiff_cli.errors import DataError
from autodiff_cli.spec.loader import LoadedSpec
from autodiff_cli.spec.models import SplitSpec

SPLITS = ("train", "val", "test")


def split_names(loaded: LoadedSpec) -> list[str]:
    data = loaded.spec.data
    if data.generator is not None:
        return [s for s in SPLITS if getattr(data.generator, s) > 0]
    return [s for s in SPLITS if getattr(data, s) is not None]


def load_split(loaded: LoadedSpec, split: str, input_fields: set[str] | None = None) -> list[Example]:
    """The examples of one split; raises DataError (exit 2) naming the file, line and problem."""
    data = loaded.spec.data
    if data.generator is not None:
        gen = data.generator
        n = getattr(gen, split)
        if n == 0:
            raise loaded.error(("data", "generator", split), cls=DataError, expected=f"a size for the {split} split", got="0")
        try:
            # a distinct seed per split keeps the splits (and their ids) apart
            rows = generate(gen.name, n, gen.seed * 1000 + SPLITS.index(split))
        except DataError as e:
            raise loaded.error(("data", "generator", "name"), cls=DataError, expected=e.expected, got=e.got) from None
        examples = [Example(id=r["id"], fields=r) for r in rows]
        source = f"generator {gen.name}"
    else:
        entry = getattr(data, split)
        if entry is None:
            raise loaded.error(("data",), cls=DataError, expected=f"a `{split}` split in `data`", got="none",
                               hint=f"Add `data.{split}: path/to/{split}.jsonl` or choose another --split.")
        spec = entry if isinstance(entry, SplitSpec) else SplitSpec(path=entry)
        found, tried = resolve_data_path(spec.path, loaded.config_dir)
        if found is None:
            name = spec.path.split("/")[0]
            raise loaded.error(("data", split), cls=DataError, expected="an existing data file",
                               got=f"{spec.path!r} (tried {', '.join(map(str, tried))})",
                               hint=f"Fetch a public dataset with `autodiff data fetch {name}` "
                                    "(add `--from DIR` offline), or set AUTODIFF_DATA to the folder that holds it.")
        examples = load_examples(found, id_field=data.id_field)
        examples = select(examples, start=spec.start, stop=spec.stop, sample=spec.sample,
                          stratify=spec.stratify, seed=spec.seed)
        source = str(found)
    if not examples:
        raise loaded.error(("data", split), cls=DataError, expected="at least one example", got="an empty split")
    if input_fields:
        check_fields(examples, input_fields, source)
    return examples
