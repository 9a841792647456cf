"""Prompt template sets for zero-shot classification.

The built-in sets are the core's (``polyclip/data/templates.json``, read through
``polyclip.zero_shot.template_sets``): OpenAI CLIP's 80 ImageNet templates and the prompts each domain
system evaluates with. A user's own set is a file: plain text (one template per line, ``#`` comments),
JSON (a list of strings, or ``{"templates": [...]}``) or TOML (``templates = [...]``). Every template
holds exactly one ``{}`` (``{c}`` is accepted too) where the class name goes. Reading and checking
them is the core's (`polyclip.zero_shot.resolve_templates`); this module gives its errors as EvalErrors.
"""

from __future__ import annotations

from pathlib import Path

from polyclip.eval.errors import EvalError
from polyclip.zero_shot import TemplateError, resolve_templates, template_sets
from polyclip.zero_shot import validate_templates as core_validate


def list_template_sets() -> dict[str, list[str]]:
    """Built-in set name -> its templates."""
    return {name: list(templates) for name, templates in template_sets().items()}


def validate_templates(templates: list[str], origin: str = "templates") -> list[str]:
    """Templates with ``{c}`` rewritten to ``{}`` (`polyclip.zero_shot.validate_templates`), as EvalErrors."""
    try:
        return core_validate(templates, origin)
    except TemplateError as error:
        raise EvalError(str(error)) from None


def load_templates(spec: str | Path | list[str] | tuple[str, ...]) -> list[str]:
    """Templates from a built-in set name, a literal with ``{}``, a file path, or a list of strings.

    The core's one resolver (`polyclip.zero_shot.resolve_templates`), with its errors as EvalErrors.
    """
    try:
        return resolve_templates(list(spec) if isinstance(spec, tuple) else spec)
    except TemplateError as error:
        raise EvalError(str(error)) from None
