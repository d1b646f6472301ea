"""One DSPy run, inside the peers venv: build the task's program with its initial instructions, optimize it
(or not), then score the result per example on val and on test. Started by benchmarks/peers/run.py as

    PYTHONPATH=<repo> benchmarks/work/peers-venv/bin/python benchmarks/peers/dspy_job.py RUN_DIR/job.json

job.json (written by run.py) names task.json (the exported splits and pipeline), the system (none,
bootstrap, mipro, gepa), the seed, the budget in task-model calls, the proxy's URL and this run's tag, the
served model alias, the temperatures and max_tokens per role, and the run directory.

Every LM call goes to the counting proxy with the role in its URL (task, teacher, prompt, reflection). The
job sets the proxy's phase for its tag (optimize, then val, then test), so the server-side counts split the
optimizer's calls from the final scorings. The parser, metric and retriever are autodiff's own functions,
imported from the repository (PYTHONPATH), never copies.

Written into the run directory: program.json (`Module.save`), val.jsonl and test.jsonl (one row per example:
id, prediction, target, score, error, as `autodiff eval --out`), raw-val.jsonl and raw-test.jsonl (the
fields DSPy parsed, or the adapter's error), result.json (scores, settings the optimizer really ran with,
DSPy-level LM calls per phase and role with cache hits, wall time per phase, the program's instructions and
demos, versions), and DSPy's own logs (mipro-logs/, gepa-logs/). A rerun after an interruption replays
the calls already made from DSPy's cache in RUN_DIR/dspy-cache (GEPA also resumes from gepa-logs/).
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
import traceback
import urllib.request
from collections import Counter
from pathlib import Path

BIG = 10**9  # max_errors: a reply DSPy cannot parse scores 0 and never stops a run


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def post_json(url: str, data: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    run_dir = Path(job["run_dir"])
    task = json.loads(Path(job["task_json"]).read_text(encoding="utf-8"))
    system, seed, budget = job["system"], job["seed"], job["budget"]
    started = time.time()

    import dspy
    from dspy.utils.callback import BaseCallback
    from dspy.utils.exceptions import AdapterParseError

    from autodiff_cli.nodes.builtins import resolve_function
    from autodiff_cli.nodes.metrics import resolve_metric

    # a cache per run: its calls are its own (nothing answered by another run's cache), and a rerun replays them
    dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(run_dir / "dspy-cache"))

    # ---------------------------------------------------------------- LMs: one model behind the counting proxy
    def lm(role: str, temperature: float, max_tokens: int):
        # engine="litellm": DSPy 3.4's default ("auto") prefers its own lm15 client; litellm (in this project's
        # pin) is the backend the comparison is about, and the one DSPy documents for local servers
        return dspy.LM(f"openai/{job['alias']}", api_base=f"{job['proxy']}/t/{job['tag']}/{role}/v1",
                       api_key="local-no-key", temperature=temperature, max_tokens=max_tokens, cache=True,
                       num_retries=job["num_retries"], timeout=job["timeout"], engine="litellm")

    tm = task["task_model"]
    task_lm = lm("task", tm["temperature"] or 0.0, tm["max_tokens"] or job["meta_max_tokens"])
    teacher_lm = lm("teacher", job["teacher_temperature"], tm["max_tokens"] or job["meta_max_tokens"])

    class CountCalls(BaseCallback):
        """DSPy-level LM calls per phase and role (cache hits included; the proxy counts what reached the model)."""

        def __init__(self) -> None:
            self.calls: Counter = Counter()
            self.phase = "optimize"
            self.lock = threading.Lock()

        def on_lm_start(self, call_id, instance, inputs):
            base = str((getattr(instance, "kwargs", {}) or {}).get("api_base", ""))
            role = base.rstrip("/").split("/")[-2] if base.endswith("/v1") else "unlabelled"
            with self.lock:
                self.calls[(self.phase, role)] += 1

        def task_calls(self) -> int:
            return sum(n for (phase, role), n in self.calls.items() if phase == "optimize" and role in ("task", "teacher"))

    counter = CountCalls()
    dspy.configure(lm=task_lm, callbacks=[counter], max_errors=BIG)

    def set_phase(phase: str) -> None:
        counter.phase = phase
        post_json(f"{job['proxy']}/control/{job['tag']}", {"phase": phase})

    # ---------------------------------------------------------------- data, program, metric
    target_field, id_field = task["target_field"], task["id_field"]
    inputs = task["input_fields"]

    ids: dict[str, list[str]] = {}

    def examples(split: str) -> list:
        rows = read_jsonl(task["files"][split]["path"])
        ids[split] = [str(r[id_field]) for r in rows]  # kept apart: the optimizers show examples' fields to the LM
        return [dspy.Example(**{f: r[f] for f in inputs}, answer=r[target_field]).with_inputs(*inputs) for r in rows]

    trainset, valset, testset = examples("train"), examples("val"), examples("test")
    metric_fn, loss_fn = resolve_metric(task["metric"]["fn"]), resolve_metric(task["loss"]["fn"])

    if task["program"] == "single":
        parser, _ = resolve_function(task["parser"]["fn"])
        parser_with = task["parser"]["with"]
        signature = dspy.Signature(f"{', '.join(inputs)} -> answer", task["instructions"][task["node"]])
        program = dspy.Predict(signature)

        def prediction_of(pred):
            return parser(getattr(pred, "answer", None), **parser_with)
    elif task["program"] == "multihop_cycle":
        retrieve, _ = resolve_function(task["retrieve"]["fn"])
        merge, _ = resolve_function(task["merge"]["fn"])
        retrieve_with = task["retrieve"]["with"]

        class Query(dspy.Signature):
            question: str = dspy.InputField()
            passages: list[str] = dspy.InputField(desc="passages found so far (none on the first hop)")
            query: str = dspy.OutputField()

        class Answer(dspy.Signature):
            passages: list[str] = dspy.InputField()
            question: str = dspy.InputField()
            answer: str = dspy.OutputField()

        class MultiHop(dspy.Module):
            """The config's loop: one query writer called once per hop (bm25 retrieval, dedup_extend), then the
            answer, with the same retriever and corpus as autodiff's pipeline."""

            def __init__(self) -> None:
                super().__init__()
                self.query = dspy.Predict(Query.with_instructions(task["instructions"][task["query_node"]]))
                self.answer = dspy.Predict(Answer.with_instructions(task["instructions"][task["answer_node"]]))

            def forward(self, question: str):
                context: list = []
                for _ in range(task["hops"]):
                    query = self.query(question=question, passages=context).query
                    context = merge(items=context, new=retrieve(query=query or "", **retrieve_with))
                return self.answer(passages=context, question=question)

        program = MultiHop()

        def prediction_of(pred):
            return getattr(pred, "answer", None)
    else:
        raise SystemExit(f"unknown program shape {task['program']!r}")

    feedback_about = f"{task['metric']['fn']}" + (f" (partial credit by {task['loss']['fn']})"
                                                  if task["loss"]["fn"] != task["metric"]["fn"] else "")

    def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
        prediction = prediction_of(pred)
        value = float(metric_fn(prediction, gold.answer))
        if system != "gepa":
            return value
        # GEPA's textual feedback: what autodiff's template loss feedback says (prompts/loss_feedback.j2)
        partial = float(loss_fn(prediction, gold.answer))
        verdict = "correct" if value >= 1.0 else "wrong"
        feedback = (f"The pipeline's result for this example is {verdict} (score {value:.2f} of 1 by {feedback_about}"
                    + (f"; partial credit {partial:.2f}" if task["loss"]["fn"] != task["metric"]["fn"] else "")
                    + f").\nThe pipeline produced: {prediction}\nThe expected result is: {gold.answer}")
        return dspy.Prediction(score=value, feedback=feedback)

    # ---------------------------------------------------------------- optimize within the budget
    cpe = job["calls_per_example"]
    details: dict = {"budget_task_calls": budget, "calls_per_example": cpe}

    class CappedMIPROv2(dspy.MIPROv2):
        """MIPROv2 with its `auto` settings, and as many of its trials as the remaining budget pays for.

        Bootstrapping and instruction proposal run first, then `_optimize_prompt_parameters` gets the
        number of trials `auto` chose; here it gets the largest number whose evaluations (the default
        program on the whole valset, one minibatch or full evaluation per trial, and the periodic full
        evaluations) fit in what is left of the budget, counted as DSPy-level task-model calls so far (cache
        hits included, so a rerun plans the same). DSPy 3.4.1's private method, pinned with the package."""

        def _optimize_prompt_parameters(self, program, instruction_candidates, demo_candidates, evaluate, valset,
                                        num_trials, minibatch, minibatch_size, minibatch_full_eval_steps, seed):
            used = counter.task_calls()
            left = budget - used
            v = len(valset)

            def cost(k: int) -> int:
                if not minibatch:
                    return (v + k * v) * cpe
                return (v + k * minibatch_size + (k // minibatch_full_eval_steps + 1) * v) * cpe

            fit = max((k for k in range(num_trials + 1) if cost(k) <= left), default=0)
            details.update(mipro_auto_trials=num_trials, mipro_trials=fit, mipro_minibatch=minibatch,
                           mipro_minibatch_size=minibatch_size if minibatch else None, mipro_valset=v,
                           task_calls_before_trials=used, projected_task_calls=used + cost(fit))
            if cost(0) > left:
                details["mipro_note"] = ("the budget left after bootstrapping does not pay for one evaluation of the "
                                         "default program: the initial program is kept")
                return program
            return super()._optimize_prompt_parameters(program, instruction_candidates, demo_candidates, evaluate,
                                                       valset, fit, minibatch, minibatch_size,
                                                       minibatch_full_eval_steps, seed)

    def optimize():
        if system == "none":
            return program
        teacher_settings = {"lm": teacher_lm}
        if system == "bootstrap":
            shuffled = list(trainset)
            random.Random(seed).shuffle(shuffled)  # BootstrapFewShot walks the trainset in order: the seed orders it
            opt = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=task["demos_max"],
                                        max_labeled_demos=task["demos_max"], max_rounds=1, max_errors=BIG,
                                        teacher_settings=teacher_settings)
            return opt.compile(program, trainset=shuffled)
        if system == "mipro":
            opt = CappedMIPROv2(metric=metric, prompt_model=lm("prompt", job["meta_temperature"], job["meta_max_tokens"]),
                                task_model=task_lm, teacher_settings=teacher_settings, auto="light",
                                max_bootstrapped_demos=task["demos_max"], max_labeled_demos=task["demos_max"],
                                num_threads=job["num_threads"], max_errors=BIG, seed=seed, verbose=False,
                                track_stats=True, log_dir=str(run_dir / "mipro-logs"),
                                init_temperature=job["meta_temperature"])
            best = opt.compile(program, trainset=trainset, valset=valset)
            details["val_best_by_optimizer"] = getattr(best, "score", None)
            return best
        if system == "gepa":
            reflection_minibatch = 3
            probe = dspy.GEPA(metric=metric, auto="light", reflection_lm=task_lm)  # only for auto_budget()
            light = probe.auto_budget(num_preds=len(program.predictors()), num_candidates=6, valset_size=len(valset))
            # GEPA checks its budget between iterations; one iteration may add two minibatch evaluations and a
            # full valset evaluation, so that much is kept in reserve to stay within the budget
            reserve = len(valset) + 2 * reflection_minibatch
            cap = (budget - counter.task_calls()) // cpe - reserve
            max_metric_calls = min(light, cap)
            details.update(gepa_light_metric_calls=light, gepa_cap_metric_calls=cap, gepa_max_metric_calls=max_metric_calls)
            if max_metric_calls < len(valset):
                details["gepa_note"] = "the budget does not pay for one valset evaluation: the initial program is kept"
                return program
            opt = dspy.GEPA(metric=metric, max_metric_calls=max_metric_calls,
                            reflection_lm=lm("reflection", job["meta_temperature"], job["meta_max_tokens"]),
                            reflection_minibatch_size=reflection_minibatch, candidate_selection_strategy="pareto",
                            use_merge=True, num_threads=job["num_threads"], seed=seed, track_stats=True,
                            log_dir=str(run_dir / "gepa-logs"))
            best = opt.compile(program, trainset=trainset, valset=valset)
            results = getattr(best, "detailed_results", None)
            if results is not None:
                details.update(val_best_by_optimizer=results.val_aggregate_scores[results.best_idx],
                               val_initial_by_optimizer=results.val_aggregate_scores[0],
                               candidates=len(results.candidates), total_metric_calls=results.total_metric_calls)
            return best
        raise SystemExit(f"unknown system {system!r}")

    walls: dict[str, float] = {}
    set_phase("optimize")
    t0 = time.perf_counter()
    try:
        optimized = optimize()
    except Exception as e:  # noqa: BLE001 - recorded as a failed run
        traceback.print_exc()
        write_json(run_dir / "result.json", {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000],
                                             "details": details, "dspy_calls": _calls(counter)})
        return 1
    walls["optimize"] = round(time.perf_counter() - t0, 2)
    optimized.save(str(run_dir / "program.json"))

    # ---------------------------------------------------------------- score on val, then test, per example
    def score(split: str, dataset: list) -> tuple[list[dict], list[dict]]:
        rows, raws = [], []
        for example_id, ex in zip(ids[split], dataset, strict=True):
            raw: dict = {"id": example_id}
            try:
                pred = optimized(**ex.inputs())
                prediction = prediction_of(pred)
                value, error = float(metric_fn(prediction, ex.answer)), None
                raw.update({k: v for k, v in pred.items()})
            except AdapterParseError as e:
                # not in the adapter's format (ChatAdapter, then its JSON fallback): no answer, scored 0 as
                # autodiff scores a reply its parser finds nothing in (not a model-call error)
                prediction, value, error = None, 0.0, None
                raw.update(adapter_error=str(e)[:2000], lm_response=getattr(e, "lm_response", None))
            except Exception as e:  # noqa: BLE001 - a failed model call: left out of the score, as autodiff does
                prediction, value, error = None, None, f"{type(e).__name__}: {e}"[:1000]
            rows.append({"id": example_id, "prediction": prediction, "target": ex.answer, "score": value,
                         "error": error})
            raws.append(raw)
        return rows, raws

    scores = {}
    for split, dataset in (("val", valset), ("test", testset)):
        set_phase(split)
        t0 = time.perf_counter()
        rows, raws = score(split, dataset)
        walls[split] = round(time.perf_counter() - t0, 2)
        write_jsonl(run_dir / f"{split}.jsonl", rows)
        write_jsonl(run_dir / f"raw-{split}.jsonl", raws)
        ok = [r["score"] for r in rows if r["error"] is None]
        scores[split] = {"score": math.fsum(ok) / len(ok) if ok else None, "n": len(rows), "completed": len(ok),
                         "format_failures": sum(1 for r in raws if "adapter_error" in r)}

    import importlib.metadata as md

    def describe(prog) -> list[dict]:
        # a bare Predict is its own (only) predictor, named "self" by DSPy: named after the config's node here
        return [{"predictor": task.get("node", name) if name == "self" else name,
                 "instructions": pred.signature.instructions,
                 "demos": [{k: v for k, v in (d.toDict() if hasattr(d, "toDict") else dict(d)).items()
                            if k != "augmented"} for d in pred.demos]}
                for name, pred in prog.named_predictors()]

    write_json(run_dir / "result.json", {
        "status": "completed", "scores": scores, "details": details, "dspy_calls": _calls(counter),
        "wall_seconds": walls, "process_wall_seconds": round(time.time() - started, 2),
        "program": describe(optimized),
        "versions": {"python": sys.version.split()[0],
                     **{d: md.version(d) for d in ("dspy", "litellm", "gepa", "optuna", "openai", "llama_cpp_python")}},
    })
    return 0


def _calls(counter) -> dict:
    out: dict = {}
    for (phase, role), n in sorted(counter.calls.items()):
        out.setdefault(phase, {})[role] = n
    return out


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
