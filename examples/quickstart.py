# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quickstart: build shards, train, load the run, look inside
#
# From data to an attention map in one notebook, with the commands of the README and the Python API of
# [docs/api.md](../docs/api.md):
#
# 1. build a training set and evaluation sets (`seqgen build`), and look at a few sequences (`seqgen.open_shards`);
# 2. train a small run (`trainer fit`);
# 3. load it (`trainer.load_run`): config, metrics, checkpoints;
# 4. plot in-context (ICL) and in-weights (IWL) learning against step;
# 5. find the strongest induction and previous-token heads (`trainer.analyze.measures`) and draw their attention;
# 6. evaluate the trained model on a new shard set (`Run.evaluate`, the same numbers as `trainer evaluate`).
#
# `QUICKSTART_SIZE` picks the size: `cpu` (the default) is the paper's Omniglot data at CPU scale
# (`configs/cpu.toml`: 28 px images, a 4-layer transformer, 8,000 steps; about 10 minutes of training on
# 2 cores, and Omniglot is downloaded into `data/omniglot` if it is not there or at `$OMNIGLOT_DIR`);
# `tiny` is 40 symbolic classes and 40 steps, a minute at most, which the test suite runs so that this
# notebook cannot rot (its curves mean nothing). It runs from the repository root (or `examples/`) and writes
# everything under `QUICKSTART_DIR` (default `data/quickstart/`).

# %%
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import seqgen
import trainer

SIZE = os.environ.get("QUICKSTART_SIZE", "cpu")
# Work from the repository root (Jupyter starts in examples/): data/omniglot and data/cache are found there.
ROOT = next((p for p in (Path.cwd(), Path.cwd().parent) if (p / "configs" / "cpu.toml").is_file()), None)
if ROOT is not None:
    os.chdir(ROOT)
WORK = Path(os.environ.get("QUICKSTART_DIR", "data/quickstart")).absolute()
WORK.mkdir(parents=True, exist_ok=True)

# One TOML file configures both commands: its [seqgen.*] tables the shard sets, its [trainer.*] tables the run.
CONFIGS = {
    "tiny": """
[seqgen.dataset]
example_type = "symbolic"
symbolic_size = 40
[seqgen.split]
n_rare_classes = 30
n_common_classes = 5
n_holdout_classes = 5
[trainer.model]
example_encoding = "embedding"
emb_dim = 32
num_layers = 2
num_heads = 2
[trainer.optimizer]
max_lr = 1e-3
warmup_steps = 10
[trainer.training]
steps = 40
batch_size = 16
log_every = 5
eval_every = 10
eval_seqs = 64
eval_batch_size = 32
checkpoint_every = 20
""",
    "cpu": None,  # configs/cpu.toml of the repository
}
NUM_SEQS = {"tiny": {"train": 4096, "eval": 256}, "cpu": {"train": 4_000_000, "eval": 4096}}.get(SIZE)
CONFIG = WORK / f"{SIZE}.toml"
if SIZE not in CONFIGS:
    raise SystemExit(f"QUICKSTART_SIZE must be one of {sorted(CONFIGS)}, got {SIZE!r}")
if CONFIGS[SIZE] is None and ROOT is None:
    raise SystemExit("QUICKSTART_SIZE=cpu reads configs/cpu.toml: start this notebook in the repository or examples/")
CONFIG.write_text(CONFIGS[SIZE] or (ROOT / "configs" / "cpu.toml").read_text())


def command(*args: str) -> None:
    """Run a command line (`seqgen ...` or `trainer ...`) with this kernel's Python, echoing its output."""
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    print(out.stdout[-2000:], out.stderr[-2000:], sep="")
    out.check_returncode()


# %% [markdown]
# ## 1. Build the shard sets
#
# The training set (bursty sequences), the two evaluation sets of the paper's headline numbers
# (`fewshot_holdout`: ICL on classes never trained on; `no_support_zipfian`: IWL), and a new set the run
# never sees during training (`fewshot_rare`: few-shot sequences of trained classes, labels assigned at random
# per sequence, so the answer must come from the context). Sequence *i* of a set is a pure function of
# (seed, *i*).

# %%
SHARDS = WORK / "shards"
SETS = {  # name: (sequence type, number of sequences, seed)
    "bursty": ("bursty", NUM_SEQS["train"], 0),
    "fewshot_holdout": ("fewshot_holdout", NUM_SEQS["eval"], 1),
    "no_support_zipfian": ("no_support_zipfian", NUM_SEQS["eval"], 2),
    "fewshot_rare": ("fewshot_rare", NUM_SEQS["eval"], 3),
}
for name, (seq_type, num_seqs, seed) in SETS.items():
    command("seqgen", "build", "--config", str(CONFIG), "--type", seq_type, "--num-seqs", str(num_seqs),
        "--seed", str(seed), "--out", str(SHARDS / name), "--quiet")

# %% [markdown]
# A shard set opens as a sequence set: `len`, indexing, iteration, and its manifest and config.

# %%
train_set = seqgen.open_shards(SHARDS / "bursty")
print(train_set, train_set.config.sequence.p_bursty)
train_set[0]  # sequence 0: class ids, exemplar indices, labels, rare flags of its 8 examples and the query

# %% [markdown]
# ## 2. Train a run
#
# `trainer fit` evaluates on the `--eval` sets every `eval_every` steps and saves checkpoints; Ctrl+C saves one
# and `--resume` continues bit for bit.

# %%
RUN_DIR = WORK / "runs" / SIZE
command("trainer", "fit", "--config", str(CONFIG), "--train", str(SHARDS / "bursty"),
    "--eval", str(SHARDS / "fewshot_holdout"), "--eval", str(SHARDS / "no_support_zipfian"),
    "--run-dir", str(RUN_DIR), "--no-progress")

# %% [markdown]
# ## 3. Load it

# %%
run = trainer.load_run(RUN_DIR)
print(run)
print("model:", run.config.model.num_layers, "layers,", run.config.model.num_heads, "heads; steps:",
      run.config.training.steps, "; checkpoints at", run.checkpoints)
steps, loss = run.metrics["loss"]
print("training loss from", loss[0].round(3), "at step", steps[0], "to", loss[-1].round(3), "at step", steps[-1])

# %% [markdown]
# ## 4. In-context and in-weights learning against step
#
# ICL = `accuracy_closed` on `fewshot_holdout` (chance 1/2; ceiling about 0.95, see the README), IWL =
# `accuracy_query` on `no_support_zipfian`, each with its 95 % interval.

# %%
fig, ax = plt.subplots(figsize=(6, 3.5))
for label, curve in (("ICL (fewshot_holdout)", run.metrics.icl), ("IWL (no_support_zipfian)", run.metrics.iwl)):
    ax.plot(curve.steps, curve.mean, marker="o", ms=3, label=label)
    ax.fill_between(curve.steps, curve.lo, curve.hi, alpha=0.2)
ax.axhline(0.5, color="grey", ls=":", lw=1, label="ICL chance")
ax.set(xlabel="training step", ylabel="accuracy", ylim=(-0.02, 1.02), title=f"ICL vs IWL ({SIZE})")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(WORK / "icl_iwl.png", dpi=100)

# %% [markdown]
# ## 5. The induction head and the previous-token head
#
# `trainer analyze`'s measures score every head of the last checkpoint on fewshot_holdout sequences: the
# **induction score** is the query's attention to the label tokens that follow an example of its class, the
# **previous-token score** each label token's attention to the example just before it, both minus what uniform
# attention would give (docs/analysis.md). We draw the attention map of the strongest head of each kind on one
# sequence.

# %%
from trainer.analyze.measures import analyze_run

[record] = analyze_run(RUN_DIR, SHARDS / "fewshot_holdout", steps="last", ablate_steps="none",
                       max_seqs=min(512, NUM_SEQS["eval"]))
heads = {}
for kind in ("induction", "prev_token"):
    scores = np.asarray(record[kind])  # [layers, heads]
    layer, head = np.unravel_index(int(np.argmax(scores)), scores.shape)
    heads[kind] = (int(layer), int(head), float(scores[layer, head]))
    print(f"strongest {kind} head: layer {layer}, head {head}, score {scores[layer, head]:+.3f}")

model = run.model()  # the latest checkpoint: an Equinox model and what it takes to run it
holdout = seqgen.open_shards(SHARDS / "fewshot_holdout")
sequence = holdout[0]
attention = model.attention(sequence, holdout.config)[0]  # [layers, heads, T, T]
tokens = [f"{kind}{j}" for j in range(holdout.length - 1) for kind in ("x", "y")] + ["query"]

fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
for ax, (kind, (layer, head, score)) in zip(axes, heads.items()):
    ax.imshow(attention[layer, head], cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(tokens)), tokens, fontsize=7)
    ax.set(title=f"{kind} head L{layer}H{head} (score {score:+.2f})", xlabel="attended token",
           ylabel="attending token")
fig.tight_layout()
fig.savefig(WORK / "attention.png", dpi=100)
print("query class", sequence["example"][-1], "label", sequence["label"][-1], "; predicted",
      model.predict(sequence, holdout.config)[0])

# %% [markdown]
# ## 6. Evaluate on a new shard set
#
# `Run.evaluate` is `trainer evaluate` from Python (the same code, the same numbers); it writes nothing into
# the run directory unless `record=True`. Every metric comes with its 95 % interval.

# %%
results = run.evaluate([SHARDS / "fewshot_rare", SHARDS / "fewshot_holdout"])
for name, metrics in results.items():
    m = metrics["accuracy_closed"]
    print(f"{name:<16} accuracy_closed {m['mean']:.3f}  95% CI [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]  n={m['n']}")
