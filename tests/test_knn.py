"""kNN label features: no leakage across folds, self/duplicate exclusion by group, small pools, IVF."""

from __future__ import annotations

import io

import joblib
import numpy as np
import pytest
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score

from hybridstack.errors import HybridstackError
from hybridstack.features.knn import KNNFeatureHead, KnnPool, neighbour_features
from hybridstack.features.knn_index import build_index, normalize_rows, search_excluding_groups
from hybridstack.heads.base import fit_oof
from hybridstack.heads.logreg import LogRegHead


class LabelMeanProbe(BaseEstimator):
    """A base head that predicts the kNN label-mean columns it is given, and remembers its fit input."""

    def fit(self, X, Y, X_val=None, Y_val=None):
        self.n_classes_ = Y.shape[1]
        self.fit_X_ = X
        return self

    def predict_proba(self, X):
        return X[:, -(self.n_classes_ + 2):-2]  # [..., label means, top sim, mean sim]


def with_groups(X: np.ndarray, groups: np.ndarray) -> np.ndarray:
    return np.hstack([X, groups[:, None]]).astype(np.float32)


def clustered(n: int, dim: int, n_clusters: int, seed: int = 0, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    cluster = rng.integers(n_clusters, size=n)
    return (centres[cluster] + spread * rng.normal(size=(n, dim))).astype(np.float32), cluster


def no_score(Y, P):
    return 0.0


def test_real_labels_score_high_and_permuted_labels_stay_at_chance():
    X, cluster = clustered(600, 16, 6)
    folds = np.arange(600) % 3
    Xg = with_groups(X, np.arange(600))
    Y = (cluster % 2 == 0).astype(np.float32)[:, None]
    oof = fit_oof(KNNFeatureHead(LabelMeanProbe(), k=10), Xg, Y, folds, score=no_score).oof
    assert roc_auc_score(Y[:, 0], oof[:, 0]) > 0.95
    # A leak (a row seeing itself or its own fold) would make shuffled labels predictable.
    shuffled = np.random.default_rng(1).permutation(Y)
    oof = fit_oof(KNNFeatureHead(LabelMeanProbe(), k=10), Xg, shuffled, folds, score=no_score).oof
    assert abs(roc_auc_score(shuffled[:, 0], oof[:, 0]) - 0.5) < 0.08


def test_validation_rows_never_see_their_own_folds_labels():
    # Each fold is its own tight cluster, so a row's nearest rows are all in its fold;
    # the label is the fold itself, so any same-fold neighbour would show up in column k.
    n_folds, n = 3, 90
    folds = np.arange(n) % n_folds
    rng = np.random.default_rng(0)
    X = (np.eye(8)[folds] + 0.05 * rng.normal(size=(n, 8))).astype(np.float32)
    Y = np.eye(n_folds, dtype=np.float32)[folds]
    oof = fit_oof(KNNFeatureHead(LabelMeanProbe(), k=5), with_groups(X, np.arange(n)), Y, folds,
                  score=no_score).oof
    assert np.all(oof[np.arange(n), folds] == 0.0)


def test_training_rows_exclude_themselves_and_duplicates_by_group_id():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(100, 16)).astype(np.float32)
    order = rng.permutation(200)  # twins sit at unrelated positions
    X, pair = np.concatenate([base, base])[order], np.concatenate([np.arange(100)] * 2)[order]
    Y = rng.integers(0, 2, size=(200, 1)).astype(np.float32)

    dup_aware = KNNFeatureHead(LabelMeanProbe(), k=3).fit(with_groups(X, pair), Y)
    top_sim = dup_aware.base_head_.fit_X_[:, -2]
    assert top_sim.max() < 0.99  # neither the row nor its exact twin was a neighbour

    # With one group per row only the row itself is excluded, so each finds its twin at 1.0.
    per_row = KNNFeatureHead(LabelMeanProbe(), k=3).fit(with_groups(X, np.arange(200)), Y)
    np.testing.assert_allclose(per_row.base_head_.fit_X_[:, -2], 1.0, atol=1e-5)


def test_k_larger_than_the_pool_uses_every_other_row():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5, 4)).astype(np.float32)
    Y = np.array([[1.0], [0.0], [1.0], [0.0], [1.0]], dtype=np.float32)
    head = KNNFeatureHead(LabelMeanProbe(), k=20).fit(with_groups(X, np.arange(5)), Y)
    features = head.base_head_.fit_X_[:, -3:]  # [label mean, top sim, mean sim]
    unit = normalize_rows(X)
    sims = unit @ unit.T
    for i in range(5):
        others = np.delete(np.arange(5), i)
        weights = np.maximum(sims[i, others], 0) + 1e-6
        expected = [np.sum(weights * Y[others, 0]) / weights.sum(), sims[i, others].max(),
                    sims[i, others].mean()]
        np.testing.assert_allclose(features[i], expected, rtol=1e-5, atol=1e-6)


def test_search_marks_missing_neighbours_and_falls_back_to_the_prior():
    vectors = normalize_rows(np.eye(3, dtype=np.float32))
    index = build_index(vectors)
    pool_groups = np.array([7, 7, 8])
    sims, ids = search_excluding_groups(index, pool_groups, vectors, pool_groups, k=4)
    # rows 0 and 1 share group 7: each sees only row 2; row 2 sees both (tied, in any order)
    assert ids[:2].tolist() == [[2, -1, -1, -1], [2, -1, -1, -1]]
    assert sorted(ids[2, :2].tolist()) == [0, 1] and ids[2, 2:].tolist() == [-1, -1]
    assert np.isnan(sims[0, 1:]).all()
    lonely_sims, lonely_ids = search_excluding_groups(build_index(vectors[:2]), pool_groups[:2],
                                                      vectors[:1], np.array([7]), k=2)
    prior = np.array([0.25], dtype=np.float32)
    feats = neighbour_features(lonely_sims, lonely_ids, np.ones((2, 1), np.float32), prior)
    assert feats.tolist() == [[0.25, 0.0, 0.0]]


def test_small_query_batches_give_the_same_neighbours():
    X, _ = clustered(300, 8, 5)
    unit = normalize_rows(X)
    groups = np.arange(300) // 2
    index = build_index(unit)
    whole = search_excluding_groups(index, groups, unit, groups, k=7)
    batched = search_excluding_groups(index, groups, unit, groups, k=7, batch_size=16)
    np.testing.assert_array_equal(whole[1], batched[1])


def test_ivf_index_finds_nearly_the_exact_neighbours_and_survives_pickling():
    X, cluster = clustered(3000, 32, 20, spread=0.5)
    unit = normalize_rows(X)
    groups = np.arange(3000)
    exact = search_excluding_groups(build_index(unit, "flat"), groups, unit, groups, k=5)[1]
    ivf_index = build_index(unit, "ivf", nprobe=8)
    assert ivf_index.nlist > 1
    approx = search_excluding_groups(ivf_index, groups, unit, groups, k=5)[1]
    assert np.mean(exact[:, 0] == approx[:, 0]) > 0.9

    Y = np.eye(2, dtype=np.float32)[cluster % 2]
    Xg = with_groups(X, groups)
    head = KNNFeatureHead(LogRegHead(), k=5, index_kind="ivf", nprobe=8).fit(Xg[:2500], Y[:2500])
    buffer = io.BytesIO()
    joblib.dump(head, buffer)
    buffer.seek(0)
    restored = joblib.load(buffer)
    np.testing.assert_array_equal(restored.predict_proba(Xg[2500:]), head.predict_proba(Xg[2500:]))
    assert np.mean(head.predict_proba(Xg[2500:]).argmax(1) == Y[2500:].argmax(1)) > 0.9


def test_key_columns_select_the_neighbour_key():
    # Only the first 4 columns are the key; the rest are noise that must not change neighbours.
    rng = np.random.default_rng(0)
    key = rng.normal(size=(50, 4)).astype(np.float32)
    noisy = np.hstack([key, 100 * rng.normal(size=(50, 6)).astype(np.float32)])
    Y = rng.integers(0, 2, size=(50, 1)).astype(np.float32)
    groups = np.arange(50)
    keyed = KNNFeatureHead(LabelMeanProbe(), key_start=0, key_stop=4, k=3)
    keyed.fit(with_groups(noisy, groups), Y)
    plain = KNNFeatureHead(LabelMeanProbe(), k=3).fit(with_groups(key, groups), Y)
    np.testing.assert_array_equal(keyed.base_head_.fit_X_[:, -3:], plain.base_head_.fit_X_[:, -3:])


def test_a_rows_neighbours_do_not_depend_on_the_rows_searched_with_it():
    """faiss' batched similarities differ in the last bit with the batch's shape (5.96e-08 on
    this data); the exact re-ranking makes each row's result independent of the batch."""
    import faiss

    from hybridstack.features.knn_index import normalize_rows, search_excluding_groups

    rng = np.random.default_rng(1)
    pool = normalize_rows(rng.normal(size=(3000, 1152)).astype(np.float32))
    queries = normalize_rows(rng.normal(size=(507, 1152)).astype(np.float32))
    index = faiss.IndexFlatIP(1152)
    index.add(pool)
    subset = rng.permutation(507)[:254]
    raw_full, raw_part = index.search(queries, 30)[0], index.search(queries[subset], 30)[0]
    assert np.abs(raw_full[subset] - raw_part).max() > 0  # what the re-ranking has to undo
    groups, query_groups = np.arange(3000), np.full(507, -1)
    sims, ids = search_excluding_groups(index, groups, queries, query_groups, 20)
    part_sims, part_ids = search_excluding_groups(index, groups, queries[subset],
                                                  query_groups[subset], 20)
    np.testing.assert_array_equal(sims[subset], part_sims)
    np.testing.assert_array_equal(ids[subset], part_ids)
    assert (np.diff(sims, axis=1) <= 0).all()  # still nearest first


def test_a_head_over_the_shared_pool_predicts_exactly_as_one_with_its_own_copy(tmp_path):
    X, cluster = clustered(300, 8, 4)
    Y = np.eye(4, dtype=np.float32)[cluster]
    Xg = with_groups(X, np.arange(300, dtype=np.float32))
    folds = np.arange(300) % 3
    pool = KnnPool.from_keys([Xg[:, :-1]])
    own = fit_oof(KNNFeatureHead(LogRegHead(), k=5), Xg, Y, folds, Xg[:50], score=no_score)
    shared_head = KNNFeatureHead(LogRegHead(), k=5, pool=pool)
    shared = fit_oof(shared_head, Xg, Y, folds, Xg[:50], score=no_score)
    np.testing.assert_array_equal(own.oof, shared.oof)
    np.testing.assert_array_equal(own.test_pred, shared.test_pred)
    fitted = KNNFeatureHead(LogRegHead(), k=5, pool=pool).fit(Xg[:200], Y[:200])
    own_fitted = KNNFeatureHead(LogRegHead(), k=5).fit(Xg[:200], Y[:200])
    saved, own_saved = io.BytesIO(), io.BytesIO()
    joblib.dump(fitted, saved)
    joblib.dump(own_fitted, own_saved)
    vector_bytes, position_bytes = 200 * 8 * 4, 200 * 4
    # positions into the pool replace the vectors (and the faiss index holding them)
    assert len(saved.getvalue()) <= len(own_saved.getvalue()) - vector_bytes + position_bytes
    saved.seek(0)
    loaded = joblib.load(saved)
    assert not hasattr(loaded, "index_") and loaded.pool_rows_.dtype == np.int32
    with pytest.raises(HybridstackError, match="needs its pool"):
        loaded.predict_proba(Xg[200:])
    pool.save(tmp_path)
    reloaded = KnnPool.load(tmp_path, pool.digest)
    np.testing.assert_array_equal(loaded.attach_pool(reloaded).predict_proba(Xg[200:]),
                                  fitted.predict_proba(Xg[200:]))
    with pytest.raises(HybridstackError, match="fitted on pool"):
        joblib.load(io.BytesIO(saved.getvalue())).attach_pool(KnnPool.from_keys([Xg[:10, :-1]]))


def test_the_pool_keeps_each_distinct_vector_once_and_is_content_addressed(tmp_path):
    X, _ = clustered(50, 6, 3)
    pool = KnnPool.from_keys([X, X[::-1]])  # the second view repeats every row
    assert len(pool.vectors) == 50
    np.testing.assert_array_equal(pool.positions(normalize_rows(X[[7, 3]])), [7, 3])
    assert KnnPool.from_keys([X]).digest == pool.digest != KnnPool.from_keys([X[1:]]).digest
    path = pool.save(tmp_path)
    assert path == tmp_path / "knn" / f"{pool.digest}.npy"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(HybridstackError, match="does not hold the kNN pool"):
        KnnPool.load(tmp_path, pool.digest)


# -- memory: keys normalised and indexed a chunk at a time, features shared by heads ----------


def faiss_add_index(unit: np.ndarray, kind: str, nprobe: int = 4):
    """The index as faiss' own train + add build it from the full normalised keys."""
    import faiss

    from hybridstack.features.knn_index import ivf_list_count

    n, dim = unit.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.index_factory(dim, f"IVF{ivf_list_count(n)},Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(unit)
        faiss.extract_index_ivf(index).nprobe = nprobe
    index.add(unit)
    return index


def full_copy_features(X: np.ndarray, Y: np.ndarray, kind: str, k: int) -> np.ndarray:
    """The kNN features of every fitted row computed the simple way: one normalised copy of the
    keys, faiss' own index build, one search over all rows."""
    unit, groups = normalize_rows(X[:, :-1]), X[:, -1].astype(np.int64)
    sims, ids = search_excluding_groups(faiss_add_index(unit, kind), groups, unit, groups, k)
    return neighbour_features(sims, ids, Y, Y.mean(axis=0))


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 rows, so a few hundred rows cross many chunk boundaries."""
    from hybridstack.features import knn, knn_index

    for module in (knn, knn_index):  # the index build's chunks and the head's
        monkeypatch.setattr(module, "CHUNK_ROWS", 64)


def list_contents(ivf, list_no: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, codes) of one inverted list, as numpy copies."""
    import faiss

    size = ivf.invlists.list_size(list_no)
    return (faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), size).copy(),
            faiss.rev_swig_ptr(ivf.invlists.get_codes(list_no), size * ivf.code_size).copy())


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_the_chunked_index_holds_exactly_what_faiss_add_puts_in_it(small_chunks, kind):
    import faiss

    from hybridstack.features.knn_index import NormalizedKeys

    X, _ = clustered(1000, 12, 8)
    X[3] = 0.0  # a zero row stays zero
    unit = normalize_rows(X)
    ours, theirs = build_index(NormalizedKeys(X, 0, 12), kind, 4), faiss_add_index(unit, kind)
    assert ours.ntotal == theirs.ntotal == 1000
    if kind == "ivf":
        a, b = faiss.extract_index_ivf(ours), faiss.extract_index_ivf(theirs)
        for list_no in range(a.nlist):
            ours_ids, ours_codes = list_contents(a, list_no)
            theirs_ids, theirs_codes = list_contents(b, list_no)
            np.testing.assert_array_equal(ours_ids, theirs_ids)
            np.testing.assert_array_equal(ours_codes, theirs_codes)
    queries = unit[::7]
    np.testing.assert_array_equal(ours.search(queries, 9)[1], theirs.search(queries, 9)[1])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_fit_gives_the_features_of_one_full_copy_search_bit_for_bit(small_chunks, kind):
    X, cluster = clustered(700, 10, 5)
    groups = np.arange(700) // 3
    Xg, Y = with_groups(X, groups), np.eye(5, dtype=np.float32)[cluster]
    head = KNNFeatureHead(LabelMeanProbe(), k=6, index_kind=kind, nprobe=4, batch_size=100).fit(Xg, Y)
    np.testing.assert_array_equal(head.base_head_.fit_X_[:, -7:], full_copy_features(Xg, Y, kind, 6))
    assert head.index_.ntotal == 700  # a head without a pool rebuilt (and keeps) its index


class SearchCounter:
    """Counts the faiss searches of the kNN heads (one per query batch)."""

    def __init__(self, monkeypatch):
        from hybridstack.features import knn

        self.calls, real = 0, knn.search_batches

        def counted(*args, **kwargs):
            self.calls += 1
            yield from real(*args, **kwargs)

        monkeypatch.setattr(knn, "search_batches", counted)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_heads_sharing_a_search_cache_search_each_fold_once_with_unchanged_outputs(monkeypatch, kind):
    from hybridstack.features.knn import KnnSearchCache

    X, cluster = clustered(300, 8, 4)
    Y = np.eye(4, dtype=np.float32)[cluster]
    Xg, folds = with_groups(X, np.arange(300, dtype=np.float32)), np.arange(300) % 3
    pool, cache = KnnPool.from_keys([Xg[:, :-1]]), KnnSearchCache()
    counter = SearchCounter(monkeypatch)

    def run(base, search_cache):
        head = KNNFeatureHead(base, k=5, index_kind=kind, nprobe=4, pool=pool, search_cache=search_cache)
        return fit_oof(head, Xg, Y, folds, Xg[:50], score=no_score)

    alone = [run(LogRegHead(), None), run(LabelMeanProbe(), None)]
    # per head and fold: its fitted rows, the held-out rows at fit (early-stopping rows here)
    # and again at predict, the test rows
    assert counter.calls == 2 * 3 * 4
    counter.calls = 0
    first = run(LogRegHead(), cache)
    after_first = counter.calls
    second = run(LabelMeanProbe(), cache)
    assert after_first == cache.misses == 3 * 3  # the held-out rows once
    assert counter.calls == after_first and cache.hits == 3 + 3 * 4  # the second head: no search
    for shared, own in zip([first, second], alone, strict=True):
        np.testing.assert_array_equal(shared.oof, own.oof)
        np.testing.assert_array_equal(shared.test_pred, own.test_pred)
    run(LabelMeanProbe(), cache)  # the same again: still no search
    assert counter.calls == after_first
    other_k = KNNFeatureHead(LabelMeanProbe(), k=4, pool=pool, search_cache=cache)
    fit_oof(other_k, Xg, Y, folds, score=no_score)  # other settings: other features, searched
    assert counter.calls > after_first


def test_a_head_pickles_without_its_search_cache_and_old_pickles_still_load(tmp_path):
    from hybridstack.features.knn import KnnSearchCache

    X, cluster = clustered(200, 6, 3)
    Y = np.eye(3, dtype=np.float32)[cluster]
    Xg = with_groups(X, np.arange(200, dtype=np.float32))
    pool = KnnPool.from_keys([Xg[:, :-1]])
    head = KNNFeatureHead(LogRegHead(), k=5, pool=pool, search_cache=KnnSearchCache()).fit(Xg, Y)
    expected = head.predict_proba(Xg[:40])
    buffer = io.BytesIO()
    joblib.dump(head, buffer)
    loaded = joblib.load(io.BytesIO(buffer.getvalue()))
    assert loaded.search_cache is None and not hasattr(loaded, "fit_digest_")
    np.testing.assert_array_equal(loaded.attach_pool(pool).predict_proba(Xg[:40]), expected)
    # a head pickled before the cache existed has no such attribute at all
    state = joblib.load(io.BytesIO(buffer.getvalue())).__getstate__()
    del state["search_cache"]
    old = KNNFeatureHead.__new__(KNNFeatureHead)
    old.__setstate__(state)
    assert old.get_params()["search_cache"] is None
    np.testing.assert_array_equal(old.attach_pool(pool).predict_proba(Xg[:40]), expected)
