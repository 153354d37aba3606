"""Jigsaw- and LMSYS-shaped competition folders of any size, for scale benchmarks.

Texts are made by recombining the sentences (and lines) of the real rows in ../shared/data,
so their lengths and vocabulary stay those of real data; labels follow the real competitions'
rates, not those of the subsets the sentences come from:

* ``jigsaw``: ``train.csv`` (id, comment_text, the 6 labels), ``test.csv`` (id, comment_text)
  at the competition's 153,164 test : 159,571 train rows, ``sample_submission.csv`` (0.5 in
  every label column) and ``test_labels.csv``; every field quoted, as in Kaggle's files.
  10.17% of the comments carry a label (16,225 of 159,571 on Kaggle), with the label
  combinations of the labelled rows of jigsaw-toxic-10k, which give the competition's rates
  (toxic ~9.6%, severe_toxic ~1.0%, obscene ~5.3%, threat ~0.3%, insult ~4.9%, identity_hate
  ~0.9%) and its nesting (severe_toxic implies toxic). A comment of a label combination is
  made of sentences of real comments of that combination, with as many sentences as a real
  comment of it (a random one) has; sentence breaks are newlines at the rate of the Kaggle
  excerpt's (jigsaw-toxic-10k had its whitespace collapsed).
* ``lmsys``: ``train.csv`` (id, model_a, model_b, prompt, response_a, response_b,
  winner_model_a, winner_model_b, winner_tie; prompt and responses JSON lists of turns, as
  Kaggle's files and llmeval2-pairwise) at LMSYS's 25,000 test : 57,477 train rows,
  ``test.csv`` (id, prompt, response_a, response_b), ``sample_submission.csv`` and
  ``test_labels.csv``. Winners at LMSYS's rates (A 34.9%, B 34.2%, tie 30.9%); each row takes
  the turn structure and segment lengths (in sentences) of a real llmeval2 row with the same
  winner, its texts drawn from every prompt's / response's sentences. ``--repeat-prompts F``
  gives a share F of the rows the prompt of an earlier row (LMSYS: ~10%); by default every
  prompt is unique.

Every text (comment; prompt, response) is unique: a text that came out equal to an earlier
one is drawn again with one of its sentences spliced from two (the head of one, the tail of
another, cut at word boundaries). The same seed gives byte-identical files. Write the folder
outside the repository (e.g. under /tmp); nothing generated belongs in it.

    python bench/scale_data.py jigsaw 10000 /tmp/scale/jigsaw-10k [--test-rows N] [--seed 0] [--zip]
    python bench/scale_data.py lmsys 10000 /tmp/scale/lmsys-10k [--repeat-prompts 0.1]

Prints the folder's statistics as JSON (rows, label rates, text lengths of the generated and
the source rows, repeats).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import random
import re
import statistics
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
JIGSAW_SOURCE = DATA / "jigsaw-toxic-10k" / "source" / "train_10k.csv"
JIGSAW_EXCERPT = DATA / "jigsaw-toxic-kaggle-excerpt" / "train.csv"
LMSYS_SOURCE = DATA / "llmeval2-pairwise"

JIGSAW_LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
PAIRWISE_LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]
# The real competitions' sizes and rates.
JIGSAW_TRAIN, JIGSAW_TEST = 159_571, 153_164
JIGSAW_ANY_LABEL = 16_225 / 159_571  # rows with at least one label
LMSYS_TRAIN, LMSYS_TEST = 57_477, 25_000
LMSYS_WINNER_RATES = (0.349, 0.342, 0.309)  # winner_model_a, winner_model_b, winner_tie
LMSYS_MODELS = (  # a few of the arena's model names (Kaggle's train.csv has 64)
    "gpt-4-1106-preview", "gpt-4-0613", "gpt-4-0314", "gpt-3.5-turbo-0613", "gpt-3.5-turbo-0125",
    "claude-2.1", "claude-2.0", "claude-1", "claude-instant-1", "llama-2-70b-chat",
    "llama-2-13b-chat", "vicuna-33b", "vicuna-13b", "mixtral-8x7b-instruct-v0.1",
    "mistral-medium", "gemini-pro", "gemini-pro-dev-api", "zephyr-7b-beta", "koala-13b",
    "palm-2", "wizardlm-70b", "yi-34b-chat", "qwen-14b-chat", "openchat-3.5",
)
GENERATOR_VERSION = 1  # bump when the same seed would give other files

# A unit is a sentence or a line; the separator after it (spaces or a line break) stays with it.
_SPLIT = re.compile(r"((?<=[.!?])[ \t]+|[ \t]*\n\s*)")
_MAX_TRIES = 50


def competition_train_rows(kind: str) -> int:
    """The real competition's train rows (the full-size rung of the ladder)."""
    return JIGSAW_TRAIN if kind == "jigsaw" else LMSYS_TRAIN


def test_rows_for(kind: str, n_train: int) -> int:
    """Test rows in the competition's ratio to ``n_train`` train rows."""
    train, test = (JIGSAW_TRAIN, JIGSAW_TEST) if kind == "jigsaw" else (LMSYS_TRAIN, LMSYS_TEST)
    return max(1, round(n_train * test / train))


def split_units(text: str) -> list[str]:
    """Sentences/lines of ``text``, each with the separator that followed it (none on the last)."""
    parts = _SPLIT.split(text.strip())
    units = [parts[i] + (parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]
    return [u for u in units if u.strip()] or [text]


# -- building unique texts ------------------------------------------------------------------------


@dataclass
class TextMaker:
    """Joins units drawn from pools into texts never made before (by this maker)."""

    rng: random.Random
    newline_rate: float = 0.0  # share of unit breaks that become a line break
    newline_seps: list[str] = field(default_factory=lambda: ["\n"])
    seen: set[bytes] = field(default_factory=set)
    spliced: int = 0

    def _join(self, units: list[str]) -> str:
        out = []
        for i, unit in enumerate(units):
            body = unit.rstrip()
            if i + 1 < len(units):
                if self.newline_rate and self.rng.random() < self.newline_rate:
                    sep = self.rng.choice(self.newline_seps)
                else:
                    sep = unit[len(body):] or " "
                out.append(body + sep)
            else:
                out.append(body)
        return "".join(out)

    def _splice(self, a: str, b: str) -> str:
        """The head of ``a`` and the tail of ``b``, cut at word boundaries."""
        wa, wb = a.rstrip().split(" "), b.rstrip().split(" ")
        head = wa[:self.rng.randint(1, len(wa))]
        tail = wb[self.rng.randint(0, len(wb) - 1):]
        return " ".join(head + tail) + b[len(b.rstrip()):]

    def make(self, pool: list[str], n_units: int, fallback: list[str] | None = None) -> str:
        """A text of ``n_units`` units of ``pool``, unique among this maker's texts."""
        n_units = max(1, n_units)
        for attempt in range(_MAX_TRIES):
            units = [self.rng.choice(pool) for _ in range(n_units)]
            if attempt:  # a repeat: splice one of the units from two
                j = self.rng.randrange(n_units)
                other = self.rng.choice(fallback if fallback and attempt > _MAX_TRIES // 2 else pool)
                units[j] = self._splice(units[j], other)
            text = self._join(units)
            key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=12).digest()
            if key not in self.seen:
                self.seen.add(key)
                self.spliced += attempt > 0
                return text
        raise RuntimeError(f"no unique text after {_MAX_TRIES} tries (a pool of {len(pool)} units)")


def _length_stats(texts: list[str]) -> dict:
    lengths = [len(t) for t in texts]
    return {"mean_chars": round(statistics.fmean(lengths), 1), "median_chars": statistics.median(lengths)}


def _ids(rng: random.Random, n: int, bits: int, taken: set) -> list:
    out = []
    while len(out) < n:
        value = rng.getrandbits(bits)
        if value not in taken:
            taken.add(value)
            out.append(value)
    return out


def _write_csv(frame: pd.DataFrame, path: Path, quote_all: bool) -> None:
    frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL if quote_all else csv.QUOTE_MINIMAL,
                 lineterminator="\n")


# -- Jigsaw ---------------------------------------------------------------------------------------


def _jigsaw_sources() -> tuple[dict[str, list[str]], dict[str, list[int]], dict[str, int], list[str], float]:
    """Units and unit counts per label combination, combination counts among labelled rows,
    and the Kaggle excerpt's line-break separators and their rate among unit breaks."""
    real = pd.read_csv(JIGSAW_SOURCE, dtype={c: int for c in JIGSAW_LABELS}, keep_default_na=False)
    patterns = real[JIGSAW_LABELS].astype(str).agg("".join, axis=1)
    units: dict[str, list[str]] = {}
    counts: dict[str, list[int]] = {}
    for text, pattern in zip(real["comment_text"], patterns):
        u = split_units(text)
        units.setdefault(pattern, []).extend(u)
        counts.setdefault(pattern, []).append(len(u))
    labelled = patterns[patterns != "0" * len(JIGSAW_LABELS)].value_counts().sort_index()
    excerpt = pd.read_csv(JIGSAW_EXCERPT, keep_default_na=False)
    seps = [m.group(0) for t in excerpt["comment_text"] for m in _SPLIT.finditer(t.strip())]
    newline_seps = [s for s in seps if "\n" in s]
    rate = len(newline_seps) / max(1, len(seps))
    return units, counts, labelled.to_dict(), newline_seps or ["\n"], rate


def jigsaw_frames(n_train: int, n_test: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Train and test frames (test with its labels) and the source statistics."""
    units, counts, labelled, newline_seps, newline_rate = _jigsaw_sources()
    rng = random.Random(f"jigsaw-{seed}")
    maker = TextMaker(rng, newline_rate, newline_seps)
    clean = "0" * len(JIGSAW_LABELS)
    combos, weights = list(labelled), list(labelled.values())
    toxic_units = [u for p in combos for u in units[p]]
    taken: set = set()
    frames = []
    for n in (n_train, n_test):
        ids = sorted(f"{v:016x}" for v in _ids(rng, n, 64, taken))
        rows = []
        for row_id in ids:
            pattern = rng.choices(combos, weights)[0] if rng.random() < JIGSAW_ANY_LABEL else clean
            text = maker.make(units[pattern], rng.choice(counts[pattern]),
                              fallback=toxic_units if pattern != clean else units[clean])
            rows.append((row_id, text, *map(int, pattern)))
        frames.append(pd.DataFrame(rows, columns=["id", "comment_text", *JIGSAW_LABELS]))
    source = pd.read_csv(JIGSAW_SOURCE, keep_default_na=False)
    labelled_rows = source[JIGSAW_LABELS].astype(int).any(axis=1)
    stats = {"source_rows": len(source),
             "source_lengths_clean": _length_stats(list(source.comment_text[~labelled_rows])),
             "source_lengths_labelled": _length_stats(list(source.comment_text[labelled_rows])),
             "newline_rate": round(newline_rate, 3), "spliced_texts": maker.spliced}
    return frames[0], frames[1], stats


def write_jigsaw(folder: str | Path, n_train: int, n_test: int | None = None, seed: int = 0,
                 zipped: bool = False) -> dict:
    """Write a Jigsaw-shaped competition folder; return its statistics."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_test = test_rows_for("jigsaw", n_train) if n_test is None else n_test
    train, test, stats = jigsaw_frames(n_train, n_test, seed)
    files = {"train.csv": (train, True), "test.csv": (test[["id", "comment_text"]], True),
             "sample_submission.csv": (test[["id"]].assign(**{c: 0.5 for c in JIGSAW_LABELS}), False),
             "test_labels.csv": (test[["id", *JIGSAW_LABELS]], False)}
    for name, (frame, quote_all) in files.items():
        _write_csv(frame, folder / name, quote_all)
        if zipped and name != "test_labels.csv":  # Kaggle ships train.csv.zip, ...
            with zipfile.ZipFile(folder / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                zf.write(folder / name, arcname=name)
            (folder / name).unlink()
    any_label = train[JIGSAW_LABELS].any(axis=1)
    return {"kind": "jigsaw", "folder": str(folder), "seed": seed, "train_rows": len(train),
            "test_rows": len(test), "label_rates": train[JIGSAW_LABELS].mean().round(4).to_dict(),
            "any_label_rate": round(float(any_label.mean()), 4),
            "severe_without_toxic": int(((train.severe_toxic == 1) & (train.toxic == 0)).sum()),
            "lengths_clean": _length_stats(list(train.comment_text[~any_label])),
            "lengths_labelled": _length_stats(list(train.comment_text[any_label])),
            "unique_texts": int(pd.concat([train.comment_text, test.comment_text]).nunique()),
            **stats}


# -- LMSYS ----------------------------------------------------------------------------------------


def _turn_units(cell: str) -> list[list[str] | None]:
    return [None if t is None else split_units(str(t)) for t in json.loads(cell)]


def _lmsys_sources() -> tuple[list[dict], list[str], list[str], pd.DataFrame]:
    """Donor rows (winner, turn structure in units) and the prompt and response unit pools."""
    train = pd.read_csv(LMSYS_SOURCE / "train.csv", keep_default_na=False)
    test = pd.read_csv(LMSYS_SOURCE / "test.csv", keep_default_na=False).merge(
        pd.read_csv(LMSYS_SOURCE / "test_labels.csv"), on="id")
    real = pd.concat([train, test], ignore_index=True)
    donors, prompt_pool, response_pool = [], [], []
    for row in real.itertuples(index=False):
        prompt, a, b = (_turn_units(getattr(row, c)) for c in ("prompt", "response_a", "response_b"))
        for turns, pool in ((prompt, prompt_pool), (a, response_pool), (b, response_pool)):
            pool.extend(u for t in turns if t for u in t)
        winner = [int(getattr(row, c)) for c in PAIRWISE_LABELS].index(1)
        donors.append({"winner": winner, "turns": [
            tuple(None if t is None else len(t) for t in turn) for turn in zip(prompt, a, b)]})
    return donors, prompt_pool, response_pool, real


def lmsys_frames(n_train: int, n_test: int, seed: int = 0,
                 repeat_prompts: float = 0.0) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    donors, prompt_pool, response_pool, real = _lmsys_sources()
    by_winner = [[d for d in donors if d["winner"] == w] for w in range(3)]
    rng = random.Random(f"lmsys-{seed}")
    prompts, responses = TextMaker(rng), TextMaker(rng)
    made: list[tuple[str, dict]] = []  # (prompt JSON, donor) of every row so far
    taken: set = set()
    frames, repeated = [], 0
    for n in (n_train, n_test):
        ids = sorted(_ids(rng, n, 32, taken))
        rows = []
        for row_id in ids:
            winner = rng.choices(range(3), LMSYS_WINNER_RATES)[0]
            if made and rng.random() < repeat_prompts:
                prompt, donor = rng.choice(made)
                repeated += 1
            else:
                donor = rng.choice(by_winner[winner] or donors)
                prompt = json.dumps([prompts.make(prompt_pool, p or 1) for p, _, _ in donor["turns"]],
                                    ensure_ascii=False)
                made.append((prompt, donor))
            sides = [json.dumps([None if turn[k] is None else responses.make(response_pool, turn[k])
                                 for turn in donor["turns"]], ensure_ascii=False) for k in (1, 2)]
            model_a, model_b = rng.sample(LMSYS_MODELS, 2)
            rows.append((row_id, model_a, model_b, prompt, *sides, *[int(winner == k) for k in range(3)]))
        frames.append(pd.DataFrame(rows, columns=["id", "model_a", "model_b", "prompt", "response_a",
                                                  "response_b", *PAIRWISE_LABELS]))
    stats = {"source_rows": len(real), "source_prompt_lengths": _length_stats(list(real["prompt"])),
             "source_response_lengths": _length_stats(list(real["response_a"]) + list(real["response_b"])),
             "repeated_prompt_rows": repeated,
             "spliced_texts": prompts.spliced + responses.spliced}
    return frames[0], frames[1], stats


def write_lmsys(folder: str | Path, n_train: int, n_test: int | None = None, seed: int = 0,
                repeat_prompts: float = 0.0) -> dict:
    """Write an LMSYS-shaped competition folder; return its statistics."""
    if not 0 <= repeat_prompts < 1:
        raise ValueError(f"repeat_prompts must be in [0, 1), got {repeat_prompts}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_test = test_rows_for("lmsys", n_train) if n_test is None else n_test
    train, test, stats = lmsys_frames(n_train, n_test, seed, repeat_prompts)
    text = ["prompt", "response_a", "response_b"]
    _write_csv(train, folder / "train.csv", False)
    _write_csv(test[["id", *text]], folder / "test.csv", False)
    _write_csv(test[["id"]].assign(**{c: 1 / 3 for c in PAIRWISE_LABELS}), folder / "sample_submission.csv",
               False)
    _write_csv(test[["id", *PAIRWISE_LABELS]], folder / "test_labels.csv", False)
    both = pd.concat([train, test])
    return {"kind": "lmsys", "folder": str(folder), "seed": seed, "train_rows": len(train),
            "test_rows": len(test), "label_rates": train[PAIRWISE_LABELS].mean().round(4).to_dict(),
            "multi_turn_rate": round(float(train.prompt.map(lambda p: len(json.loads(p)) > 1).mean()), 4),
            "prompt_lengths": _length_stats(list(train["prompt"])),
            "response_lengths": _length_stats(list(train["response_a"]) + list(train["response_b"])),
            "unique_prompts": int(both.prompt.nunique()),
            "unique_responses": int(pd.concat([both.response_a, both.response_b]).nunique()),
            "repeat_prompts": repeat_prompts, **stats}


def write(kind: str, folder: str | Path, n_train: int, n_test: int | None = None, seed: int = 0,
          repeat_prompts: float = 0.0, zipped: bool = False) -> dict:
    """``write_jigsaw`` or ``write_lmsys`` by ``kind``; the statistics get the seconds taken."""
    started = time.perf_counter()
    if kind == "jigsaw":
        stats = write_jigsaw(folder, n_train, n_test, seed, zipped)
    elif kind == "lmsys":
        stats = write_lmsys(folder, n_train, n_test, seed, repeat_prompts)
    else:
        raise ValueError(f"kind must be jigsaw or lmsys, got {kind!r}")
    stats["generator_version"] = GENERATOR_VERSION
    stats["seconds"] = round(time.perf_counter() - started, 1)
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["jigsaw", "lmsys"])
    parser.add_argument("train_rows", type=int)
    parser.add_argument("folder", type=Path, help="where to write (outside the repository)")
    parser.add_argument("--test-rows", type=int, help="default: the competition's ratio to the train rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat-prompts", type=float, default=0.0,
                        help="lmsys: share of rows that take an earlier row's prompt (LMSYS: ~0.1)")
    parser.add_argument("--zip", action="store_true", help="jigsaw: train.csv.zip etc., as Kaggle ships them")
    args = parser.parse_args(argv)
    if args.folder.resolve().is_relative_to(ROOT):
        parser.error(f"{args.folder} is inside the repository; write generated data elsewhere (e.g. /tmp)")
    stats = write(args.kind, args.folder, args.train_rows, args.test_rows, args.seed, args.repeat_prompts,
                  args.zip)
    print(json.dumps(stats, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
