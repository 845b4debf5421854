"""Prompt templates for zero-shot labels: ``"a photo of a {}."`` with the label in the ``{}``.

A template holds exactly one ``{}``; ``{{`` and ``}}`` stand for literal braces; any other
brace is an error. Only the label is substituted: no ``str.format`` fields, conversions or
format specs (``"{0:>20000000}"`` would pad a label to 20 MB), so a filled template is never
longer than the template plus the label.

:data:`TEMPLATE_PATTERN` says the same as a regular expression (the HTTP API publishes it in
its OpenAPI document); :func:`fill_template` checks a template and fills it.

Example::

    fill_template("a photo of a {}.", "red circle")   # 'a photo of a red circle.'
    fill_template("{{{}}}", "x")                      # '{x}'
    fill_template("{0}", "x")                         # ValueError naming the template
"""

from __future__ import annotations

import re

# Literal text (no braces, or doubled ones), one `{}`, literal text.
_LITERAL = r"(?:[^{}]|\{\{|\}\})*"
TEMPLATE_PATTERN = rf"^{_LITERAL}\{{\}}{_LITERAL}$"
_TEMPLATE = re.compile(TEMPLATE_PATTERN)
_PIECE = re.compile(r"\{\{|\}\}|\{\}")


def check_template(template: str, *, name: str = "template") -> str:
    """``template`` itself if it holds exactly one ``{}`` (braces otherwise doubled), else a
    ``ValueError`` whose message starts with ``name``."""
    if not isinstance(template, str):
        raise TypeError(f"{name} must be a str, got {type(template).__name__}")
    if _TEMPLATE.fullmatch(template) is None:
        raise ValueError(
            f"{name} must contain exactly one '{{}}' where the label goes, and write any "
            f"other brace doubled ('{{{{' or '}}}}'); got {_preview(template)}"
        )
    return template


def fill_template(template: str, label: str, *, name: str = "template") -> str:
    """``template`` with its ``{}`` replaced by ``label`` and ``{{``/``}}`` by one brace.

    Raises ``ValueError`` (message starting with ``name``) for any other template.
    """
    check_template(template, name=name)
    return _PIECE.sub(lambda m: label if m[0] == "{}" else m[0][0], template)


def _preview(text: str, limit: int = 80) -> str:
    # An error message quotes at most `limit` characters of what it refuses.
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"
