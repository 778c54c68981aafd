"""What happened on every call: quality reports, signed webhooks, recordings (docs/events.md)."""
