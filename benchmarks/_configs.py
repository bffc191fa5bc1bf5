"""The trainer benchmarks' model and data flags and the ``TrainConfig`` built from them
(``step_loop.py``, ``recovery.py``): a GPT (or, in ``step_loop.py``, an HF Llama) of
``--d-model``/``--layers``/``--heads``/``--vocab``/``--seq-len`` on a ``SyntheticLMDataset`` of
``--num-samples`` sequences, ``--global-batch`` samples a step in micro-batches of
``--micro-batch``. The scripts add their own flags for everything else.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_model_flags(p: argparse.ArgumentParser, *, global_batch: int, micro_batch: int,
                    num_samples: int) -> None:
    """Add the model and data flags; the batch and dataset sizes default per script.
    ``--layers``/``--heads`` are also spelled ``--n-layers``/``--n-heads`` (each script's
    spelling of before); both set ``layers``/``heads``."""
    p.add_argument("--d-model", type=int, default=128, help="model width (128)")
    p.add_argument("--layers", "--n-layers", dest="layers", type=int, default=4,
                   help="transformer blocks (4)")
    p.add_argument("--heads", "--n-heads", dest="heads", type=int, default=4,
                   help="attention heads (4)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sample (64)")
    p.add_argument("--vocab", type=int, default=256, help="vocabulary size (256)")
    p.add_argument("--global-batch", type=int, default=global_batch,
                   help=f"samples per step ({global_batch})")
    p.add_argument("--micro-batch", type=int, default=micro_batch,
                   help=f"samples per forward pass ({micro_batch})")
    p.add_argument("--num-samples", type=int, default=num_samples,
                   help=f"synthetic dataset size ({num_samples})")


def llama_fields(o: argparse.Namespace) -> dict[str, Any]:
    """``transformers`` ``LlamaConfig`` fields of the flags' shape (untied head, MHA)."""
    return {"model_type": "llama", "vocab_size": o.vocab, "hidden_size": o.d_model,
            "intermediate_size": 4 * o.d_model, "num_hidden_layers": o.layers,
            "num_attention_heads": o.heads, "num_key_value_heads": o.heads,
            "max_position_embeddings": o.seq_len, "tie_word_embeddings": False}


def model_fields(o: argparse.Namespace, kind: str = "gpt") -> dict[str, Any]:
    """The config's ``model`` section: the built-in GPT, or (``kind="hf"``) an HF Llama."""
    if kind == "hf":
        return {"kind": "hf", "config": llama_fields(o)}
    return {"vocab_size": o.vocab, "d_model": o.d_model, "n_layers": o.layers,
            "n_heads": o.heads, "max_seq_len": o.seq_len}


def train_config(o: argparse.Namespace, *, seed: int = 0, kind: str = "gpt", **fields: Any):
    """``TrainConfig`` of the flags' model and data, with ``seed`` as both the run's and the
    sample order's seed; ``fields`` give the other sections (``max_steps``, ``checkpoint``,
    ``optim``, ``scaling``, ``run_dir``, ...)."""
    from elastic_ckpt.config import TrainConfig

    return TrainConfig(
        seed=seed,
        data={"global_batch_size": o.global_batch, "micro_batch_size": o.micro_batch,
              "seed": seed,
              "dataset": {"num_samples": o.num_samples, "seq_len": o.seq_len,
                          "vocab_size": o.vocab}},
        model=model_fields(o, kind),
        **fields,
    )
