"""Test-wide setup.

Console: library functions log and only the command line prints (common/cli.py), so the tests install the
command line's console handler once and read a library function's lines from stdout/stderr, as a user of
the command would see them.

Scheduling (``make test`` runs two pytest-xdist workers; the scheduler below): the tests that start real
Flower processes are two groups that each run on one worker, one test at a time, and start first: the
loopback deployments (SuperLink + SuperNodes) and the simulations (Flower's simulation runtime, and the
centralized negative control). They are latency-bound (Flower polls every few seconds), so the other worker
runs the rest meanwhile; two deployments at once on two cores starved each other (BENCHMARKS.md). Every
other test file is a group of its own, so its module fixtures are built once.
"""

import pytest

from common.cli import console

HEAVY = {
    "deployments": ("test_faults.py", "test_deploy.py", "test_bad_site.py"),
    "simulations": ("test_federated.py", "test_controls.py", "test_safety_run.py", "test_strategy_runs.py"),
}
_FIRST = {group: rank for rank, group in enumerate(HEAVY)}


def _group_of_file(name: str) -> str | None:
    return next((group for group, files in HEAVY.items() if name in files), None)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _FIRST.get(_group_of_file(item.path.name), len(_FIRST)))  # stable: file order kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's file scheduling, with each HEAVY group of files as one unit (xdist_group marks do not reach
    pytest 9's node ids, so --dist loadgroup cannot do this)."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return _group_of_file(path.rsplit("/", 1)[-1]) or path

    return GroupScheduling(config, log)


@pytest.fixture(autouse=True, scope="session")
def fedpd_console():
    handler = console()
    yield handler
