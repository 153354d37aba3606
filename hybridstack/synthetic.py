"""Small synthetic competitions of each task kind, with a learnable signal.

Used by ``hybridstack demo`` and the tests. Labels depend on the words in the text
(plus a little label noise), so every model can beat the prior but none is perfect.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hybridstack.config import JIGSAW_LABELS, PAIRWISE_LABELS

_NEUTRAL = (
    "the a of to and in is it that for on with as was this be are by at from have not or "
    "article page edit talk wiki source section thanks please about would could there"
).split()
_TOPICS = {
    "sports": "match goal team coach league season score player stadium referee".split(),
    "tech": "software code laptop server cloud python network chip data update".split(),
    "food": "recipe pasta bake oven spice flavor dinner kitchen sauce fresh".split(),
}
_LABEL_WORDS = {
    "toxic": "stupid idiot dumb moron loser".split(),
    "severe_toxic": "scum vermin garbage filth".split(),
    "obscene": "crap damn frigging bloody".split(),
    "threat": "hurt punch destroy smash".split(),
    "insult": "fool clown pathetic ugly".split(),
    "identity_hate": "outsiders foreigners heathens".split(),
}
_GOOD = "clearly detailed example steps because therefore explain accurate helpful".split()
_BAD = "dunno whatever maybe idk unclear".split()


def _words(rng: np.random.Generator, pool: list[str], n: int) -> list[str]:
    return list(rng.choice(pool, size=n))


def _sentence(rng: np.random.Generator, extra: list[str], n_neutral: int) -> str:
    words = _words(rng, _NEUTRAL, n_neutral) + extra
    rng.shuffle(words)
    return " ".join(words).capitalize() + "."


def multiclass_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    topics = list(_TOPICS)
    rows = []
    for i in range(n):
        label = topics[int(rng.integers(len(topics)))]
        true = label if rng.random() > 0.1 else topics[int(rng.integers(len(topics)))]
        text = _sentence(rng, _words(rng, _TOPICS[true], int(rng.integers(1, 4))), int(rng.integers(6, 14)))
        rows.append({"id": f"mc{i}", "text": text, "label": label})
    return pd.DataFrame(rows)


def multilabel_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rates = {"toxic": 0.35, "severe_toxic": 0.08, "obscene": 0.2, "threat": 0.06, "insult": 0.18,
             "identity_hate": 0.06}
    rows = []
    for i in range(n):
        labels = {name: int(rng.random() < rate) for name, rate in rates.items()}
        extra = []
        for name, on in labels.items():
            if on and rng.random() > 0.1:  # 10% of positives carry no trigger word
                extra += _words(rng, _LABEL_WORDS[name], int(rng.integers(1, 3)))
        rows.append({"id": f"ml{i:05d}", "comment_text": _sentence(rng, extra, int(rng.integers(5, 15))),
                     **labels})
    return pd.DataFrame(rows, columns=["id", "comment_text", *JIGSAW_LABELS])


def _response(rng: np.random.Generator, quality: float) -> list[str | None]:
    n_good = int(round(quality * 4))
    words = _words(rng, _GOOD, n_good) + _words(rng, _BAD, 4 - n_good)
    turns = [_sentence(rng, words, int(rng.integers(4, 10 + 10 * quality)))]
    if rng.random() < 0.2:  # some multi-turn rows, occasionally with a null turn
        turns.append(None if rng.random() < 0.3 else _sentence(rng, _words(rng, _GOOD, 1), 5))
    return turns


def pairwise_frame(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    prompts = [_sentence(rng, _words(rng, sum(_TOPICS.values(), []), 2), 5) + " Explain?"
               for _ in range(max(4, n // 3))]  # prompts repeat, as on LMSYS
    rows = []
    for i in range(n):
        prompt = prompts[int(rng.integers(len(prompts)))]
        qa, qb = rng.random(), rng.random()
        gap = qa - qb + rng.normal(0, 0.15)
        winner = 2 if abs(gap) < 0.15 else (0 if gap > 0 else 1)
        onehot = [int(winner == j) for j in range(3)]
        rows.append({
            "id": i, "model_a": "model-x", "model_b": "model-y",
            "prompt": json.dumps([prompt]),
            "response_a": json.dumps(_response(rng, qa)),
            "response_b": json.dumps(_response(rng, qb)),
            **dict(zip(PAIRWISE_LABELS, onehot)),
        })
    return pd.DataFrame(rows)


_FRAMES = {"multiclass": multiclass_frame, "multilabel": multilabel_frame, "pairwise": pairwise_frame}
_TASK_SECTIONS = {
    "multiclass": {"kind": "multiclass", "text_columns": ["text"], "label_column": "label"},
    "multilabel": {"kind": "multilabel", "text_columns": ["comment_text"]},
    "pairwise": {"kind": "pairwise"},
}


def write_competition(folder: str | Path, kind: str, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Write train.csv, test.csv and sample_submission.csv; return the [task]/[data] config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    full = _FRAMES[kind](n_train + n_test, seed)
    train, test = full.iloc[:n_train], full.iloc[n_train:]
    train.to_csv(folder / "train.csv", index=False)
    task = _TASK_SECTIONS[kind]
    if kind == "pairwise":
        label_cols, text_cols = list(PAIRWISE_LABELS), ["prompt", "response_a", "response_b"]
    elif kind == "multilabel":
        label_cols, text_cols = list(JIGSAW_LABELS), ["comment_text"]
    else:
        label_cols, text_cols = sorted(train["label"].unique()), ["text"]
    test[["id", *text_cols]].to_csv(folder / "test.csv", index=False)
    sample = pd.DataFrame({"id": test["id"].to_numpy()})
    for col in label_cols:
        sample[col] = 1.0 / len(label_cols) if kind != "multilabel" else 0.5
    sample.to_csv(folder / "sample_submission.csv", index=False)
    data = {"train": str(folder / "train.csv"), "test": str(folder / "test.csv"),
            "sample_submission": str(folder / "sample_submission.csv")}
    return {"task": dict(task), "data": data}


def write_kaggle_competition(input_root: str | Path, recipe: str, n_train: int = 40,
                             n_test: int = 10, seed: int = 0) -> Path:
    """A synthetic competition folder named and shaped as Kaggle attaches it for ``recipe``.

    ``<input_root>/<competition>/``: LMSYS ships plain CSVs, Jigsaw zipped ones
    (``train.csv.zip``, ...). Returns the competition folder.
    """
    import zipfile

    from hybridstack.recipes import load_recipe

    spec = load_recipe(recipe)
    folder = Path(input_root) / spec.competition
    write_competition(folder, spec.kind, n_train, n_test, seed=seed)
    if recipe == "jigsaw":
        for name in ("train.csv", "test.csv", "sample_submission.csv"):
            with zipfile.ZipFile(folder / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
                zf.write(folder / name, arcname=name)
            (folder / name).unlink()
    return folder


_SPM_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]"]


def write_tiny_deberta_v3(folder: str | Path, texts: list[str], *, dtype: str = "float16",
                          vocab_size: int = 300, hidden_size: int = 32, num_layers: int = 2,
                          max_positions: int = 512, seed: int = 0) -> Path:
    """A randomly initialised DeBERTa-v3 backbone shaped like the Hub's checkpoints.

    Like ``microsoft/deberta-v3-small``: ``config.json``, weights stored in ``dtype``
    (float16 on the Hub) and a tokenizer that is only ``spm.model`` + ``tokenizer_config.json``
    (no tokenizer.json, so loading it converts the sentencepiece model). The vocabulary is
    trained on ``texts``. For tests and rehearsals: it learns, but knows nothing.
    """
    import json

    import sentencepiece as spm
    import torch
    from transformers import DebertaV2Config, DebertaV2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(t.replace("\n", " ") for t in texts if t.strip()), encoding="utf-8")
    # ids as in deberta-v3: [PAD]=0, [CLS]=1, [SEP]=2, [UNK]=3, [MASK] last
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(folder / "spm"), vocab_size=vocab_size,
        model_type="unigram", pad_id=0, bos_id=1, eos_id=2, unk_id=3, pad_piece="[PAD]",
        bos_piece="[CLS]", eos_piece="[SEP]", unk_piece="[UNK]", hard_vocab_limit=False,
        minloglevel=2, num_threads=1, seed_sentencepiece_size=100_000,
    )
    corpus.unlink()
    (folder / "spm.vocab").unlink(missing_ok=True)
    size = spm.SentencePieceProcessor(model_file=str(folder / "spm.model")).get_piece_size()
    tokenizer_config = {"tokenizer_class": "DebertaV2Tokenizer", "do_lower_case": False,
                        "vocab_type": "spm", "split_by_punct": False,
                        "bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]",
                        "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                        "mask_token": "[MASK]"}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    torch.manual_seed(seed)
    config = DebertaV2Config(
        vocab_size=size + 1, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, intermediate_size=2 * hidden_size,
        max_position_embeddings=max_positions, pad_token_id=0,
        # the relative-attention settings of deberta-v3
        relative_attention=True, position_buckets=64, norm_rel_ebd="layer_norm",
        share_att_key=True, pos_att_type=["p2c", "c2p"], max_relative_positions=-1,
        position_biased_input=False,
    )
    model = DebertaV2Model(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


# Special tokens of the tiny decoders, as their real tokenizers name them. Neither has a pad
# token (like Llama-3); the Gemma-2 one has an unk token (the Llama one has not).
_DECODER_SPECIALS = {"llama": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
                     "gemma2": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}}


def write_tiny_decoder(folder: str | Path, texts: list[str], family: str = "llama", *,
                       dtype: str = "float32", vocab_size: int = 400, hidden_size: int = 32,
                       num_layers: int = 2, max_positions: int = 512, seed: int = 0) -> Path:
    """A randomly initialised decoder LM (``llama`` or ``gemma2``) saved like the Hub's.

    A causal-LM checkpoint (``*ForCausalLM``, so loading it for sequence classification
    drops the LM head and adds a fresh ``score`` head, as with the real ones) with a
    byte-level BPE tokenizer trained on ``texts``: bos and eos tokens, no pad token. For
    tests and rehearsals: it learns, but knows nothing.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if family not in _DECODER_SPECIALS:
        raise ValueError(f"family must be one of {', '.join(_DECODER_SPECIALS)}, got {family!r}")
    specials = _DECODER_SPECIALS[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=specials.get("unk_token")))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([t for t in texts if t.strip()], trainer=trainer)
    bos = specials["bos_token"]
    # like the real ones: the tokenizer prepends bos (Llama-3, Gemma-2)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **specials)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size,
                  intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=2, num_key_value_heads=1,
                  max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                  tie_word_embeddings=False, attention_dropout=0.0)
    if family == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        from transformers import Gemma2Config, Gemma2ForCausalLM

        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=hidden_size // 2,
                                               sliding_window=64))
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder
