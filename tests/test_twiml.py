"""The TwiML subset of the Calls resource: what runs, and a clear error for everything else."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rapida_tap.twiml import (
    MAX_TWIML,
    Dial,
    Hangup,
    MalformedTwiml,
    TwimlError,
    UnsupportedTwiml,
    parse_twiml,
)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("<Response><Hangup/></Response>", Hangup()),
        ('<?xml version="1.0" encoding="UTF-8"?>\n<Response> <Hangup/> </Response>', Hangup()),
        ("<Response><Dial>+4930123456</Dial></Response>", Dial("+4930123456")),
        (
            '<Response><Dial timeout="20" callerId="+4930999"><Number>+4930123456</Number>'
            "</Dial></Response>",
            Dial("+4930123456", "number", 20, "+4930999"),
        ),
        (
            "<Response><Dial><Sip>sip:alice@pbx.example.com:5060</Sip></Dial></Response>",
            Dial("sip:alice@pbx.example.com:5060", "sip"),
        ),
        ("<Response><Dial>+4930123456</Dial><Hangup/></Response>", Dial("+4930123456")),
    ],
)
def test_supported_twiml(document: str, expected: object) -> None:
    assert parse_twiml(document) == expected


@pytest.mark.parametrize(
    ("document", "error", "message"),
    [
        ("<Response><Say>Bye</Say></Response>", UnsupportedTwiml, "verb <Say> is not supported"),
        ("<Response><Hangup/><Play>x.wav</Play></Response>", UnsupportedTwiml, "<Play>"),
        ("<Response><Redirect>http://x</Redirect></Response>", UnsupportedTwiml, "<Redirect>"),
        ("<Response><Dial><Client>bob</Client></Dial></Response>", UnsupportedTwiml, "<Client>"),
        ("<Response><Dial><Conference>r</Conference></Dial></Response>", UnsupportedTwiml, "noun"),
        ('<Response><Dial action="/x">+4930123</Dial></Response>', UnsupportedTwiml, "'action'"),
        ('<Response><Dial timeout="0">+4930123</Dial></Response>', UnsupportedTwiml, "timeout"),
        ('<Response><Dial timeout="9x">+4930123</Dial></Response>', UnsupportedTwiml, "timeout"),
        ('<Response><Dial callerId="Bob">+4930123</Dial></Response>', UnsupportedTwiml, "callerId"),
        ("<Response><Dial>+49 30 123</Dial></Response>", UnsupportedTwiml, "needs a number"),
        ("<Response><Dial>100&amp;PJSIP/evil</Dial></Response>", UnsupportedTwiml, "number"),
        ("<Response><Dial><Sip>sip:a@b,30,U(x)</Sip></Dial></Response>", UnsupportedTwiml, "URI"),
        (
            "<Response><Dial><Number>+4930123</Number><Number>+4930124</Number></Dial></Response>",
            UnsupportedTwiml,
            "not several",
        ),
        ("<Response/>", UnsupportedTwiml, "no verb"),
        ("<Hangup/>", UnsupportedTwiml, "must be a <Response>"),
        ("<Response><Hangup>now</Hangup></Response>", UnsupportedTwiml, "no content"),
        ("<Response><Hangup/>", MalformedTwiml, "not well-formed"),
        ("", MalformedTwiml, "not well-formed"),
        (
            '<!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'
            "<Response><Dial>&b;</Dial></Response>",
            MalformedTwiml,
            "document type",
        ),
        (
            '<!DOCTYPE r SYSTEM "file:///etc/passwd"><Response><Hangup/></Response>',
            MalformedTwiml,
            "document type",
        ),
        ("<Response>" + " " * MAX_TWIML + "<Hangup/></Response>", MalformedTwiml, "longer"),
    ],
)
def test_refused_twiml_names_what_is_wrong(
    document: str, error: type[TwimlError], message: str
) -> None:
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        parse_twiml(document)


@given(st.text(max_size=300))
def test_any_text_is_parsed_or_refused_with_a_twiml_error(document: str) -> None:
    try:
        parse_twiml(document)
    except TwimlError:
        pass
