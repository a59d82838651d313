"""Prompt templates for zero-shot classification, shipped as JSON files in this package.

    templates = load_templates("default")          # a template set shipped with clipforge
    templates = load_templates("my_prompts.json")  # or a file of yours

A template file holds one JSON value in either form that `clipforge.zeroshot` documents:

- a list of strings, each with ``{c}`` where the class name goes (``{}`` works too, so OpenAI's
  published prompt list can be pasted in as it is):
  ``["a photo of a {c}.", "a sketch of a {c}."]``;
- an object mapping each class name to a list of complete prompts for that class:
  ``{"cat": ["a cat asleep on a sofa."], "dog": ["a dog chasing a ball."]}``.

Shipped sets, by language: English ``default`` (20 generic prompts written for clipforge) and
``single`` (``"a photo of a {c}."`` alone, the single prompt of Radford et al., 2021, section
3.1.4); Chinese ``zh`` (16 prompts of the same kinds, written for clipforge) and ``zh-single``
(``"一张{c}的照片。"``), for models with a Chinese text tower and Chinese class names.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from clipforge.data.text import read_text
from clipforge.zeroshot import Templates, check_templates

__all__ = ["builtin_templates", "load_templates"]


def builtin_templates() -> list[str]:
    """Names of the template sets shipped with clipforge."""
    return sorted(f.name[: -len(".json")] for f in resources.files(__name__).iterdir() if f.name.endswith(".json"))


def load_templates(name_or_path: str | os.PathLike[str]) -> Templates:
    """A shipped template set by name, or a template file; raises ValueError naming the file
    and the offending entry when the content does not have a documented form."""
    name = str(name_or_path)
    if name in builtin_templates():
        source = f"clipforge/templates/{name}.json"
        text = resources.files(__name__).joinpath(f"{name}.json").read_text(encoding="utf-8")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"{name!r} is neither a template file nor a shipped set ({', '.join(builtin_templates())})"
            )
        source, text = str(path), read_text(path, what="template file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}:{err.lineno}: not valid JSON: {err.msg}") from err
    return check_templates(data, source=source)
