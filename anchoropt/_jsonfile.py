"""Reading the JSON files anchoropt takes (descriptions, split files, saved configs) with errors that name them.

Stricter than :func:`json.loads` where a silent reading would be wrong: a key given twice in one object (the
standard library keeps the last one), ``NaN`` / ``Infinity`` (not JSON), bytes that are not UTF-8 and
nesting too deep for Python's recursion limit are all errors naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json(path: Path, not_found: str, error: type[Exception] = ValueError) -> Any:
    """The parsed content of ``path``: ``FileNotFoundError(not_found)`` when it is missing, ``error`` when it
    is not valid, strict JSON (the message names the file and the position or the problem)."""
    if not path.is_file():
        raise FileNotFoundError(not_found)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(
            f"{path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    return parse_json(text, str(path), error)


def parse_json(text: str, where: str, error: type[Exception] = ValueError) -> Any:
    """:func:`read_json`'s strict parsing of ``text`` (``where`` names it in messages)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as err:
        raise error(f"{where} is not valid JSON: {err}") from None
    except _StrictJSONError as err:
        raise error(f"{where}: {err}") from None
    except RecursionError:
        raise error(f"{where} nests JSON too deeply to read (arrays / objects inside each other)") from None


class _StrictJSONError(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _StrictJSONError(f"the key {key!r} appears twice in one object (only one entry would be kept)")
        out[key] = value
    return out


def _no_constant(name: str):
    raise _StrictJSONError(f"{name} is not a JSON value (write a number, or null)")
