"""Which assistant serves which assistant id."""

from __future__ import annotations

from rapida_tap.interfaces import IAssistant


class AssistantRegistry:
    """Maps assistant ids to assistants, with an optional default for ids not listed.

    With no default, an unlisted id is unknown: registration answers 404 for it.
    """

    def __init__(
        self, assistants: dict[str, IAssistant] | None = None, default: IAssistant | None = None
    ) -> None:
        self._by_id = dict(assistants or {})
        self.default = default

    def lookup(self, assistant_id: str) -> IAssistant | None:
        return self._by_id.get(assistant_id, self.default)

    def __contains__(self, assistant_id: str) -> bool:
        return self.lookup(assistant_id) is not None
