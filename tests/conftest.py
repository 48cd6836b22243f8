"""Shared fixtures. `tests/` is on sys.path so test modules can import `helpers`."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# Under pytest-xdist each worker gets an equal share of the cores for torch's intra-op threads, so that two workers
# on a 2-core machine do not each start two threads and slow each other down.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="module")
def one_thread():
    """Modules of many small forwards use one intra-op thread: on a busy 2-core machine it is much faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model():
    """The default model (`load_model()`: the shipped tiny model) on the torch backend."""
    from superlinear_lab.model import load_model

    return load_model("tiny", backend="torch")


@pytest.fixture
def planted_statements(monkeypatch):
    """The statements (needle texts) of the last row the data builder built: a spy on `data._Builder.build`,
    filled in place each time a row is built while the test runs."""
    from superlinear_lab import data as D

    planted: list[str] = []
    build = D._Builder.build

    def spy(self, *args, **kwargs):
        planted[:] = [n[1] for n in self.needles]
        return build(self, *args, **kwargs)

    monkeypatch.setattr(D._Builder, "build", spy)
    return planted
