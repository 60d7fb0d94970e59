"""Shared fixtures: tiny LLaDA configs and randomly initialised models.

The models are random on purpose: with the default init (norm weights all ones, small linear
weights) several bugs -- an ignored norm weight, a swapped gate/up projection -- would not change
the output enough to notice. Drawing every parameter with a sizeable std makes them show.
"""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import random_model, tiny_raw_config

# The test tensors are tiny: one intra-op thread avoids OpenMP hand-off costs that, on a busy
# 2-core machine, made a 4x9-token forward take ~0.25 s instead of ~1 ms.
torch.set_num_threads(1)


@pytest.fixture
def raw_config():
    """Factory fixture: `raw_config(**overrides)` -> a tiny raw config dict."""
    return tiny_raw_config


@pytest.fixture
def make_model():
    """Factory fixture: `make_model(raw, seed=0, std=0.3, dtype=torch.float64)` -> random model."""
    return random_model
