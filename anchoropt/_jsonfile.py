"""Reading the JSON files anchoropt takes (descriptions, split files, saved configs) with errors that name them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, not_found: str, error: type[Exception] = ValueError) -> Any:
    """The parsed content of ``path``: ``FileNotFoundError(not_found)`` when it is missing, ``error`` when it
    is not valid JSON (the message names the file and the position)."""
    if not path.is_file():
        raise FileNotFoundError(not_found)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON: {err}") from err
