"""Where the real Asterisk captures live: ``tests/fixtures/`` (see its README.md).

They are part of the repository, so a clone anywhere runs its tests with nothing beside it.
"""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
