"""Sizes checked before anything is allocated: a model that cannot fit is refused in one line (it used to end
in a native XLA RESOURCE_EXHAUSTED stack or the kernel's out-of-memory kill), and the estimate it is
refused on is a true lower bound (trainer/memory.py)."""

from __future__ import annotations

import dataclasses

import jax
import pytest
from click.testing import CliRunner

from tests.trainkit import paper_like_sets, tiny_config
from trainer.cli import main as trainer_main
from trainer.config import TrainConfig
from trainer.memory import ModelTooLarge, check_fits, estimate
from trainer.models.config import ModelConfig
from trainer.models.model import count_params
from trainer.state import init_state


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return paper_like_sets(tmp_path_factory.mktemp("sets"), 256)[:2]


def test_the_estimate_counts_the_real_state_without_allocating_it():
    cfg = tiny_config()
    est = estimate(cfg, 40, 9)
    state = init_state(cfg, 40)
    real = sum(x.nbytes for x in jax.tree_util.tree_leaves(state) if isinstance(x, jax.Array))
    # eval_shape sees the optimizer's two Python-bool flags as 1-byte arrays: the only difference
    assert est.state_bytes - real == 2 and est.params == count_params(state.model)
    assert est.grad_bytes == 4 * est.params and est.activation_bytes > 0
    # the paper's model: the original's parameter count
    assert estimate(TrainConfig().validate(), 1623, 9).params == 831_479


def test_a_model_too_large_is_refused_with_its_sizes_and_the_fix():
    cfg = tiny_config()
    need = estimate(cfg, 40, 9).total
    check_fits(cfg, 40, 9, available=need)  # exactly enough: passes
    with pytest.raises(ModelTooLarge, match=r"cannot fit: [\d,]+ parameters \(2 layers of width 32\).*"
                                            r"--emb-dim, --num-layers or --batch-size"):
        check_fits(cfg, 40, 9, available=need - 1)
    # a group needs each run's share; data parallelism splits only the activations
    with pytest.raises(ModelTooLarge, match="for 3 runs at once"):
        check_fits(cfg, 40, 9, runs=3, available=2 * need)
    est = estimate(cfg, 40, 9)
    check_fits(cfg, 40, 9, data_parallel=4,
               available=est.state_bytes + est.grad_bytes + est.activation_bytes // 4)


@pytest.mark.parametrize("opts, fragment", [
    (["--emb-dim", "100000"], "cannot fit"),
    (["--emb-dim", "4096", "--num-layers", "64"], "cannot fit"),
    (["--num-heads", "0"], "num_heads must be >= 1"),
    (["--num-heads", "3"], "num_heads (3) must divide the token width (16)"),
])
def test_trainer_fit_refuses_bad_sizes_in_one_line_before_writing(sets, tmp_path, opts, fragment):
    train, icl = sets
    run = tmp_path / "run"
    args = ["fit", "--train", str(train), "--eval", str(icl), "--run-dir", str(run), "--steps", "2",
            "--batch-size", "8", "--emb-dim", "16", "--num-layers", "1", "--num-heads", "2",
            "--example-encoding", "embedding", "--no-progress", *opts]
    result = CliRunner().invoke(trainer_main, args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and fragment in lines[0], result.output
    assert not list(run.glob("*"))


def test_a_rnn_and_a_group_are_checked_too(sets, tmp_path):
    from trainer.group import fit_group
    from trainer.models.config import SeqModel

    train, icl = sets
    lstm = dataclasses.replace(tiny_config(), model=dataclasses.replace(tiny_config().model, seq_model=SeqModel.LSTM))
    assert estimate(lstm.validate(), 40, 9).activation_bytes == 0 and estimate(lstm, 40, 9).params > 0
    big = dataclasses.replace(tiny_config(), model=ModelConfig(
        example_encoding=tiny_config().model.example_encoding, emb_dim=8192, num_layers=48, num_heads=8))
    with pytest.raises(ModelTooLarge):
        fit_group([big, big], [train, train], [[icl], [icl]], [tmp_path / "a", tmp_path / "b"], progress=False)
    assert not (tmp_path / "a" / "config.json").exists()


def test_a_sweep_too_large_is_refused_at_dry_run_naming_its_keys(tmp_path):
    from tests.test_sweep import BASE, SWEEP, _write

    path = _write(tmp_path, SWEEP + "[runs.trainer.model]\nemb_dim = 100000\n")
    result = CliRunner().invoke(trainer_main, ["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "run 'p1': the model cannot fit" in lines[0] and "trainer.model.emb_dim" in lines[0], result.output
    assert not (tmp_path / "o").exists()
    # the same sweep with a model that fits plans its runs
    ok = _write(tmp_path / "ok", SWEEP, BASE)
    assert CliRunner().invoke(trainer_main, ["sweep", str(ok), "--dry-run", "--out", str(tmp_path / "o")]).exit_code == 0
