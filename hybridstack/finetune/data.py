"""From task fields to padded batches: token budgets, head+tail truncation, length grouping.

A row is rendered as ``[CLS] seg_1 [SEP] seg_2 [SEP] ... [SEP]``. Single-text tasks have
one segment; pairwise rows have three (prompt, response A, response B), each held to its
share of the token budget (``finetune.segment_budget``) and cut head+tail, because the
end of a long answer says as much about its quality as the beginning.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from hybridstack.errors import HybridstackError

# Texts are clipped to this many characters per budget token before tokenising, so a
# 100k-character response costs no more than a short one; a token is rarely > 10 chars.
CHARS_PER_TOKEN_CAP = 10
# Length grouping sorts rows inside "mega-batches" of this many batches: long enough to
# group similar lengths, short enough that batch order stays random.
MEGABATCH_BATCHES = 50


def allocate_budget(lengths: Sequence[int], shares: Sequence[float], total: int) -> list[int]:
    """Split ``total`` tokens between segments in proportion to ``shares``.

    A segment shorter than its share keeps only what it needs; the rest goes to the
    segments that still need more (water-filling), so no budget is wasted.

    Parameters
    ----------
    lengths : (S,) token count of each segment.
    shares : (S,) non-negative weights, e.g. (0.2, 0.4, 0.4).
    total : tokens available for all segments together.

    Returns
    -------
    (S,) tokens granted to each segment; ``budget[i] <= lengths[i]``, sum <= total.
    """
    budget = [0] * len(lengths)
    # Serve the least needy segments first: whatever they leave is shared by the rest.
    order = sorted(range(len(lengths)),
                   key=lambda i: lengths[i] / shares[i] if shares[i] > 0 else math.inf)
    remaining, share_left = total, float(sum(shares))
    for position, i in enumerate(order):
        if position == len(order) - 1:
            fair = remaining  # the neediest segment absorbs rounding leftovers
        else:
            fair = int(remaining * shares[i] / share_left) if share_left > 0 else 0
        budget[i] = min(lengths[i], fair)
        remaining -= budget[i]
        share_left -= shares[i]
    return budget


def truncate_head_tail(ids: Sequence[int], budget: int, head_fraction: float) -> list[int]:
    """Keep ``budget`` tokens: ``round(budget * head_fraction)`` from the head, the rest from the tail."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    n_head = round(budget * head_fraction)
    n_tail = budget - n_head
    return ids[:n_head] + (ids[len(ids) - n_tail:] if n_tail else [])


def clip_chars(text: str, max_chars: int, head_fraction: float) -> str:
    """Head+tail character clip before tokenising (a cheap superset of the token clip)."""
    if len(text) <= max_chars:
        return text
    n_head = round(max_chars * head_fraction)
    return text[:n_head] + " " + text[len(text) - (max_chars - n_head):]


def check_shares(shares: Sequence[float], field_names: Sequence[str]) -> None:
    """One budget share per segment, or one error line naming the setting."""
    if len(shares) != len(field_names):
        raise HybridstackError(
            f"finetune.segment_budget has {len(shares)} shares but the task has "
            f"{len(field_names)} segments ({', '.join(field_names)}); give one share each"
        )


@dataclass(frozen=True)
class Renderer:
    """Renders task fields into token ids for one tokenizer and budget."""

    tokenizer: object  # a Hugging Face tokenizer
    field_names: list[str]
    shares: tuple[float, ...]
    max_length: int
    head_fraction: float

    def __post_init__(self) -> None:
        check_shares(self.shares, self.field_names)
        if self.sep_id is None:
            raise HybridstackError(
                "finetune.model: the tokenizer has no sep/eos token to join segments with; "
                "use an encoder tokenizer (BERT, DeBERTa, RoBERTa style)"
            )
        if self.tokenizer.pad_token_id is None:
            raise HybridstackError(
                "finetune.model: the tokenizer has no pad token, so batches cannot be padded; "
                "use an encoder tokenizer or set its pad_token and save it again"
            )

    @property
    def cls_id(self) -> int | None:
        tok = self.tokenizer
        return tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id

    @property
    def sep_id(self) -> int | None:
        tok = self.tokenizer
        return tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id

    @property
    def content_budget(self) -> int:
        """Tokens left for text after [CLS] and one [SEP] per segment."""
        n_special = len(self.field_names) + (self.cls_id is not None)
        return self.max_length - n_special

    def tokenize(self, fields: dict[str, list[str]]) -> list[list[list[int]]]:
        """Token ids of every segment, ``[row][segment] -> ids`` (no special tokens)."""
        max_chars = self.content_budget * CHARS_PER_TOKEN_CAP
        columns = []
        for name in self.field_names:
            texts = [clip_chars(t, max_chars, self.head_fraction) for t in fields[name]]
            unique = list(dict.fromkeys(texts))  # LMSYS repeats prompts: tokenise each once
            # verbose=False: the "longer than the maximum" warning does not apply, we cut below
            encoded = self.tokenizer(unique, add_special_tokens=False, verbose=False)["input_ids"]
            lookup = dict(zip(unique, encoded))
            columns.append([lookup[t] for t in texts])
        return [list(segments) for segments in zip(*columns)]

    def assemble(self, segments: Sequence[Sequence[int]]) -> list[int]:
        """``[CLS] seg_1 [SEP] ...`` with each segment held to its budget (head+tail)."""
        budgets = allocate_budget([len(s) for s in segments], self.shares, self.content_budget)
        ids = [] if self.cls_id is None else [self.cls_id]
        for segment, budget in zip(segments, budgets):
            ids += truncate_head_tail(segment, budget, self.head_fraction) + [self.sep_id]
        return ids

    def render(self, fields: dict[str, list[str]], swap: tuple[str, str] | None = None,
               turns: dict | None = None) -> tuple[list[list[int]], list[list[int]] | None]:
        """Input ids of every row, and of its swapped view when ``swap`` names two fields.

        ``turns`` (a Dataset's) is for :class:`TurnRenderer`; segments here are whole fields.

        Returns
        -------
        (ids, swapped_ids): lists of n token-id lists; ``swapped_ids`` is None without ``swap``.
        """
        return assemble_views(self.assemble, self.tokenize(fields), self.field_names, swap)


def assemble_views(assemble, rows: list, field_names: Sequence[str],
                   swap: tuple[str, str] | None) -> tuple[list[list[int]], list[list[int]] | None]:
    """Every row's ids, and its swapped view's (the ``swap`` segments exchanged) if asked."""
    ids = [assemble(segments) for segments in rows]
    if swap is None:
        return ids, None
    a, b = (list(field_names).index(f) for f in swap)
    order = list(range(len(field_names)))
    order[a], order[b] = order[b], order[a]
    return ids, [assemble([segments[j] for j in order]) for segments in rows]


# Decoder backbones: each segment's turns come after a marker, turn by turn, and the row
# ends with END_MARKER, whose last token is the one the classification head pools.
END_MARKER = "\n<verdict>:"
# Turns of a long conversation kept (head + tail) when markers would take more of the budget.
MARKER_SHARE_CAP = 0.25


def turn_marker(field_name: str) -> str:
    return f"\n<{field_name}>: "


@dataclass(frozen=True)
class TurnRenderer:
    """Renders task fields for decoder backbones (Llama, Gemma-2, Qwen2, Mistral).

    ``[BOS] <prompt>: p1 <response_a>: a1 <response_b>: b1 <prompt>: p2 ... <verdict>:``:
    the turns of every segment interleaved behind clear markers. The budget is split
    between segments by ``shares`` (water-filling, as for encoders), then within a segment
    between its turns, each turn cut head+tail. A row never ends with a pad/eos token, so
    the head's "last non-pad token" is always the end marker's, even where pad = eos.
    """

    tokenizer: object
    field_names: list[str]
    shares: tuple[float, ...]
    max_length: int
    head_fraction: float

    def __post_init__(self) -> None:
        check_shares(self.shares, self.field_names)
        if self.tokenizer.pad_token_id is None:
            raise HybridstackError("finetune.model: the decoder tokenizer has no pad token "
                                   "(hybridstack.finetune.lora.prepare_tokenizer sets one)")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @cached_property  # frozen dataclass: cached_property writes __dict__ directly
    def markers(self) -> list[list[int]]:
        if len(self.field_names) == 1:
            return [[]]
        return [self._ids(turn_marker(name)) for name in self.field_names]

    @cached_property
    def prefix(self) -> list[int]:
        bos = self.tokenizer.bos_token_id
        return [] if bos is None else [bos]

    def tokenize(self, fields: dict[str, list[str]],
                 turns: dict | None = None) -> list[list[list[list[int]]]]:
        """``[row][segment][turn] -> ids`` (no special tokens, no markers)."""
        max_chars = self.max_length * CHARS_PER_TOKEN_CAP
        columns = []
        for name in self.field_names:
            field_turns = None if turns is None else turns.get(name)
            rows = [(t,) if field_turns is None or field_turns[i] is None else field_turns[i]
                    for i, t in enumerate(fields[name])]
            unique = list(dict.fromkeys(clip_chars(t, max_chars, self.head_fraction)
                                        for row in rows for t in row))
            encoded = self.tokenizer(unique, add_special_tokens=False, verbose=False)["input_ids"]
            lookup = dict(zip(unique, encoded))
            columns.append([[lookup[clip_chars(t, max_chars, self.head_fraction)] for t in row]
                            for row in rows])
        return [list(segments) for segments in zip(*columns)]

    def assemble(self, segments: Sequence[Sequence[Sequence[int]]]) -> list[int]:
        markers, prefix, end = self.markers, self.prefix, self._end
        n_turns = max(len(s) for s in segments)
        per_turn = sum(len(m) for m in markers)
        fixed = len(prefix) + len(end)
        room = self.max_length - fixed
        keep = max(1, min(n_turns, int(room * MARKER_SHARE_CAP) // max(per_turn, 1)))
        kept = truncate_head_tail(list(range(n_turns)), keep, self.head_fraction)
        # each segment's kept turns (a segment with fewer turns than others is padded with [])
        turns = [[list(s[t]) if t < len(s) else [] for t in kept] for s in segments]
        budget = max(0, room - per_turn * len(kept))
        seg_budget = allocate_budget([sum(map(len, ts)) for ts in turns], self.shares, budget)
        for j, ts in enumerate(turns):
            cuts = allocate_budget([len(t) for t in ts], [1.0] * len(ts), seg_budget[j])
            turns[j] = [truncate_head_tail(t, c, self.head_fraction) for t, c in zip(ts, cuts)]
        ids = list(prefix)
        for i in range(len(kept)):
            for j in range(len(segments)):
                ids += markers[j] + turns[j][i]
        return ids + end

    @cached_property
    def _end(self) -> list[int]:
        return self._ids(END_MARKER)

    def render(self, fields: dict[str, list[str]], swap: tuple[str, str] | None = None,
               turns: dict | None = None) -> tuple[list[list[int]], list[list[int]] | None]:
        """Like :meth:`Renderer.render`; the swapped view exchanges the two segments' turns."""
        return assemble_views(self.assemble, self.tokenize(fields, turns), self.field_names, swap)


def make_renderer(tokenizer, field_names: list[str], shares: tuple[float, ...], max_length: int,
                  head_fraction: float, decoder: bool) -> Renderer | TurnRenderer:
    """The renderer of an encoder (``[CLS] a [SEP] b [SEP]``) or a decoder (turns + markers)."""
    cls = TurnRenderer if decoder else Renderer
    return cls(tokenizer, list(field_names), shares, max_length, head_fraction)


@dataclass(frozen=True)
class TokenFeaturizer:
    """How a fine-tuned model's rows become token ids: saved as its ``featurizer.joblib``
    (the tokenizer is the one saved in each fold's ``best/``), so predict renders new rows
    exactly as the stage rendered train and test."""

    field_names: tuple[str, ...]
    shares: tuple[float, ...]  # of the token budget, per field
    max_length: int
    head_fraction: float
    swap: tuple[str, str] | None  # the fields exchanged for the swapped view, if any
    decoder: bool = False  # a decoder backbone: turns behind markers (TurnRenderer)

    @classmethod
    def from_settings(cls, ft: dict, field_names: Sequence[str],
                      swap_fields: tuple[str, str] | None, decoder: bool = False
                      ) -> TokenFeaturizer:
        """From the [finetune] settings (``FinetuneConfig.model_dump(mode="json")``)."""
        shares = tuple(ft["segment_budget"]) if len(field_names) > 1 else (1.0,)
        wants_swap = ft["swap_augment"] or ft["swap_tta"]
        return cls(tuple(field_names), shares, ft["max_length"], ft["head_fraction"],
                   tuple(swap_fields) if wants_swap and swap_fields else None, decoder)

    def renderer(self, tokenizer) -> Renderer | TurnRenderer:
        return make_renderer(tokenizer, list(self.field_names), self.shares, self.max_length,
                             self.head_fraction, self.decoder)

    def render(self, tokenizer, fields: dict[str, list[str]],
               turns: dict | None = None) -> list[list[list[int]]]:
        """[ids] or [ids, swapped ids]: n token-id lists per view (``turns``: a Dataset's)."""
        ids, swapped = self.renderer(tokenizer).render(fields, self.swap, turns)
        return [ids] if swapped is None else [ids, swapped]


class EncodedRows(Dataset):
    """Token ids and (optionally) float32 targets of n rows, indexable for a DataLoader."""

    def __init__(self, input_ids: list[list[int]], targets: np.ndarray | None = None):
        self.input_ids = input_ids
        self.targets = targets

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i]}
        if self.targets is not None:
            item["labels"] = self.targets[i]
        return item

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]


class Collator:
    """Pads a list of rows to the longest in the batch (or to ``pad_to``) with the tokenizer."""

    def __init__(self, tokenizer, pad_to: int | None = None):
        self.tokenizer = tokenizer
        self.pad_to = pad_to

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad(
            {"input_ids": [item["input_ids"] for item in items]},
            padding="max_length" if self.pad_to else "longest",
            max_length=self.pad_to,
            return_attention_mask=True,
            return_tensors="pt",
        )
        out = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "labels" in items[0]:
            out["labels"] = torch.from_numpy(np.stack([item["labels"] for item in items]))
        return out


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Random batches of similar length, reproducible from ``(seed, epoch)``.

    Rows are shuffled, cut into mega-batches of ``MEGABATCH_BATCHES`` batches, sorted by
    length inside each, chunked into batches, and the batches shuffled again. Padding
    then costs little while every epoch still sees a fresh random order.
    ``group_by_length=False`` gives plain shuffled batches (the padding benchmark's baseline).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int,
                 group_by_length: bool = True):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _chunks(self) -> list[int]:
        """Row counts of the mega-batches (the sorting windows)."""
        n, window = len(self.lengths), self.batch_size * MEGABATCH_BATCHES
        return [min(window, n - start) for start in range(0, n, window)]

    def __len__(self) -> int:
        return sum(math.ceil(size / self.batch_size) for size in self._chunks())

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches, start = [], 0
        for size in self._chunks():
            window = order[start:start + size]
            start += size
            if self.group_by_length:
                window.sort(key=lambda i: -self.lengths[i])
            batches += [window[j:j + self.batch_size] for j in range(0, size, self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Deterministic inference batches, longest first (least padding, OOM shows up early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
