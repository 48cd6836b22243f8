"""Shared fixtures. `tests/` is on sys.path so test modules can import `helpers`."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))


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
