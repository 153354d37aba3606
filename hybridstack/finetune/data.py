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
from hybridstack.finetune.token_store import TokenStore, as_token_store

# Texts are clipped to this many characters per budget token before tokenising, so a
# 100k-character response costs no more than a short one; a token is rarely > 10 chars.
CHARS_PER_TOKEN_CAP = 10
# Length grouping sorts rows inside "mega-batches" of this many batches: long enough to
# group similar lengths, short enough that batch order stays random.
MEGABATCH_BATCHES = 50
# Distinct texts tokenised per tokenizer call: each chunk's Python lists become int32 arrays
# before the next, so all rows' ids never exist as Python ints at once.
ENCODE_CHUNK = 2048


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


def truncate_head_tail_array(ids: np.ndarray, budget: int, head_fraction: float) -> np.ndarray:
    """:func:`truncate_head_tail` of an int32 array (the same tokens kept, no Python ints)."""
    if len(ids) <= budget:
        return ids
    n_head = round(budget * head_fraction)
    n_tail = budget - n_head
    return np.concatenate([ids[:n_head], ids[len(ids) - n_tail:]]) if n_tail else ids[:n_head]


def encode_texts(tokenizer, texts: Sequence[str]) -> tuple[TokenStore, np.ndarray]:
    """Every distinct text tokenised once (no special tokens), in chunks.

    LMSYS repeats prompts, so each is tokenised once. Returns the store of distinct texts'
    ids and the (n,) int64 index of each text's row in it.
    """
    index_of: dict[str, int] = {}
    codes = np.fromiter((index_of.setdefault(t, len(index_of)) for t in texts),
                        dtype=np.int64, count=len(texts))
    unique = list(index_of)
    del index_of
    arrays = []
    for start in range(0, len(unique), ENCODE_CHUNK):
        # verbose=False: the "longer than the maximum" warning does not apply, we cut later
        encoded = tokenizer(unique[start:start + ENCODE_CHUNK], add_special_tokens=False,
                            verbose=False)["input_ids"]
        arrays += [np.asarray(e, dtype=np.int32) for e in encoded]
    return TokenStore.from_arrays(arrays), codes


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

    def encode(self, fields: dict[str, list[str]], turns: dict | None = None
               ) -> list[tuple[TokenStore, np.ndarray]]:
        """Per field: the distinct (clipped) texts' ids and each row's index into them."""
        max_chars = self.content_budget * CHARS_PER_TOKEN_CAP
        return [encode_texts(self.tokenizer, [clip_chars(t, max_chars, self.head_fraction)
                                              for t in fields[name]])
                for name in self.field_names]

    def assemble(self, segments: Sequence[Sequence[int]]) -> np.ndarray:
        """``[CLS] seg_1 [SEP] ...`` with each segment held to its budget (head+tail)."""
        budgets = allocate_budget([len(s) for s in segments], self.shares, self.content_budget)
        sep = np.array([self.sep_id], dtype=np.int32)
        parts = [] if self.cls_id is None else [np.array([self.cls_id], dtype=np.int32)]
        for segment, budget in zip(segments, budgets):
            parts += [truncate_head_tail_array(np.asarray(segment, dtype=np.int32), budget,
                                               self.head_fraction), sep]
        return np.concatenate(parts)

    def row_segments(self, encoded: list[tuple[TokenStore, np.ndarray]], i: int) -> list:
        """Row ``i``'s segments (int32 views into the encoded fields)."""
        return [store[codes[i]] for store, codes in encoded]

    def render_store(self, fields: dict[str, list[str]], swap: tuple[str, str] | None = None,
                     turns: dict | None = None) -> TokenStore:
        """Input ids of the n rows, then (``swap`` names two fields) of their n swapped views.

        ``turns`` (a Dataset's) is for :class:`TurnRenderer`; segments here are whole fields.
        """
        return assemble_views(self, self.encode(fields, turns), swap)

    def render(self, fields: dict[str, list[str]], swap: tuple[str, str] | None = None,
               turns: dict | None = None) -> tuple[list[list[int]], list[list[int]] | None]:
        """:meth:`render_store` as token-id lists (original, swapped or None): for small inputs."""
        return store_as_lists(self.render_store(fields, swap, turns), swap is not None)


def assemble_views(renderer, encoded: list, swap: tuple[str, str] | None) -> TokenStore:
    """Every row's ids (rows 0..n-1), then its swapped view's (n..2n-1) if ``swap`` is set.

    Rows are assembled one at a time from the encoded fields, each straight into int32.
    """
    n = len(encoded[0][1])
    orders = [list(range(len(renderer.field_names)))]
    if swap is not None:
        a, b = (list(renderer.field_names).index(f) for f in swap)
        swapped = list(orders[0])
        swapped[a], swapped[b] = swapped[b], swapped[a]
        orders.append(swapped)
    rows = []
    for order in orders:
        for i in range(n):
            segments = renderer.row_segments(encoded, i)
            rows.append(renderer.assemble([segments[j] for j in order]))
    return TokenStore.from_arrays(rows)


def store_as_lists(store: TokenStore, swapped: bool) -> tuple[list[list[int]], list[list[int]] | None]:
    views = [view.to_lists() for view in split_views(store, swapped)]
    return views[0], views[1] if swapped else None


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

    def encode(self, fields: dict[str, list[str]], turns: dict | None = None
               ) -> list[tuple[TokenStore, list[np.ndarray]]]:
        """Per field: the distinct (clipped) turns' ids and each row's turn indices into them."""
        max_chars = self.max_length * CHARS_PER_TOKEN_CAP
        encoded = []
        for name in self.field_names:
            field_turns = None if turns is None else turns.get(name)
            rows = [(t,) if field_turns is None or field_turns[i] is None else field_turns[i]
                    for i, t in enumerate(fields[name])]
            flat = [clip_chars(t, max_chars, self.head_fraction) for row in rows for t in row]
            store, codes = encode_texts(self.tokenizer, flat)
            bounds = np.cumsum([0] + [len(row) for row in rows])
            encoded.append((store, [codes[bounds[i]:bounds[i + 1]] for i in range(len(rows))]))
        return encoded

    def row_segments(self, encoded: list, i: int) -> list[list[np.ndarray]]:
        """Row ``i``'s segments, each a list of its turns' int32 ids."""
        return [[store[c] for c in codes[i]] for store, codes in encoded]

    def assemble(self, segments: Sequence[Sequence[Sequence[int]]]) -> list[int]:
        markers, prefix, end = self.markers, self.prefix, self._end
        n_turns = max(len(s) for s in segments)
        per_turn = sum(len(m) for m in markers)
        fixed = len(prefix) + len(end)
        room = self.max_length - fixed
        keep = max(1, min(n_turns, int(room * MARKER_SHARE_CAP) // max(per_turn, 1)))
        kept = truncate_head_tail(list(range(n_turns)), keep, self.head_fraction)
        # each segment's kept turns (a segment with fewer turns than others is padded with [])
        turns = [[np.asarray(s[t]).tolist() if t < len(s) else [] for t in kept]
                 for s in segments]
        budget = max(0, room - per_turn * len(kept))
        seg_budget = allocate_budget([sum(map(len, ts)) for ts in turns], self.shares, budget)
        for j, ts in enumerate(turns):
            cuts = allocate_budget([len(t) for t in ts], [1.0] * len(ts), seg_budget[j])
            turns[j] = [truncate_head_tail(t, c, self.head_fraction) for t, c in zip(ts, cuts)]
        ids = list(prefix)
        for i in range(len(kept)):
            for j in range(len(segments)):
                ids += markers[j] + turns[j][i]
        return np.array(ids + end, dtype=np.int32)

    @cached_property
    def _end(self) -> list[int]:
        return self._ids(END_MARKER)

    def render_store(self, fields: dict[str, list[str]], swap: tuple[str, str] | None = None,
                     turns: dict | None = None) -> TokenStore:
        """Like :meth:`Renderer.render_store`; the swapped view exchanges the two segments' turns."""
        return assemble_views(self, self.encode(fields, turns), swap)

    def render(self, fields: dict[str, list[str]], swap: tuple[str, str] | None = None,
               turns: dict | None = None) -> tuple[list[list[int]], list[list[int]] | None]:
        """:meth:`render_store` as token-id lists (original, swapped or None): for small inputs."""
        return store_as_lists(self.render_store(fields, swap, turns), swap is not None)


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

    def render_store(self, tokenizer, fields: dict[str, list[str]],
                     turns: dict | None = None) -> TokenStore:
        """n rows, then their n swapped views when ``swap`` is set (``turns``: a Dataset's)."""
        return self.renderer(tokenizer).render_store(fields, self.swap, turns)

    def render(self, tokenizer, fields: dict[str, list[str]],
               turns: dict | None = None) -> list[TokenStore]:
        """[ids] or [ids, swapped ids]: n rows per view, both views sharing one flat array."""
        return split_views(self.render_store(tokenizer, fields, turns), self.swap is not None)


def split_views(store: TokenStore, swapped: bool) -> list[TokenStore]:
    """[store] or [rows 0..n-1, rows n..2n-1] of a store rendered with a swapped view."""
    if not swapped:
        return [store]
    n = len(store) // 2
    return [store[:n], store[n:]]


class EncodedRows(Dataset):
    """Token ids and (optionally) float32 targets of n rows, indexable for a DataLoader.

    ``input_ids``: a :class:`TokenStore` (a plain list of token-id lists is converted).
    """

    def __init__(self, input_ids: TokenStore | list[list[int]], targets: np.ndarray | None = None):
        self.input_ids = as_token_store(input_ids)
        self.targets = targets

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.input_ids[i]}
        if self.targets is not None:
            item["labels"] = self.targets[i]
        return item

    @property
    def lengths(self) -> np.ndarray:
        return self.input_ids.lengths


class Collator:
    """Pads a list of rows to the longest in the batch (or to ``pad_to``).

    Built with numpy straight from the rows' int32 ids: the same tensors as the tokenizer's
    ``pad`` (int64 ids and mask, its ``pad_token_id`` on its ``padding_side``), without its
    per-token Python work.
    """

    def __init__(self, tokenizer, pad_to: int | None = None):
        self.tokenizer = tokenizer
        self.pad_to = pad_to

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_rows([item["input_ids"] for item in items],
                                             self.tokenizer.pad_token_id,
                                             self.tokenizer.padding_side, self.pad_to)
        out = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "labels" in items[0]:
            out["labels"] = torch.from_numpy(np.stack([item["labels"] for item in items]))
        return out


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right",
             pad_to: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, width) int64 ``input_ids`` and ``attention_mask``; width = longest row, or ``pad_to``
    (never narrower than the longest row: rows are not cut here)."""
    lengths = [len(r) for r in rows]
    width = max([*lengths, pad_to or 0])
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        start = width - n if side == "left" else 0
        ids[i, start:start + n] = row
        mask[i, start:start + n] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Random batches of similar length, reproducible from ``(seed, epoch)``.

    Rows are shuffled, cut into mega-batches of ``MEGABATCH_BATCHES`` batches, sorted by
    length inside each, chunked into batches, and the batches shuffled again. Padding
    then costs little while every epoch still sees a fresh random order.
    ``group_by_length=False`` gives plain shuffled batches (the padding benchmark's baseline).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int,
                 group_by_length: bool = True):
        self.lengths = np.asarray(lengths).tolist()
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
    # a stable sort of the negated lengths: ties keep row order, as Python's sorted did
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable").tolist()
    return [order[j:j + batch_size] for j in range(0, len(order), batch_size)]
