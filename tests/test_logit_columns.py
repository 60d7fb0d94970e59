"""`logit_columns`: a forward that computes the logits of some fed columns only (the LM head,
and the last layer's residual and MLP, there) gives those columns' logits of the full forward,
and leaves the same keys and values in the cache, for every family, in float64."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_models import FAMILY_RAW, left_padded_batch, tiny_family_model, tiny_family_raw
from workers.kv_cache import KVCache


@pytest.mark.parametrize("family", sorted(FAMILY_RAW))
@pytest.mark.parametrize("cached", [False, True])
def test_logit_columns_equal_the_full_forward_there(family, cached):
    model = tiny_family_model(family, seed=3)
    ids, positions, key_mask = left_padded_batch(tiny_family_raw(family), [13, 9, 11], seed=4)
    columns = slice(5, 10)

    def forward(**kw):
        cache = None
        if cached:
            cache = KVCache(model.config, "cpu", torch.float64)
            cache.reserve(ids.shape[0], ids.shape[1])
        with torch.no_grad():
            return model(ids, positions, key_mask, cache=cache, **kw), cache

    full, full_cache = forward()
    some, some_cache = forward(logit_columns=columns)
    assert some.shape == (3, 5, full.shape[-1])
    torch.testing.assert_close(some, full[:, columns], rtol=0, atol=1e-12)
    assert torch.equal(some.argmax(-1), full[:, columns].argmax(-1))
    if cached:  # every column's keys and values, not only the logit columns'
        assert torch.equal(some_cache.k, full_cache.k) and torch.equal(some_cache.v, full_cache.v)
