"""`trainer fit --profile DIR` (issue 28): a jax.profiler trace of dispatches 2-4 written under DIR, in
formats TensorBoard (xplane.pb) and Perfetto (trace.json.gz) read, and the run's metrics unchanged."""

from __future__ import annotations

from click.testing import CliRunner

from tests.trainkit import paper_like_sets
from trainer.cli import main
from trainer.run import RunDir

ARGS = ["--batch-size", "8", "--num-layers", "1", "--emb-dim", "16", "--num-heads", "2", "--example-encoding",
        "embedding", "--steps", "12", "--steps-per-dispatch", "2", "--log-every", "4", "--eval-every", "12",
        "--checkpoint-every", "12", "--eval-seqs", "32", "--no-progress"]


def _records(run):
    return [{k: v for k, v in r.items() if k != "time"} for r in RunDir(run).read_metrics()]


def test_profile_writes_a_trace_and_changes_no_metric(tmp_path):
    train, icl, _ = paper_like_sets(tmp_path / "shards", train_seqs=512)
    base = ["fit", "--train", str(train), "--eval", str(icl), *ARGS]
    plain = CliRunner().invoke(main, [*base, "--run-dir", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    traced = CliRunner().invoke(main, [*base, "--run-dir", str(tmp_path / "traced"), "--profile", str(tmp_path / "prof")])
    assert traced.exit_code == 0, traced.output
    said = [line for line in traced.output.splitlines() if line.startswith("profile: ")]
    assert said == [f"profile: dispatches 2-4 traced in {tmp_path / 'prof'} (tensorboard --logdir, or "
                    "perfetto_trace.json.gz at ui.perfetto.dev)"], traced.output
    files = [p for p in (tmp_path / "prof").rglob("*") if p.is_file()]
    assert any(p.name.endswith(".xplane.pb") and p.stat().st_size > 0 for p in files), files
    assert any(p.name.endswith("trace.json.gz") for p in files), files
    assert _records(tmp_path / "traced") == _records(tmp_path / "plain")  # train and eval records, bitwise
    assert len([r for r in _records(tmp_path / "plain") if r["kind"] == "train"]) == 3
    # a file where the folder belongs: one line
    (tmp_path / "file").write_text("x")
    bad = CliRunner().invoke(main, [*base, "--run-dir", str(tmp_path / "bad"), "--profile", str(tmp_path / "file")])
    assert bad.exit_code == 2 and bad.output.startswith(f"error: --profile {tmp_path / 'file'} ")
    assert len(bad.output.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
