"""Where the real Asterisk captures live: ``shared/fixtures`` beside the checkout.

``RAPIDA_FIXTURES`` overrides the location.
"""

import os
from pathlib import Path

FIXTURES = Path(
    os.environ.get("RAPIDA_FIXTURES") or Path(__file__).resolve().parents[2] / "shared" / "fixtures"
)
