"""The JSON settings files transformers writes beside a tokenizer, read as the tokenizers here need them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["read_tokenizer_config"]


def read_tokenizer_config(directory: Path) -> dict[str, Any]:
    """``directory/tokenizer_config.json`` as a dict; {} when there is none, a ValueError naming
    the file when it is not a JSON object."""
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a JSON {type(config).__name__}, not an object")
    return config
