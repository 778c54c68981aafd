"""The AudioSocket dialplan, as shipped in ``etc/`` and printed at start-up for this host.

Correct for real Asterisk (see protocols.md): the key travels in a header, the caller id is
URI-encoded, CURL() has timeouts and failure codes, and the context id is checked by length.
After the call it runs a bot's transfer (``docs/call-control.md``): ``…/next`` gives the
``Dial()`` arguments or nothing, ``…/outcome`` reports ``DIALSTATUS`` and answers a new context
id when the caller goes back to the bot; the ``h`` extension reports a transfer the caller
hung up on.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from rapida_tap.config import Settings
from rapida_tap.listeners import endpoint_interface, endpoint_port

AUDIOSOCKET_TEMPLATE = """\
[globals]
RAPIDA_URL = {rapida_url}
RAPIDA_API_KEY = {api_key}
RAPIDA_AS_HOST = {audiosocket_host}
RAPIDA_PORT = {audiosocket_port}
ASSISTANT_ID = {assistant_id}

[rapida-inbound]
exten => _X.,1,Answer()
 same => n,Set(CURLOPT(conntimeout)=3)
 same => n,Set(CURLOPT(httptimeout)=3)
 same => n,Set(CURLOPT(failurecodes)=400,401,403,404,429,500,502,503,504)
 same => n,Set(CURLOPT(httpheader)=X-Api-Key: ${{RAPIDA_API_KEY}})
 same => n,Set(CTX=${{CURL(${{RAPIDA_URL}}/v1/talk/asterisk/call/${{ASSISTANT_ID}}?from=${{URIENCODE(${{CALLERID(num)}})}})}})
 same => n,GotoIf($[${{LEN(${{CTX}})}} != 36]?error)
 same => n(talk),AudioSocket(${{CTX}},${{RAPIDA_AS_HOST}}:${{RAPIDA_PORT}})
 same => n,Set(NEXT=${{CURL(${{RAPIDA_URL}}/v1/talk/asterisk/call/${{CTX}}/next)}})
 same => n,GotoIf($[${{LEN(${{NEXT}})}} = 0]?done)
 same => n,Set(RAPIDA_DIALLING=${{CTX}})
 same => n,Dial(${{NEXT}})
 same => n,Set(RAPIDA_DIALLING=)
 same => n,Set(CTX=${{CURL(${{RAPIDA_URL}}/v1/talk/asterisk/call/${{CTX}}/outcome?dialstatus=${{DIALSTATUS}})}})
 same => n,GotoIf($[${{LEN(${{CTX}})}} = 36]?talk)
 same => n(done),Hangup()
 same => n(error),Playback(an-error-has-occurred)
 same => n,Hangup()
exten => h,1,GotoIf($[${{LEN(${{RAPIDA_DIALLING}})}} != 36]?end)
 same => n,Set(OUTCOME=${{CURL(${{RAPIDA_URL}}/v1/talk/asterisk/call/${{RAPIDA_DIALLING}}/outcome?dialstatus=${{DIALSTATUS}})}})
 same => n(end),NoOp()
"""


def audiosocket_dialplan(
    *,
    rapida_url: str,
    api_key: str,
    audiosocket_host: str,
    audiosocket_port: int | str,
    assistant_id: str = "123456789",
) -> str:
    return AUDIOSOCKET_TEMPLATE.format(
        rapida_url=rapida_url.rstrip("/"),
        api_key=api_key,
        audiosocket_host=audiosocket_host,
        audiosocket_port=audiosocket_port,
        assistant_id=assistant_id,
    )


SAMPLE_VALUES = dict(
    rapida_url="http://rapida.example.com:8080",
    api_key="rpd-CHANGE-ME",
    audiosocket_host="rapida.example.com",
    audiosocket_port=4573,
)


# Interfaces that mean "every address of this machine": the dialplan then names the machine.
_WILDCARDS = frozenset({"", "0.0.0.0", "::", "0:0:0:0:0:0:0:0"})


def this_host() -> str:
    """This machine's address as other machines may reach it: its hostname's address when
    that is not a loopback one, else the hostname, else ``127.0.0.1``."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        return "127.0.0.1"
    return address if not address.startswith("127.") else name


def listener_host(endpoint: str) -> str:
    """Where Asterisk reaches the listener ``endpoint``: its ``interface=`` when it is bound to
    one address (``127.0.0.1``, ``10.0.0.5``, ``[::1]``), else this machine."""
    interface = endpoint_interface(endpoint)
    if interface in _WILDCARDS:
        return this_host()
    return f"[{interface}]" if ":" in interface else interface


def _port_text(endpoint: str) -> str:
    try:
        port = endpoint_port(endpoint)
    except ValueError:
        port = None
    return "?" if port is None else str(port)


def startup_dialplan(settings: Settings) -> str:
    """The dialplan printed at start-up: this node's URL, AudioSocket address and first key.

    ``public_url`` (how Asterisk reaches the node) wins; otherwise each address is the one its
    listener is bound to, so a node on ``127.0.0.1`` prints ``127.0.0.1``, not a hostname that
    resolves elsewhere.
    """
    if settings.public_url:
        url = settings.public_url
        host = urlsplit(url).hostname or this_host()
        audiosocket_host = f"[{host}]" if ":" in host else host
    else:
        scheme, endpoint = ("http", settings.http) if settings.http else ("https", settings.https)
        url = f"{scheme}://{listener_host(endpoint)}:{_port_text(endpoint)}"
        audiosocket_host = listener_host(settings.audiosocket)
    return audiosocket_dialplan(
        rapida_url=url,
        api_key=settings.api_keys[0],
        audiosocket_host=audiosocket_host,
        audiosocket_port=_port_text(settings.audiosocket),
    )
