"""Test-wide setup: library functions log and only the command line prints (common/cli.py), so the tests
install the command line's console handler once and read a library function's lines from stdout/stderr,
as a user of the command would see them."""

import pytest

from common.cli import console


@pytest.fixture(autouse=True, scope="session")
def fedpd_console():
    handler = console()
    yield handler
