"""The ARI endpoint an outbound call dials: a provider's ``endpoint`` template and the numbers
that may go into it.

A template is an Asterisk dial string with placeholders: ``PJSIP/{to}@{trunk}`` dials a PJSIP
endpoint, ``Local/{to}@from-rapida`` routes through the dialplan (and lets a test set-up answer
with a Local channel).  Without a template the dial string is ``{technology}/{trunk}/{to}``, or
``{technology}/{to}`` when there is no trunk.  Templates are checked when the settings are read,
so a typo stops start-up; ``{to}`` is only ever filled with a validated number.
"""

from __future__ import annotations

import re
import string
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from rapida_tap.ari import AriProvider

MIN_DIGITS = 3
MAX_DIGITS = 20
_DIGITS = frozenset("0123456789")
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


class InvalidNumber(ValueError):
    """A number the daemon will not put into a dial string."""


def validate_number(number: str) -> str:
    """Return ``number`` without surrounding whitespace, or raise ``InvalidNumber``.

    Accepted: an optional leading ``+`` then 3 to 20 ASCII digits (E.164 or national/short
    numbers).  Nothing else is: not separators, not SIP URIs or user parts, since ``@``, ``/``,
    ``&`` or ``;`` in a dial string can redirect the call to another host or endpoint.
    """
    text = number.strip()
    digits = text.removeprefix("+")
    if not digits:
        raise InvalidNumber("number is empty: expected digits with an optional leading '+'")
    for position, char in enumerate(digits, start=len(text) - len(digits)):
        if char not in _DIGITS:
            raise InvalidNumber(
                f"number has {char!r} at position {position}: only digits with an optional "
                "leading '+' are allowed"
            )
    if not MIN_DIGITS <= len(digits) <= MAX_DIGITS:
        raise InvalidNumber(
            f"number has {len(digits)} digits: {MIN_DIGITS} to {MAX_DIGITS} are allowed"
        )
    return text


def build_endpoint(provider: AriProvider, number: str) -> str:
    """The ARI dial string: the provider's endpoint template filled in with ``number``.

    The number is validated first (``InvalidNumber``).
    """
    return _fill(provider, validate_number(number))


def describe_endpoint(provider: AriProvider) -> str:
    """What the provider dials, for the log: ``PJSIP/my-trunk/<number>``."""
    return _fill(provider, "<number>")


def _fill(provider: AriProvider, to: str) -> str:
    return render(
        provider.endpoint_template,
        technology=provider.endpoint_technology,
        trunk=provider.trunk,
        to=to,
    )
