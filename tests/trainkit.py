"""Small symbolic shard sets and tiny trainer configs for end-to-end tests (no Omniglot needed)."""

from __future__ import annotations

from pathlib import Path

from seqgen.build import build
from seqgen.config import BuildConfig, DatasetConfig, ExampleType, SeqType, SequenceConfig, SplitConfig
from trainer.config import OptimizerConfig, TrainConfig, TrainingConfig
from trainer.models.config import ExampleEncoding, ModelConfig

DATASET = DatasetConfig(example_type=ExampleType.SYMBOLIC, symbolic_size=40)
SPLIT = SplitConfig(n_rare_classes=30, n_common_classes=5, n_holdout_classes=5)


def symbolic_set(root: Path, seq_type: SeqType, num_seqs: int, *, seed: int = 0, split: SplitConfig = SPLIT,
                 **sequence) -> Path:
    """Build (or reuse) a symbolic shard set under `root` and return its folder."""
    seq = SequenceConfig(**sequence)
    cfg = BuildConfig(seq_type=seq_type, num_seqs=num_seqs, seed=seed, shard_size=max(64, num_seqs // 3),
                      dataset=DATASET, split=split, sequence=seq)
    name = f"{seq_type.value}-{seed}-{num_seqs}-{split.split_seed}-" + "-".join(
        f"{k}{v}" for k, v in sorted(sequence.items()))
    folder = root / name
    build(cfg, folder, progress=False)
    return folder


def paper_like_sets(root: Path, train_seqs: int = 4096) -> tuple[Path, Path, Path]:
    """The paper's default sequence options on 40 symbolic classes: bursty training, ICL and IWL eval sets."""
    train = symbolic_set(root, SeqType.BURSTY, train_seqs)
    icl = symbolic_set(root, SeqType.FEWSHOT_HOLDOUT, 256, seed=1)
    iwl = symbolic_set(root, SeqType.NO_SUPPORT_ZIPFIAN, 256, seed=2)
    return train, icl, iwl


# A run trained in a group against the same run alone: the vmapped (batched) matmuls sum in another
# order, so results differ by float32 round-off (measured: max |difference| < 1e-6 after 10 steps). Such
# comparisons use Adam eps 1e-4 instead of 1e-8: the attention's key bias has an exactly zero gradient
# (softmax ignores a constant added to a row of scores), so its computed gradient is round-off noise of
# ~1e-10, which Adam with eps 1e-8 divides by its own size and turns into steps of the learning rate
# (differences of ~4e-4 after 10 steps between ANY two summation orders, not a defect of the group).
GROUP_RTOL, GROUP_ATOL = 1e-5, 2e-6
GROUP_ADAM_EPS = 1e-4


def tiny_config(steps: int = 20, **training) -> TrainConfig:
    model = ModelConfig(example_encoding=ExampleEncoding.EMBEDDING, emb_dim=32, num_layers=2, num_heads=2)
    opts = dict(steps=steps, batch_size=16, log_every=5, eval_every=10, eval_seqs=64, eval_batch_size=32,
                checkpoint_every=10, keep_checkpoints=0)
    opts.update(training)
    return TrainConfig(model=model, optimizer=OptimizerConfig(max_lr=1e-3, warmup_steps=10),
                       training=TrainingConfig(**opts)).validate()


# the smallest `trainer fit` options that train (for command-line tests)
TINY_CLI = ["--steps", "2", "--batch-size", "8", "--log-every", "2", "--eval-every", "2", "--checkpoint-every", "2",
            "--eval-seqs", "16", "--num-layers", "1", "--num-heads", "2", "--emb-dim", "16",
            "--example-encoding", "embedding", "--no-progress"]


def one_line_error(result, *fragments) -> str:
    """The one `error:` line of a refused command (exit 2, no traceback), holding each of `fragments`."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]
