"""docs/configuration.md is generated from the models and current."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "hack" / "gen_config_reference.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_reference_names_every_section():
    text = (ROOT / "docs" / "configuration.md").read_text()
    for section in ("## preflight", "## health", "## teams", "## capacity", "## relay", "## netacct", "## runtime"):
        assert section in text
    assert "`webhook.cert_dir`" in text and "`gangs.webhook_cert_dir`" in text
