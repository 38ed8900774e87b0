"""Slow, obvious reference generator: the original SeqGenerator, step by step, in plain Python.

Follows datasets/data_generators.py of Chan et al. 2022 (get_bursty_seq, get_fewshot_seq,
get_random_seq, get_no_support_seq, get_mixed_seq, _get_classes_to_sample, _create_noisy_image_seq),
including its string labelings ('ordered', 'orderedK', 'orderedK_polysemyX', 'unfixed', 'original'),
with Python ints and lists, and with the same counter-based random stream as the numba kernels
(SplitMix64 re-implemented here with Python ints), consumed in the same order:

- a class draw is one draw: uniform pools `randint(n)`, weighted pools a search of the cumulative weights;
- random seq: per position a class, then (polysemy) the label offset;
- few-shot: per way a class, then (polysemy) its label offset; then the query way; then the shuffle;
- no-support: the query class, then one draw per support position from the other classes;
- bursty: bursty?; which kind?; few-shot block (not shuffled on its own: the whole support is shuffled
  right after, which makes a separate shuffle redundant); remainder; shuffle of all but the query;
- exemplars: per position, uniform draws in [0, n_exemplars) until one its class has not used yet.
"""

from __future__ import annotations

import bisect
import itertools

import numpy as np

from seqgen.config import BuildConfig, Labeling, SeqType
from seqgen.sampling import SEQ_TYPE_TAGS
from seqgen.split import ClassSplit

MASK = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


def mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


class CounterRng:
    """The random stream of one sequence: a pure function of (seed, type tag, sequence index)."""

    def __init__(self, seed: int, tag: int, index: int):
        base = mix(mix(seed & MASK) ^ tag)
        self.state0 = mix((base + index * GAMMA) & MASK)
        self.state = self.state0

    def bits(self) -> int:
        self.state = (self.state + GAMMA) & MASK
        return mix(self.state)

    def randint(self, n: int) -> int:
        return ((self.bits() >> 32) * n) >> 32

    def random(self) -> float:
        return (self.bits() >> 11) * 2.0**-53

    def noise_seed(self) -> int:
        return mix(self.state0 ^ 0x6E6F697365736565) >> 32

    def shuffle(self, items: list) -> None:
        for i in range(len(items) - 1, 0, -1):
            j = self.randint(i + 1)
            items[i], items[j] = items[j], items[i]


class NaiveGenerator:
    def __init__(self, cfg: BuildConfig, split: ClassSplit):
        self.cfg = cfg
        sp = cfg.split
        self.rare_classes = [int(c) for c in split.rare]
        self.common_classes = [int(c) for c in split.common]
        self.holdout_classes = [int(c) for c in split.holdout]
        self.non_holdout_classes = self.rare_classes + self.common_classes
        self.zipf_weights = [float(w) for w in split.zipf_weights]
        self.n_rare_classes = sp.n_rare_classes
        self.n_common_classes = sp.n_common_classes
        self.n_holdout_classes = sp.n_holdout_classes
        self.n_classes = sp.n_classes
        self.use_zipf_for_common_rare = sp.use_zipf_for_common_rare
        self.n_exemplars = cfg.dataset.exemplars_per_class

    # ---- classes and weights -------------------------------------------------------------
    def classes_to_sample(self, class_type: str) -> tuple[list[int], list[float]]:
        classes = {"rare": self.rare_classes, "common": self.common_classes,
                   "holdout": self.holdout_classes, "zipfian": self.non_holdout_classes}[class_type]
        if class_type == "zipfian":
            weights = list(self.zipf_weights)
        elif self.use_zipf_for_common_rare and class_type in ("common", "rare"):
            w = np.array(self.zipf_weights)
            w = w[self.n_rare_classes:] if class_type == "common" else w[: self.n_rare_classes]
            weights = list(w / np.sum(w))
        else:
            weights = [1 / len(classes)] * len(classes)
        return classes, weights

    def choose(self, rng: CounterRng, weights: list[float], exclude: int | None = None) -> int:
        n = len(weights)
        if all(w == weights[0] for w in weights):
            if exclude is None:
                return rng.randint(n)
            k = rng.randint(n - 1)
            return k + 1 if k >= exclude else k
        cdf = list(itertools.accumulate(weights))
        u = rng.random()
        if exclude is None:
            return min(bisect.bisect_right(cdf, u * cdf[-1]), n - 1)
        q = exclude
        lo = cdf[q - 1] if q > 0 else 0.0
        hi = cdf[-1] - cdf[q]
        t = u * (lo + hi)
        if t < lo or q == n - 1:
            return min(bisect.bisect_right(cdf, t, 0, q), q - 1)
        return min(bisect.bisect_right(cdf, (t - lo) + cdf[q], q + 1, n), n - 1)

    def zipf_polysemy(self, i: int, factor: int, extra: int) -> int:
        """Deviation: under polysemy a zipfian index i (rare, then common) gets its own pool's label
        (rare: i*factor + extra; common: its ordered{n_rare*factor} label); the original overruns
        num_labels here (i*factor + extra, or i + n_rare*factor, for every i)."""
        n = self.n_rare_classes
        return i * factor + extra if i < n else n * factor + (i - n)

    # ---- the original's generators, one record each -----------------------------------------
    def random_seq(self, rng, class_type, seq_len, labeling):
        classes, weights = self.classes_to_sample(class_type)
        is_rare = [1 if class_type == "rare" else 0] * seq_len
        idx = []
        extra = []
        for _ in range(seq_len):
            idx.append(self.choose(rng, weights))
            if "polysemy" in labeling:
                extra.append(rng.randint(int(labeling.split("polysemy")[1])))
        examples = [classes[i] for i in idx]
        if labeling == "original":
            labels = list(examples)
        elif labeling == "ordered":
            shift = {"common": self.n_rare_classes, "holdout": self.n_rare_classes + self.n_common_classes}
            labels = [i + shift.get(class_type, 0) for i in idx]
        elif "ordered" in labeling and "polysemy" not in labeling:
            start = int(labeling.split("ordered")[1])
            labels = [i + start for i in idx]
        elif labeling.startswith("zipf_polysemy"):
            labels = [self.zipf_polysemy(i, int(labeling.split("polysemy")[1]), e) for i, e in zip(idx, extra)]
        elif "polysemy" in labeling:
            start = int(labeling.split("ordered")[1].split("_")[0])
            factor = int(labeling.split("polysemy")[1])
            labels = [i * factor + start + e for i, e in zip(idx, extra)]
        else:
            raise ValueError(f"the original cannot label a random sequence with {labeling!r}")
        return examples, labels, is_rare

    def fewshot_seq(self, rng, class_type, shots, ways, labeling, grouped, shuffle=True):
        classes, weights = self.classes_to_sample(class_type)
        seq_len = shots * ways + 1
        is_rare = [1 if class_type == "rare" else 0] * seq_len
        class_options, label_options = [], []
        for w in range(ways):
            i = self.choose(rng, weights)
            class_options.append(classes[i])
            if labeling.startswith("zipf_polysemy"):
                label_options.append(self.zipf_polysemy(i, int(labeling.split("polysemy")[1]), rng.randint(
                    int(labeling.split("polysemy")[1]))))
            elif "polysemy" in labeling:
                start = int(labeling.split("ordered")[1].split("_")[0])
                factor = int(labeling.split("polysemy")[1])
                label_options.append(i * factor + rng.randint(factor) + start)
            elif labeling == "unfixed":
                label_options.append(w)
            elif labeling == "ordered":
                if class_type == "common":
                    i += self.n_rare_classes
                elif class_type == "holdout":
                    i += self.n_classes - self.n_holdout_classes
                label_options.append(i)
            elif labeling == "original":
                label_options.append(classes[i])
            elif labeling.startswith("ordered"):
                # 'orderedK' (common few-shot under polysemy): the original raises; we label i + K.
                label_options.append(i + int(labeling.split("ordered")[1]))
            else:
                raise ValueError(labeling)
        query = rng.randint(ways)
        labels = label_options * shots + [label_options[query]]
        examples = class_options * shots + [class_options[query]]
        if shuffle:
            ordering = list(range(seq_len - 1))
            if grouped:
                for s in range(shots):
                    block = ordering[s * ways:(s + 1) * ways]
                    rng.shuffle(block)
                    ordering[s * ways:(s + 1) * ways] = block
            else:
                rng.shuffle(ordering)
            examples = [examples[k] for k in ordering] + [examples[-1]]
            labels = [labels[k] for k in ordering] + [labels[-1]]
        return examples, labels, is_rare

    def no_support_seq(self, rng, class_type, seq_len, labeling):
        classes, weights = self.classes_to_sample(class_type)
        is_rare = [1 if class_type == "rare" else 0] * seq_len
        query = self.choose(rng, weights)
        support = [self.choose(rng, weights, exclude=query) for _ in range(seq_len - 1)]
        idx = support + [query]
        examples = [classes[i] for i in idx]
        if labeling == "original":
            labels = list(examples)
        elif labeling == "ordered":
            shift = {"common": self.n_rare_classes, "holdout": self.n_rare_classes + self.n_common_classes}
            labels = [i + shift.get(class_type, 0) for i in idx]
        else:  # 'orderedK'
            labels = [i + int(labeling.split("ordered")[1]) for i in idx]
        return examples, labels, is_rare

    def bursty_seq(self, rng):
        sq = self.cfg.sequence
        seq_len, shots, ways = sq.seq_len, sq.bursty_shots, sq.ways
        labeling_common, labeling_rare = sq.labeling_common.value, sq.labeling_rare.value
        if sq.polysemy > 1:
            labeling_rare = f"ordered_polysemy{sq.polysemy}"
        if "ordered_polysemy" in labeling_rare:
            factor = int(labeling_rare.split("ordered_polysemy")[1])
            labeling_common = f"ordered{self.n_rare_classes * factor}"
            labeling_rare = f"ordered0_polysemy{factor}"
        generate_remainders = seq_len > shots * ways + 1
        if rng.random() < sq.p_bursty:
            d = rng.random()
            if d < sq.p_bursty_zipfian:
                zipf = f"zipf_polysemy{sq.polysemy}" if sq.polysemy > 1 else labeling_rare
                kinds = ("zipfian", zipf, "zipfian", zipf)
            elif d < sq.p_bursty_common + sq.p_bursty_zipfian:
                kinds = ("common", labeling_common, "rare", labeling_rare)
            else:
                kinds = ("rare", labeling_rare, "common", labeling_common)
            ex, lb, rr = self.fewshot_seq(rng, kinds[0], shots, ways, kinds[1], sq.grouped, shuffle=False)
            if generate_remainders:
                rex, rlb, rrr = self.random_seq(rng, kinds[2], seq_len - shots * ways - 1, kinds[3])
                ex, lb, rr = rex + ex, rlb + lb, rrr + rr
            ordering = list(range(seq_len - 1))
            rng.shuffle(ordering)
            pick = ordering + [seq_len - 1]
            return [ex[k] for k in pick], [lb[k] for k in pick], [rr[k] for k in pick]
        kind = sq.non_bursty_type.value
        if kind == "zipfian":
            zipf = f"zipf_polysemy{sq.polysemy}" if sq.polysemy > 1 else labeling_common
            return self.random_seq(rng, "zipfian", seq_len, zipf)
        if kind == "common_uniform":
            return self.random_seq(rng, "common", seq_len, labeling_common)
        return self.no_support_seq(rng, "common", seq_len, labeling_common)

    def strategy_seq(self, rng, flip: bool):
        """flip / copy_available: distinct trained classes (redraw a taken one), their trained labels,
        with flip a derangement of them (whole permutations redrawn until no fixed point), the copies, a
        query way, the support shuffle."""
        sq = self.cfg.sequence
        shots, ways = sq.fs_shots, sq.ways
        classes, weights = self.classes_to_sample("zipfian")
        picked: list[int] = []
        while len(picked) < ways:
            i = self.choose(rng, weights)
            if classes[i] not in [classes[j] for j in picked]:
                picked.append(i)
        class_options = [classes[i] for i in picked]
        trained = list(class_options) if sq.labeling_common is Labeling.ORIGINAL else list(picked)
        perm = list(range(ways))
        while flip:
            perm = list(range(ways))
            rng.shuffle(perm)
            if all(perm[w] != w for w in range(ways)):
                break
        label_options = [trained[perm[w]] for w in range(ways)]
        query = rng.randint(ways)
        examples = class_options * shots + [class_options[query]]
        labels = label_options * shots + [label_options[query]]
        ordering = list(range(shots * ways))
        if sq.grouped:
            for s in range(shots):
                block = ordering[s * ways:(s + 1) * ways]
                rng.shuffle(block)
                ordering[s * ways:(s + 1) * ways] = block
        else:
            rng.shuffle(ordering)
        examples = [examples[k] for k in ordering] + [examples[-1]]
        labels = [labels[k] for k in ordering] + [labels[-1]]
        return examples, labels, [0] * len(examples)

    def sequence(self, rng):
        cfg, sq, t = self.cfg, self.cfg.sequence, self.cfg.seq_type
        if t in (SeqType.FLIP, SeqType.COPY_AVAILABLE):
            return self.strategy_seq(rng, t is SeqType.FLIP)
        if t is SeqType.BURSTY:
            return self.bursty_seq(rng)
        if t.is_no_support:
            labeling = "original" if sq.labeling_common is Labeling.ORIGINAL else "ordered"
            return self.no_support_seq(rng, t.value.removeprefix("no_support_"), cfg.length, labeling)
        if t.is_fewshot:
            return self.fewshot_seq(rng, t.value.removeprefix("fewshot_"), sq.fs_shots, sq.ways, "unfixed",
                                    sq.grouped)
        if rng.random() < sq.p_fewshot:  # mixed
            return self.fewshot_seq(rng, "rare", sq.fs_shots, sq.ways, "unfixed", False)
        return self.random_seq(rng, "common", cfg.length, "ordered")

    def exemplars(self, rng, examples):
        """_create_noisy_image_seq: each class's drawings without replacement (over the whole sequence),
        by rejection: redraw while the drawing is already taken by the class."""
        if self.n_exemplars == 1:
            return [0] * len(examples)
        chosen: list[int] = []
        for k, c in enumerate(examples):
            taken = {chosen[j] for j in range(k) if examples[j] == c}
            e = rng.randint(self.n_exemplars)
            while e in taken:
                e = rng.randint(self.n_exemplars)
            chosen.append(e)
        return chosen


def naive_generate(cfg: BuildConfig, split: ClassSplit, start: int, count: int) -> dict[str, np.ndarray]:
    gen = NaiveGenerator(cfg, split)
    rows: dict[str, list] = {"example": [], "exemplar": [], "label": [], "is_rare": [], "noise_seed": []}
    for i in range(start, start + count):
        rng = CounterRng(cfg.seed, SEQ_TYPE_TAGS[cfg.seq_type], i)
        examples, labels, is_rare = gen.sequence(rng)
        rows["example"].append(examples)
        rows["label"].append(labels)
        rows["is_rare"].append(is_rare)
        rows["exemplar"].append(gen.exemplars(rng, examples))
        rows["noise_seed"].append(rng.noise_seed())
    L = cfg.length
    out = {
        "example": np.array(rows["example"], dtype=np.int32).reshape(count, L),
        "exemplar": np.array(rows["exemplar"], dtype=np.uint8).reshape(count, L),
        "label": np.array(rows["label"], dtype=np.int32).reshape(count, L),
        "is_rare": np.array(rows["is_rare"], dtype=np.uint8).reshape(count, L),
    }
    if cfg.needs_noise_seed:
        out["noise_seed"] = np.array(rows["noise_seed"], dtype=np.uint32)
    return out
