"""Where the real Asterisk captures live: /work/shared/fixtures next to the main checkout."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
