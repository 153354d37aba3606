"""Length and structure counts on strings whose counts are known."""

from __future__ import annotations

import numpy as np

from hybridstack.features.lengths import STRUCTURE_NAMES, log_counts, structure_counts

MARKDOWN = """# Title

Intro line.
- first
* second
2) third
```python
x = 1
```
## Section"""


def counts(text: str) -> dict[str, float]:
    return dict(zip(STRUCTURE_NAMES, structure_counts([text])[0].tolist(), strict=True))


def test_plain_sentence():
    assert counts("Hello big world") == {"chars": 15, "words": 3, "lines": 1, "list_items": 0,
                                         "code_blocks": 0, "headers": 0}


def test_markdown_structure():
    got = counts(MARKDOWN)
    assert got["lines"] == 9  # the blank line does not count
    assert got["list_items"] == 3
    assert got["code_blocks"] == 1
    assert got["headers"] == 2
    assert got["chars"] == len(MARKDOWN)
    assert got["words"] == len(MARKDOWN.split())


def test_look_alikes_are_not_structure():
    # a hashtag, a negative number and an emphasis are not a header or list items
    got = counts("#hashtag\n-5 degrees\n*emphasis*\n1.5 litres")
    assert got["headers"] == 0
    assert got["list_items"] == 0


def test_unclosed_fence_is_one_block_and_two_blocks_count_two():
    assert counts("```\ncode without end")["code_blocks"] == 1
    assert counts("```\na\n```\ntext\n```\nb\n```")["code_blocks"] == 2


def test_empty_text_is_all_zero_and_log_counts_are_log1p():
    texts = ["", "one two\nthree"]
    raw = structure_counts(texts)
    assert raw.dtype == np.float32 and raw.shape == (2, len(STRUCTURE_NAMES))
    assert not raw[0].any()
    np.testing.assert_allclose(log_counts(texts), np.log1p(raw))
