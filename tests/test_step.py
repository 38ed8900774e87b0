"""The train step's query-only output layer gives the original's loss, metrics and gradients."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from seqgen.config import BuildConfig, SeqType
from tests.trainkit import DATASET, SPLIT, tiny_config
from trainer.metrics import per_sequence_metrics
from trainer.models import ModelConfig, SeqModel, forward, make_model, targets
from trainer.step import StepContext, _loss_and_metrics


@pytest.mark.parametrize("seq_model", [SeqModel.TRANSFORMER, SeqModel.LSTM])
@pytest.mark.parametrize("seq_type", [SeqType.BURSTY, SeqType.FEWSHOT_HOLDOUT, SeqType.NO_SUPPORT_ZIPFIAN])
def test_query_only_matches_full_logits(seq_model, seq_type):
    cfg = tiny_config()
    cfg = type(cfg)(model=ModelConfig(**{**cfg.model.__dict__, "seq_model": seq_model}),
                    optimizer=cfg.optimizer, training=cfg.training)
    data_cfg = BuildConfig(seq_type=seq_type, dataset=DATASET, split=SPLIT)
    ctx = StepContext.create(cfg, data_cfg)
    model, state = make_model(cfg.model, 40, key=jr.PRNGKey(0))
    examples = jr.randint(jr.PRNGKey(1), (6, 9), 0, 40)
    labels = jr.randint(jr.PRNGKey(2), (6, 9), 0, 40)

    def full(m):
        logits, _ = forward(m, state, examples, labels, key=None, inference=False)
        per = per_sequence_metrics(logits, targets(labels, cfg.model), ctx.label_sets, seq_type, 0.0)
        return jnp.mean(per["loss"]), per

    def fast(m):
        per, _ = _loss_and_metrics(m, state, examples, labels, None, ctx, seq_type, False)
        return jnp.mean(per["loss"]), per

    (la, pa), ga = eqx.filter_value_and_grad(full, has_aux=True)(model)
    (lb, pb), gb = eqx.filter_value_and_grad(fast, has_aux=True)(model)
    assert float(la) == pytest.approx(float(lb), rel=1e-6)
    for name in pa:
        np.testing.assert_allclose(np.asarray(pa[name]), np.asarray(pb[name]), rtol=1e-5, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    logits, _ = forward(model, state, examples, labels, key=None, inference=True)
    query, _ = forward(model, state, examples, labels, key=None, inference=True, query_only=True)
    assert query.shape == (6, 1, 40)
    np.testing.assert_allclose(np.asarray(query), np.asarray(logits[:, -1:]), rtol=1e-5, atol=1e-6)
