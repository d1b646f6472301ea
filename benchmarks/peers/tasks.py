"""The benchmark's tasks, and their export for both tools (main venv, autodiff's own code).

A task is one of this repository's configs. `export_task` loads its train/val/test splits with autodiff's
own loader (the config's slices, seeded stratified sample and ids), keeps the first N of each when sizes are
given, and writes them to WORK/splits/<task>-<sizes>/{train,val,test}.jsonl. Both tools read exactly those
files: autodiff through `--set data.train=FILE` (and val, test), the DSPy job directly. `task.json` beside
them describes the pipeline for the DSPy job: its program shape, the initial instruction of each LLM node
(the config's system prompt rendered by autodiff's templates with the initial params and no demos), the
input and target fields, the parser, the metric (and loss) by name, and the task model's generation
settings. The DSPy job imports the parser, metric and retriever functions from the repository
(PYTHONPATH), so both tools score and retrieve with the same code.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPLITS = ("train", "val", "test")

# name -> config, dataset (for `autodiff data fetch`), the DSPy program shape, the budget in task-model calls
# per run, seeds, and sizes (None: the config's own). Budgets and sizes keep a Qwen2.5-Coder-1.5B run near an
# hour on 2 cores (from the issue-4/5 runs in RESULTS.md: ~0.5 s per TREC call, ~7.5 s per ObjectCount
# chain-of-thought call, ~5 s per HotpotQA call), test and val scoring included.
TASKS: dict[str, dict] = {
    "trec": {"config": "configs/trec.yaml", "dataset": "trec", "program": "single",
             "budget": 800, "seeds": [0, 1, 2], "sizes": None},
    "object_count": {"config": "configs/object_count.yaml", "dataset": "object_counting", "program": "single",
                     "budget": 300, "seeds": [0], "sizes": {"val": 50}},
    "hotpot_cycle": {"config": "configs/hotpot_multihop_cycle.yaml", "dataset": "hotpotqa",
                     "program": "multihop_cycle", "budget": 400, "seeds": [0], "sizes": None},
}


def sizes_tag(sizes: dict[str, int] | None) -> str:
    return "-".join(f"{s[:2]}{sizes[s]}" for s in SPLITS if sizes and s in sizes) or "full"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_if_changed(path: Path, text: str) -> None:
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _render(template: str | None, values: dict) -> str:
    from autodiff_cli.spec.templates import compile_template

    return compile_template(template).render(values) if template else ""


def _get(node, key: str, default=None):
    """A node's key, whether the loaded spec keeps nodes as the mappings written (`with`, `body`, ...) or as
    models (`with_`): the config format is the contract, the in-memory form is autodiff's own business."""
    if isinstance(node, dict):
        return node.get(key, default)
    return getattr(node, "with_" if key == "with" else key, default)


def _llm_nodes(nodes: dict, prefix: str = "") -> dict:
    """name -> llm node, loop bodies included (as `loop.node`)."""
    out = {}
    for name, node in nodes.items():
        if _get(node, "kind") == "llm":
            out[prefix + name] = node
        elif _get(node, "kind") == "loop":
            out.update(_llm_nodes(_get(node, "body"), f"{prefix}{name}."))
    return out


def export_task(name: str, work: Path, sizes: dict[str, int] | None) -> Path:
    """Write the split files and task.json under WORK/splits/<name>-<sizes>/; returns task.json's path."""
    from autodiff_cli.data.splits import load_split
    from autodiff_cli.spec.loader import load_spec

    info = TASKS[name]
    config = ROOT / info["config"]
    loaded = load_spec(config)
    spec = loaded.spec
    out = work / "splits" / f"{name}-{sizes_tag(sizes)}"
    files, fields = {}, set()
    for split in SPLITS:
        examples = load_split(loaded, split)
        n = (sizes or {}).get(split)
        examples = examples[:n] if n else examples
        rows = [{**ex.fields, spec.data.id_field: ex.id} for ex in examples]
        fields |= set().union(*(r.keys() for r in rows))
        path = out / f"{split}.jsonl"
        _write_if_changed(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        files[split] = {"path": str(path), "n": len(rows), "sha256": _sha256(path)}
    values = {p: (v.value if v.kind != "demos" else "") for p, v in spec.params.items()}
    nodes = _llm_nodes(spec.nodes)
    metric, loss = spec.metric, spec.loss or spec.metric
    target = metric.args["target"].split(".", 1)[1]
    task = {
        "task": name, "config": info["config"], "config_sha256": _sha256(config), "program": info["program"],
        "id_field": spec.data.id_field, "target_field": target,
        # each LLM node's initial instruction: its system prompt with the initial params and no demos
        "instructions": {n: _render(_get(node, "system"), values) for n, node in nodes.items()},
        "user_templates": {n: _get(node, "user") for n, node in nodes.items()},
        "demos_max": next((p.max if p.max is not None else 3 for p in spec.params.values() if p.kind == "demos"), 3),
        "metric": {"fn": metric.fn}, "loss": {"fn": loss.fn},
        "task_model": {k: getattr(spec.models[_get(next(iter(nodes.values())), "model", "task")], k)
                       for k in ("temperature", "max_tokens", "top_p")},
        "files": files,
    }
    if info["program"] == "single":
        (llm_name, llm), = nodes.items()
        parse = spec.nodes[spec.output]
        if _get(parse, "kind") != "function" or metric.args.get("pred") != spec.output:
            raise SystemExit(f"{config}: expected the output to be a parser of the one llm node, scored by the metric")
        task.update(node=llm_name, input_fields=sorted(_template_inputs(_get(llm, "user"))),
                    parser={"fn": _get(parse, "fn"), "with": dict(_get(parse, "with") or {})})
    elif info["program"] == "multihop_cycle":
        from autodiff_cli.data.paths import resolve_data_path

        (loop_name, loop), = ((n, x) for n, x in spec.nodes.items() if _get(x, "kind") == "loop")
        body = _get(loop, "body")
        retrieve_with = dict(_get(body["retrieve"], "with") or {})
        corpus, tried = resolve_data_path(retrieve_with["corpus"], loaded.config_dir)
        if corpus is None:
            raise SystemExit(f"{config}: corpus {retrieve_with['corpus']} not found (tried {tried})")
        task.update(hops=_get(loop, "max_iters"), query_node=f"{loop_name}.query", answer_node=spec.output,
                    retrieve={"fn": _get(body["retrieve"], "fn"), "with": {**retrieve_with, "corpus": str(corpus)}},
                    merge={"fn": _get(body["merge"], "fn")}, input_fields=["question"])
    path = out / "task.json"
    _write_if_changed(path, json.dumps(task, indent=2, ensure_ascii=False) + "\n")
    return path


def _template_inputs(template: str) -> set[str]:
    from autodiff_cli.spec.templates import compile_template

    return {a for n, a in compile_template(template).attributes if n == "input"}


def calls_per_example(task: dict) -> int:
    """LLM calls of one example's forward pass (loops unrolled)."""
    return 1 if task["program"] == "single" else task["hops"] + 1
