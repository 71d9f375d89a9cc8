"""Shared test set-up."""

import os
from pathlib import Path

import pytest

#: the checkout under test
CHECKOUT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _children_import_this_checkout():
    """Child processes (benchmark()'s `sys.executable` workers, DDP ranks, resume workers)
    import this checkout's lobster_fx, not another installed copy."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(CHECKOUT), os.environ.get("PYTHONPATH")) if p))
        yield


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread (several, on a busy machine, spin-wait for many times the
    work). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
