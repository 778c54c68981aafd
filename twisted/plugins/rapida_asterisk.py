from twisted.application.service import ServiceMaker

rapida_asterisk = ServiceMaker(
    "rapida-asterisk",
    "rapida_tap.tap",
    "Connect Asterisk calls (AudioSocket, chan_websocket, ARI) to voice-AI assistants",
    "rapida-asterisk",
)
