"""Typed, validated experiment configuration.

One TOML file per experiment. Every section is a pydantic model with
``extra="forbid"``, so an unknown or misspelt key is an error that names it.
Defaults carry a short note on why they are what they are.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from hybridstack.errors import HybridstackError

TaskKind = Literal["pairwise", "multilabel", "multiclass"]
JIGSAW_LABELS = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
PAIRWISE_LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]


class Section(BaseModel):
    """Base for every config section: unknown keys and wrong types are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskConfig(Section):
    kind: TaskKind = "multiclass"
    id_column: str = "id"
    # multilabel/multiclass: the text column(s); several are joined with a newline.
    text_columns: list[str] = ["text"]
    # multilabel: the 0/1 label columns (default: the six Jigsaw labels).
    label_columns: list[str] = Field(default_factory=lambda: list(JIGSAW_LABELS))
    # multiclass: the one label column, any dtype (binary included).
    label_column: str = "label"
    # binary with a one-column sample submission: the class whose probability it holds.
    # None: the class the column is named after, else 1 / true / yes; asked when ambiguous.
    positive_label: str | None = None
    # pairwise: the LMSYS field names.
    prompt_column: str = "prompt"
    response_columns: list[str] = ["response_a", "response_b"]
    winner_columns: list[str] = Field(default_factory=lambda: list(PAIRWISE_LABELS))


class CleanConfig(Section):
    """Text cleaning as in the CleanSpeech report; every step can be switched off."""

    lowercase: bool = False  # off: cased encoders and char n-grams use case (CAPS = shouting)
    remove_urls: bool = True
    remove_non_ascii: bool = False  # off: LMSYS has many non-English prompts
    normalize_whitespace: bool = True
    # exact de-duplication of train rows after cleaning (conflicting labels are reported)
    dedup: bool = False


class DataConfig(Section):
    train: Path
    test: Path | None = None
    sample_submission: Path | None = None
    # None: "," for .csv, tab for .tsv/.tab, else sniffed from the header line.
    delimiter: str | None = None
    # For header-less files: the column names in order (the first line is then data).
    column_names: list[str] | None = None
    clean: CleanConfig = CleanConfig()


class CVConfig(Section):
    n_splits: int = Field(5, ge=2, le=50)
    seed: int = 42
    # Where LightGBM rounds, MLP epochs and fine-tune epochs are chosen. "inner": on a split
    # of each fold's training rows (cv.inner_fraction of them, grouped and stratified like
    # the folds), so the held-out fold's OOF predictions never helped pick their own model.
    # "held_out_fold": on the held-out fold itself (every training row fits, but the OOF
    # then peeks at its own labels and the CV score is optimistic).
    early_stopping: Literal["inner", "held_out_fold"] = "inner"
    inner_fraction: float = Field(0.1, gt=0, le=0.5)

    def early_stopping_settings(self) -> dict[str, Any]:
        """What a model that early-stops depends on ({} for held_out_fold: older runs' hashes)."""
        if self.early_stopping == "held_out_fold":
            return {}
        return {"early_stopping": self.early_stopping, "inner_fraction": self.inner_fraction}


class LogRegModel(Section):
    """One logistic-regression head over the shared TF-IDF matrix."""

    name: str = "tfidf_logreg"
    C: float = Field(4.0, gt=0)  # mild regularisation suits ~10^5 sparse features
    class_weight: Literal["balanced"] | None = None
    max_iter: int = Field(1000, gt=0)


class NBSVMModel(Section):
    """One NB-SVM (naive-Bayes log-count ratios + logistic regression) on the TF-IDF matrix;
    multilabel and multiclass tasks (the pairwise A - B block is signed)."""

    name: str = "tfidf_nbsvm"
    C: float = Field(4.0, gt=0)
    alpha: float = Field(1.0, gt=0)  # smoothing of the per-class feature counts
    max_iter: int = Field(1000, gt=0)


class TfidfConfig(Section):
    enabled: bool = True
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 5)
    # caps keep the matrix (and LR time) bounded on 100k+ row competitions
    max_word_features: int = Field(100_000, gt=0)
    max_char_features: int = Field(200_000, gt=0)
    min_df: int = Field(2, ge=1)
    sublinear_tf: bool = True
    # pairwise: train on A/B swapped too, and average swapped predictions at test time
    swap_augment: bool = True
    swap_tta: bool = True
    # append log length/structure counts of every field (pairwise: and A - B): lists, code
    # blocks, headers, lines, words, characters, max-abs scaled
    shape_features: bool = False
    models: list[LogRegModel] = Field(default_factory=lambda: [LogRegModel()])
    nbsvm: list[NBSVMModel] = []  # e.g. [[tfidf.nbsvm]] with the defaults: one NB-SVM model

    @model_validator(mode="after")
    def _unique_names(self) -> TfidfConfig:
        names = [m.name for m in [*self.models, *self.nbsvm]]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        return self


class LGBMHead(Section):
    name: str = "lgbm"
    num_leaves: int = Field(31, ge=2)
    learning_rate: float = Field(0.05, gt=0)
    n_estimators: int = Field(2000, ge=1)  # upper bound; early stopping picks the real count
    min_child_samples: int = Field(20, ge=1)
    subsample: float = Field(0.8, gt=0, le=1)
    colsample_bytree: float = Field(0.5, gt=0, le=1)
    reg_lambda: float = Field(1.0, ge=0)
    early_stopping_rounds: int = Field(100, ge=1)
    num_threads: int = Field(2, ge=1)  # fixed, so results do not depend on the machine's cores


class MLPHead(Section):
    name: str = "mlp"
    hidden_sizes: list[int] = [512, 128]
    dropout: float = Field(0.2, ge=0, lt=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    batch_size: int = Field(256, ge=1)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(8, ge=1)


# Head kinds beyond lgbm/mlp register their config list here (hybridstack.heads.registry).
EXTRA_HEAD_LISTS: dict[str, type[Section]] = {}


def register_head_list(key: str, spec: type[Section]) -> None:
    if key not in EmbedConfig.model_fields:
        EXTRA_HEAD_LISTS[key] = spec


class EmbedConfig(Section):
    # registered head lists (e.g. [[embed.toy]]) arrive as extra keys, checked below
    model_config = ConfigDict(extra="allow", validate_assignment=True)

    enabled: bool = True
    # an id resolved offline (HF cache) or a local folder
    model: str = "intfloat/e5-small-v2"
    # short name used in model folder names, e.g. "e5" -> e5_lgbm; default derived from model
    alias: str | None = None
    prefix: str = "query: "  # e5 expects it; use "" for other encoders
    max_seq_length: int = Field(512, ge=8)
    normalize: bool = True
    batch_size: int = Field(64, ge=1)
    dtype: Literal["float32", "float16"] = "float16"  # halves the cache; heads see float32
    # None: <workdir>/cache/embeddings, shared by every experiment in the workdir
    cache_dir: Path | None = None
    knn: bool = True
    knn_k: int = Field(20, ge=1)
    knn_index: Literal["flat", "ivf"] = "flat"  # flat: exact; ivf: approximate, for 10^5+ rows
    knn_nprobe: int = Field(16, ge=1)  # ivf lists scanned per query (recall vs speed)
    length_features: bool = True
    swap_augment: bool = True
    swap_tta: bool = True
    lgbm: list[LGBMHead] = Field(default_factory=lambda: [LGBMHead()])
    mlp: list[MLPHead] = Field(default_factory=lambda: [MLPHead()])

    @model_validator(mode="after")
    def _registered_lists_and_unique_names(self) -> EmbedConfig:
        for key, value in (self.model_extra or {}).items():
            spec = EXTRA_HEAD_LISTS.get(key)
            if spec is None:
                raise PydanticCustomError("unknown_key", "unknown key", {"key": key})
            if not isinstance(value, list):
                raise ValueError(f"embed.{key} must be a list of tables ([[embed.{key}]])")
            self.model_extra[key] = [v if isinstance(v, spec) else spec.model_validate(v)
                                     for v in value]
        names = [h.name for key in self.head_list_keys() for h in self.head_list(key)]
        if len(set(names)) != len(names):
            raise ValueError(f"embed head names must be unique across every head list, got {names}")
        return self

    def head_list_keys(self) -> list[str]:
        return ["lgbm", "mlp", *sorted(self.model_extra or {})]

    def head_list(self, key: str) -> list[Any]:
        """The entries of ``[[embed.<key>]]`` (empty when the config has none)."""
        if key in type(self).model_fields:
            return list(getattr(self, key))
        return list((self.model_extra or {}).get(key, []))


class LoraSettings(Section):
    """``[finetune.lora]``: the adapters of ``finetune.method = "lora"``."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)  # scaling alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    # None: per model family (hybridstack.finetune.lora.DEFAULT_TARGETS), e.g. the attention
    # and MLP projections of Llama/Gemma-2/Qwen2/Mistral, query/key/value/dense of BERT
    target_modules: list[str] | None = None


class FinetuneConfig(Section):
    enabled: bool = True
    model: str = "microsoft/deberta-v3-small"
    name: str | None = None  # model folder name; default derived from the model id
    max_length: int = Field(512, ge=16)
    # pairwise: share of the token budget for prompt / response A / response B
    segment_budget: tuple[float, float, float] = (0.2, 0.4, 0.4)
    head_fraction: float = Field(0.5, ge=0, le=1)  # head+tail truncation: share kept from the head
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)  # per device
    eval_batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    scheduler: Literal["cosine", "linear"] = "cosine"
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighted_bce: bool = True
    # hidden-state and classifier-head dropout; None keeps the checkpoint's rates
    dropout: float | None = Field(None, ge=0, lt=1)
    attention_dropout: float | None = Field(None, ge=0, lt=1)  # None: the checkpoint's
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    gradient_checkpointing: bool = False
    patience: int = Field(2, ge=1)
    folds: list[int] | None = None  # None: every fold; [0]: one 80/20 split
    max_train_rows: int | None = Field(None, ge=1)  # subsample the training fold (CPU demos)
    swap_augment: bool = True
    swap_tta: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int = 42  # model init, dropout and batch order; a re-run on CPU is bit-identical
    # "full" trains every weight; "lora" freezes the base (in its storage dtype) and trains
    # low-rank adapters and the head in float32 (needs the llm extra: pip install 'hybridstack[llm]')
    method: Literal["full", "lora"] = "full"
    lora: LoraSettings = LoraSettings()
    # with method = "lora" on CUDA: load the frozen base through bitsandbytes (QLoRA)
    quantization: Literal["4bit", "8bit"] | None = None
    # distillation: a finished fine-tuned model of this experiment whose fold-k model gives
    # student fold k soft labels, mixed into the targets with this weight (never its OOF)
    teacher: str | None = None
    teacher_weight: float = Field(0.5, ge=0, le=1)


class StackConfig(Section):
    enabled: bool = True
    models: list[str] | None = None  # None: every finished base model
    # candidates scored by nested CV; the best one is used only if it beats every single model
    methods: list[Literal["weighted", "logreg", "lgbm"]] = ["weighted", "logreg", "lgbm"]
    temperature: bool = True  # weighted blend: also fit a temperature (calibration)
    meta_features: bool = False  # lgbm meta-model: add text lengths to the base logits
    # inner CV of the meta-models (regularisation, boosting rounds); 3 keeps stacking fast
    inner_folds: int = Field(3, ge=2, le=10)


class Config(Section):
    experiment: str = "experiment"
    workdir: Path = Path(".")
    # a second copy of every submission.csv written, e.g. /kaggle/working/submission.csv where
    # Kaggle reads it; relative to workdir. None: only runs/<experiment>/submission.csv
    submission: Path | None = None
    task: TaskConfig = TaskConfig()
    data: DataConfig
    cv: CVConfig = CVConfig()
    tfidf: TfidfConfig = TfidfConfig()
    embed: EmbedConfig = EmbedConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    stack: StackConfig = StackConfig()

    # -- derived locations ---------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.workdir / "runs" / self.experiment

    @property
    def embedding_cache_dir(self) -> Path:
        return self.embed.cache_dir or (self.workdir / "cache" / "embeddings")

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named sections (what a stage's DONE marker depends on)."""
        dumped = {name: _jsonable(getattr(self, name)) for name in sections}
        blob = json.dumps(dumped, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_toml(self) -> str:
        return dump_toml(_jsonable(self))


def _jsonable(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


# -- loading ---------------------------------------------------------------------------


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a TOML config, apply ``section.key=value`` overrides, validate.

    Relative paths in ``[data]`` and ``workdir`` are resolved against the config
    file's folder, so a config works from any current directory.
    """
    path = Path(path)
    if not path.is_file():
        raise HybridstackError(f"config file not found: {path} (write one with `hybridstack init`)")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise HybridstackError(f"{path}: invalid TOML: {err}") from None
    raw.setdefault("experiment", path.stem)
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, base_dir=path.parent.resolve(), source=str(path))


def config_from_dict(raw: dict[str, Any], base_dir: Path = Path("."), source: str = "config",
                     check_files: bool = True) -> Config:
    """Validate ``raw``; ``check_files=False`` when the data files may be gone (predict)."""
    raw = json.loads(json.dumps(raw, default=str))  # deep copy; never mutate the caller's dict
    _resolve_paths(raw, base_dir)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as err:
        raise HybridstackError(f"{source}: {_describe(err)}") from None
    if check_files:
        _check_files(cfg)
    return cfg


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``--set a.b.c=value`` override; the value is parsed as TOML when it can be.

    Inside an array of tables (e.g. ``[[embed.lgbm]]``) a number picks one entry
    (``embed.lgbm.0.num_leaves=15``) and a key sets it on every entry (``embed.lgbm.num_leaves=15``).
    """
    if "=" not in item:
        raise HybridstackError(f"--set {item!r}: expected section.key=value, e.g. finetune.lr=2e-5")
    dotted, text = item.split("=", 1)
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare string such as a path or model id
    _set_path(raw, dotted.strip().split("."), value, item)


def _set_path(node: Any, keys: list[str], value: Any, item: str, at: tuple[str, ...] = ()) -> None:
    key, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if key.isdigit() and int(key) < len(node):
            node, keys = [node[int(key)]], rest
        for entry in node:
            _set_path(entry, keys, value, item, at)
        return
    if not isinstance(node, dict):
        raise HybridstackError(f"--set {item!r}: '{'.'.join(at)}' is a value, not a section")
    if not rest:
        node[key] = value
        return
    if key not in node:
        # descend into the section's default (an array of tables keeps its default entries)
        node[key] = _default_value((*at, key))
    _set_path(node[key], rest, value, item, (*at, key))


def _default_value(path: tuple[str, ...]) -> Any:
    """The JSON form of the default at a dotted path of Config, or {} for an unknown one."""
    model: Any = Config
    default: Any = {}
    for key in path:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return {}
        default = field.get_default(call_default_factory=True)
        model = type(default) if isinstance(default, BaseModel) else None
    if isinstance(default, BaseModel):
        return {}  # a plain section: only the overridden key is set, the rest stays default
    if isinstance(default, list):
        return [d.model_dump(mode="json") if isinstance(d, BaseModel) else d for d in default]
    return {}


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> None:
    def resolve(value: Any) -> Any:
        if value is None or value == "":
            return value
        p = Path(str(value)).expanduser()
        return str(p if p.is_absolute() else base_dir / p)

    raw["workdir"] = resolve(raw.get("workdir", "."))
    if raw.get("submission"):
        sub = Path(str(raw["submission"])).expanduser()
        raw["submission"] = str(sub if sub.is_absolute() else Path(raw["workdir"]) / sub)
    data = raw.get("data")
    if isinstance(data, dict):
        for key in ("train", "test", "sample_submission"):
            if key in data:
                data[key] = resolve(data[key])
    embed = raw.get("embed")
    if isinstance(embed, dict) and embed.get("cache_dir"):
        embed["cache_dir"] = resolve(embed["cache_dir"])
    for section in ("embed", "finetune"):
        sec = raw.get(section)
        # a model given as a relative local folder is resolved like any other path
        if isinstance(sec, dict) and isinstance(sec.get("model"), str):
            candidate = base_dir / sec["model"]
            if sec["model"].startswith((".", "/", "~")) or candidate.exists():
                sec["model"] = resolve(sec["model"])


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "unknown_key":
        where = ".".join(p for p in (where, first["ctx"]["key"]) if p)
    if first["type"] in ("extra_forbidden", "unknown_key"):
        return f"unknown config key '{where}' (check the spelling; see configs/ for every key)"
    if first["type"] == "missing":
        return f"missing required config key '{where}'"
    return f"config key '{where}': {first['msg']} (got {first.get('input')!r})"


def _check_files(cfg: Config) -> None:
    for key in ("train", "test", "sample_submission"):
        p = getattr(cfg.data, key)
        if p is not None and not Path(p).is_file():
            raise HybridstackError(f"data.{key}: file not found: {p} (fix the path in the config)")


# -- writing ---------------------------------------------------------------------------


def dump_toml(data: dict[str, Any]) -> str:
    """TOML text for a config snapshot; None values are dropped (an absent key means None)."""
    return tomli_w.dumps(_drop_none(data))


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_drop_none(v) for v in value]
    return value
