"""Where data files are found: next to the config, else under $AUTODIFF_DATA (default ./datasets)."""
from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("AUTODIFF_DATA", "datasets"))


def resolve_data_path(text: str, config_dir: Path) -> tuple[Path | None, list[Path]]:
    """A path relative to the config, else to $AUTODIFF_DATA. Returns (found, tried)."""
    p = Path(text).expanduser()
    if p.is_absolute():
        return (p if p.exists() else None), [p]
    tried = [config_dir / p, data_root() / p]
    for candidate in tried:
        if candidate.exists():
            return candidate, tried
    return None, tried
