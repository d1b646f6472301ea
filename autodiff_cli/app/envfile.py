"""`--env-file FILE`: API keys from a dotenv-style file the user names (never from a config).

Lines are `NAME=value` (optionally `export NAME=value`, values optionally quoted); `#` starts a
comment. Variables already set in the environment win. Values are never printed, not even in
errors.
"""
from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from pathlib import Path

from autodiff_cli.errors import UsageError

LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def parse_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(file=path, key="--env-file", expected="an existing file of NAME=value lines", got="no such file") from None
    except UnicodeDecodeError:
        raise UsageError(file=path, key="--env-file", expected="UTF-8 text", got="undecodable bytes") from None
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        match = LINE.match(raw)
        if match is None:
            raise UsageError(file=path, line=number, expected="NAME=value", got="a line of another shape (not shown)")
        name, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[name] = value
    return values


def load_env_file(path: Path, environ: MutableMapping[str, str] = os.environ) -> list[str]:
    """Set the file's variables that the environment does not already have; returns their names."""
    loaded = []
    for name, value in parse_env_file(path).items():
        if name not in environ:
            environ[name] = value
            loaded.append(name)
    return loaded
