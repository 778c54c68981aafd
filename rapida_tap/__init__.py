"""rapida-asterisk: a Twisted daemon joining Asterisk calls to voice-AI assistants."""

__version__ = "0.1.0"
