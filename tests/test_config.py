from pathlib import Path

import pytest

from hybridstack.config import config_from_dict, load_config
from hybridstack.errors import HybridstackError


def _write(tmp_path: Path, text: str, name: str = "cfg.toml") -> Path:
    (tmp_path / "train.csv").write_text("id,text,label\n1,a,x\n")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_loads_with_defaults_and_relative_paths(tmp_path):
    cfg = load_config(_write(tmp_path, '[data]\ntrain = "train.csv"\n'))
    assert cfg.experiment == "cfg"  # default: the config file's stem
    assert cfg.data.train == tmp_path / "train.csv"
    assert cfg.cv.n_splits == 5 and cfg.cv.seed == 42
    assert cfg.run_dir == tmp_path / "runs" / "cfg"
    assert cfg.embedding_cache_dir == tmp_path / "cache" / "embeddings"


def test_unknown_key_names_it(tmp_path):
    path = _write(tmp_path, '[data]\ntrain = "train.csv"\n[tfidf]\nmax_featurez = 3\n')
    with pytest.raises(HybridstackError, match=r"unknown config key 'tfidf.max_featurez'"):
        load_config(path)


def test_wrong_type_names_key(tmp_path):
    path = _write(tmp_path, '[data]\ntrain = "train.csv"\n[cv]\nn_splits = "five"\n')
    with pytest.raises(HybridstackError, match=r"cv.n_splits"):
        load_config(path)


def test_missing_file_names_path(tmp_path):
    path = _write(tmp_path, '[data]\ntrain = "nope.csv"\n')
    with pytest.raises(HybridstackError, match=r"data.train: file not found: .*nope.csv"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(HybridstackError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_invalid_toml(tmp_path):
    with pytest.raises(HybridstackError, match="invalid TOML"):
        load_config(_write(tmp_path, "[data\ntrain="))


def test_overrides_parse_values(tmp_path):
    path = _write(tmp_path, '[data]\ntrain = "train.csv"\n')
    cfg = load_config(path, ["finetune.lr=3e-5", "cv.n_splits=3", "embed.model=my/model",
                             "finetune.folds=[0]", "tfidf.swap_tta=false"])
    assert cfg.finetune.lr == 3e-5 and cfg.cv.n_splits == 3
    assert cfg.embed.model == "my/model" and cfg.finetune.folds == [0]
    assert cfg.tfidf.swap_tta is False


def test_override_unknown_key_is_error(tmp_path):
    path = _write(tmp_path, '[data]\ntrain = "train.csv"\n')
    with pytest.raises(HybridstackError, match="unknown config key 'cv.n_split'"):
        load_config(path, ["cv.n_split=3"])
    with pytest.raises(HybridstackError, match="expected section.key=value"):
        load_config(path, ["cv.n_splits"])


def test_duplicate_model_names_rejected(tmp_path):
    (tmp_path / "t.csv").write_text("id,text,label\n")
    raw = {"data": {"train": str(tmp_path / "t.csv")},
           "tfidf": {"models": [{"name": "a"}, {"name": "a"}]}}
    with pytest.raises(HybridstackError, match="unique"):
        config_from_dict(raw)


def test_snapshot_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, '[data]\ntrain = "train.csv"\n[finetune]\nfolds = [0]\n'))
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg.model_copy(update={"experiment": cfg.experiment})


def test_shipped_configs_validate(tmp_path):
    (tmp_path / "f.csv").write_text("id\n1\n")
    root = Path(__file__).resolve().parents[1] / "configs"
    shipped = sorted(root.glob("*.toml"))
    assert shipped, "configs/ should ship example configs"
    for path in shipped:
        overrides = [f"data.{k}={tmp_path / 'f.csv'}" for k in ("train", "test", "sample_submission")]
        # every key of a shipped config is valid once its data paths exist
        import tomllib

        raw = tomllib.loads(path.read_text())
        keep = [o for o in overrides if o.split("=")[0].split(".")[1] in raw.get("data", {})]
        load_config(path, keep)
