"""The TwiML a bot may send to ``POST …/Calls/{CallSid}.json`` (``Twiml=``): a safe, small subset.

Supported: ``<Hangup/>`` and ``<Dial>`` with one target (a number as text, ``<Number>`` or
``<Sip>``) and the attributes ``timeout`` and ``callerId``.  Anything else is refused with an
``UnsupportedTwiml`` that names the verb, noun or attribute, so the bot's author learns at once
what this server does not do (see ``docs/call-control.md``).

The parser is expat with every document type declaration refused (so no entity expansion, no
external entities), on a document already bounded to ``MAX_TWIML`` characters.
"""

from __future__ import annotations

import dataclasses
import re
from xml.parsers import expat

#: Largest TwiML accepted, in characters (Twilio's own limit for ``Twiml=``).
MAX_TWIML = 4000
DEFAULT_DIAL_TIMEOUT = 30  # seconds, as Twilio's <Dial>
NUMBER = re.compile(r"\+?[0-9]{3,20}")
# sip:user@host[:port]: no characters that mean something in an Asterisk dial string (& , | ( ) /).
SIP_URI = re.compile(r"sips?:[A-Za-z0-9._~+*#-]{1,64}@[A-Za-z0-9.-]{1,253}(?::[0-9]{1,5})?")
VERBS = ("Hangup", "Dial")
DIAL_ATTRIBUTES = ("timeout", "callerId")


class TwimlError(ValueError):
    """TwiML this server cannot run; ``str()`` says why, for the bot's author."""


class MalformedTwiml(TwimlError):
    """Not well-formed XML, too long, or a document type declaration."""


class UnsupportedTwiml(TwimlError):
    """Well-formed, but a verb, noun or attribute outside the supported subset."""


@dataclasses.dataclass(frozen=True)
class Hangup:
    pass


@dataclasses.dataclass(frozen=True)
class Dial:
    """Transfer the caller: ``kind`` is ``number`` or ``sip``; ``timeout`` in seconds."""

    target: str
    kind: str = "number"
    timeout: int = DEFAULT_DIAL_TIMEOUT
    caller_id: str = ""


Instruction = Hangup | Dial


@dataclasses.dataclass
class _Element:
    tag: str
    attributes: dict[str, str]
    children: list[_Element] = dataclasses.field(default_factory=list)
    text: str = ""


def _parse_xml(document: str) -> _Element:
    if len(document) > MAX_TWIML:
        raise MalformedTwiml(f"TwiML is longer than {MAX_TWIML} characters")
    parser = expat.ParserCreate()
    stack: list[_Element] = []
    roots: list[_Element] = []

    def refuse_doctype(*_: object) -> None:
        raise MalformedTwiml("TwiML may not declare a document type or entities")

    def start(tag: str, attributes: dict[str, str]) -> None:
        element = _Element(tag, attributes)
        (stack[-1].children if stack else roots).append(element)
        stack.append(element)

    def end(tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        if stack:
            stack[-1].text += data

    parser.StartDoctypeDeclHandler = refuse_doctype
    parser.EntityDeclHandler = refuse_doctype
    parser.ExternalEntityRefHandler = refuse_doctype  # type: ignore[assignment]
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(document, True)
    except expat.ExpatError as e:
        raise MalformedTwiml(f"TwiML is not well-formed XML: {e}") from None
    return roots[0]


def parse_twiml(document: str) -> Instruction:
    """The instruction in ``document``: its first verb, after checking every verb is supported.

    Raises ``MalformedTwiml`` or ``UnsupportedTwiml``.
    """
    root = _parse_xml(document)
    if root.tag != "Response":
        raise UnsupportedTwiml(f"TwiML must be a <Response>, not <{root.tag}>")
    if not root.children:
        raise UnsupportedTwiml("the <Response> has no verb: send <Dial> or <Hangup/>")
    instructions = [_verb(child) for child in root.children]
    return instructions[0]


def _verb(element: _Element) -> Instruction:
    if element.tag not in VERBS:
        raise UnsupportedTwiml(
            f"the TwiML verb <{element.tag}> is not supported here (supported: <Dial>, <Hangup/>)"
        )
    if element.tag == "Hangup":
        if element.children or element.text.strip() or element.attributes:
            raise UnsupportedTwiml("<Hangup/> takes no content and no attributes")
        return Hangup()
    return _dial(element)


def _dial(element: _Element) -> Dial:
    for name in element.attributes:
        if name not in DIAL_ATTRIBUTES:
            raise UnsupportedTwiml(
                f"the <Dial> attribute {name!r} is not supported here (supported: timeout, "
                "callerId)"
            )
    timeout_text = element.attributes.get("timeout", str(DEFAULT_DIAL_TIMEOUT)).strip()
    if not timeout_text.isdigit() or not 1 <= int(timeout_text) <= 600:
        raise UnsupportedTwiml(f"<Dial timeout> must be 1-600 seconds, not {timeout_text!r}")
    caller_id = element.attributes.get("callerId", "").strip()
    if caller_id and not NUMBER.fullmatch(caller_id):
        raise UnsupportedTwiml("<Dial callerId> must be a number: an optional +, 3-20 digits")
    nouns = element.children
    if len(nouns) > 1:
        raise UnsupportedTwiml("<Dial> takes one <Number> or <Sip> here, not several")
    if not nouns:
        kind, target = "number", element.text.strip()
    else:
        noun = nouns[0]
        if noun.tag not in ("Number", "Sip"):
            raise UnsupportedTwiml(
                f"the <Dial> noun <{noun.tag}> is not supported here (supported: <Number>, <Sip>)"
            )
        if noun.attributes or noun.children:
            raise UnsupportedTwiml(f"<{noun.tag}> takes no attributes or elements here")
        if element.text.strip():
            raise UnsupportedTwiml(f"<Dial> has both text and a <{noun.tag}>")
        kind, target = noun.tag.lower(), noun.text.strip()
    if kind == "number" and not NUMBER.fullmatch(target):
        raise UnsupportedTwiml(
            f"<Dial> needs a number (an optional +, then 3-20 digits), not {target[:40]!r}"
        )
    if kind == "sip" and not SIP_URI.fullmatch(target):
        raise UnsupportedTwiml(
            f"<Sip> needs a URI like sip:alice@pbx.example.com, not {target[:60]!r}"
        )
    return Dial(target, kind, int(timeout_text), caller_id)
