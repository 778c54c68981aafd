"""The AudioSocket dialplan, as shipped in ``etc/`` and printed at start-up for this host.

Correct for real Asterisk (see protocols.md): the key travels in a header, the caller id is
URI-encoded, CURL() has timeouts and failure codes, and the context id is checked by length.
"""

from __future__ import annotations

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
 same => n,AudioSocket(${{CTX}},${{RAPIDA_AS_HOST}}:${{RAPIDA_PORT}})
 same => n,Hangup()
 same => n(error),Playback(an-error-has-occurred)
 same => n,Hangup()
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
