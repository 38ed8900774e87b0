"""The trainer on the real Omniglot: image table on the device, ResNet path, fingerprint checks, a real
Ctrl+C (SIGINT) leaving a loadable checkpoint, and `trainer evaluate --watch` following a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import trainer.evaluate

from seqgen.build import build
from seqgen.config import BuildConfig, SeqType
from tests.conftest import shared_omniglot_dir
from trainer import checkpoint
from trainer.config import OptimizerConfig, TrainConfig, TrainingConfig
from trainer.data import DataError
from trainer.runtime.distributed import make_topology
from trainer.evaluate import watch_run
from trainer.fit import fit
from trainer.models import ModelConfig
from trainer.run import RunDir
from trainer.state import state_skeleton

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _cfg(steps: int, **training) -> TrainConfig:
    opts = dict(steps=steps, batch_size=8, image_size=28, log_every=2, eval_every=2, eval_seqs=32,
                eval_batch_size=32, checkpoint_every=2, keep_checkpoints=0)
    opts.update(training)
    return TrainConfig(model=ModelConfig(num_layers=1, num_heads=2, emb_dim=16),
                       optimizer=OptimizerConfig(warmup_steps=2),
                       training=TrainingConfig(**opts)).validate()


@pytest.fixture(scope="module")
def real_sets(tmp_path_factory, omniglot_table, omniglot_cache_dir):
    root = tmp_path_factory.mktemp("omniglot-shards")
    src = shared_omniglot_dir()
    out = {}
    for t, seed in ((SeqType.BURSTY, 0), (SeqType.FEWSHOT_HOLDOUT, 1), (SeqType.NO_SUPPORT_ZIPFIAN, 2)):
        out[t] = root / t.value
        build(BuildConfig(seq_type=t, num_seqs=256, seed=seed, shard_size=128), out[t], omniglot_dir=src,
              cache_dir=omniglot_cache_dir, progress=False)
    return out


def test_fit_and_watch_on_real_omniglot(real_sets, omniglot_cache_dir, tmp_path, monkeypatch):
    src = shared_omniglot_dir()
    evals = [real_sets[SeqType.FEWSHOT_HOLDOUT], real_sets[SeqType.NO_SUPPORT_ZIPFIAN]]
    result = fit(_cfg(4), real_sets[SeqType.BURSTY], evals, tmp_path / "run", omniglot_dir=src,
                 cache_dir=omniglot_cache_dir, progress=False)
    assert result.step == 4 and checkpoint.list_steps(tmp_path / "run") == [2, 4]
    seen, polls = [], []

    def sleep(seconds, stop):  # the watcher's wait, faked: a watcher that never stops fails instead of hanging
        polls.append(seconds)
        assert len(polls) <= 3, "the watcher kept polling a finished run"

    monkeypatch.setattr(trainer.evaluate, "_sleep", sleep)
    steps = watch_run(tmp_path / "run", evals, poll=0.05, train_dir=None, max_seqs=16, batch_size=16,
                      omniglot_dir=src, cache_dir=omniglot_cache_dir, topo=make_topology(), echo=seen.append)
    assert steps == [4]  # newest first; the run is finished, so the watcher stops after its last step
    watch = [r for r in RunDir(tmp_path / "run").read_metrics() if r.get("source") == "watch"]
    assert {r["seq_type"] for r in watch} == {"fewshot_holdout", "no_support_zipfian"}
    assert all(r["step"] == 4 and r["metrics"]["accuracy_closed"]["n"] == 16 for r in watch)
    assert seen[0].startswith("device: cpu") and "ICL (accuracy_closed on fewshot_holdout)" in seen[1]


def test_shards_from_another_omniglot_are_refused(real_sets, omniglot_cache_dir, tmp_path):
    manifest = json.loads((real_sets[SeqType.BURSTY] / "manifest.json").read_text())
    moved = tmp_path / "bursty"
    import shutil

    shutil.copytree(real_sets[SeqType.BURSTY], moved)
    manifest["image_table"]["fingerprint"] = "0" * 64
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="fingerprint"):
        fit(_cfg(2), moved, [], tmp_path / "run", omniglot_dir=shared_omniglot_dir(),
            cache_dir=omniglot_cache_dir, progress=False)


def test_real_ctrl_c_saves_a_loadable_checkpoint(real_sets, omniglot_cache_dir, tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "trainer", "fit", "--train", str(real_sets[SeqType.BURSTY]), "--run-dir", str(run),
           "--steps", "100000", "--batch-size", "8", "--image-size", "28", "--num-layers", "1", "--num-heads", "2",
           "--emb-dim", "16", "--log-every", "1", "--checkpoint-every", "100000", "--eval-every", "100000",
           "--no-progress", "--omniglot", str(shared_omniglot_dir()), "--cache-dir", str(omniglot_cache_dir)]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "continue with --resume" in out
    step = checkpoint.latest_step(run)
    assert step is not None and step >= 3
    stored = RunDir(run)
    checkpoint.load(run, step, state_skeleton(stored.train_config(), stored.read()["data"]["num_labels"]))
