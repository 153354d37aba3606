"""The embed stage's heads share each fold's kNN search: same outputs, one search per fold."""

from __future__ import annotations

import numpy as np
import pytest

from hybridstack.experiment import open_experiment
from hybridstack.features import knn
from hybridstack.stages import embed as embed_stage

EMBED = {
    "enabled": True, "model": "embedded:minilm", "prefix": "", "max_seq_length": 32, "knn_k": 5,
    "lgbm": [{"name": "lgbm", "n_estimators": 20, "num_threads": 1, "min_child_samples": 5}],
    "mlp": [{"name": "mlp", "max_epochs": 2, "hidden_sizes": [16]}],
}
HEADS = ("minilm_lgbm", "minilm_mlp")


def stage_outputs(cfg) -> dict[str, np.ndarray]:
    exp = open_experiment(cfg)
    return {f"{name}/{what}": getattr(exp.dir.model(name), f"load_{what}")()
            for name in HEADS for what in ("oof", "test")}


@pytest.mark.parametrize("index_kind", ["flat", "ivf"])
def test_the_second_head_searches_nothing_and_both_heads_write_what_they_wrote_alone(
        make_config, monkeypatch, index_kind):
    searches_by_head = {}
    real_fit_head = embed_stage.fit_head
    real_search = knn.search_batches
    calls = [0]

    def counted_search(*args, **kwargs):
        calls[0] += 1
        yield from real_search(*args, **kwargs)

    def counted_fit_head(exp, cache, features, pool, spec, model_name, *args):
        before = calls[0]
        real_fit_head(exp, cache, features, pool, spec, model_name, *args)
        searches_by_head[model_name] = calls[0] - before

    monkeypatch.setattr(knn, "search_batches", counted_search)
    monkeypatch.setattr(embed_stage, "fit_head", counted_fit_head)
    embed = {**EMBED, "knn_index": index_kind, "knn_nprobe": 2}
    shared_cfg, _ = make_config("pairwise", n_train=90, n_test=30, embed=embed, experiment="shared")
    embed_stage.run(shared_cfg)
    assert searches_by_head["minilm_lgbm"] > 0 and searches_by_head["minilm_mlp"] == 0

    # the same run with every head searching on its own (no shared cache): the same bits
    monkeypatch.setattr(embed_stage, "KnnSearchCache", lambda: None)
    alone_cfg, _ = make_config("pairwise", n_train=90, n_test=30, embed=embed, experiment="alone")
    embed_stage.run(alone_cfg)
    assert searches_by_head["minilm_mlp"] > 0
    shared, alone = stage_outputs(shared_cfg), stage_outputs(alone_cfg)
    for key, value in alone.items():
        assert not np.isnan(value).all(), key
        np.testing.assert_array_equal(shared[key], value, err_msg=key)
