"""`trainer analyze RUN_DIR --eval SET`: attention-based progress measures and head ablations per checkpoint.

For every checkpoint of a run (or `--steps`), on the first `--max-seqs` sequences of one eval set, per
layer and head (details and references: docs/analysis.md):

- **induction score**: the attention of the query token to the label tokens that follow an exemplar of
  the query's class (`y_j` at position 2j+1 where `example_j == example_query`), minus the share those
  tokens would get under uniform causal attention (`n_match / T`, T = 2L-1 tokens), averaged over the
  sequences that hold the query's class in their context. 0: no preference; up to 1 - n_match / T: all
  of the query's attention on those labels: the attention pattern of the induction head in this task
  (Reddy 2023; Singh et al. 2024), per head and corrected for uniform attention.
- **previous-token score**: each support label token's attention to the exemplar token just before it
  (`y_j -> x_j`), minus the uniform share `1 / (2j + 2)`, averaged over label tokens and sequences: the
  first half of the two-layer induction circuit (the label token takes in the content of its exemplar).
- **head ablations** (at `--ablate-steps`): the accuracies (accuracy_closed = ICL on fewshot_holdout, and
  accuracy_query) with one head's output replaced before the output projection, by 0 (`zero`) or by
  its mean output over the same eval sequences at each position (`mean`), one head at a time.
- **joint ablation** (at the same steps, `--joint-top K`, default 2): the K heads with the highest
  previous-token scores at that checkpoint ablated together, in each mode, for a circuit whose
  previous-token role is split over several heads (one head's ablation then understates it).

Raw masses and uniform shares are stored beside the scores. Records go to `RUN_DIR/analysis.jsonl` (one
line per (checkpoint, set); re-analysing replaces the lines of the same step and set), plots to
`RUN_DIR/plots/{induction,prev_token,ablation}.png` beside the run's ICL / IWL curves.

Speed: the ResNet embeds each eval sequence once per checkpoint; the ablations rerun only the transformer
on the stored tokens (one jitted function, the head mask an input, so no recompilation per head).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from seqgen.atomic import atomic_write_text
from seqgen.config import BuildConfig
from trainer import checkpoint
from trainer.data import eval_batches
from trainer.images import examples_for
from trainer.metrics import per_sequence_metrics
from trainer.models import targets
from trainer.models.config import SeqModel
from trainer.analyze.inspect import inspect
from trainer.analyze.records import ANALYSIS_FILE, read_analysis
from trainer.run import RunDir, RunError

ABLATIONS = ("zero", "mean")


# ---- the scores (pure functions: tested on hand-built attention patterns) --------------------------
def score_sums(attention: jax.Array, example: jax.Array, valid: jax.Array) -> dict[str, jax.Array]:
    """Sums over the valid sequences of a batch, for `summarize_scores`.

    `attention` [B, layers, heads, T, T] (rows: attending token), T = 2L-1 interleaved tokens
    `x_0, y_0, ..., x_{L-1}`; `example` [B, L] class ids; `valid` [B] 0/1.
    """
    b, length = example.shape
    t = 2 * length - 1
    if attention.shape[-1] != t:
        raise ValueError(f"attention covers {attention.shape[-1]} tokens, expected 2L-1 = {t}")
    valid = jnp.asarray(valid, jnp.float32)
    label_pos = 2 * jnp.arange(length - 1) + 1  # y_j
    match = (example[:, :-1] == example[:, -1:]).astype(jnp.float32)  # [B, L-1]
    n_match = match.sum(-1)
    has = valid * (n_match > 0)
    to_labels = attention[:, :, :, t - 1, :][..., label_pos]  # [B, layers, heads, L-1]
    mass = jnp.sum(to_labels * match[:, None, None, :], axis=-1)  # [B, layers, heads]
    prev = attention[:, :, :, label_pos, label_pos - 1]  # [B, layers, heads, L-1]: y_j -> x_j
    prev_uniform = 1.0 / (label_pos + 1).astype(jnp.float32)
    return {
        "induction_mass": jnp.einsum("b,blh->lh", has, mass),
        "induction_uniform": jnp.sum(has * n_match / t),
        "induction_n": jnp.sum(has),
        "prev_mass": jnp.einsum("b,blhj->lh", valid, prev),
        "prev_uniform": jnp.sum(valid) * jnp.sum(prev_uniform),
        "prev_n": jnp.sum(valid) * (length - 1),
    }


def summarize_scores(sums: dict[str, np.ndarray]) -> dict[str, Any]:
    """Means and scores (mass minus the uniform share) from accumulated `score_sums`; None where undefined."""
    out: dict[str, Any] = {}
    n = float(sums["induction_n"])
    if n > 0:
        mass, uniform = np.asarray(sums["induction_mass"]) / n, float(sums["induction_uniform"]) / n
        out.update(induction=(mass - uniform).tolist(), induction_mass=mass.tolist(), induction_uniform=uniform)
    else:  # e.g. no_support sets: the query's class is never in the context
        out.update(induction=None, induction_mass=None, induction_uniform=None)
    out["induction_n"] = int(n)
    m = float(sums["prev_n"])
    if m > 0:
        mass, uniform = np.asarray(sums["prev_mass"]) / m, float(sums["prev_uniform"]) / m
        out.update(prev_token=(mass - uniform).tolist(), prev_token_mass=mass.tolist(), prev_token_uniform=uniform)
    else:
        out.update(prev_token=None, prev_token_mass=None, prev_token_uniform=None)
    return out


def head_mask(num_layers: int, num_heads: int, *heads: tuple[int, int]) -> jax.Array:
    """keep [layers, heads]: 1 everywhere but at each (layer, head) of `heads`, which is 0 (none: nothing
    ablated; several: a joint ablation)."""
    keep = np.ones((num_layers, num_heads), np.float32)
    for layer, head in heads:
        keep[layer, head] = 0.0
    return jnp.asarray(keep)


def top_heads(grid: Any, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of the highest scores of a [layers][heads] grid, highest first (ties: the
    earlier layer, then head)."""
    a = np.asarray(grid, float)
    order = np.argsort(-a, axis=None, kind="stable")[:k]
    return [tuple(int(i) for i in np.unravel_index(j, a.shape)) for j in order]


# ---- the model passes -----------------------------------------------------------------------------
def check_model(cfg: Any) -> None:
    m = cfg.model
    if m.seq_model is not SeqModel.TRANSFORMER or m.concatenate_labels:
        raise RunError("trainer analyze needs a transformer with interleaved label tokens "
                       "(seq_model = transformer, concatenate_labels = false)")


def tokens_of(model: Any, bn_state: Any, examples: jax.Array, labels: jax.Array) -> jax.Array:
    """The transformer's input tokens [B, 2L-1, D] at inference (the embedder of `forward`)."""
    model = eqx.nn.inference_mode(model)
    b, length = labels.shape
    h, _ = model.embedder.encode_examples(examples.reshape(b * length, *examples.shape[2:]), bn_state)
    h = h.reshape(b, length, -1)
    return jax.vmap(lambda hh, ll: model.embedder.tokens(hh, ll, example_key=None, pos_key=None))(h, labels)


class Passes:
    """The jitted passes for one eval set (its BuildConfig is static) and the run's label sets."""

    def __init__(self, set_cfg: BuildConfig, label_sets: Any, train_cfg: Any):
        seq_type, model_cfg = set_cfg.seq_type, train_cfg.model
        make_examples = examples_for(train_cfg)  # inputs as the run made them (trainer.images)

        def metrics(logits, labels, valid):
            per = per_sequence_metrics(logits, targets(labels, model_cfg), label_sets, seq_type)
            return {k: jnp.sum(per[k] * valid) for k in ("accuracy_closed", "accuracy_query")}

        @eqx.filter_jit
        def collect(table, model, bn_state, batch):
            tokens = tokens_of(model, bn_state, make_examples(table, batch, set_cfg), batch["label"])
            model = eqx.nn.inference_mode(model)
            logits, inner = jax.vmap(lambda x: inspect(model.seq_model, x, collect=True))(tokens)
            valid = batch["valid"].astype(jnp.float32)
            heads_sum = jnp.einsum("b,blthk->lthk", valid, inner["heads"])
            return (tokens, score_sums(inner["attention"], batch["example"], valid), heads_sum,
                    metrics(logits, batch["label"], valid))

        @eqx.filter_jit
        def ablated(model, tokens, labels, valid, keep, replace):
            model = eqx.nn.inference_mode(model)
            logits = jax.vmap(lambda x: inspect(model.seq_model, x, query_only=True, keep=keep, replace=replace))(tokens)
            return metrics(logits, labels, valid)

        self.collect, self.ablated = collect, ablated


def analyze_checkpoint(passes: Passes, table: Any, model: Any, bn_state: Any, shard_set: Any, *, max_seqs: int,
                       batch_size: int, ablations: Sequence[str], joint_top: int = 2) -> dict[str, Any]:
    """One checkpoint on one eval set: scores, baseline accuracies and (if `ablations`) per-head ablations
    and the joint ablation of the `joint_top` heads with the highest previous-token scores (0: none)."""
    n_layers = model.seq_model.num_layers
    n_heads = model.seq_model.blocks.num_heads
    stored, sums, heads_sum, acc = [], None, None, None
    for batch in eval_batches(shard_set, batch_size, max_seqs):
        batch = {k: jnp.asarray(v) for k, v in batch.items() if k in ("example", "exemplar", "label", "is_rare",
                                                                      "noise_seed", "valid")}
        tokens, s, h, a = passes.collect(table, model, bn_state, batch)
        sums = s if sums is None else jax.tree_util.tree_map(jnp.add, sums, s)
        heads_sum = h if heads_sum is None else heads_sum + h
        acc = a if acc is None else jax.tree_util.tree_map(jnp.add, acc, a)
        stored.append((tokens, batch["label"], batch["valid"].astype(jnp.float32)))
    n = int(sum(float(jnp.sum(v)) for _, _, v in stored))
    record: dict[str, Any] = {"n": n, "num_layers": n_layers, "num_heads": n_heads,
                              **summarize_scores(jax.device_get(sums))}
    record.update({k: float(v) / n for k, v in jax.device_get(acc).items()})
    if ablations:
        mean_heads = heads_sum / n
        all_tokens, all_labels, all_valid = (jnp.concatenate([s[i] for s in stored]) for i in range(3))
        joint = top_heads(record["prev_token"], joint_top) if joint_top and record["prev_token"] else []

        def accuracies(replace, *heads):
            out = passes.ablated(model, all_tokens, all_labels, all_valid, head_mask(n_layers, n_heads, *heads),
                                 replace)
            return {k: float(v) / n for k, v in jax.device_get(out).items()}

        record["ablation"] = {}
        if joint:
            record["joint_ablation"] = {"heads": [list(h) for h in joint], "by": "prev_token"}
        for mode in ablations:
            replace = mean_heads if mode == "mean" else jnp.zeros_like(mean_heads)
            grid = {k: np.zeros((n_layers, n_heads)) for k in ("accuracy_closed", "accuracy_query")}
            for layer in range(n_layers):
                for head in range(n_heads):
                    for k, v in accuracies(replace, (layer, head)).items():
                        grid[k][layer, head] = v
            record["ablation"][mode] = {k: v.tolist() for k, v in grid.items()}
            if joint:
                record["joint_ablation"][mode] = accuracies(replace, *joint)
    return record


# ---- the command ----------------------------------------------------------------------------------
def _parse_steps(text: str | None, available: list[int], what: str) -> list[int]:
    if text is None or text == "all":
        return list(available)
    if text == "last":
        return available[-1:]
    if text == "none":
        return []
    try:
        steps = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        raise RunError(f"{what} must be comma-separated step numbers, 'all', 'last' or 'none', got {text!r}") from None
    missing = [s for s in steps if s not in available]
    if missing:
        raise RunError(f"{what}: no checkpoint at step(s) {missing} (available: {available or 'none'}); "
                       "pick listed steps, or train with a checkpoint schedule that keeps them")
    return steps


def _write_records(run: RunDir, records: list[dict[str, Any]]) -> Path:
    path = run.path / ANALYSIS_FILE
    new = {(r["step"], r["set"]) for r in records}
    # read checked: a corrupt line is refused (naming it), never dropped from the rewrite
    kept = [r for r in read_analysis(run.path) if (r.get("step"), r.get("set")) not in new]
    rows = sorted(kept + records, key=lambda r: (r["set"], r["step"]))
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return path


def analyze_run(run_dir: Any, eval_dir: Any, *, train_dir: Any = None, steps: str | None = None,
                ablate_steps: str | None = "last", ablation: str = "both", joint_top: int = 2, max_seqs: int = 512,
                batch_size: int = 128, omniglot_dir: Any = None, cache_dir: Any = "data/cache",
                echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    from trainer.runtime.distributed import make_topology
    from trainer.data import EvalSpec, open_sets
    from trainer.evaluate import set_name
    from trainer.images import device_table
    from trainer.state import restore
    from trainer.step import StepContext

    run = RunDir(run_dir)
    cfg = run.train_config()
    check_model(cfg)
    if max_seqs < 1 or batch_size < 1:
        raise RunError("--max-seqs and --batch-size must be >= 1")
    heads = cfg.model.num_layers * cfg.model.num_heads
    if not 0 <= joint_top <= heads:
        raise RunError(f"--joint-top must be between 0 and the model's {heads} heads, got {joint_top}")
    available = checkpoint.list_steps(run.path)
    if not available:
        raise RunError(f"{run.path} has no complete checkpoint yet; train with `trainer fit` first")
    todo = _parse_steps(steps, available, "--steps")
    ablate = set(_parse_steps(ablate_steps, todo, "--ablate-steps"))
    modes = ABLATIONS if ablation == "both" else (ablation,)
    topo = make_topology(1)
    # analysis may look at any set, the training set included (it reports no headline number)
    train, (shard_set,) = open_sets(run.train_path(train_dir), [EvalSpec(Path(eval_dir), also_train=True)],
                                    train_role=False)
    table = device_table(train, cfg.training.image_size, topo, omniglot_dir, cache_dir)
    passes = Passes(shard_set.config, StepContext.create(cfg, train.config).label_sets, cfg)
    records = []
    for step in todo:
        state = restore(run.path, step, cfg, train.num_labels, topo)
        rec = analyze_checkpoint(passes, table, state.model, state.bn_state, shard_set, max_seqs=max_seqs,
                                 batch_size=batch_size, ablations=modes if step in ablate else (), joint_top=joint_top)
        rec = {"step": step, "set": set_name(shard_set), "seq_type": shard_set.config.seq_type.value, **rec}
        records.append(rec)
        _write_records(run, records)  # after every checkpoint: an interrupted analysis keeps what it did
        best = _best_head(rec.get("induction"))
        echo(f"step {step}: accuracy_closed {rec['accuracy_closed']:.3f}"
             + (f", top induction head L{best[0]}H{best[1]} {best[2]:+.3f}" if best else "")
             + (f", ablations {', '.join(modes)}" if step in ablate else ""))
    return records


def _best_head(grid: Any) -> tuple[int, int, float] | None:
    if not grid:
        return None
    a = np.asarray(grid)
    layer, head = np.unravel_index(int(np.argmax(a)), a.shape)
    return int(layer), int(head), float(a[layer, head])


__all__ = ["Passes", "analyze_checkpoint", "analyze_run", "head_mask", "score_sums", "summarize_scores",
           "tokens_of", "top_heads"]
