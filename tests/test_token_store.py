"""TokenStore, the renderers that fill it, and the numpy collator, against the list-based path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hybridstack.finetune.data import (
    CHARS_PER_TOKEN_CAP,
    Collator,
    EncodedRows,
    Renderer,
    TurnRenderer,
    clip_chars,
    sorted_batches,
    truncate_head_tail,
)
from hybridstack.finetune.model import load_tokenizer
from hybridstack.finetune.token_store import TokenStore
from hybridstack.models import resolve_model

FIELDS = ["prompt", "response_a", "response_b"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model("embedded:minilm", "test model"))


def pairwise_fields(n: int = 9) -> dict[str, list[str]]:
    """Rows with repeated prompts, empty and very long answers: every budget branch."""
    words = [f"word{i}" for i in range(400)]
    return {
        "prompt": [["What is two plus two?", "Name a colour.", ""][i % 3] for i in range(n)],
        "response_a": [" ".join(words[: 7 * i * i]) for i in range(n)],
        "response_b": [" ".join(reversed(words[: 40 * (n - i)])) + f" end{i}" for i in range(n)],
    }


# -- the list-of-lists path as it was, the reference the store must reproduce ----------------


def legacy_tokenize(renderer: Renderer, fields):
    max_chars = renderer.content_budget * CHARS_PER_TOKEN_CAP
    columns = []
    for name in renderer.field_names:
        texts = [clip_chars(t, max_chars, renderer.head_fraction) for t in fields[name]]
        unique = list(dict.fromkeys(texts))
        encoded = renderer.tokenizer(unique, add_special_tokens=False, verbose=False)["input_ids"]
        lookup = dict(zip(unique, encoded))
        columns.append([lookup[t] for t in texts])
    return [list(segments) for segments in zip(*columns)]


def legacy_assemble(renderer: Renderer, segments):
    from hybridstack.finetune.data import allocate_budget

    budgets = allocate_budget([len(s) for s in segments], renderer.shares, renderer.content_budget)
    ids = [] if renderer.cls_id is None else [renderer.cls_id]
    for segment, budget in zip(segments, budgets):
        ids += truncate_head_tail(segment, budget, renderer.head_fraction) + [renderer.sep_id]
    return ids


def legacy_turn_tokenize(renderer: TurnRenderer, fields, turns):
    max_chars = renderer.max_length * CHARS_PER_TOKEN_CAP
    columns = []
    for name in renderer.field_names:
        field_turns = turns.get(name)
        rows = [(t,) if field_turns is None or field_turns[i] is None else field_turns[i]
                for i, t in enumerate(fields[name])]
        unique = list(dict.fromkeys(clip_chars(t, max_chars, renderer.head_fraction)
                                    for row in rows for t in row))
        encoded = renderer.tokenizer(unique, add_special_tokens=False, verbose=False)["input_ids"]
        lookup = dict(zip(unique, encoded))
        columns.append([[lookup[clip_chars(t, max_chars, renderer.head_fraction)] for t in row]
                        for row in rows])
    return [list(segments) for segments in zip(*columns)]


def legacy_views(assemble, rows, swap_order):
    return ([assemble(s) for s in rows],
            [assemble([s[j] for j in swap_order]) for s in rows])


# -- the store --------------------------------------------------------------------------------


def test_store_indexes_takes_and_concatenates_without_copying_the_ids(tmp_path):
    rows = [[5, 6, 7], [], [8], [9, 10]]
    store = TokenStore.from_lists(rows)
    assert len(store) == 4 and store.flat.dtype == np.int32
    assert store.to_lists() == rows and store[3].tolist() == [9, 10]
    np.testing.assert_array_equal(store.lengths, [3, 0, 1, 2])
    taken = store.take(np.array([3, 0, 3]))
    assert taken.flat is store.flat and taken.to_lists() == [[9, 10], [5, 6, 7], [9, 10]]
    both = TokenStore.concat([store[:2], store[2:].take([1, 0])])
    assert both.flat is store.flat and both.to_lists() == [[5, 6, 7], [], [9, 10], [8]]
    other = TokenStore.concat([store.take([0]), TokenStore.from_lists([[1]])])  # two flats: copied
    assert other.to_lists() == [[5, 6, 7], [1]]

    taken.save(tmp_path / "t")  # a reordered view is written compact
    loaded = TokenStore.load(tmp_path / "t")
    assert isinstance(loaded.flat, np.memmap) and loaded.to_lists() == taken.to_lists()
    assert len(loaded.flat) == int(taken.lengths.sum())
    store.save(tmp_path / "s")
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "offsets.npy"), [0, 3, 3, 4, 6])


def test_encoded_rows_accept_lists_and_stores_alike():
    rows = [[1, 2, 3], [4], [5, 6]]
    from_list, from_store = EncodedRows(rows), EncodedRows(TokenStore.from_lists(rows))
    assert from_list.lengths.tolist() == from_store.lengths.tolist() == [3, 1, 2]
    assert [from_list[i]["input_ids"].tolist() for i in range(3)] == rows
    # longest first, ties in row order: as the sorted() of Python lists did
    assert sorted_batches([2, 5, 2, 5, 1], 2) == [[1, 3], [0, 2], [4]]


# -- the renderers: identical ids to the list path --------------------------------------------


@pytest.mark.parametrize("max_length", [24, 64])
def test_encoder_store_matches_the_list_path_with_its_swapped_half(tokenizer, max_length):
    fields = pairwise_fields()
    renderer = Renderer(tokenizer, FIELDS, (0.2, 0.4, 0.4), max_length, head_fraction=0.3)
    store = renderer.render_store(fields, swap=("response_a", "response_b"))
    rows = legacy_tokenize(renderer, fields)
    ids, swapped = legacy_views(lambda s: legacy_assemble(renderer, s), rows, [0, 2, 1])
    n = len(ids)
    assert len(store) == 2 * n and store.flat.dtype == np.int32
    assert store[:n].to_lists() == ids and store[n:].to_lists() == swapped
    assert renderer.render(fields, swap=("response_a", "response_b")) == (ids, swapped)
    assert max(store.lengths) == max_length  # the long answers were cut


def test_single_text_store_matches_the_list_path(tokenizer):
    texts = ["short", "", "a somewhat longer comment " * 30, "short"]
    renderer = Renderer(tokenizer, ["text"], (1.0,), 32, head_fraction=0.5)
    store = renderer.render_store({"text": texts})
    expected = [legacy_assemble(renderer, s) for s in legacy_tokenize(renderer, {"text": texts})]
    assert len(store) == 4 and store.to_lists() == expected


def test_decoder_turn_store_matches_the_list_path(tokenizer):
    fields = pairwise_fields(6)
    turns = {"prompt": [None, ("q one", "q two"), None, ("a", "b", "c"), None, ("x",)],
             "response_b": [("r1", fields["response_b"][0]), None, None, None, ("r", ""), None]}
    renderer = TurnRenderer(tokenizer, FIELDS, (0.2, 0.4, 0.4), 48, head_fraction=0.5)
    store = renderer.render_store(fields, ("response_a", "response_b"), turns)
    rows = legacy_turn_tokenize(renderer, fields, turns)

    ids, swapped = legacy_views(lambda s: renderer.assemble(s).tolist(), rows, [0, 2, 1])
    assert store[:6].to_lists() == ids and store[6:].to_lists() == swapped
    end = tokenizer("\n<verdict>:", add_special_tokens=False)["input_ids"]
    assert all(row[-len(end):].tolist() == end for row in store)


# -- the collator: the tokenizer's pad, without it --------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("pad_to", [None, 12])
def test_collator_gives_the_tokenizers_padded_tensors(tokenizer, side, pad_to):
    rows = [[101, 7, 8, 102], [101, 102], [101, 5, 6, 7, 8, 9, 102]]
    tokenizer.padding_side = side
    try:
        expected = tokenizer.pad({"input_ids": rows}, padding="max_length" if pad_to else "longest",
                                 max_length=pad_to, return_attention_mask=True, return_tensors="pt")
        items = [{"input_ids": np.asarray(r, dtype=np.int32), "labels": np.float32([i])}
                 for i, r in enumerate(rows)]
        batch = Collator(tokenizer, pad_to=pad_to)(items)
    finally:
        tokenizer.padding_side = "right"
    for key in ("input_ids", "attention_mask"):
        assert batch[key].dtype == expected[key].dtype == torch.int64
        assert torch.equal(batch[key], expected[key])
    assert batch["input_ids"].shape[1] == (pad_to or 7)
    assert batch["labels"].tolist() == [[0.0], [1.0], [2.0]]


def test_store_of_full_scale_rows_costs_four_bytes_a_token():
    lengths = np.random.default_rng(0).integers(1, 512, 2000)
    store = TokenStore.from_arrays(np.zeros(n, dtype=np.int32) for n in lengths)
    assert store.flat.nbytes == 4 * lengths.sum()
    assert math.isclose(store.lengths.mean(), lengths.mean())
