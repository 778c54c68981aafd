"""Where the captured Asterisk wire data lives (``/work/shared/fixtures`` beside the checkout)."""

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
