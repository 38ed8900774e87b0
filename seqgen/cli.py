"""The `seqgen` command line: build, finalize, verify, info, download.

Settings come from the defaults (the paper's `images_all_exemplars`), overridden by the `[seqgen]`
table of `--config FILE` (TOML), overridden by command-line options. Every expected failure (bad
options, missing Omniglot, unwritable output, corrupt shards, a folder holding another build) is
printed as one line `error: ...` with exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import numpy as np

from seqgen import shards as fmt
from seqgen.verify import verify
from seqgen.build import (
    build,
    finalize,
    omniglot_base_url,
    parse_shard_range,
)
from seqgen.cliopts import ConfigOption, ConfigOptions, cache_dir_option, omniglot_option
from seqgen.config import BuildConfig, SeqType, build_config_from_toml, replace_nested
from seqgen.configio import load_toml
from seqgen.errors import EXIT_ERROR, Advice, OneLineGroup, one_line_errors

OMNIGLOT_HELP = "Omniglot folder (default: $OMNIGLOT_DIR, else data/omniglot; downloaded when absent)."

# what seqgen advises after a full disk, no memory or Ctrl+C (seqgen.errors: the one-line error policy)
ADVICE = Advice(
    disk_full="free space, then rerun the same command to resume (finished shards are kept)",
    out_of_memory="lower --shard-size (rows held in memory at once) or --workers",
    interrupted="rerun the same command to resume (finished shards are kept)",
)
one_line = one_line_errors(ADVICE)


@click.group(cls=OneLineGroup)
def main() -> None:
    """seqgen: build the sequence sets of Chan et al. 2022 into HDF5 shards."""


# The BuildConfig fields `seqgen build` sets, in --help order; name, type, help and shown default come from
# the fields (seqgen.cliopts). Every option defaults to "not given", so a --config file's value is kept.
BUILD_OPTIONS = ConfigOptions(
    BuildConfig,
    ConfigOption("seq_type", "--type"), "num_seqs", "seed", "shard_size",
    "sequence.p_bursty", "sequence.p_bursty_common", "sequence.p_bursty_zipfian", "sequence.p_fewshot",
    "sequence.seq_len", "sequence.ways", "sequence.bursty_shots", "sequence.fs_shots", "sequence.non_bursty_type",
    "sequence.labeling_rare", "sequence.labeling_common", "sequence.polysemy", "sequence.grouped",
    "sequence.randomly_generate_rare", "sequence.noise_scale",
    "split.zipf_exponent", "split.use_zipf_for_common_rare", "split.n_rare_classes", "split.n_common_classes",
    "split.n_holdout_classes", ConfigOption("split.preserve_ordering_every_n", none_is=0), "split.split_seed",
    "dataset.example_type", "dataset.exemplars", "dataset.augment", "dataset.symbolic_size",
)


def make_config(config_file: str | None, overrides: dict[str, Any]) -> BuildConfig:
    """defaults < [seqgen] table of `config_file` < `overrides` ({dotted field: value}: the options given)."""
    cfg = build_config_from_toml(load_toml(config_file)) if config_file else BuildConfig()
    return replace_nested(cfg, overrides).validate() if overrides else cfg.validate()


def _progress_flag(quiet: bool) -> bool:
    return not quiet


@main.command("build")
@BUILD_OPTIONS
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: data/shards/<type>).")
@click.option("--config", "config_file", type=click.Path(), help="TOML file with a [seqgen] table.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Shard-building processes.")
@omniglot_option(OMNIGLOT_HELP)
@cache_dir_option
@click.option("--overwrite", is_flag=True, help="Replace a folder that holds a different build.")
@click.option("--materialize", is_flag=True, help="Also store uint8 pixels [rows, length, 105, 105].")
@click.option("--shards", "shard_range", metavar="A:B", help="Build only shards A..B-1 (no manifest; see finalize).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line
def build_cmd(out: str | None, config_file: str | None, workers: int, omniglot_dir: str | None, cache_dir: str,
              overwrite: bool, materialize: bool, shard_range: str | None, quiet: bool, **options: Any) -> None:
    """Build (or resume) a shard set.

    Settings: defaults (shown) < the [seqgen] table of --config FILE < the options given."""
    cfg = make_config(config_file, BUILD_OPTIONS.overrides(options))
    folder = Path(out) if out else Path("data/shards") / cfg.seq_type.value
    shards = parse_shard_range(shard_range, cfg.num_shards) if shard_range is not None else None
    res = build(cfg, folder, workers=workers, overwrite=overwrite, materialize=materialize, shards=shards,
                omniglot_dir=omniglot_dir, cache_dir=cache_dir, progress=_progress_flag(quiet))
    _report(res, cfg)


def _report(res: Any, cfg: BuildConfig) -> None:
    rows = sum(cfg.shard_rows(i) for i in res.built)
    rate = f" ({rows / res.seconds:,.0f} sequences/s)" if res.built and res.seconds > 0 else ""
    click.echo(f"{res.folder}: built {len(res.built)} shard(s), {len(res.reused)} already done, "
               f"in {res.seconds:.1f} s{rate}")
    if res.finalized:
        click.echo(f"{res.folder}: complete, {cfg.num_seqs:,} {cfg.seq_type.value} sequences in {cfg.num_shards} shard(s)")
    else:
        click.echo(f"{res.folder}: no manifest yet; when every range is built run `seqgen finalize {res.folder}`")


@main.command("finalize")
@click.argument("folder", type=click.Path(file_okay=False))
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes rebuilding missing shards.")
@omniglot_option(OMNIGLOT_HELP)
@cache_dir_option
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line
def finalize_cmd(folder: str, workers: int, omniglot_dir: str | None, cache_dir: str, quiet: bool) -> None:
    """Check all shards of a (ranged) build, rebuild missing ones, write the manifest."""
    res = finalize(folder, workers=workers, omniglot_dir=omniglot_dir, cache_dir=cache_dir,
                   progress=_progress_flag(quiet))
    _report(res, fmt.manifest_config(fmt.read_manifest(Path(folder))))


@main.command("verify")
@click.argument("folder", type=click.Path())
@click.option("--sample", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Rows per shard checked for the structural invariants.")
@one_line
def verify_cmd(folder: str, sample: int) -> None:
    """Check manifest, checksums, shapes, dtypes and sequence invariants."""
    from seqgen.split import make_split

    manifest = fmt.read_manifest(Path(folder))
    cfg = fmt.manifest_config(manifest)
    _, problems = verify(Path(folder), sample=sample, expected_split=make_split(cfg))
    if problems:
        for p in problems:
            click.echo(f"error: {' '.join(p.split())}", err=True)
        raise click.exceptions.Exit(EXIT_ERROR)
    click.echo(f"{folder}: ok, {cfg.num_seqs:,} {cfg.seq_type.value} sequences in {cfg.num_shards} shard(s), "
               "checksums, shapes and invariants verified")


def _disk_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@main.command("info")
@click.argument("folder", type=click.Path())
@one_line
def info_cmd(folder: str) -> None:
    """Summarise a finished shard set."""
    path = Path(folder)
    manifest = fmt.read_manifest(path)
    cfg = fmt.manifest_config(manifest)
    d, sp, sq = cfg.dataset, cfg.split, cfg.sequence
    labels, bursty = [], 0
    for e in manifest["shards"]:
        data = fmt.read_shard(path / e["file"], ["example", "label"])
        labels.append(data["label"][:, -1].astype(np.int64))
        ex = data["example"]
        bursty += int(((ex[:, :-1] == ex[:, -1:]).sum(axis=1) >= sq.bursty_shots).sum())
    q = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    counts = np.bincount(q, minlength=cfg.num_labels) if q.size else np.zeros(cfg.num_labels, np.int64)
    top = np.argsort(-counts, kind="stable")[:8]
    table = manifest.get("image_table")
    pixels = ", pixels stored" if manifest.get("materialized") else ""
    lines = [
        ("type", cfg.seq_type.value),
        ("sequences", (f"{cfg.num_seqs:,} in {cfg.num_shards} shard(s) of <= {cfg.shard_size:,}; "
                      f"length {cfg.length}; seed {cfg.seed}")),
        ("labels", (f"{cfg.num_labels} (labeling rare {sq.labeling_rare.value}, "
                   f"common {sq.labeling_common.value}, polysemy {sq.polysemy})")),
        ("dataset", (f"{d.example_type.value}, exemplars {d.exemplars.value}, augment {d.augment}, "
                    f"{d.num_dataset_classes} classes{pixels}")),
        ("split", (f"{sp.n_rare_classes} rare / {sp.n_common_classes} common / "
                  f"{sp.n_holdout_classes} holdout, zipf_exponent {sp.zipf_exponent}, split_seed {sp.split_seed}")),
        ("sequence", (f"p_bursty {sq.p_bursty}, bursty_shots {sq.bursty_shots}, fs_shots {sq.fs_shots}, "
                     f"ways {sq.ways}, non_bursty {sq.non_bursty_type.value}, noise_scale {sq.noise_scale}")),
        ("image table", table["fingerprint"][:16] if table else "none (symbolic)"),
        ("query labels", ", ".join(f"{int(k)}: {counts[k] / max(1, q.size):.1%}" for k in top if counts[k])),
    ]
    if cfg.seq_type is SeqType.BURSTY:
        frac = bursty / max(1, cfg.num_seqs)
        lines.append(("bursty", (f"{frac:.3f} of sequences show their query class >= {sq.bursty_shots} times "
                                f"(p_bursty {sq.p_bursty})")))
    lines.append(("disk", f"{_disk_size(path) / 1e6:,.1f} MB"))
    for k, v in lines:
        click.echo(f"{k:<13}{v}")


@main.command("download")
@click.option("--omniglot", "omniglot_dir", type=click.Path(file_okay=False),
              help="Destination (default: $OMNIGLOT_DIR, else data/omniglot).")
@click.option("--base-url", hidden=True, default=None, help="Mirror URL (also $SEQGEN_OMNIGLOT_URL).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@one_line
def download_cmd(omniglot_dir: str | None, base_url: str | None, quiet: bool) -> None:
    """Download the official Omniglot archives (MD5-checked)."""
    from seqgen.omniglot import download, resolve_omniglot_dir

    dest = resolve_omniglot_dir(omniglot_dir)
    paths = download(dest, base_url=base_url or omniglot_base_url(), progress=not quiet)
    for p in paths:
        click.echo(str(p))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
