"""The installed package is what twistd finds: `pip install .` must ship the plugin."""

import os
import subprocess
import sys
from pathlib import Path


def test_twistd_lists_the_installed_plugin(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "--help"],
        cwd=tmp_path,  # not the checkout: only the installed copy can be found
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "rapida-asterisk" in out.stdout, out.stdout + out.stderr


def test_plugin_directory_has_no_init() -> None:
    root = Path(__file__).resolve().parents[1]
    assert not (root / "twisted" / "__init__.py").exists()
    assert not (root / "twisted" / "plugins" / "__init__.py").exists()
