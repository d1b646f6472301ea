"""The `autodiff` command line. Thin: parse options, call one function, map errors to exit codes.

Heavy modules (litellm, llama.cpp, networkx, jinja2) are imported inside the commands so
that `autodiff --help` answers at once.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import typer

from autodiff_cli.app.console import set_quiet
from autodiff_cli.errors import EXIT_INTERRUPTED, AutodiffError, UsageError

app = typer.Typer(
    name="autodiff",
    help="Optimize the prompts of whole LLM pipelines declared in YAML (LLM-AutoDiff).",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Public datasets: fetch and convert.", no_args_is_help=True)
cache_app = typer.Typer(help="The model-call cache ($AUTODIFF_CACHE, or Redis at $AUTODIFF_CACHE_URL).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(cache_app, name="cache")

_state = {"debug": False}

SetOption = typer.Option(None, "--set", metavar="KEY=VALUE",
                         help="Override a spec key; VALUE is parsed as YAML. Repeatable, e.g. --set models.task.model=local/qwen2.5-coder-1.5b")


def _print_version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        print(f"autodiff {version('autodiff-cli')}")
    except PackageNotFoundError:  # run from a source tree that was never installed
        print("autodiff (version unknown: the autodiff-cli package is not installed)")
    raise typer.Exit()


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
          version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit."),
          env_file: Path | None = typer.Option(None, "--env-file", metavar="FILE",
                                                  help="Read API keys (NAME=value lines) from this file; the environment wins.")) -> None:
    _state["debug"] = debug
    if env_file is not None:
        from autodiff_cli.app.envfile import load_env_file

        run_guarded(load_env_file, env_file)


def _debug_traceback() -> None:
    if _state["debug"]:
        traceback.print_exc()


def _fail(err: AutodiffError) -> None:
    print(err.render(), file=sys.stderr)
    raise typer.Exit(err.exit_code)


def run_guarded(fn, *args, **kwargs):
    """Run a command body: AutodiffError -> one paragraph and its exit code; Ctrl-C -> 130.
    With --debug the traceback comes first; the paragraph and the exit code stay the same."""
    try:
        return fn(*args, **kwargs)
    except AutodiffError as err:
        _debug_traceback()
        _fail(err)
    except RecursionError:
        # last resort: inputs are checked for depth where they are read (spec, --set, prompts files), so
        # this is input no check located; it is still the input's fault, never a crash with exit 1
        _debug_traceback()
        _fail(UsageError("an input is nested too deeply to process (Python's recursion limit was reached)",
                         hint="Look for a value with hundreds of nested [ or { in the config, a --set value, "
                              "a data or prompts file; `autodiff --debug ...` shows where it was read."))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED)


# ---------------------------------------------------------------- validate / graph


@app.command()
def validate(config: Path = typer.Argument(..., help="The pipeline spec (YAML)."),
             set_: list[str] | None = SetOption) -> None:
    """Check a spec statically: schema, references, graph, functions, data files. No model is called.

    Example: autodiff validate configs/quickstart.yaml
    """
    from autodiff_cli.app.commands import validate_command

    run_guarded(validate_command, config, set_ or [])


@app.command()
def graph(config: Path = typer.Argument(..., help="The pipeline spec (YAML)."),
          format: str = typer.Option("mermaid", "--format", help="mermaid or dot."),
          png: Path | None = typer.Option(None, "--png", help="Also render a PNG with Graphviz `dot`."),
          set_: list[str] | None = SetOption) -> None:
    """Print the pipeline as a Mermaid or DOT diagram.

    Example: autodiff graph configs/object_count.yaml --format dot
    """
    from autodiff_cli.app.commands import graph_command

    run_guarded(graph_command, config, format, png, set_ or [])


# ---------------------------------------------------------------- eval


@app.command("eval")
def eval_(config: Path = typer.Argument(..., help="The pipeline spec (YAML)."),
          prompts: Path | None = typer.Option(None, "--prompts", help="Param values: a run's prompts.yaml or an export-prompts yaml/json."),
          run: Path | None = typer.Option(None, "--run", help="A run directory: use its best prompts."),
          split: str = typer.Option("val", "--split", help="train, val or test."),
          limit: int | None = typer.Option(None, "--limit", min=1, help="Score only the first N examples."),
          concurrency: int | None = typer.Option(None, "--concurrency", min=1, help="Calls in flight per model config (overrides the spec)."),
          fail_under: float | None = typer.Option(None, "--fail-under", min=0.0, max=1.0, help="Exit 1 if the score is below this fraction."),
          json_out: bool = typer.Option(False, "--json", help="Print one JSON object (split, n, completed, errors, score, usage)."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr (errors still show)."),
          out: Path | None = typer.Option(None, "--out", help="Write one JSONL row per example (id, prediction, target, score, error)."),
          no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the call cache."),
          set_: list[str] | None = SetOption) -> None:
    """Score a pipeline on a split.

    Examples:
      autodiff eval configs/quickstart.yaml
      autodiff eval configs/object_count.yaml --split test --run runs/object_count-20261124-101500 --fail-under 0.6
    """
    from autodiff_cli.app.commands import eval_command

    set_quiet(quiet)
    run_guarded(eval_command, config, prompts=prompts, run=run, split=split, limit=limit, concurrency=concurrency,
                fail_under=fail_under, json_out=json_out, out=out, no_cache=no_cache, overrides=set_ or [])


# ---------------------------------------------------------------- export-prompts


@app.command("export-prompts")
def export_prompts(run_dir: Path = typer.Argument(..., help="A run directory made by `autodiff train`."),
                   format: str = typer.Option("yaml", "--format", help="yaml, json, md or config (the spec with the best prompts baked in)."),
                   output: Path | None = typer.Option(None, "-o", "--output", help="Write FILE (atomically) instead of printing.")) -> None:
    """Print a run's best prompts as plain text, or the config with them baked in.

    Examples:
      autodiff export-prompts runs/object_count-20261124-101500 --format md
      autodiff export-prompts runs/object_count-20261124-101500 --format config -o configs/object_count.best.yaml
    """
    from autodiff_cli.app.commands import export_command

    run_guarded(export_command, run_dir, format, output)


# ---------------------------------------------------------------- train


@app.command()
def train(config: Path = typer.Argument(..., help="The pipeline spec (YAML)."),
          runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where run directories are made."),
          resume: Path | None = typer.Option(None, "--resume", help="Continue this run directory from its last completed step."),
          dry_run: bool = typer.Option(False, "--dry-run", help="Project calls and tokens per role; call no model."),
          concurrency: int | None = typer.Option(None, "--concurrency", min=1, help="Calls in flight per model config."),
          json_out: bool = typer.Option(False, "--json", help="Print summary.json's content before the run directory."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress or log lines on stderr (errors still show)."),
          no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the call cache."),
          mlflow: str | None = typer.Option(None, "--mlflow", metavar="URI", envvar="AUTODIFF_MLFLOW_URI",
                                            help="Also log the run to this MLflow tracking store, e.g. sqlite:///mlflow.db "
                                                 "(needs the mlflow extra)."),
          set_: list[str] | None = SetOption) -> None:
    """Optimize the trainable prompts: forward, textual backward, GDPO proposals, two-stage validation.

    The last stdout line is the run directory.

    Examples:
      autodiff train configs/quickstart.yaml
      autodiff train configs/object_count.yaml --set models.task.model=local/qwen2.5-coder-1.5b --dry-run
      autodiff train configs/object_count.yaml --resume runs/object_count-20261124-101500
      autodiff train configs/quickstart.yaml --mlflow sqlite:///mlflow.db
    """
    from autodiff_cli.app.train_run import train_command

    set_quiet(quiet)
    run_guarded(train_command, config, runs_dir=runs_dir, resume=resume, dry_run=dry_run, concurrency=concurrency,
                json_out=json_out, no_cache=no_cache, overrides=set_ or [], mlflow=mlflow)


# ---------------------------------------------------------------- data / cache / schema


@data_app.command("fetch")
def data_fetch(name: str = typer.Argument(..., help="object_counting, trec, hotpotqa or gsm8k."),
               from_dir: Path | None = typer.Option(None, "--from", help="Copy from a local folder (offline) instead of downloading."),
               dest: Path | None = typer.Option(None, "--dest", help="Target folder (default $AUTODIFF_DATA or datasets/).")) -> None:
    """Fetch a public dataset into <dest>/<name>/{train,val,test}.jsonl.

    Example: autodiff data fetch object_counting --from ../shared/datasets
    """
    from autodiff_cli.app.commands import fetch_command

    run_guarded(fetch_command, name, from_dir, dest)


@cache_app.command("stats")
def cache_stats() -> None:
    """Where the cache is, how many replies it holds and its size.

    Example: AUTODIFF_CACHE=/tmp/ad-cache autodiff cache stats
    """
    from autodiff_cli.app.commands import cache_stats_command

    run_guarded(cache_stats_command)


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete every cached reply (the next run calls the models again).

    Example: autodiff cache clear
    """
    from autodiff_cli.app.commands import cache_clear_command

    run_guarded(cache_clear_command)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the config format (for editor completion and validation).

    Example: autodiff schema > autodiff.schema.json   (then point your editor's YAML plugin at it)
    """
    import json

    from autodiff_cli.app.commands import spec_schema

    print(json.dumps(spec_schema(), indent=2))


# ---------------------------------------------------------------- runs / diff / report / init

runs_app = typer.Typer(help="Browse run directories: list them, show one.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


@runs_app.command("list")
def runs_list(runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="The folder holding run directories."),
              json_out: bool = typer.Option(False, "--json", help="Print a JSON list (one object per run).")) -> None:
    """One row per run directory: name, date, status, best val/test, steps, cost (newest first).

    Examples:
      autodiff runs list
      autodiff runs list --runs-dir experiments/runs --json
    """
    from autodiff_cli.app.browse import runs_list_command

    run_guarded(runs_list_command, runs_dir, json_out)


@runs_app.command("show")
def runs_show(run_dir: Path = typer.Argument(..., help="A run directory (or a run's name under runs/)."),
              json_out: bool = typer.Option(False, "--json", help="Print {run_dir, summary, steps} as JSON.")) -> None:
    """A run's summary (status, models, scores, proposals, usage), then one line per step and proposal.

    Example: autodiff runs show runs/object_count-20261124-101500
    """
    from autodiff_cli.app.browse import show_run

    run_guarded(show_run, run_dir, json_out)


@app.command()
def diff(run_dir: Path = typer.Argument(..., help="A run directory (or a run's name under runs/)."),
         lines: bool = typer.Option(False, "--lines", help="A line-level unified diff instead of a word-level one."),
         context: int = typer.Option(3, "--context", min=0, help="Unchanged lines shown around each change.")) -> None:
    """Each param's initial value (resolved.yaml) against its best one (prompts.yaml); coloured on a terminal.

    Without a terminal, removed words read [-like this-] and added ones {+like this+}.

    Examples:
      autodiff diff runs/object_count-20261124-101500
      autodiff diff runs/object_count-20261124-101500 --lines
    """
    from autodiff_cli.app.browse import diff_command

    run_guarded(diff_command, run_dir, lines, context)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory (or a run's name under runs/).")) -> None:
    """(Re)write a run's report.md and its plots score.png, proposals.png, usage.png (score curve, steps, prompt diffs, usage, test scores).

    Prints the report's path.

    Example: autodiff report runs/object_count-20261124-101500
    """
    from autodiff_cli.app.report import report_command

    run_guarded(report_command, run_dir)


@app.command()
def init(directory: Path = typer.Argument(Path("."), help="Where to write autodiff.yaml and data/ (made if missing)."),
         template: str = typer.Option("classification", "--template", "-t",
                                      help="classification, qa, rag or agent."),
         force: bool = typer.Option(False, "--force", help="Overwrite existing files.")) -> None:
    """Scaffold a commented config (DIR/autodiff.yaml) and a tiny dataset (DIR/data/*.jsonl).

    The result passes `autodiff validate` as is; edit it from there.

    Examples:
      autodiff init my-pipeline --template rag
      autodiff init . --template agent --force
    """
    from autodiff_cli.app.scaffold import init_command

    run_guarded(init_command, directory, template, force)


# ---------------------------------------------------------------- models

models_app = typer.Typer(help="The GGUF files of the `local/` provider: list them, pull one (verified).",
                         no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(json_out: bool = typer.Option(False, "--json", help="One JSON object instead of the table.")) -> None:
    """Each known model: size, whether it is here (and its sha256 checked), its file and download URL.

    Example: autodiff models list --json
    """
    from autodiff_cli.app.models_cmd import list_command

    run_guarded(list_command, json_out)


@models_app.command("pull")
def models_pull(name: str = typer.Argument(..., help="smollm2-135m, qwen2.5-coder-1.5b or qwen2.5-3b."),
                from_dir: Path | None = typer.Option(None, "--from",
                                                     help="Copy from a local folder (offline) instead of downloading."),
                sha256: str | None = typer.Option(None, "--sha256", metavar="HEX",
                                                  help="The expected sha256, for a model without a recorded one.")
                ) -> None:
    """Download a model into $AUTODIFF_MODELS (resuming an interrupted pull), checked against its sha256 before use.

    Examples:
      autodiff models pull qwen2.5-coder-1.5b
      autodiff models pull qwen2.5-coder-1.5b --from /mnt/usb/models
    """
    from autodiff_cli.app.models_cmd import pull_command

    run_guarded(pull_command, name, from_dir, sha256)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
