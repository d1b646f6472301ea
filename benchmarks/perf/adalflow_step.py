#!/usr/bin/env python3
"""Runs INSIDE the AdalFlow 1.1.3 virtual environment: AdalFlow's `Trainer.fit` on one pipeline of
figure 2 (issue 6), against the benchmark's fake OpenAI-compatible server.

    <adalflow-venv>/bin/python benchmarks/perf/adalflow_step.py CONFIG.json

benchmarks/perf/adalflow_side.py writes CONFIG.json (server URL, data files, the pipeline's nodes and
initial instructions, the shared settings) and starts this with HOME pointing at a fresh directory
(AdalFlow keeps its call cache and checkpoints under ~/.adalflow), OPENAI_API_KEY set to any value,
and TIKTOKEN_CACHE_DIR holding the real cl100k_base encoding file (AdalFlow builds a tiktoken
tokenizer on import and would download it).

The pipeline is written the way AdalFlow's own examples write one (use_cases/.../object_count):
one `Generator` per LLM node with a trainable `Parameter` (ParameterType.PROMPT) as its instruction,
the template AdalFlow's examples use (<START_OF_SYSTEM_PROMPT> ... <START_OF_USER> ...), the stock
`OpenAIClient(base_url=...)` (one per generator, as its docstring asks), the last node's output
processor parsing the last integer; `EvalFnToTextLoss` over `AnswerMatchAcc("exact_match")`; the
backward engine and the TGD optimizer on the same server. Nothing of AdalFlow is patched. Two
subclasses only add timestamps: the AdalComponent records when `train_step` starts (the start of a
training step) and the Trainer when `_text_grad_constraint_propose_step` returns (its end). The
AdalComponent also records each validation of the whole validation set inside a step (its
`validation_step` is called by the constrained proposal step with `minimum_score=last_val_score`,
AdalFlow's own early stop, left on as it is): how many examples it scored before it stopped, the
score, and when the call started and returned; it calls the stock method unchanged.

Writes CONFIG["out"]: the step windows (time.time()), the import time, validation scores, the
trainer's pass/fail counts, package versions.
"""
from __future__ import annotations

import json
import random
import re
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path


def template(user: str) -> str:
    """The template of AdalFlow's examples; the node's user text with {question} / {upstream} as Jinja
    variables (the upstream node's output is a prompt kwarg of its own: in training it is a Parameter,
    the edge of AdalFlow's graph)."""
    user = user.replace("{question}", "{{question}}").replace("{upstream}", "{{upstream}}")
    return ("<START_OF_SYSTEM_PROMPT>\n{{instruction}}\n<END_OF_SYSTEM_PROMPT>\n"
            f"<START_OF_USER>\n{user}\n<END_OF_USER>\n")


def last_integer(text: str) -> str:
    found = re.findall(r"-?\d+", text or "")
    return found[-1] if found else ""


def main() -> int:
    config = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    s = config["settings"]
    t0 = time.time()
    import adalflow as adal
    from adalflow.components.model_client import OpenAIClient
    from adalflow.eval.answer_match_acc import AnswerMatchAcc
    from adalflow.optim.parameter import ParameterType
    import_s = time.time() - t0

    @dataclass
    class Example(adal.DataClass):
        """One sample, shaped like adalflow.datasets.types.Example (that package imports torch)."""
        id: str = field(default=None, metadata={"desc": "The unique identifier of the example"})
        question: str = field(default=None, metadata={"desc": "The question to be answered"})
        answer: str = field(default=None, metadata={"desc": "The answer to the question"})

    model_kwargs = {"model": "fake"}

    def client() -> OpenAIClient:
        return OpenAIClient(base_url=config["base_url"])

    parse = adal.func_to_data_component(last_integer)

    class Pipeline(adal.Component):
        """The LLM nodes of CONFIG["nodes"] in a chain: (name, param, user template, upstream node)."""

        def __init__(self) -> None:
            super().__init__()
            self.order = []
            for i, (name, param, user, upstream) in enumerate(config["nodes"]):
                instruction = adal.Parameter(
                    data=config["params"][param], role_desc=f"Task instruction of the `{name}` step",
                    requires_opt=True, param_type=ParameterType.PROMPT, name=param)
                last = i == len(config["nodes"]) - 1
                gen = adal.Generator(model_client=client(), model_kwargs=dict(model_kwargs), template=template(user),
                                     prompt_kwargs={"instruction": instruction},
                                     output_processors=parse if last else None, use_cache=True)
                setattr(self, f"gen_{name}", gen)
                self.order.append((name, upstream))

        def call(self, question: str, id: str | None = None):
            outputs = {}
            out = None
            for name, upstream in self.order:
                kwargs = {"question": question}
                if upstream:
                    up = outputs[upstream]
                    if not self.training:
                        up = up.data if up.data is not None else up.raw_response
                    kwargs["upstream"] = up
                out = getattr(self, f"gen_{name}")(prompt_kwargs=kwargs, id=id)
                outputs[name] = out
            return out

    windows: list[dict] = []

    class Task(adal.AdalComponent):
        def __init__(self) -> None:
            eval_fn = AnswerMatchAcc(type="exact_match").compute_single_item
            loss_fn = adal.EvalFnToTextLoss(eval_fn=eval_fn,
                                            eval_fn_desc="exact_match: 1 if str(y) == str(y_gt) else 0")
            super().__init__(task=Pipeline(), eval_fn=eval_fn, loss_fn=loss_fn,
                             backward_engine_model_config={"model_client": client(),
                                                           "model_kwargs": dict(model_kwargs)},
                             text_optimizer_model_config={"model_client": client(), "model_kwargs": dict(model_kwargs)})

        def prepare_task(self, sample):
            return self.task.call, {"question": sample.question, "id": sample.id}

        def prepare_eval(self, sample, y_pred):
            y = y_pred.data if y_pred is not None and y_pred.data is not None else "-1"
            return self.eval_fn, {"y": y, "y_gt": sample.answer}

        def prepare_loss(self, sample, pred):
            y_gt = adal.Parameter(name="y_gt", data=sample.answer, eval_input=sample.answer, requires_opt=False)
            pred.eval_input = pred.data.data if pred.data is not None else "-1"
            return self.loss_fn, {"kwargs": {"y": pred, "y_gt": y_gt}, "id": sample.id, "gt": sample.answer}

        def train_step(self, batch, batch_idx, num_workers: int = 2):
            windows.append({"step": batch_idx, "start": time.time()})
            return super().train_step(batch, batch_idx, num_workers)

        def validation_step(self, batch, batch_idx, num_workers: int = 2, minimum_score=None,
                            use_loss_eval_fn: bool = False):
            start = time.time()
            out = super().validation_step(batch, batch_idx, num_workers, minimum_score=minimum_score,
                                          use_loss_eval_fn=use_loss_eval_fn)
            if windows and "end" not in windows[-1] and batch is val:  # the validation set, inside a step
                windows[-1].setdefault("validations", []).append(
                    {"examples": len(batch), "scored": len(out.per_item_scores or []), "score": out.avg_score,
                     "minimum_score": minimum_score, "start": start, "end": time.time()})
            return out

    class TimedTrainer(adal.Trainer):
        def _text_grad_constraint_propose_step(self, *args, **kwargs):
            before = {k: dict(v) for k, v in self._effective_measure.items()}
            out = super()._text_grad_constraint_propose_step(*args, **kwargs)
            windows[-1]["end"] = time.time()
            after = self._effective_measure
            windows[-1]["proposals"] = {stage: {k: after[stage][k] - before[stage][k] for k in ("pass", "fail")}
                                        for stage in ("subset", "valset")}
            return out

    def load(path: str):
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
        return [Example(id=r["id"], question=r["question"], answer=r["answer"]) for r in rows]

    train, val = load(config["train"]), load(config["val"])
    random.seed(s["seed"])
    trainer = TimedTrainer(adaltask=Task(), strategy="constrained", max_steps=s["steps"],
                           train_batch_size=s["batch"], num_workers=s["workers"],
                           max_proposals_per_step=s["proposals"], max_error_samples=s["max_error"],
                           max_correct_samples=s["max_correct"], ckpt_path=config["ckpt"], debug=False)
    trainer.set_random_seed(s["seed"])
    t1 = time.time()
    _, results = trainer.fit(train_dataset=train, val_dataset=val)
    fit_s = time.time() - t1
    versions = {d: _version(d) for d in ("adalflow", "openai", "httpx", "tiktoken", "numpy")}
    versions["python"] = sys.version.split()[0]
    out = {"windows": [w for w in windows if "end" in w], "import_s": import_s, "fit_s": fit_s,
           "initial_val": results.val_scores[0] if results.val_scores else None,
           "val_scores": list(results.val_scores), "effective": trainer._effective_measure, "versions": versions}
    Path(config["out"]).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return 0


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
