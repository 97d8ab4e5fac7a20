"""Writing test configuration files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["toml_value", "write_config"]


def toml_value(v: Any) -> str:
    """A Python value as a TOML literal (str, bool, int, float)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write ``sections`` as a TOML file at ``path`` and return the path."""
    lines: list[str] = []
    for name, body in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path
