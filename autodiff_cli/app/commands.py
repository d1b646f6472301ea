"""What each CLI command does, apart from option parsing (cli.py) so it can be called from tests."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from autodiff_cli.app.console import log, progress, setup_logging
from autodiff_cli.errors import (
    EXIT_BELOW_THRESHOLD,
    EXIT_MODEL_ERRORS,
    DataError,
    UsageError,
)


@dataclass
class Pipeline:
    """A spec loaded, compiled and ready to run."""

    loaded: object
    program: object

    @property
    def spec(self):
        return self.loaded.spec


def load_pipeline(config: Path, overrides: list[str]) -> Pipeline:
    from autodiff_cli.nodes.compiler import compile_spec
    from autodiff_cli.spec.loader import load_spec

    loaded = load_spec(config, overrides)
    return Pipeline(loaded, compile_spec(loaded))


def make_client(pipeline: Pipeline, *, concurrency: int | None, no_cache: bool):
    from autodiff_cli.llm.cache import open_cache
    from autodiff_cli.llm.client import ModelClient
    from autodiff_cli.llm.usage import Usage

    return ModelClient(pipeline.spec.models, config_dir=pipeline.loaded.config_dir, usage=Usage(),
                       cache=None if no_cache else open_cache(), concurrency=concurrency)


def check_models(pipeline: Pipeline, client, models) -> None:
    """`client.check` each model; an error without a place (missing script or GGUF, unset key variable)
    is located at its key in the spec (or its --set argument)."""
    from autodiff_cli.errors import AutodiffError

    for model in models:
        try:
            client.check(model)
        except AutodiffError as e:
            if e.file is not None or not e.key:
                raise
            raise pipeline.loaded.error(tuple(e.key.split(".")), cls=type(e), message=e.message, hint=e.hint) from None


def task_models(pipeline: Pipeline) -> list[str]:
    return sorted({m for n in pipeline.program.all_nodes() for m in n.models()})


# ---------------------------------------------------------------- validate / graph


def validate_command(config: Path, overrides: list[str]) -> None:
    from autodiff_cli.data.splits import load_split, split_names
    from autodiff_cli.train.trainer import check_train_settings

    p = load_pipeline(config, overrides)
    check_train_settings(p.program)
    sizes = []
    for split in split_names(p.loaded):
        sizes.append(f"{split} {len(load_split(p.loaded, split, p.program.input_fields))}")
    client = make_client(p, concurrency=None, no_cache=True)
    check_models(p, client, task_models(p))
    nodes = p.program.all_nodes()
    trainable = [n for n, s in p.spec.params.items() if s.trainable]
    print(f"ok: {config}: {len(nodes)} nodes, {len(p.spec.params)} params ({len(trainable)} trainable), "
          f"data {', '.join(sizes)}")


def graph_command(config: Path, fmt: str, png: Path | None, overrides: list[str]) -> None:
    from autodiff_cli.app.render_graph import to_dot, to_mermaid

    if fmt not in ("mermaid", "dot"):
        raise UsageError(key="--format", expected="mermaid or dot", got=repr(fmt))
    p = load_pipeline(config, overrides)
    print(to_mermaid(p.program) if fmt == "mermaid" else to_dot(p.program), end="")
    if png is not None:
        if shutil.which("dot") is None:
            raise UsageError(key="--png", expected="Graphviz `dot` on PATH (e.g. apt-get install graphviz)", got="no `dot`")
        subprocess.run(["dot", "-Tpng", "-o", str(png)], input=to_dot(p.program).encode(), check=True)
        log(f"wrote {png}")


# ---------------------------------------------------------------- eval


def eval_command(config: Path, *, prompts: Path | None, run: Path | None, split: str, limit: int | None,
                 concurrency: int | None, fail_under: float | None, json_out: bool, out: Path | None,
                 no_cache: bool, overrides: list[str]) -> None:
    from autodiff_cli.data.splits import SPLITS, load_split
    from autodiff_cli.engine.evaluate import evaluate
    from autodiff_cli.spec.prompts_file import values_for

    if split not in SPLITS:
        raise UsageError(key="--split", expected="train, val or test", got=repr(split))
    setup_logging()
    p = load_pipeline(config, overrides)
    values = values_for(p.spec, prompts, run)
    examples = load_split(p.loaded, split, p.program.input_fields)
    if limit is not None:
        examples = examples[:limit]
    client = make_client(p, concurrency=concurrency, no_cache=no_cache)
    check_models(p, client, task_models(p))
    with progress(f"eval {p.spec.name} [{split}]", len(examples), bar=not json_out, usage=client.usage) as update:
        report = asyncio.run(evaluate(p.program, examples, values, client, progress=update))
    usage = client.usage.to_dict()
    result = {"name": p.spec.name, "split": split, "n": report.n, "completed": report.completed,
              "errors": report.errors, "score": report.score, "usage": usage,
              "wall_seconds": round(report.wall_seconds, 3)}
    if out is not None:
        _write_rows(out, [r.row() for r in report.results])
    if json_out:
        print(json.dumps(result, ensure_ascii=False))
    else:
        _print_eval_table(result, report)
    max_rate = p.spec.train.max_error_rate
    if report.errors and (report.error_rate > max_rate or report.score is None):
        print(f"error: {report.errors} of {report.n} examples failed with model-call errors "
              f"({report.error_rate:.0%} > max_error_rate {max_rate:.0%}); first: {report.first_error()}",
              file=sys.stderr)
        raise typer.Exit(EXIT_MODEL_ERRORS)
    if fail_under is not None and (report.score is None or report.score < fail_under):
        print(f"score {report.score:.4f} is below --fail-under {fail_under}", file=sys.stderr)
        raise typer.Exit(EXIT_BELOW_THRESHOLD)


def _write_rows(path: Path, rows: list[dict]) -> None:
    from autodiff_cli.io.files import atomic_write_text, jsonl_text

    atomic_write_text(path, jsonl_text(rows, default=str))


def _print_eval_table(result: dict, report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(no_color=not sys.stdout.isatty(), highlight=False, soft_wrap=True)
    score = "-" if result["score"] is None else f"{result['score']:.4f}"
    console.print(f"{result['name']} [{result['split']}]: score {score} on {result['completed']}/{result['n']} examples"
                  f" ({result['errors']} errors) in {result['wall_seconds']:.1f}s", markup=False)
    table = Table(title=None, show_edge=False)
    for col in ("role", "calls", "cached", "errors", "unsent", "prompt tok", "completion tok", "cost $"):
        table.add_column(col, justify="right" if col != "role" else "left")
    for role, u in result["usage"].items():
        if u["calls"] or u["cached_calls"] or u["errors"] or u.get("unsent"):
            table.add_row(role, str(u["calls"]), str(u["cached_calls"]), str(u["errors"]), str(u.get("unsent", 0)),
                          str(u["prompt_tokens"]), str(u["completion_tokens"]), f"{u['cost_usd']:.4f}")
    console.print(table)


# ---------------------------------------------------------------- export-prompts


def export_command(run_dir: Path, fmt: str, output: Path | None) -> None:
    from autodiff_cli.app.export import check_format, export_prompts
    from autodiff_cli.io.files import atomic_write_bytes

    check_format(fmt)
    text = export_prompts(run_dir, fmt)
    if output is None:
        print(text, end="")
        return
    atomic_write_bytes(output, text.encode("utf-8"))
    log(f"wrote {output}")


# ---------------------------------------------------------------- data / cache


def fetch_command(name: str, from_dir: Path | None, dest: Path | None) -> None:
    from autodiff_cli.data.fetch import DATASETS, fetch
    from autodiff_cli.data.paths import data_root

    if name not in DATASETS:
        raise DataError(key="NAME", expected="one of " + ", ".join(DATASETS), got=repr(name))
    written = fetch(name, dest=dest or data_root(), from_dir=from_dir)
    for split, path in written.items():
        print(f"{split}: {path}")


def cache_stats_command() -> None:
    from autodiff_cli.llm.cache import open_cache

    stats = open_cache().stats()
    where = f"redis: {stats['url']} (keys {stats['prefix']}*)" if "url" in stats else f"directory: {stats['directory']}"
    print(f"{where}\nentries: {stats['entries']}\nsize: {stats['size_bytes'] / 1e6:.1f} MB")


def cache_clear_command() -> None:
    from autodiff_cli.llm.cache import open_cache

    print(f"removed {open_cache().clear()} cached replies")




def spec_schema() -> dict:
    """The JSON Schema of the config format: the Spec's, with `Node` the union of every registered node kind's
    own model (nodes/registry.py), so a new kind appears here without a change to the spec layer."""
    from autodiff_cli.nodes.registry import KINDS, kind_class
    from autodiff_cli.optim.registry import text_optimizers
    from autodiff_cli.spec.models import NODE_SCHEMA_MARK, Spec

    def linked(value: Any) -> Any:  # the spec layer marks where a node goes; `Node` is defined below
        if value == NODE_SCHEMA_MARK:
            return {"$ref": "#/$defs/Node"}
        if isinstance(value, dict):
            return {k: linked(v) for k, v in value.items()}
        return [linked(v) for v in value] if isinstance(value, list) else value

    schema = Spec.model_json_schema(by_alias=True)
    defs = schema.setdefault("$defs", {})
    kinds = []
    for name in KINDS:
        model = kind_class(name).Spec
        one = model.model_json_schema(by_alias=True)
        defs.update(one.pop("$defs", {}))
        defs[model.__name__] = one
        kinds.append({"$ref": f"#/$defs/{model.__name__}"})
    defs["Node"] = {"oneOf": kinds, "description": "a node: `kind` names its kind, the other keys are that kind's"}
    defs["TrainSpec"]["properties"]["optimizer"]["enum"] = text_optimizers()
    return linked(schema)
