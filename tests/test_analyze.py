"""trainer analyze: scores on hand-built attention patterns, the transformer's optional attention outputs
and head ablation, and one end-to-end analysis of a tiny run (JSONL, plots, one-line errors)."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from click.testing import CliRunner

from seqgen.config import SeqType
from tests.trainkit import symbolic_set, tiny_config
from trainer.analyze.inspect import inspect
from trainer.analyze.measures import analyze_run, head_mask, score_sums, summarize_scores, top_heads
from trainer.analyze.records import analysis_values
from trainer.analyze.records import ANALYSIS_FILE, read_analysis
from trainer.analyze.plots import plot_analysis
from trainer.run import RunError
from trainer.cli import main
from trainer.fit import fit
from trainer.models import kernels
from trainer.models.kernels import gelu
from trainer.models.transformer import Transformer


# ---- scores on hand-built attention ------------------------------------------------------------
def _uniform_causal(t):
    a = np.tril(np.ones((t, t)))
    return a / a.sum(-1, keepdims=True)


def test_scores_on_a_hand_built_pattern():
    # L = 3 examples -> T = 5 tokens x0 y0 x1 y1 xq; one layer, two heads; three sequences
    t = 5
    att = np.zeros((3, 1, 2, t, t))
    att[:, 0, 1] = _uniform_causal(t)  # head 1: uniform causal attention -> both scores exactly 0
    head0 = _uniform_causal(t).copy()
    head0[4] = [0.0, 0.6, 0.4, 0.0, 0.0]  # query: 0.6 on y0, 0.4 on x1
    head0[1] = [1.0, 0.0, 0, 0, 0]  # y0 -> x0 entirely
    head0[3] = [0.0, 0.0, 0.5, 0.5, 0]  # y1 -> x1 half
    att[:, 0, 0] = head0
    example = np.array([[7, 9, 7],  # query class 7 = x0: y0 is the label that follows it
                        [7, 9, 5],  # no match: this row is left out of the induction score
                        [7, 7, 7]])  # padding row (invalid): ignored
    valid = np.array([1.0, 1.0, 0.0])
    out = summarize_scores(jax.device_get(score_sums(jnp.asarray(att), jnp.asarray(example), jnp.asarray(valid))))
    assert out["induction_n"] == 1
    np.testing.assert_allclose(out["induction_mass"], [[0.6, np.mean([0.2, 0.2])]], atol=1e-6)
    assert out["induction_uniform"] == pytest.approx(1 / 5)
    np.testing.assert_allclose(out["induction"], [[0.6 - 0.2, 0.0]], atol=1e-6)
    # previous token: head 0 gives y0 -> x0 1.0 and y1 -> x1 0.5 (mean 0.75); uniform shares 1/2 and 1/4
    assert out["prev_token_uniform"] == pytest.approx(0.375)
    np.testing.assert_allclose(out["prev_token_mass"], [[0.75, 0.375]], atol=1e-6)
    np.testing.assert_allclose(out["prev_token"], [[0.375, 0.0]], atol=1e-6)
    # two matches: the mass on both label tokens counts, against a uniform share of 2 / T
    ex2 = np.array([[7, 7, 7]])
    two = summarize_scores(jax.device_get(score_sums(jnp.asarray(att[:1]), jnp.asarray(ex2), jnp.ones(1))))
    np.testing.assert_allclose(two["induction"], [[0.6 - 0.4, 0.4 - 0.4]], atol=1e-6)
    none = summarize_scores(jax.device_get(score_sums(jnp.asarray(att[1:2]), jnp.asarray(example[1:2]), jnp.ones(1))))
    assert none["induction"] is None and none["prev_token"] is not None


# ---- the transformer's analysis path ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tower():
    return eqx.nn.inference_mode(Transformer(16, 7, 2, 4, key=jr.PRNGKey(3)))


def _block(tower, i):
    return jax.tree_util.tree_map(lambda a: a[i] if eqx.is_array(a) else a, tower.blocks)


def test_inspect_returns_the_plain_logits_and_causal_attention(tower):
    x = jr.normal(jr.PRNGKey(1), (9, 16))
    plain = tower(x, key=None)
    logits, inner = inspect(tower, x, collect=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(plain), rtol=1e-5, atol=1e-6)
    att = np.asarray(inner["attention"])
    assert att.shape == (2, 4, 9, 9) and inner["heads"].shape == (2, 9, 4, 4)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(att, k=1) == 0)
    q_only = tower(x, key=None, query_only=True)
    nothing = inspect(tower, x, query_only=True, keep=head_mask(2, 4), replace=jnp.zeros((2, 9, 4, 4)))
    np.testing.assert_allclose(np.asarray(nothing), np.asarray(q_only), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="query_only"):
        inspect(tower, x, query_only=True, collect=True)
    with pytest.raises(ValueError, match="both keep"):
        inspect(tower, x, keep=head_mask(2, 4))


def test_the_plain_forward_has_no_analysis_modes(tower):
    """The model computes logits only: analysis flags are not parameters of the tower or its blocks."""
    import inspect as pyinspect
    for fn in (type(tower).__call__, type(_block(tower, 0)).__call__):
        assert set(pyinspect.signature(fn).parameters) <= {"self", "x", "key", "query_only", "last_only"}


def test_ablating_a_head_changes_exactly_that_heads_contribution(tower):
    x = jr.normal(jr.PRNGKey(2), (9, 16))
    block = _block(tower, 0)
    heads = kernels.causal_attention(*block.project(x))
    # by hand: the attention output with head 2's 4 dimensions zeroed, then the rest of the block
    cut = np.asarray(heads).copy()
    cut[:, 2] = 0.0
    h = x + block.attn_out(jnp.asarray(cut).reshape(9, 16))
    want = h + block.mlp_out(gelu(block.mlp_in(block.ln_mlp(h))))
    np.testing.assert_allclose(np.asarray(block.finish(x, jnp.asarray(cut), key=None)), np.asarray(want),
                               rtol=1e-5, atol=1e-6)
    # in the whole tower: ablating layer 0's head 2 is that block output, then layer 1 as usual
    zeros = jnp.zeros((2, 9, 4, 4))
    got, b = inspect(tower, x, collect=True, keep=head_mask(2, 4, (0, 2)), replace=zeros)
    after = _block(tower, 1)(want, key=None)
    np.testing.assert_allclose(np.asarray(got), np.asarray(tower.head(tower.final_ln(after))), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(b["heads"][0])[:, [0, 1, 3]], np.asarray(heads)[:, [0, 1, 3]])
    assert np.all(np.asarray(b["heads"][0])[:, 2] == 0)
    # replacing every head by its own output changes nothing
    _, a = inspect(tower, x, collect=True)
    same = inspect(tower, x, keep=jnp.zeros((2, 4)), replace=a["heads"])
    np.testing.assert_allclose(np.asarray(same), np.asarray(tower(x, key=None)), rtol=1e-5, atol=1e-6)
    # ablating a layer-1 head leaves layer 0's attention as it was
    logits_b, b = inspect(tower, x, collect=True, keep=head_mask(2, 4, (1, 3)), replace=zeros)
    np.testing.assert_allclose(np.asarray(b["attention"][0]), np.asarray(a["attention"][0]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(b["heads"][1][:, :3]), np.asarray(a["heads"][1][:, :3]), rtol=1e-6)
    assert not np.allclose(np.asarray(logits_b), np.asarray(tower(x, key=None)))


def test_a_joint_ablation_removes_all_its_heads_at_once(tower):
    x = jr.normal(jr.PRNGKey(4), (9, 16))
    # all four heads of layer 1 zeroed together: layer 1's attention adds only its output bias
    h0 = _block(tower, 0)(x, key=None)
    want = _block(tower, 1).finish(h0, jnp.zeros((9, 4, 4)), key=None)
    every = head_mask(2, 4, (1, 0), (1, 1), (1, 2), (1, 3))
    assert np.asarray(every).tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]
    got = inspect(tower, x, keep=every, replace=jnp.zeros((2, 9, 4, 4)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(tower.head(tower.final_ln(want))), rtol=1e-5, atol=1e-5)
    # two heads jointly is not either one alone
    zeros = jnp.zeros((2, 9, 4, 4))
    pair = inspect(tower, x, keep=head_mask(2, 4, (0, 1), (1, 2)), replace=zeros)
    for one in ((0, 1), (1, 2)):
        assert not np.allclose(np.asarray(pair), np.asarray(inspect(tower, x, keep=head_mask(2, 4, one), replace=zeros)))


def test_top_heads_orders_by_score():
    grid = [[0.1, 0.7, 0.2], [0.7, -1.0, 0.3]]
    assert top_heads(grid, 2) == [(0, 1), (1, 0)]  # a tie: the earlier layer first
    assert top_heads(grid, 4) == [(0, 1), (1, 0), (1, 2), (0, 2)]
    assert top_heads(grid, 0) == []


# ---- end to end --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    train = symbolic_set(root, SeqType.BURSTY, 1024)
    icl = symbolic_set(root, SeqType.FEWSHOT_HOLDOUT, 96, seed=1)
    iwl = symbolic_set(root, SeqType.NO_SUPPORT_ZIPFIAN, 64, seed=2)
    cfg = tiny_config(steps=20, checkpoint_every=10, eval_every=10)
    fit(cfg, train, [icl], root / "run", progress=False)
    return root / "run", train, icl, iwl


def test_analyze_run_writes_records_and_plots(run):
    run_dir, _, icl, iwl = run
    lines = []
    recs = analyze_run(run_dir, icl, max_seqs=80, batch_size=32, ablate_steps="last", echo=lines.append)
    assert [r["step"] for r in recs] == [10, 20] and len(lines) == 2  # a line per step
    last = recs[-1]
    assert last["n"] == 80 and last["induction_n"] == 80  # few-shot: the query's class is always in context
    assert np.asarray(last["induction"]).shape == (2, 2) and np.asarray(last["prev_token"]).shape == (2, 2)
    assert "ablation" not in recs[0] and set(last["ablation"]) == {"zero", "mean"}
    grid = np.asarray(last["ablation"]["zero"]["accuracy_closed"])
    assert grid.shape == (2, 2) and ((grid >= 0) & (grid <= 1)).all()
    # the joint ablation: the two top previous-token heads, both modes, its columns readable by sweeps
    joint = last["joint_ablation"]
    assert joint["by"] == "prev_token" and [tuple(h) for h in joint["heads"]] == top_heads(last["prev_token"], 2)
    assert set(joint) == {"heads", "by", "zero", "mean"}
    values = analysis_values(recs, 20, last["set"])
    assert values["joint_ablated_icl"] == joint["zero"]["accuracy_closed"]
    assert values["mean_joint_ablated_icl"] == joint["mean"]["accuracy_closed"]
    # a joint ablation of one head is that head's single ablation
    one = analyze_run(run_dir, icl, steps="20", max_seqs=80, batch_size=32, joint_top=1, echo=lambda s: None)[0]
    (layer, head), = one["joint_ablation"]["heads"]
    for mode in ("zero", "mean"):
        assert one["joint_ablation"][mode]["accuracy_closed"] == pytest.approx(
            one["ablation"][mode]["accuracy_closed"][layer][head], abs=1e-9)
    none = analyze_run(run_dir, icl, steps="20", max_seqs=80, batch_size=32, joint_top=0, echo=lambda s: None)[0]
    assert "joint_ablation" not in none and "ablation" in none
    assert [p.name for p in plot_analysis(run_dir)] == ["induction.png", "prev_token.png", "ablation.png"]
    for name in ("induction", "prev_token", "ablation"):
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 1000
    # again on the same set: lines replaced, not duplicated; another set is kept beside it
    analyze_run(run_dir, icl, steps="20", ablate_steps="none", max_seqs=40, echo=lambda s: None)
    analyze_run(run_dir, iwl, steps="20", ablate_steps="none", max_seqs=40, echo=lambda s: None)
    stored = read_analysis(run_dir)
    keys = [(r["set"], r["step"]) for r in stored]
    assert len(keys) == len(set(keys)) == 3
    ns = [r for r in stored if r["seq_type"] == "no_support_zipfian"][0]
    assert ns["induction"] is None and ns["induction_n"] == 0  # the query's class is never in context
    assert all(json.loads(line) for line in (run_dir / ANALYSIS_FILE).read_text().splitlines())


def test_analyze_cli_errors_are_one_line(run, tmp_path):
    run_dir, _, icl, _ = run

    def one_line(result, fragment):
        assert result.exit_code == 2, result.output
        lines = [l for l in result.output.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output

    one_line(CliRunner().invoke(main, ["analyze", str(run_dir), "--eval", str(icl), "--ablate-steps", "15"]),
             "no checkpoint at step")
    one_line(CliRunner().invoke(main, ["analyze", str(run_dir), "--eval", str(icl), "--steps", "x"]), "comma")
    one_line(CliRunner().invoke(main, ["analyze", str(tmp_path / "nothing"), "--eval", str(icl)]),
             "does not exist")
    one_line(CliRunner().invoke(main, ["analyze", str(run_dir), "--eval", str(icl), "--joint-top", "5"]),
             "--joint-top must be between 0 and the model's 4 heads")
    ok = CliRunner().invoke(main, ["analyze", str(run_dir), "--eval", str(icl), "--steps", "10",
                                   "--ablate-steps", "10", "--ablation", "zero", "--max-seqs", "32"])
    assert ok.exit_code == 0, ok.output
    assert "step 10: accuracy_closed" in ok.output


def test_read_analysis_checks_what_it_reads(tmp_path):
    """A line cut by a hard kill is skipped; a line that is not an analysis record is a one-line RunError."""
    good = {"step": 10, "set": "s", "seq_type": "fewshot_holdout", "n": 8, "accuracy_closed": 0.5,
            "accuracy_query": 0.25, "num_layers": 2, "num_heads": 2}
    path = tmp_path / "analysis.jsonl"
    path.write_text(json.dumps(good) + "\n" + '{"step": 20, "set"')
    assert read_analysis(tmp_path) == [good]
    path.write_text(json.dumps({**good, "step": "ten"}) + "\n")
    with pytest.raises(RunError, match="analysis records"):
        read_analysis(tmp_path)
    assert analysis_values([{**good, "joint_ablation": {"heads": [[0, 1]], "zero": {"accuracy_closed": 0.5}}}], 10,
                           "s") == {"analysis_icl": 0.5, "joint_ablated_icl": 0.5}
    for bad in ([1], {"zero": {"accuracy_closed": "x"}}, {"mean": {"accuracy_closed": float("nan")}}):
        with pytest.raises(RunError, match="joint_ablation"):
            analysis_values([{**good, "joint_ablation": bad}], 10, "s")
