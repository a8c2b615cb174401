"""The committed fixtures are what tests/fixtures/make_tiny_models.py makes: regenerated into a
temporary folder, every file equals the committed one byte for byte.

It needs torch and transformers (pinned in the script's docstring), which the test suite itself
does not: without them this test is skipped, saying so. Run it by hand with the fixture venv:

    /tmp/fixtures-venv/bin/python tests/fixtures/make_tiny_models.py --check
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import FIXTURES

SCRIPT = FIXTURES / "make_tiny_models.py"


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None,
    reason="torch and transformers are not installed here (an optional peer: the fixture script "
           "needs them, the tests do not); run tests/fixtures/make_tiny_models.py --check in a "
           "venv with torch==2.13.0 transformers==5.24.0")
def test_fixture_script_reproduces_the_committed_fixtures():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                            text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "byte-identical" in result.stdout
