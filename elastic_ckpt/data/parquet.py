"""``ParquetDataset``: map-style access to rows of a Parquet file or directory, on any URI.

Construction reads only footers (row counts per row group, schema). Rows are read on demand a
row group at a time - a ranged read of just the requested column's chunk - and the last few
decoded row groups are cached, so shuffled access is cheapest with small row groups (a few
MiB). Files under a directory are ordered by path; global row ``i`` counts across them.
"""

from __future__ import annotations

import posixpath
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from elastic_ckpt.data.datasets import DatasetError
from elastic_ckpt.errors import ConfigError, StorageError
from elastic_ckpt.storage import resolve


def _resolve(uri: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is None:
        return resolve(uri)
    # With an explicit filesystem the URI's scheme (if any) only names it.
    return filesystem, uri.split("://", 1)[-1] if "://" in uri else uri


def _is_token_type(t: pa.DataType) -> bool:
    listy = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    return listy and pa.types.is_integer(t.value_type)


def _list_files(fs: pafs.FileSystem, root: str, uri: str) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [root]
    if info.type != pafs.FileType.Directory:
        raise StorageError(f"cannot open dataset {uri}: it does not exist", path=uri, missing=True)
    files = sorted(
        i.path
        for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        # Skip Spark/Hive markers (_SUCCESS, _metadata) and hidden temp files.
        if i.type == pafs.FileType.File
        and i.base_name.endswith(".parquet")
        and not i.base_name.startswith(("_", "."))
    )
    if not files:
        raise DatasetError(f"no *.parquet files under {uri}", path=uri)
    return files


class ParquetDataset:
    """Rows of ``column`` across one Parquet file or every ``*.parquet`` file under a directory.

    A token column (``list``/``large_list``/``fixed_size_list`` of integers) gives
    ``{"input_ids": LongTensor[n]}`` per row (labels are the loss function's shift, as for
    ``SyntheticLMDataset``); with ``seq_len`` set, every row read must have exactly that many
    tokens, else ``DatasetError`` naming file, row and column. Any other column gives the
    row's Python value. Pickles without open handles or caches (DataLoader workers, Ray).
    """

    def __init__(
        self,
        uri: str,
        column: str = "tokens",
        seq_len: int | None = None,
        filesystem: pafs.FileSystem | None = None,
        *,
        cache_row_groups: int = 4,
    ) -> None:
        if seq_len is not None and (isinstance(seq_len, bool) or int(seq_len) < 1):
            raise ConfigError(f"seq_len must be a positive integer or None, got {seq_len!r}",
                              field="seq_len")
        if cache_row_groups < 1:
            raise ConfigError(f"cache_row_groups must be >= 1, got {cache_row_groups}",
                              field="cache_row_groups")
        self.uri = uri
        self.column = column
        self.seq_len = None if seq_len is None else int(seq_len)
        self.cache_row_groups = int(cache_row_groups)
        self._fs, root = _resolve(uri, filesystem)
        self.files = _list_files(self._fs, root, uri)
        self._metadata = [self._read_footer(path) for path in self.files]

        kinds = {path: _is_token_type(md.schema.to_arrow_schema().field(column).type)
                 for path, md in zip(self.files, self._metadata)}
        self.is_tokens = kinds[self.files[0]]
        for path, kind in kinds.items():
            if kind != self.is_tokens:
                raise DatasetError(
                    f"column {column!r} is a token list in {self.files[0]} but not in {path} "
                    "(or the reverse); every file must have the same column type",
                    path=path, column=column,
                )

        # One entry per non-empty row group, in global row order.
        rg_file, rg_index, rg_file_row, starts = [], [], [], [0]
        for f, md in enumerate(self._metadata):
            file_row = 0
            for g in range(md.num_row_groups):
                n = md.row_group(g).num_rows
                if n:
                    rg_file.append(f)
                    rg_index.append(g)
                    rg_file_row.append(file_row)
                    starts.append(starts[-1] + n)
                file_row += n
        if starts[-1] == 0:
            raise DatasetError(f"dataset {uri} has no rows", path=uri)
        self._rg_file, self._rg_index, self._rg_file_row = rg_file, rg_index, rg_file_row
        self._starts = np.asarray(starts, dtype=np.int64)
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _read_footer(self, path: str) -> pq.FileMetaData:
        try:
            with self._fs.open_input_file(path) as f:
                md = pq.ParquetFile(f).metadata
        except (OSError, pa.ArrowInvalid) as exc:
            raise StorageError(f"cannot read Parquet footer of {path}: {exc}", path=path) from exc
        schema = md.schema.to_arrow_schema()
        if self.column not in schema.names:
            raise ConfigError(
                f"column {self.column!r} not in {path}; it has {schema.names}",
                field="column", path=path,
            )
        t = schema.field(self.column).type
        fixed = pa.types.is_fixed_size_list(t)
        if self.seq_len is not None and fixed and t.list_size != self.seq_len:
            raise DatasetError(
                f"column {self.column!r} of {path} holds rows of {t.list_size} tokens, "
                f"seq_len is {self.seq_len}",
                path=path, column=self.column,
            )
        return md

    def __repr__(self) -> str:
        return (f"ParquetDataset({self.uri!r}, column={self.column!r}, seq_len={self.seq_len}, "
                f"files={len(self.files)}, rows={len(self)})")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_cache"], state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._cache = OrderedDict()
        self._lock = threading.Lock()

    # -- reads ------------------------------------------------------------------------------
    def _locate(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {type(index).__name__}")
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows of {self.uri}")
        return int(np.searchsorted(self._starts, index, side="right")) - 1

    def _row_group(self, g: int) -> Any:
        """Row group ``g`` decoded: ``(offsets, values, is_null)`` numpy arrays for a token
        column, the Arrow array otherwise. LRU-cached; a miss reads outside the lock, so two
        threads may both read the same group (harmless) rather than serialise all reads."""
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        f = self._rg_file[g]
        path = self.files[f]
        try:
            with self._fs.open_input_file(path) as handle:
                pf = pq.ParquetFile(handle, metadata=self._metadata[f])
                arr = pf.read_row_group(self._rg_index[g], columns=[self.column]).column(0)
        except (OSError, pa.ArrowInvalid) as exc:
            raise StorageError(f"cannot read row group {self._rg_index[g]} of {path}: {exc}",
                               path=path) from exc
        arr = arr.combine_chunks()
        data = self._decode_tokens(arr, g) if self.is_tokens else arr
        with self._lock:
            self._cache[g] = data
            while len(self._cache) > self.cache_row_groups:
                self._cache.popitem(last=False)
        return data

    def _decode_tokens(self, arr: pa.Array, g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        is_null = arr.is_null().to_numpy(zero_copy_only=False)
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy().astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        flat = arr.flatten()  # skips null rows, matching their zero length above
        if flat.null_count:
            first = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
            row = int(np.searchsorted(offsets, first, side="right")) - 1
            raise self._row_error(g, row, "has a null token")
        values = np.asarray(flat.to_numpy(), dtype=np.int64)
        return offsets, values, is_null

    def _row_error(self, g: int, row: int, what: str) -> DatasetError:
        path = self.files[self._rg_file[g]]
        file_row = self._rg_file_row[g] + row
        index = int(self._starts[g]) + row
        return DatasetError(
            f"row {file_row} of {path} (dataset index {index}), column {self.column!r}, {what}",
            path=path, row=file_row, column=self.column,
        )

    def _sample(self, data: Any, g: int, row: int) -> Any:
        if not self.is_tokens:
            return data[row].as_py()
        offsets, values, is_null = data
        if is_null[row]:
            raise self._row_error(g, row, "is null")
        lo, hi = int(offsets[row]), int(offsets[row + 1])
        if self.seq_len is not None and hi - lo != self.seq_len:
            raise self._row_error(g, row, f"has {hi - lo} tokens, seq_len is {self.seq_len}")
        # Copy: the cached row group must not change if a caller edits the tensor in place.
        return {"input_ids": torch.from_numpy(values[lo:hi].copy())}

    def __getitem__(self, index: int) -> Any:
        g = self._locate(index)
        return self._sample(self._row_group(g), g, int(index) - int(self._starts[g]))

    def __getitems__(self, indices: list[int]) -> list:
        """``[self[i] for i in indices]``, reading each needed row group once per call even
        when there are more of them than the cache holds."""
        by_group: dict[int, list[int]] = {}  # row group -> positions in ``indices``
        for pos, i in enumerate(indices):
            by_group.setdefault(self._locate(i), []).append(pos)
        out: list[Any] = [None] * len(indices)
        for g, positions in by_group.items():
            data = self._row_group(g)
            start = int(self._starts[g])
            for pos in positions:
                out[pos] = self._sample(data, g, int(indices[pos]) - start)
        return out


def write_token_parquet(
    uri: str,
    token_rows: Iterable[Any],
    *,
    column: str = "tokens",
    row_group_size: int = 1024,
    filesystem: pafs.FileSystem | None = None,
) -> str:
    """Write ``token_rows`` (a 2-D array/tensor, or an iterable of integer sequences, ragged
    allowed) as one Parquet file with a ``list<int64>`` column; for tests and demos.

    Creates parent directories; overwrites an existing file. Returns the path written
    (within ``filesystem``).
    """
    if row_group_size < 1:
        raise ConfigError(f"row_group_size must be >= 1, got {row_group_size}",
                          field="row_group_size")
    if isinstance(token_rows, torch.Tensor):
        token_rows = token_rows.detach().cpu().numpy()
    rows = [np.asarray(r, dtype=np.int64).reshape(-1) for r in token_rows]
    if not rows:
        raise DatasetError("write_token_parquet got no rows")
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    values = pa.array(np.concatenate(rows), type=pa.int64())
    if offsets[-1] <= np.iinfo(np.int32).max:
        tokens = pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), values)
    else:  # list<> offsets are int32; past 2**31 tokens a file needs large_list<>
        tokens = pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), values)
    fs, path = _resolve(uri, filesystem)
    parent = posixpath.dirname(path)
    try:
        if parent:
            fs.create_dir(parent, recursive=True)
        pq.write_table(pa.table({column: tokens}), path, filesystem=fs,
                       row_group_size=row_group_size)
    except OSError as exc:
        raise StorageError(f"cannot write {uri}: {exc}", path=uri) from exc
    return path
