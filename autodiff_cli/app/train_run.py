"""`autodiff train`: set up the run directory, run the Trainer, write after every step, resume.

The Trainer (trainer.py) knows nothing about files; this module turns its state into the
run directory of CONTRACT.md and back.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import typer

from autodiff_cli.app.console import LiveStatus, log, setup_logging
from autodiff_cli.errors import (
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_MODEL_ERRORS,
    BudgetExhausted,
    ErrorRateExceeded,
    UsageError,
)
from autodiff_cli.train.stopping import GracefulStop

SCHEMA_VERSION = 1


def role_models(spec, trainer) -> dict[str, str | None]:
    models = spec.models
    task = models[_first_task(trainer)].model
    teacher = spec.train.teacher
    if teacher:
        teacher_model = models[teacher].model
    else:  # the default teacher: the task model at a sampling temperature, only when demos are trained
        trains_demos = spec.train.demos != "off" or any(
            spec.params[p].kind == "demos" for p in trainer.optimizers["text"].trainable())
        teacher_model = task if trains_demos else None
    return {"task": task, "backward": models[trainer.backward_model].model,
            "optimizer": models[trainer.optimizer_model].model, "teacher": teacher_model}


def _first_task(trainer) -> str:
    from autodiff_cli.train.trainer import _task_model

    return _task_model(trainer.program)


def summary_of(rd, spec, trainer, state, status: str, reason: str | None, tests: dict, config_path: Path) -> dict:
    return {
        "schema_version": SCHEMA_VERSION, "name": spec.name, "run_dir": str(rd.path), "status": status,
        "reason": reason, "seed": spec.train.seed, "mode": spec.train.mode, "optimizer": spec.train.optimizer, "models": role_models(spec, trainer),
        "initial": {"val": state.initial_val, "test": tests.get("initial")},
        "best": {"step": state.best_step, "val": state.best_val, "test": tests.get("best")},
        "steps": state.step, "proposals": dict(state.proposals), "usage": trainer.client.usage.to_dict(),
        "wall_seconds": round(state.wall_seconds, 3), "config_path": str(config_path.resolve()),
    }


def train_command(config: Path, *, runs_dir: Path, resume: Path | None, dry_run: bool, concurrency: int | None,
                  json_out: bool, no_cache: bool, overrides: list[str], mlflow: str | None = None) -> None:
    from autodiff_cli.app.commands import (
        check_models,
        load_pipeline,
        make_client,
        task_models,
    )
    from autodiff_cli.data.splits import load_split, split_names
    from autodiff_cli.io.records import StepRecord
    from autodiff_cli.io.rundir import RunDir
    from autodiff_cli.llm.usage import Usage
    from autodiff_cli.spec.prompts_file import initial_values
    from autodiff_cli.train.state import TrainState
    from autodiff_cli.train.trainer import BudgetGate, Trainer

    setup_logging()
    p = load_pipeline(config, overrides)
    spec = p.spec
    names = split_names(p.loaded)
    for needed in ("train", "val"):
        if needed not in names:
            raise p.loaded.error(("data",), expected=f"a `{needed}` split for training", got="none")
    splits = {s: load_split(p.loaded, s, p.program.input_fields) for s in names}
    client = make_client(p, concurrency=concurrency, no_cache=no_cache)
    trainer = Trainer(p.program, client, splits)
    check_models(p, client, sorted({*task_models(p),
                                    trainer.backward_model, trainer.optimizer_model, *filter(None, [spec.train.teacher])}))
    if dry_run:
        from autodiff_cli.train.projection import print_projection

        print_projection(p.program, splits, trainer, json_out)
        return
    if mlflow:  # before the run directory: without the extra, a usage error (exit 2)
        from autodiff_cli.app.tracking import require_mlflow

        mlflow_client = require_mlflow()

    resolved = spec.model_dump(mode="json", by_alias=True)
    if resume is not None:
        rd = RunDir.open(resume)
        rd.acquire()  # before reading: a run another process is writing is refused
        if rd.read_resolved() != json.loads(json.dumps(resolved)):
            raise UsageError(f"{config} (with --set) differs from the run's resolved.yaml; resume with the same config and --set options",
                             hint=f"Compare with {rd.path / 'resolved.yaml'}.")
        checkpoint = rd.read_checkpoint()
        if checkpoint is None:
            state = TrainState(values=initial_values(spec), initial_values=initial_values(spec))
        else:
            state = TrainState.from_dict(checkpoint["state"])
        rd.truncate_after(state.step)
        summary = rd.read_summary()
        # every call any process of this run made, the abandoned step's too, even after a SIGKILL
        journal = Usage.from_journal(rd.usage_journal)
        if journal is not None:
            client.usage = journal
        elif state.usage:  # a run directory from before the journal: its last checkpoint's
            client.usage = Usage.from_dict(state.usage)
        state.wall_seconds = _spent_wall(summary, state)
        log(f"resuming {rd.path} after step {state.step}")
    else:
        rd = RunDir.create(runs_dir, spec.name, config_path=config, resolved=resolved)
        rd.acquire()
        state = TrainState(values=initial_values(spec), initial_values=initial_values(spec))
        log(f"run directory {rd.path}")
    tracker = None
    if mlflow:
        from autodiff_cli.app.tracking import start_tracking

        tracker = start_tracking(mlflow, mlflow_client, rd, spec, resolved, state, config)
    elif resume is not None:
        from autodiff_cli.app.tracking import untracked_resume_note

        if note := untracked_resume_note(rd):
            log(note)
    client.usage.journal_to(rd.usage_journal)
    trainer.backward_engine.client = client
    client.before_call = BudgetGate(spec.train.budget, client.usage)
    wall_base, started = state.wall_seconds, time.monotonic()
    now = {"phase": "starting", "step": state.step}
    status_line = LiveStatus(lambda: _status_text(spec.name, now, state, trainer, client.usage,
                                                  wall_base + time.monotonic() - started))

    def on_phase(phase: str, info: dict) -> None:
        details = " ".join(f"{k}={v}" for k, v in info.items())
        now.update(phase=f"{phase} {details}".strip(), step=info.get("step", now["step"]))
        status_line.print(f"{phase} {details}".strip())

    def on_step(st, record: StepRecord | None, trace_rows: list[dict]) -> None:
        st.usage = client.usage.to_dict()
        st.wall_seconds = wall_base + time.monotonic() - started
        if record is not None:
            rd.write_traces(record.step, trace_rows)
            rd.append_metrics(record.to_row())
            accepted = sum(1 for p in record.proposals if p.accepted)
            status_line.print(f"step {record.step}: batch {_f(record.batch_score)} subset {_f(record.subset_score)} "
                              f"proposals {len(record.proposals)} accepted {accepted} best val {_f(st.best_val)}"
                              + (f" (skipped: {record.skipped})" if record.skipped else ""))
        else:
            status_line.print(f"initial validation score {_f(st.initial_val)}")
        rd.write_prompts(st.best_values or st.values)
        rd.write_checkpoint({"schema_version": SCHEMA_VERSION, "state": st.to_dict()})
        rd.write_summary(summary_of(rd, spec, trainer, st, "running", None, {}, config))
        if tracker is not None:  # after the checkpoint: MLflow never has a step that a resume would redo
            if record is None:
                tracker.initial(st.initial_val)
            else:
                tracker.step(record)

    trainer.on_phase, trainer.on_step = on_phase, on_step
    rd.write_summary(summary_of(rd, spec, trainer, state, "running", None, {}, config))

    status, reason, code, tests = "completed", None, 0, {}
    crash: Exception | None = None

    async def main() -> None:
        nonlocal tests
        stop.attach()
        await trainer.run(state)
        tests = await trainer.test_scores(state)

    with GracefulStop(status_line.print) as stop:
        try:
            with status_line:
                asyncio.run(main())
            reason = state.stop_reason or f"ran {state.step} of {trainer.total_steps()} steps"
        except asyncio.CancelledError:
            status, reason, code = "interrupted", "interrupted by a signal; resume with --resume", EXIT_INTERRUPTED
        except KeyboardInterrupt:
            status, reason, code = "interrupted", "interrupted; resume with --resume", EXIT_INTERRUPTED
        except BudgetExhausted as e:
            status, reason, code = "budget_exhausted", e.message, EXIT_BUDGET
        except ErrorRateExceeded as e:
            status, reason, code = "failed", e.message, EXIT_MODEL_ERRORS
        except Exception as e:  # anything else still ends the run on disk: it never stays `running`
            status, reason, crash = "failed", f"stopped by an error: {_one_line(e)}", e
        stop.after_loop()  # a Ctrl-C from here on must not cut the summary short
        # the state on disk is the last completed step's; the summary says how the run ended
        state.wall_seconds = wall_base + time.monotonic() - started
        rd.write_prompts(state.best_values or state.values)
        summary = summary_of(rd, spec, trainer, state, status, reason, tests, config)
        rd.write_summary(summary)
        _write_report(rd)
        if tracker is not None:
            tracker.finish(summary, state.best_values or state.values)
        log(f"{status}: {reason}; best val {_f(state.best_val)} at step {state.best_step} (initial {_f(state.initial_val)})"
            + (f"; test {_f(tests.get('initial'))} -> {_f(tests.get('best'))}" if tests.get("best") is not None else ""))
        if json_out:
            print(json.dumps(summary, ensure_ascii=False))
        print(rd.path)
        sys.stdout.flush()
    if tracker is not None:
        tracker.close()
    client.usage.close_journal()
    rd.release()
    if crash is not None:
        raise crash
    if code:
        raise typer.Exit(code)


def _one_line(error: Exception) -> str:
    from autodiff_cli.errors import AutodiffError

    text = error.headline() if isinstance(error, AutodiffError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split())


def _spent_wall(summary: dict, state) -> float:
    """The wall time a resumed run continues from: like the usage, the clean-stop summary of the
    checkpoint's step also counts the time spent in the step that was not finished."""
    wall = summary.get("wall_seconds")
    if summary.get("steps") == state.step and isinstance(wall, (int, float)) and wall > state.wall_seconds:
        return float(wall)
    return state.wall_seconds


def _write_report(rd) -> None:
    """report.md and its plots; a report that cannot be written never fails the run."""
    from autodiff_cli.app.report import write_report
    from autodiff_cli.errors import AutodiffError, describe_exception

    try:
        write_report(rd.path)
    except (AutodiffError, OSError, ValueError) as e:
        log(f"warning: report not written: {describe_exception(e)}")


def _status_text(name: str, now: dict, state, trainer, usage, elapsed: float) -> str:
    """The live line: phase, step, scores, calls, cost, elapsed time and a rough ETA."""
    total = trainer.total_steps()
    done = state.step
    eta = f", ETA {_clock(elapsed / done * (total - done))}" if 0 < done < total else ""
    return (f"train {name} · step {now['step']}/{total} · {now['phase']} · best val {_f(state.best_val)} "
            f"(initial {_f(state.initial_val)}) · {usage.total_calls()} calls · ${usage.total_cost():.4f} · "
            f"{_clock(elapsed)} elapsed{eta}")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"
