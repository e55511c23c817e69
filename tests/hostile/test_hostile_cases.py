"""Each case of issue 11's hostile-store list, as its own test.

All cases run in one worker subprocess (torch starts once) under a 2 GiB address-space
limit, each under a 30 s hang guard; each test below asserts its own case's outcome.
The cases themselves, with what they assert, are in ``cases.py``.
"""

from __future__ import annotations

import pytest
from cases import CASES
from hostile_run import run_workers


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-cases")
    (result,) = run_workers([["cases"]], tmp, timeout=300)
    return result["cases"]


@pytest.mark.parametrize("name", list(CASES))
def test_case(outcomes, name):
    got = outcomes[name]
    assert got["ok"], f"case {name} failed in the worker:\n{got['error']}"
