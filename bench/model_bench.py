"""Time one training step of the paper's model: forward + backward (+ Adam) at 28 px, batch 32, 9 examples.

    python bench/model_bench.py [--image-size 28] [--batch 32] [--seq-len 9] [--layers 12] [--scan]
                                [--seq-model transformer] [--steps 20]
    python bench/model_bench.py --kernels [--rounds 5]      (what each hand-written kernel saves)

Prints compile time, ms/step of `jit(value_and_grad(loss))` and of a full step (grad + Adam update, as
the trainer does), FLOPs per step from XLA's cost analysis, and the achieved GFLOP/s. `--scan` runs the
transformer blocks with `lax.scan` instead of unrolled (the default), to compare compile and run times.
The loss is the original's default: cross-entropy of the query prediction only.

`--kernels` measures each hand-written kernel alone: the full train step on the "custom" kernel path,
against the same step with ONE op's kernel replaced by its XLA reference (the others kept), and against
the all-"xla" path. Every variant is compiled first, then timed in `--rounds` alternating rounds (the
machines are shared and noisy); it prints each variant's median ms/step and the share of the all-custom
step that the kernel saves. The replacement is made here, at the benchmark's edge, by swapping the
module's kernel function for its reference while the step is traced.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import equinox as eqx
import jax
import jax.random as jr
import optax

from trainer.models import ModelConfig, SeqModel, forward, make_model, targets
from trainer.models import kernels
from trainer.models.kernels import use_kernels, use_layer_loop

from benchkit import cost_flops


def _time(fn, args, steps: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / steps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=9)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--num-classes", type=int, default=1623)
    ap.add_argument("--seq-model", default="transformer", choices=[m.value for m in SeqModel])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--scan", action="store_true", help="run the transformer blocks with lax.scan (layer loop 'scan')")
    ap.add_argument("--kernels", action="store_true", help="what each hand-written kernel saves (module doc)")
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds of --kernels")
    args = ap.parse_args()
    (run_kernels if args.kernels else run)(args)


# op -> (its kernel's name in trainer.models.kernels, the reference that replaces it)
KERNELS = {
    "conv2d": ("conv2d_kernel", "conv2d_reference"),
    "batch_norm": ("batch_norm_kernel", "batch_norm_reference"),
    "relu_max_pool": ("relu_max_pool_kernel", "relu_max_pool_xla"),
    "layer_norm": ("layer_norm_kernel", "layer_norm_reference"),
    "causal_attention": ("causal_attention_kernel", "causal_attention_reference"),
}


@contextlib.contextmanager
def reference_for(op: str | None):
    """Trace inside the block with `op`'s kernel replaced by its XLA reference (None: nothing replaced)."""
    if op is None:
        yield
        return
    name, reference = KERNELS[op]
    kept = getattr(kernels, name)
    setattr(kernels, name, getattr(kernels, reference))
    try:
        yield
    finally:
        setattr(kernels, name, kept)


def _train_step(args: argparse.Namespace):
    """(jitted train step, its arguments) of the model that `args` describes: grad + Adam, as `run`."""
    cfg = ModelConfig(num_layers=args.layers, seq_model=SeqModel(args.seq_model))
    model, state = make_model(cfg, args.num_classes, key=jr.PRNGKey(0), image_size=args.image_size)
    k1, k2, k3 = jr.split(jr.PRNGKey(1), 3)
    examples = jr.uniform(k1, (args.batch, args.seq_len, args.image_size, args.image_size, 1))
    labels = jr.randint(k2, (args.batch, args.seq_len), 0, args.num_classes)
    params, static = eqx.partition(model, eqx.is_array)
    opt = optax.adam(1e-4)

    def pure_loss(p, st, ex, lab, key):
        logits, st = forward(eqx.combine(p, static), st, ex, lab, key=key, inference=False)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], targets(lab, cfg)[:, -1]).mean()
        return loss, st

    def train_step(p, st, os, ex, lab, key):
        (loss, st), grads = jax.value_and_grad(pure_loss, has_aux=True)(p, st, ex, lab, key)
        updates, os = opt.update(grads, os, p)
        return optax.apply_updates(p, updates), st, os, loss

    return jax.jit(train_step), (params, state, opt.init(params), examples, labels, k3)


def run_kernels(args: argparse.Namespace) -> None:
    variants = {"all custom": ("custom", None), **{f"{op} -> xla": ("custom", op) for op in KERNELS},
                "all xla": ("xla", None)}
    compiled = {}
    for label, (path, op) in variants.items():
        step, step_args = _train_step(args)
        t0 = time.perf_counter()
        with use_kernels(path), use_layer_loop("scan" if args.scan else "unroll"), reference_for(op):
            compiled[label] = (step.lower(*step_args).compile(), step_args)
        print(f"compiled {label} in {time.perf_counter() - t0:.1f} s", flush=True)
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(args.rounds):
        for label, (fn, step_args) in compiled.items():
            times[label].append(_time(fn, step_args, args.steps))
    base = statistics.median(times["all custom"])
    print(f"\n{args.seq_model} layers={args.layers} image={args.image_size} batch={args.batch} "
          f"seq_len={args.seq_len}; median of {args.rounds} alternating rounds (each the best of 3 x {args.steps} steps)")
    print("| variant | ms/step (median) | vs all custom (+: what the kernel saves) |")
    print("|---|---|---|")
    for label, ts in times.items():
        ms = statistics.median(ts) * 1e3
        saves = "" if label == "all custom" else f"{(statistics.median(ts) - base) / base * 100:+.1f} %"
        print(f"| {label} | {ms:.1f} | {saves} |")


def run(args: argparse.Namespace) -> None:
    cfg = ModelConfig(num_layers=args.layers, seq_model=SeqModel(args.seq_model))
    loop = "scan" if args.scan else "unroll"  # the layer loop switch is read when the functions are traced
    model, state = make_model(cfg, args.num_classes, key=jr.PRNGKey(0), image_size=args.image_size)
    k1, k2, k3 = jr.split(jr.PRNGKey(1), 3)
    examples = jr.uniform(k1, (args.batch, args.seq_len, args.image_size, args.image_size, 1))
    labels = jr.randint(k2, (args.batch, args.seq_len), 0, args.num_classes)

    def loss_fn(m, st, ex, lab, key):
        logits, st = forward(m, st, ex, lab, key=key, inference=False)
        tgt = targets(lab, cfg)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits[:, -1], tgt[:, -1]).mean()
        return loss, st

    params, static = eqx.partition(model, eqx.is_array)  # every array of the model is a float parameter

    def pure_loss(p, st, ex, lab, key):
        return loss_fn(eqx.combine(p, static), st, ex, lab, key)

    grad_fn = jax.jit(jax.value_and_grad(pure_loss, has_aux=True))
    opt = optax.adam(1e-4)
    opt_state = opt.init(params)

    @jax.jit
    def train_step(p, st, os, ex, lab, key):
        (loss, st), grads = jax.value_and_grad(pure_loss, has_aux=True)(p, st, ex, lab, key)
        updates, os = opt.update(grads, os, p)
        return optax.apply_updates(p, updates), st, os, loss

    grad_args = (params, state, examples, labels, k3)
    t0 = time.perf_counter()
    with use_layer_loop(loop):
        compiled = grad_fn.lower(*grad_args).compile()
    t_compile = time.perf_counter() - t0
    # XLA counts a loop body once: with --scan, count FLOPs on the same function traced with unrolled blocks
    if args.scan:
        with use_layer_loop("unroll"):
            flops = cost_flops(jax.jit(jax.value_and_grad(pure_loss, has_aux=True)).lower(*grad_args).compile())
    else:
        flops = cost_flops(compiled)
    t_grad = _time(compiled, grad_args, args.steps)

    step_args = (params, state, opt_state, examples, labels, k3)
    t0 = time.perf_counter()
    with use_layer_loop(loop):
        compiled_step = train_step.lower(*step_args).compile()
    t_compile_step = time.perf_counter() - t0
    t_step = _time(compiled_step, step_args, args.steps)

    print(
        f"{args.seq_model} layers={args.layers} {'scan' if args.scan else 'unrolled'} "
        f"image={args.image_size} batch={args.batch} seq_len={args.seq_len} devices={jax.devices()}"
    )
    print(f"compile: value_and_grad {t_compile:.1f} s, train step {t_compile_step:.1f} s")
    print(f"FLOPs per value_and_grad (XLA cost analysis): {flops / 1e9:.3f} GFLOP")
    print(f"value_and_grad: {t_grad * 1e3:.1f} ms/step, {flops / t_grad / 1e9:.1f} GFLOP/s")
    print(f"train step (grad + Adam): {t_step * 1e3:.1f} ms/step, {flops / t_step / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
