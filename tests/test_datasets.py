"""Datasets: synthetic determinism and learnability, Parquet round trips and errors, collate."""

from __future__ import annotations

import math
import pickle
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from elastic_ckpt.data import (
    DatasetError,
    MapDataset,
    ParquetDataset,
    SyntheticLMDataset,
    collate,
    fetch,
    write_token_parquet,
)
from elastic_ckpt.errors import ConfigError, StorageError

# -- synthetic ------------------------------------------------------------------------------


def test_synthetic_is_deterministic_by_index():
    a = SyntheticLMDataset(1000, seq_len=32, vocab_size=50, seed=7)
    b = SyntheticLMDataset(1000, seq_len=32, vocab_size=50, seed=7)
    for i in (999, 0, 17, 500):  # order of access must not matter
        x = a[i]["input_ids"]
        assert x.dtype == torch.int64 and x.shape == (32,)
        assert int(x.min()) >= 0 and int(x.max()) < 50
        assert torch.equal(x, b[i]["input_ids"])
    other_seed = SyntheticLMDataset(1000, seq_len=32, vocab_size=50, seed=8)
    assert not torch.equal(a[1]["input_ids"], other_seed[1]["input_ids"])
    assert isinstance(a, MapDataset) and len(a) == 1000
    with pytest.raises(IndexError):
        a[1000]


def _bigram_stats(ds, n):
    pairs = Counter()
    prev_counts = Counter()
    for i in range(n):
        x = ds.tokens(i)
        for p, q in zip(x[:-1].tolist(), x[1:].tolist()):
            pairs[p, q] += 1
            prev_counts[p] += 1
    total = sum(pairs.values())
    entropy = -sum(c / total * math.log(c / prev_counts[p]) for (p, _), c in pairs.items())
    best = Counter()
    for (p, _), c in pairs.items():
        best[p] = max(best[p], c)
    return entropy, sum(best.values()) / total


def test_synthetic_is_learnable_from_previous_token():
    vocab = 64
    ds = SyntheticLMDataset(400, seq_len=32, vocab_size=vocab, seed=0)
    entropy, accuracy = _bigram_stats(ds, 400)
    # Chance is log(64) = 4.16 nats / 1.6%; four strides allow log(4) = 1.39 nats / ~25%.
    assert entropy < math.log(4) + 0.05
    assert accuracy > 0.2
    # Two previous tokens determine the next exactly (without noise).
    x = ds.tokens(3)
    assert np.all((x[2:] - x[1:-1]) % vocab == (x[1] - x[0]) % vocab)


def test_synthetic_noise_and_validation():
    noisy = SyntheticLMDataset(200, seq_len=32, vocab_size=64, seed=0, noise=0.2)
    entropy, _ = _bigram_stats(noisy, 200)
    assert math.log(4) < entropy < math.log(64)
    for kwargs, field in [
        ({"seq_len": 1}, "seq_len"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"noise": 1.5}, "noise"),
        ({"strides": []}, "strides"),
    ]:
        args = {"num_samples": 10, "seq_len": 8, "vocab_size": 16, **kwargs}
        with pytest.raises(ConfigError, match=field):
            SyntheticLMDataset(**args)


# -- fetch / collate ------------------------------------------------------------------------


class _Counting:
    def __init__(self):
        self.batched = 0

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return {"x": torch.tensor([i, i])}

    def __getitems__(self, ids):
        self.batched += 1
        return [self[i] for i in ids]


def test_fetch_prefers_getitems_and_collate_stacks():
    ds = _Counting()
    samples = fetch(ds, np.array([3, 1, 4]))
    assert ds.batched == 1
    batch = collate(samples)
    assert torch.equal(batch["x"], torch.tensor([[3, 3], [1, 1], [4, 4]]))
    plain = SyntheticLMDataset(10, 4, 8)
    assert collate(fetch(plain, [0, 1]))["input_ids"].shape == (2, 4)


def test_collate_is_default_collate_for_tuples_lists_numpy_and_numbers():
    x = [(torch.tensor([i, i]), i) for i in range(3)]
    xs, ys = collate(x)
    assert torch.equal(xs, torch.tensor([[0, 0], [1, 1], [2, 2]]))
    assert torch.equal(ys, torch.tensor([0, 1, 2]))
    arrays = collate([np.arange(2), np.arange(2) + 1])
    assert torch.equal(arrays, torch.tensor([[0, 1], [1, 2]]))
    out = collate([{"n": 1, "s": "a", "f": 0.5}, {"n": 2, "s": "b", "f": 1.5}])
    assert torch.equal(out["n"], torch.tensor([1, 2])) and out["s"] == ["a", "b"]
    assert torch.equal(out["f"], torch.tensor([0.5, 1.5], dtype=torch.float64))


def test_collate_errors_name_the_samples():
    with pytest.raises(DatasetError, match="no samples"):
        collate([])
    with pytest.raises(DatasetError, match=r"first: \{'input_ids': Tensor \(3,\)"):
        collate([{"input_ids": torch.zeros(3)}, {"input_ids": torch.zeros(4)}])


# -- parquet --------------------------------------------------------------------------------


def _rows(n, seq_len, offset=0):
    return np.arange(offset, offset + n * seq_len, dtype=np.int64).reshape(n, seq_len) % 1000


def test_parquet_file_round_trip(tmp_path):
    rows = _rows(50, 8)
    path = write_token_parquet(str(tmp_path / "a.parquet"), rows, row_group_size=7)
    assert pq.ParquetFile(path).metadata.num_row_groups == 8
    ds = ParquetDataset(path, seq_len=8, cache_row_groups=2)
    assert len(ds) == 50 and isinstance(ds, MapDataset)
    for i in [0, 49, 6, 7, 13, 25, 0]:
        x = ds[i]["input_ids"]
        assert x.dtype == torch.int64
        np.testing.assert_array_equal(x.numpy(), rows[i])
    ids = [49, 0, 7, 7, 30, 1]
    batched = ds.__getitems__(ids)
    for i, sample in zip(ids, batched):
        assert torch.equal(sample["input_ids"], ds[i]["input_ids"])
    # Editing a returned tensor must not corrupt the cache.
    ds[3]["input_ids"].zero_()
    np.testing.assert_array_equal(ds[3]["input_ids"].numpy(), rows[3])
    with pytest.raises(IndexError):
        ds[50]


def test_parquet_directory_and_uri(tmp_path):
    root = tmp_path / "data"
    write_token_parquet(str(root / "part-0.parquet"), _rows(10, 4), row_group_size=3)
    write_token_parquet(str(root / "sub" / "part-1.parquet"), _rows(5, 4, 40), row_group_size=2)
    write_token_parquet(f"file://{root}/part-2.parquet", _rows(6, 4, 60), row_group_size=4)
    (root / "_SUCCESS").write_text("")
    expected = np.concatenate([_rows(10, 4), _rows(6, 4, 60), _rows(5, 4, 40)])  # path order
    ds = ParquetDataset(f"file://{root}", seq_len=4)
    assert len(ds) == 21 and len(ds.files) == 3
    got = torch.stack([s["input_ids"] for s in fetch(ds, range(21))]).numpy()
    np.testing.assert_array_equal(got, expected)
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[20]["input_ids"], ds[20]["input_ids"])


def test_parquet_wrong_length_names_file_row_and_column(tmp_path):
    rows = [list(range(4))] * 5 + [list(range(3))] + [list(range(4))] * 4
    path = write_token_parquet(str(tmp_path / "bad.parquet"), rows, row_group_size=4)
    ds = ParquetDataset(path, seq_len=4)
    assert ds[5 - 1]["input_ids"].shape == (4,)
    with pytest.raises(DatasetError) as info:
        ds[5]
    msg = str(info.value)
    assert "bad.parquet" in msg and "row 5" in msg and "'tokens'" in msg
    assert info.value.row == 5 and info.value.column == "tokens"
    with pytest.raises(DatasetError, match="row 5"):
        ds.__getitems__([0, 5])
    # Without seq_len ragged rows are fine.
    assert ParquetDataset(path)[5]["input_ids"].tolist() == [0, 1, 2]


def test_parquet_fixed_size_list_nulls_and_other_columns(tmp_path):
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12), type=pa.int32()), 3)
    table = pa.table({"tokens": tokens, "text": ["a", "b", None, "d"]})
    path = str(tmp_path / "fixed.parquet")
    pq.write_table(table, path, row_group_size=2)
    ds = ParquetDataset(path, seq_len=3)
    assert ds[2]["input_ids"].tolist() == [6, 7, 8] and ds[2]["input_ids"].dtype == torch.int64
    with pytest.raises(DatasetError, match="3 tokens"):
        ParquetDataset(path, seq_len=4)
    text = ParquetDataset(path, column="text")
    assert [text[i] for i in range(4)] == ["a", "b", None, "d"]
    assert text.__getitems__([3, 0]) == ["d", "a"]

    nulls = pa.table({"tokens": pa.array([[1, 2], None], type=pa.list_(pa.int64()))})
    pq.write_table(nulls, str(tmp_path / "nulls.parquet"))
    with pytest.raises(DatasetError, match="row 1 .* is null"):
        ParquetDataset(str(tmp_path / "nulls.parquet"))[1]


def test_parquet_construction_errors(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        ParquetDataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no \\*.parquet"):
        ParquetDataset(str(tmp_path / "empty"))
    path = write_token_parquet(str(tmp_path / "a.parquet"), _rows(3, 2))
    with pytest.raises(ConfigError, match="'ids'.*tokens"):
        ParquetDataset(path, column="ids")
