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


def test_every_package_is_listed_in_setup_cfg() -> None:
    """``packages`` is an explicit list: a package left out of it is missing from an install."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "setup.cfg").read_text()
    listed = set(text.split("packages =", 1)[1].split("install_requires", 1)[0].split())
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for init in root.glob("rapida_tap/**/__init__.py")
    }
    assert found - listed == set()
