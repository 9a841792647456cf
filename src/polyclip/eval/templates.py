"""Prompt template sets for zero-shot classification.

The built-in sets are the core's (``polyclip/data/templates.json``, read through
``polyclip.zero_shot.template_sets``): OpenAI CLIP's 80 ImageNet templates and the prompts each domain
system evaluates with. A user's own set is a file: plain text (one template per line, ``#`` comments),
JSON (a list of strings, or ``{"templates": [...]}``) or TOML (``templates = [...]``). Every template
holds exactly one ``{}`` (``{c}`` is accepted too) where the class name goes.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from polyclip.eval.errors import EvalError
from polyclip.zero_shot import template_sets

_PLACEHOLDER = "{}"


def list_template_sets() -> dict[str, list[str]]:
    """Built-in set name -> its templates."""
    return {name: list(templates) for name, templates in template_sets().items()}


def validate_templates(templates: list[str], origin: str = "templates") -> list[str]:
    """Templates with ``{c}`` rewritten to ``{}``; an error names any template without exactly one placeholder."""
    if not templates:
        raise EvalError(f"{origin}: no templates given")
    checked = []
    for number, template in enumerate(templates, 1):
        if not isinstance(template, str):
            raise EvalError(f"{origin}: template {number} is not a string: {template!r}")
        template = template.replace("{c}", _PLACEHOLDER)
        if template.count(_PLACEHOLDER) != 1 or template.replace(_PLACEHOLDER, "").count("{") > 0:
            raise EvalError(
                f"{origin}: template {number} {template!r} must hold exactly one '{{}}' for the class name"
            )
        checked.append(template)
    return checked


def _read_template_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EvalError(f"cannot read template file {path}: {error}") from error
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(text)
            return data["templates"] if isinstance(data, dict) else data
        if suffix == ".toml":
            return tomllib.loads(text)["templates"]
    except (json.JSONDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError) as error:
        raise EvalError(
            f"template file {path} is malformed ({error}); expected a list of templates"
        ) from error
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def load_templates(spec: str | Path | list[str] | tuple[str, ...]) -> list[str]:
    """Templates from a built-in set name, a file path, or a list of strings."""
    if isinstance(spec, list | tuple):
        return validate_templates(list(spec))
    builtin = template_sets()
    if isinstance(spec, str) and spec in builtin:
        return validate_templates(list(builtin[spec]), origin=f"template set {spec!r}")
    path = Path(spec)
    if not path.is_file():
        raise EvalError(
            f"unknown template set {str(spec)!r}: not a file and not one of {', '.join(sorted(builtin))}"
        )
    return validate_templates(_read_template_file(path), origin=str(path))
