"""The ARI endpoint an outbound call dials, from a provider's ``endpoint`` template.

A template is an Asterisk dial string with placeholders: ``PJSIP/{to}@{trunk}`` dials a PJSIP
endpoint, ``Local/{to}@from-rapida`` routes through the dialplan (and lets a test set-up answer
with a Local channel).  Without a template the dial string is ``{technology}/{trunk}/{to}``, or
``{technology}/{to}`` when there is no trunk.  Templates are checked when the settings are read,
so a typo stops start-up; ``{to}`` is only ever filled with a validated number.
"""

from __future__ import annotations

import re
import string

PLACEHOLDERS = ("to", "trunk", "technology")
DEFAULT_WITH_TRUNK = "{technology}/{trunk}/{to}"
DEFAULT_WITHOUT_TRUNK = "{technology}/{to}"
# "Tech/resource": a channel technology name, then anything printable without spaces.
_DIAL_STRING = re.compile(r"[A-Za-z][A-Za-z0-9_]*/\S+")


def default_template(trunk: str) -> str:
    return DEFAULT_WITH_TRUNK if trunk else DEFAULT_WITHOUT_TRUNK


def check_template(
    template: str,
    trunk: str,
    placeholders: tuple[str, ...] = PLACEHOLDERS,
    required: str = "to",
    sample: str = "+4930123456",
) -> None:
    """Raise ``ValueError`` (starting ``endpoint``) unless ``template`` is a usable dial string.

    Placeholders are ``{to}`` (required: the number), ``{trunk}`` (needs ``trunk``) and
    ``{technology}``; ``{{`` and ``}}`` are literal braces.  Conversions, format specs and
    attribute or index look-ups are refused: a dial string has no use for them.  Transfer
    templates pass their own ``placeholders``, ``required`` one and a ``sample`` value of it.
    """
    try:
        fields = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"endpoint {template!r} is not a valid template: {e}") from None
    names = set()
    for _, name, spec, conversion in fields:
        if name is None:
            continue
        if name not in placeholders:
            known = ", ".join("{" + p + "}" for p in placeholders)
            raise ValueError(
                f"endpoint unknown placeholder {{{name}}} in {template!r} (known: {known})"
            )
        if spec or conversion:
            raise ValueError(f"endpoint {{{name}}} takes no format or conversion in {template!r}")
        names.add(name)
    if required not in names:
        what = "the number dialled" if required == "to" else "the address dialled"
        raise ValueError(f"endpoint {template!r} must contain {{{required}}}, {what}")
    if "trunk" in names and not trunk:
        raise ValueError(f"endpoint {template!r} uses {{trunk}}, but trunk is not set")
    values = {"technology": "PJSIP", "trunk": trunk, "to": "+4930123456", required: sample}
    if not _DIAL_STRING.fullmatch(template.format(**values)):
        raise ValueError(
            f"endpoint {template!r} must be a dial string like PJSIP/{{to}}@{{trunk}} or "
            "Local/{to}@from-rapida, without spaces"
        )


def render(template: str, *, technology: str, trunk: str, to: str) -> str:
    """``template`` with its placeholders filled in (``to`` must already be validated)."""
    return template.format(technology=technology, trunk=trunk, to=to)
