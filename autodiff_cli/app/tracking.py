"""`train --mlflow URI`: mirror a training run into an MLflow tracking store (the optional `mlflow` extra).

What is logged, into the experiment named after the spec, in one MLflow run per run directory:

- params: the resolved spec, flattened (`train.max_steps`, `models.task.model`, ...). Secrets never get
  there: the spec refuses literal keys, and here anything under a secret-looking key, any `headers`
  value and any text that looks like a key is replaced by NOT_LOGGED (`api_key_env` holds the NAME of a
  variable and is logged as such).
- tags: `autodiff.run_dir`, `autodiff.status`, `autodiff.reason`, `autodiff.optimizer`, `autodiff.mode`,
  `autodiff.spec`, `autodiff.config`.
- metrics, with step=N: `val_score`, `best_val`, `batch_score`, `subset_score`, `proposals/tried`,
  `proposals/accepted`, and the step's `calls/<role>`, `tokens/<role>`, `cost_usd/<role>` (plus
  `.../all_roles`); at step 0 `initial_val` and `best_val`; at the end `initial_test`, `best_test`,
  `best_step`, `run/calls`, `run/tokens`, `run/cost_usd`, `run/wall_seconds`.
- artifacts: `prompts/step-NNNN.yaml` after each accepted step; at the end prompts.yaml, summary.json,
  report.md, metrics.jsonl, config.yaml, resolved.yaml, the *.png plots and traces/.
- the prompt registry: when a run completes (or runs out of budget), each trainable prompt param's best
  value as the prompt `<spec name>.<param>` (a new version only when it differs from the latest one),
  linked to the run.

The run's id is kept in `tracking.json` in the run directory, so `--resume` with the same `--mlflow` URI
continues the same MLflow run (steps the store lacks are logged from metrics.jsonl first).

Tracking never fails or slows a training run: MLflow is called from one background thread, in order,
and an error there is a warning on stderr. Only a missing `mlflow` package is an error (a usage error,
exit 2, before the run starts). mlflow is imported only when `--mlflow` is given.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from autodiff_cli.errors import UsageError, redact_url, scrub_url_secret
from autodiff_cli.io.files import atomic_write_bytes
from autodiff_cli.spec.models import is_secret_key, looks_secret

TRACKING_FILE = "tracking.json"
SCHEMA_VERSION = 1
ENV_URI = "AUTODIFF_MLFLOW_URI"
INSTALL_HINT = 'Install the extra: pip install "autodiff-cli[mlflow]" (in a checkout: pip install -e ".[mlflow]").'
NOT_LOGGED = "(not logged)"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
PARAMS_PER_BATCH = 100  # MLflow's limit of params (and tags) per log_batch
METRICS_PER_BATCH = 1000
CLOSE_TIMEOUT = 300.0  # seconds the end of a run waits for MLflow before giving up on it
# a tracking server that does not answer should not hold the run's end for minutes (MLflow's defaults:
# 7 retries with exponential backoff, 120 s per request); the user's own settings win
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# autodiff's run status -> MLflow's run status
RUN_STATUS = {"completed": "FINISHED", "interrupted": "KILLED", "budget_exhausted": "KILLED", "failed": "FAILED"}
REGISTERED_ON = ("completed", "budget_exhausted")  # the statuses whose best values are final
LINKED_PROMPTS_TAG = "mlflow.linkedPrompts"  # MLflow's run tag of the prompt versions a run used
ROOT_ARTIFACTS = ("prompts.yaml", "summary.json", "report.md", "metrics.jsonl", "config.yaml", "resolved.yaml")

_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")
_PROMPT_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


# ---------------------------------------------------------------- what gets logged (pure, no MLflow)


def normalize_uri(uri: str) -> str:
    """The URI as used and stored: a local sqlite database and a plain folder as absolute paths, so a
    resume from another folder reaches the same store."""
    uri = uri.strip()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        rest = uri[len("sqlite:///"):]
        if rest and not rest.startswith(":memory:"):
            return "sqlite:///" + str(Path(rest).resolve())
    if not _SCHEME.match(uri) and uri != "databricks":  # a folder (MLflow's file store)
        return str(Path(uri).resolve())
    return uri


def sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        rest = unquote(uri[len("sqlite:///"):].split("?", 1)[0])
        if rest and not rest.startswith(":memory:"):
            return Path(rest)
    return None


def flatten_params(resolved: Any) -> dict[str, str]:
    """The resolved spec as MLflow params: `a.b.c` -> text. Lists of plain values are one JSON value; other
    lists are indexed (`a.0.url`). Secrets are replaced by NOT_LOGGED (see the module docstring)."""
    out: dict[str, str] = {}

    def walk(prefix: tuple[str, ...], value: Any, hidden: bool) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                k = str(k)
                secret = hidden or (is_secret_key(k) and k != "api_key_env") or k.lower() == "headers"
                walk((*prefix, k), v, secret)
            return
        if isinstance(value, list) and value and not all(_plain(v) for v in value):
            for i, v in enumerate(value):
                walk((*prefix, str(i)), v, hidden)
            return
        key = _param_key(".".join(prefix))
        if key:
            out[key] = NOT_LOGGED if hidden else _param_value(value)

    walk((), resolved, False)
    return out


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _param_key(key: str) -> str:
    key = _KEY_CHARS.sub("_", key).replace("..", "._")
    return key[:250]


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, ensure_ascii=False)
    if looks_secret(text):
        return NOT_LOGGED
    if "://" in text:
        text = redact_url(text)
    if len(text) > MAX_PARAM_VALUE:
        text = text[:MAX_PARAM_VALUE - 15] + " …(truncated)"
    return text


def step_metrics(record) -> dict[str, float]:
    """A StepRecord (io/records.py) as metrics of its step."""
    out: dict[str, float] = {}
    for name in ("val_score", "best_val", "batch_score", "subset_score"):
        value = getattr(record, name)
        if value is not None:
            out[name] = float(value)
    out["proposals/tried"] = float(len(record.proposals))
    out["proposals/accepted"] = float(sum(1 for p in record.proposals if p.accepted))
    totals = {"calls": 0.0, "tokens": 0.0, "cost_usd": 0.0}
    for role, entry in (record.usage or {}).items():
        if not isinstance(entry, dict):
            continue
        counts = {"calls": entry.get("calls", 0),
                  "tokens": (entry.get("prompt_tokens") or 0) + (entry.get("completion_tokens") or 0),
                  "cost_usd": entry.get("cost_usd", 0.0)}
        for name, value in counts.items():
            value = float(value or 0)
            out[f"{name}/{role}"] = value
            totals[name] += value
    for name, value in totals.items():
        out[f"{name}/all_roles"] = value
    return out


def final_metrics(summary: dict) -> dict[str, float]:
    """The end of a run, from its summary.json."""
    out: dict[str, float] = {}
    for name, value in (("initial_val", summary.get("initial", {}).get("val")),
                        ("initial_test", summary.get("initial", {}).get("test")),
                        ("best_test", summary.get("best", {}).get("test")),
                        ("best_step", summary.get("best", {}).get("step")),
                        ("run/wall_seconds", summary.get("wall_seconds"))):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    usage = summary.get("usage") or {}
    entries = [e for e in usage.values() if isinstance(e, dict)]
    out["run/calls"] = float(sum(e.get("calls", 0) for e in entries))
    out["run/tokens"] = float(sum((e.get("prompt_tokens") or 0) + (e.get("completion_tokens") or 0) for e in entries))
    out["run/cost_usd"] = float(sum(e.get("cost_usd", 0.0) for e in entries))
    return out


def prompt_name(spec_name: str, param: str) -> str:
    return _PROMPT_NAME_CHARS.sub("_", f"{spec_name}.{param}")


def read_tracking_file(run_path: Path) -> dict | None:
    try:
        data = json.loads((run_path / TRACKING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- MLflow


def require_mlflow():
    """The MLflow client class, or a usage error (exit 2) when the extra is not installed."""
    try:
        import mlflow  # noqa: F401  (the lazy import: only `--mlflow` pays for it)
        from mlflow import MlflowClient
    except ImportError as e:
        detail = "" if getattr(e, "name", None) == "mlflow" else f" ({type(e).__name__}: {e})"
        raise UsageError(f"--mlflow needs the optional MLflow extra, which is not installed{detail}",
                         hint=INSTALL_HINT) from None
    import logging

    for name in ("mlflow", "alembic"):  # "Creating initial MLflow database tables..." and the like
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient


def _never_raises(method):
    """A Tracker hook called by the training run: whatever goes wrong is a warning."""
    import functools

    @functools.wraps(method)
    def hook(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking never fails the run
            self._warn(f"{method.__name__.strip('_')}: {self._describe(e)}")
            return None
    return hook


def _warn(message: str) -> None:
    """A tracking problem: one line on stderr, also under --quiet (the user asked for tracking)."""
    stamp = datetime.now(UTC).strftime("%H:%M:%S")
    print(f"[{stamp}] warning: MLflow: {message}", file=sys.stderr, flush=True)


class Tracker:
    """The MLflow side of one training run. Every method returns at once: the work is queued for one
    background thread, which runs it in order; an error there is a warning and the run goes on."""

    def __init__(self, uri: str, rd, spec, *, client_class=None, warn: Callable[[str], None] = _warn) -> None:
        self.uri = normalize_uri(uri)
        self.shown_uri = redact_url(self.uri)
        self.rd = rd
        self.spec = spec
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._warn_fn = warn
        self._client_class = client_class or require_mlflow()
        self._client = None
        self._queue: queue.Queue = queue.Queue()
        if self.uri.startswith(("http://", "https://")):
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        self._thread = threading.Thread(target=self._work, name="autodiff-mlflow", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ the training run's hooks

    @_never_raises
    def start(self, *, resolved: dict, tags: dict[str, str], rows: list[dict], initial_val: float | None) -> None:
        """Open the MLflow run: the one in tracking.json when it is in this store (a resume), else a new
        one with the params. Steps the run lacks (rows of metrics.jsonl, the initial score) are logged."""
        params = flatten_params(resolved)
        self._submit("opening the MLflow run", self._open, params, dict(tags), list(rows), initial_val)

    @_never_raises
    def initial(self, initial_val: float | None) -> None:
        if initial_val is not None:
            metrics = {"initial_val": float(initial_val), "best_val": float(initial_val)}
            self._submit("initial score", self._log_metrics, metrics, 0)

    @_never_raises
    def step(self, record) -> None:
        """After a step is on disk (after its checkpoint: MLflow never holds a step that a resume redoes).
        An accepted step's prompts.yaml is kept as `prompts/step-NNNN.yaml`."""
        self._submit(f"step {record.step}", self._log_metrics, step_metrics(record), record.step)
        if record.accepted is not None:
            prompts_text = (self.rd.path / "prompts.yaml").read_text(encoding="utf-8")  # rewritten next step
            self._submit(f"step {record.step} prompts", self._log_text, prompts_text,
                         f"prompts/step-{record.step:04d}.yaml")

    @_never_raises
    def finish(self, summary: dict, best_values: dict[str, str]) -> None:
        """The end of the run (any status): end metrics and tags, artifacts, the prompt registry."""
        status = str(summary.get("status"))
        steps = summary.get("steps") if isinstance(summary.get("steps"), int) else 0
        self._submit("end metrics", self._log_metrics, final_metrics(summary), steps)
        self._submit("artifacts", self._log_run_files)
        if status in REGISTERED_ON:
            self._submit("prompt registry", self._register_prompts, dict(best_values), summary)
        tags = {"autodiff.status": status, "autodiff.reason": str(summary.get("reason") or "")}
        self._submit("end", self._end, tags, RUN_STATUS.get(status, "FINISHED"))

    @_never_raises
    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait (at most `timeout` seconds) for the queued work; a Ctrl-C stops the wait."""
        self._queue.put(None)
        deadline = time.monotonic() + timeout
        try:
            while self._thread.is_alive() and time.monotonic() < deadline:
                self._thread.join(0.2)
        except KeyboardInterrupt:
            self._warn("stopped waiting for MLflow (Ctrl-C); the run directory is complete, the MLflow run may not be")
            return
        if self._thread.is_alive():
            self._warn(f"MLflow did not finish within {timeout:.0f} s; the run directory is complete, "
                       "the MLflow run may not be")

    # ------------------------------------------------------------ the background thread

    def _submit(self, what: str, fn, *args) -> None:
        self._queue.put((what, fn, args))

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            what, fn, args = job
            if self.run_id is None and fn != self._open:
                continue  # the run could not be opened: that was warned about once
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - tracking never fails the run
                if self.run_id is None:
                    self._warn(f"could not open a run in {self.shown_uri}, so this run is not tracked: "
                               f"{self._describe(e)}")
                else:
                    self._warn(f"{what} not logged to {self.shown_uri}: {self._describe(e)}")

    def _warn(self, message: str) -> None:
        with contextlib.suppress(Exception):  # e.g. a closed stderr
            self._warn_fn(message)

    def _describe(self, error: Exception) -> str:
        text = " ".join(f"{type(error).__name__}: {error}".split())
        text = scrub_url_secret(text, self.uri)
        return text if len(text) <= 400 else text[:400] + " …"

    @property
    def client(self):
        if self._client is None:
            self._client = self._client_class(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def _open(self, params: dict[str, str], tags: dict[str, str], rows: list[dict], initial_val: float | None) -> None:
        from autodiff_cli.io.records import StepRecord

        client = self.client
        known = read_tracking_file(self.rd.path)
        run = None
        if known and known.get("run_id"):
            if known.get("tracking_uri") == self.shown_uri:
                try:
                    run = client.get_run(str(known["run_id"]))
                except Exception as e:  # noqa: BLE001
                    self._warn(f"the run's MLflow run {known['run_id']} is not in {self.shown_uri} "
                               f"({self._describe(e)}); starting a new MLflow run")
            else:
                self._warn(f"this run was tracked in {known.get('tracking_uri')}; starting a new MLflow run "
                           f"in {self.shown_uri}")
        if run is not None:
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            client.update_run(self.run_id, status="RUNNING")
            self._log_batch(tags=tags)
        else:
            self.experiment_id = self._experiment()
            created = client.create_run(self.experiment_id, run_name=self.rd.name, tags=tags)
            self.run_id = created.info.run_id
            self._log_batch(params=params)
            atomic_write_bytes(self.rd.path / TRACKING_FILE, (json.dumps(
                {"schema_version": SCHEMA_VERSION, "tracking_uri": self.shown_uri,
                 "experiment_id": self.experiment_id, "run_id": self.run_id}, indent=2) + "\n").encode("utf-8"))
        # what a resume (or an earlier process that died between a step and its logging) left out
        logged = {m.step for m in client.get_metric_history(self.run_id, "best_val")}
        if initial_val is not None and 0 not in logged:
            self._log_metrics({"initial_val": float(initial_val), "best_val": float(initial_val)}, 0)
        for row in rows:
            record = StepRecord.from_row(row)
            if record.step not in logged:
                self._log_metrics(step_metrics(record), record.step)

    def _experiment(self) -> str:
        client = self.client
        name = self.spec.name
        found = client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        db = sqlite_path(self.uri)
        if db is not None:  # beside the database, not MLflow's default ./mlruns of whatever folder we run in
            location = (db.parent / "mlartifacts" / _PROMPT_NAME_CHARS.sub("_", name)).resolve().as_uri()
        return client.create_experiment(name, artifact_location=location)

    def _log_batch(self, *, params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
                   metrics: list | None = None) -> None:
        from mlflow.entities import Param, RunTag

        param_items = [Param(k, v) for k, v in (params or {}).items()]
        tag_items = [RunTag(k, v) for k, v in (tags or {}).items()]
        for i in range(0, len(param_items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=param_items[i:i + PARAMS_PER_BATCH])
        for i in range(0, len(tag_items), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=tag_items[i:i + PARAMS_PER_BATCH])
        metrics = metrics or []
        for i in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + METRICS_PER_BATCH])

    def _log_metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(k, v, stamp, step) for k, v in values.items()])

    def _log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def _log_run_files(self) -> None:
        path = self.rd.path
        for name in ROOT_ARTIFACTS:
            if (path / name).is_file():
                self.client.log_artifact(self.run_id, str(path / name))
        for png in sorted(path.glob("*.png")):
            self.client.log_artifact(self.run_id, str(png))
        if (path / "traces").is_dir():
            self.client.log_artifacts(self.run_id, str(path / "traces"), artifact_path="traces")

    def _register_prompts(self, best_values: dict[str, str], summary: dict) -> None:
        best = summary.get("best") or {}
        registered = []
        for param, p in self.spec.params.items():
            if p.kind != "prompt" or not p.trainable or param not in best_values:
                continue
            name, value = prompt_name(self.spec.name, param), best_values[param]
            version = self._latest_prompt(name)
            if version is None or version.template != value:
                version = self._register(name, value, commit_message=(
                    f"autodiff train {self.rd.name}: best val {best.get('val')} at step {best.get('step')}"),
                    tags={"autodiff.run_dir": str(self.rd.path), "autodiff.mlflow_run_id": str(self.run_id),
                          "autodiff.best_val": str(best.get("val")), "autodiff.best_step": str(best.get("step"))})
            self._link_prompt(version)
            registered.append(f"{name}/{version.version}")
        if registered:
            self._log_batch(tags={"autodiff.registered_prompts": ", ".join(registered)})

    def _link_prompt(self, version) -> None:
        """What MlflowClient.link_prompt_version_to_run does (the run's `mlflow.linkedPrompts` tag, which the UI
        shows), done here because MLflow's own goes to the process's default tracking store, not this one."""
        tags = self.client.get_run(self.run_id).data.tags
        try:
            linked = json.loads(tags.get(LINKED_PROMPTS_TAG) or "[]")
        except ValueError:
            linked = []
        if not isinstance(linked, list):
            linked = []
        entry = {"name": version.name, "version": str(version.version)}
        if entry not in linked:
            self.client.set_tag(self.run_id, LINKED_PROMPTS_TAG, json.dumps([*linked, entry]))

    def _latest_prompt(self, name: str):
        try:
            return self.client.load_prompt(name)
        except Exception:  # noqa: BLE001 - MLflow raises when there is no such prompt yet
            return None

    def _register(self, name: str, template: str, **kw):
        """MLflow 3 and 2.21+ both have MlflowClient.register_prompt (the registry of this store, with no
        global state); the module-level function is the fallback."""
        register = getattr(self.client, "register_prompt", None)
        if register is not None:
            return register(name=name, template=template, **kw)
        import mlflow

        fluent = getattr(getattr(mlflow, "genai", None), "register_prompt", None) or mlflow.register_prompt
        mlflow.set_registry_uri(self.uri)
        return fluent(name=name, template=template, **kw)

    def _end(self, tags: dict[str, str], status: str) -> None:
        self._log_batch(tags=tags)
        self.client.set_terminated(self.run_id, status=status)


# ---------------------------------------------------------------- for app/train_run.py


def start_tracking(uri: str, client_class, rd, spec, resolved: dict, state, config_path: Path) -> Tracker | None:
    """A Tracker for this run, its MLflow run opened (or continued) in the background; None (and a
    warning) if even that fails."""
    try:
        tracker = Tracker(uri, rd, spec, client_class=client_class)
    except Exception as e:  # noqa: BLE001 - tracking never fails the run
        _warn(f"tracking off for this run: {scrub_url_secret(' '.join(f'{type(e).__name__}: {e}'.split()), uri)}")
        return None
    try:
        rows = rd.read_metrics()
    except Exception as e:  # noqa: BLE001 - a bad row is the resume's business, not tracking's
        tracker._warn(f"metrics.jsonl not read for MLflow: {tracker._describe(e)}")
        rows = []
    tags = {"autodiff.run_dir": str(rd.path), "autodiff.status": "running", "autodiff.spec": spec.name,
            "autodiff.mode": spec.train.mode, "autodiff.optimizer": spec.train.optimizer,
            "autodiff.config": str(Path(config_path).resolve())}
    tracker.start(resolved=resolved, tags=tags, rows=rows, initial_val=state.initial_val)
    return tracker


def untracked_resume_note(rd) -> str | None:
    """What to tell a `--resume` without `--mlflow` of a run that was tracked."""
    known = read_tracking_file(rd.path)
    if not known or not known.get("run_id"):
        return None
    return (f"note: this run was tracked in MLflow ({known.get('tracking_uri')}, run {known['run_id']}); "
            "pass --mlflow URI to keep logging to it")
