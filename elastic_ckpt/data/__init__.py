"""Sample order and datasets: what each rank reads at each step, for any world size.

``ElasticSampler`` maps (seed, dataset length, global batch size, step) to sample ids and
splits them per rank and micro-batch; datasets are map-style (``MapDataset``) so any rank can
read any index. Nothing here keeps per-rank state.
"""

from elastic_ckpt.data.datasets import DatasetError, MapDataset, collate, fetch
from elastic_ckpt.data.eval_split import eval_micro_batches, eval_range, forward_passes
from elastic_ckpt.data.parquet import ParquetDataset, write_token_parquet
from elastic_ckpt.data.sampler import ElasticSampler
from elastic_ckpt.data.synthetic import SyntheticLMDataset

__all__ = [
    "DatasetError",
    "ElasticSampler",
    "MapDataset",
    "ParquetDataset",
    "SyntheticLMDataset",
    "collate",
    "eval_micro_batches",
    "eval_range",
    "forward_passes",
    "fetch",
    "write_token_parquet",
]
