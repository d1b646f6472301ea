"""Parameter values: the spec's initial values, or a prompts file from a run or an export."""
from __future__ import annotations

import json
from pathlib import Path

from autodiff_cli.errors import SpecError, describe
from autodiff_cli.spec.loader import check_json_depth, load_yaml_text
from autodiff_cli.spec.models import Spec


def initial_values(spec: Spec) -> dict[str, str]:
    return {name: p.value for name, p in spec.params.items()}


def load_prompts_file(path: Path, spec: Spec) -> dict[str, str]:
    """Values from a run's prompts.yaml or an export (yaml/json): {param: value} or {params: {...}}."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(file=path, expected="a prompts file (a run's prompts.yaml or an export)", got="no such file") from None
    except UnicodeDecodeError:
        raise SpecError(file=path, expected="UTF-8 text", got="undecodable bytes") from None
    if path.suffix == ".json":
        check_json_depth(text, path)  # json.loads recurses: refuse absurd nesting with its line first
        try:
            data = json.loads(text)
        except ValueError as e:
            raise SpecError(file=path, expected="YAML or JSON", got=f"a syntax error ({e})") from None
    else:  # the spec's YAML checks (nesting depth, duplicate keys, alias bombs), each error with its line
        data = load_yaml_text(text, path, lines={})
    if isinstance(data, dict) and isinstance(data.get("params"), dict):
        data = data["params"]
    if not isinstance(data, dict):
        raise SpecError(file=path, expected="a mapping of param name -> value", got=describe(data))
    values = initial_values(spec)
    for name, value in data.items():
        if name not in spec.params:
            raise SpecError(file=path, key=str(name), expected="a param of the spec (" + ", ".join(spec.params) + ")",
                            got=f"unknown param `{name}`")
        if isinstance(value, dict) and "value" in value:
            value = value["value"]
        if not isinstance(value, str):
            raise SpecError(file=path, key=str(name), expected="a string value", got=describe(value))
        values[name] = value
    return values


def values_for(spec: Spec, prompts: Path | None, run: Path | None) -> dict[str, str]:
    if prompts is not None and run is not None:
        raise SpecError("give either --prompts FILE or --run RUN_DIR, not both")
    if run is not None:
        if not (run / "prompts.yaml").exists():
            raise SpecError(file=run, expected="a run directory with prompts.yaml", got="no prompts.yaml there")
        prompts = run / "prompts.yaml"
    return load_prompts_file(prompts, spec) if prompts is not None else initial_values(spec)
