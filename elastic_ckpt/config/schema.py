"""``TrainConfig`` and its sections: pydantic v2, frozen, unknown fields refused.

Every field has a one-line docstring; cross-field rules are checked once, here. Nested
sections accept plain dicts (``TrainConfig(data={"global_batch_size": 64})``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PositiveFloat,
    PositiveInt,
    Tag,
    model_validator,
)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)


class ScalingConfig(_Section):
    """How many workers, and what each one needs."""

    min_workers: PositiveInt = 1
    """Fewest workers training may run with; below this the coordinator waits for capacity."""
    max_workers: PositiveInt = 2
    """Most workers; the coordinator scales up to this as capacity appears."""
    resources_per_worker: dict[str, float] = {"CPU": 1.0}
    """Ray resources of one worker (one placement-group bundle)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; adds ``GPU: 1`` to each bundle when absent."""
    cooldown_s: float = Field(5.0, ge=0)
    """Minimum seconds between two resizes; node events inside it coalesce into one resize."""
    settle_s: float = Field(3.0, ge=0)
    """Scale up only once capacity has not changed for this long, so nodes that join in a
    burst cause one resize. The new workers' processes start meanwhile (hot spares): a
    window at least as long as a worker's start-up costs no extra downtime."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "SPREAD"
    """Where workers go. Each worker has its own one-bundle placement group, so a resize
    keeps the others' processes: ``STRICT_SPREAD`` refuses a second worker on a node,
    ``SPREAD`` prefers a node without one, ``PACK`` leaves the node to Ray's scheduler."""
    capacity_timeout_s: float | None = Field(300.0, gt=0)
    """How long to wait for ``min_workers`` to fit before failing; None waits forever."""
    placement_timeout_s: float = Field(5.0, gt=0)
    """How long one attempt to place the new workers' bundles may take before the
    coordinator retries with fewer (the resource view lags behind node deaths)."""
    actor_start_timeout_s: float = Field(180.0, gt=0)
    """How long a new worker process may take to start (imports, dataset) before the start
    counts as a failure."""
    process_group_timeout_s: float | None = Field(None, gt=0)
    """Timeout of the training process group's collectives: a rank that stops answering
    (hung, not dead) fails its peers' collectives after this long. None: the larger of
    ``failure.step_timeout_s`` and ``failure.first_step_timeout_s`` (600 s when both are
    off), so no collective gives up before the hang watchdog would."""
    stop_timeout_s: float = Field(600.0, gt=0)
    """How long the ranks may take to stop at a step boundary and commit their checkpoint
    for a resize (a drain's own deadline wins when it is sooner)."""
    request_resources: bool = True
    """Ask the Ray autoscaler for ``max_workers`` bundles (withdrawn when training ends)."""

    @model_validator(mode="after")
    def _check(self) -> "ScalingConfig":
        if self.min_workers > self.max_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= max_workers "
                             f"({self.max_workers})")
        if any(v < 0 for v in self.resources_per_worker.values()):
            raise ValueError("resources_per_worker values must be >= 0")
        return self

    @property
    def bundle(self) -> dict[str, float]:
        """The placement-group bundle of one worker."""
        bundle = dict(self.resources_per_worker)
        if self.use_gpu:
            bundle.setdefault("GPU", 1.0)
        return bundle


class CheckpointConfig(_Section):
    uri: str = "./checkpoints"
    """Root URI of the checkpoints: a local path, ``file://``, ``s3://``, ``gs://``."""
    interval_steps: PositiveInt | None = 50
    """Checkpoint every this many steps (None: only on resize and at the end)."""
    keep_last: PositiveInt | None = 3
    """How many of the newest committed checkpoints retention keeps (None: all)."""
    keep_every: PositiveInt | None = None
    """Also keep every checkpoint whose step is a multiple of this (None: off)."""
    save_on_finish: bool = True
    """Write a final checkpoint at ``max_steps``."""
    fallback_on_corrupt: bool = True
    """On restore, if the latest checkpoint is corrupt, mark it ``CORRUPT`` (kept for
    inspection) and resume from the next older one, recording it in the event timeline;
    False: fail the run instead."""
    async_save: bool = True
    """Interval saves stage the state into host memory and return; writing, fsync and commit
    run in the background (one save in flight). Saves on a stop request, before a resize and
    at the end are always committed before the ranks return."""
    overlap_staging: bool = True
    """With ``async_save``: copy the sharded parameters and optimizer state into host memory
    while the next step's forward/backward runs, waiting (if at all) just before its
    ``optimizer.step``; buffers and step counters are copied before the save returns. Off:
    every copy is made before training resumes."""
    reshard_from_memory: bool = True
    """On a resize, the processes that stay keep the shards their stop checkpoint wrote and
    the new group takes each chunk from its writer's memory over the process group; only the
    chunks of workers that left are read from storage. Costs one more copy of a rank's state
    (host or GPU memory, where the model lives) while the new group builds its model."""
    memory_tier: bool = False
    """The peer-memory tier: every ``memory_interval_steps`` each rank snapshots its shard
    into host memory and sends a replica to a rank on another node, so after a node loss the
    survivors restore the newest snapshot from memory (re-sharded to the new size; no
    storage read, no steps lost beyond the interval). Storage is read when a rank and its
    replica holder are both gone. Costs twice the rank's state in host memory and one copy
    of the shard over the network per snapshot."""
    memory_interval_steps: PositiveInt = 1
    """With ``memory_tier``: snapshot every this many steps."""
    lease_timeout_s: float | None = Field(60.0, gt=0)
    """One writer per root: ``fit()`` takes a lease object in ``uri`` (``.lease``: job,
    host, pid, heartbeat every quarter of this) and a second job on the same ``uri`` is
    refused naming it. A lease not renewed for this long (or whose process on the same host
    is gone) is taken over, logged. None: no lease."""
    max_failed_saves: PositiveInt = 3
    """Consecutive failed saves (ENOSPC, an object-store error) the run tolerates, each a
    warning, before it fails naming the cause and the last committed checkpoint."""
    recycle_files: bool = True
    """Local filesystems: retention hands the data files of a checkpoint it removes to the next
    save, which overwrites them in place (no new blocks to allocate: faster on most disks).
    Between saves the root then holds one checkpoint's worth of files in ``.recycle/``."""
    read_threads: PositiveInt | None = None
    """Threads each rank reads checkpoint shards with (None: from the cores the rank was given,
    ``torch.get_num_threads()``, at most 8)."""
    init_from: str | None = None
    """Pretrained weights to start from when ``uri`` holds no committed checkpoint: an HF model
    directory (safetensors, sharded or not, or pytorch_model.bin), a ``.safetensors`` or torch
    state-dict file, or an elastic_ckpt checkpoint (its model part); any pyarrow.fs URI. Each
    rank reads only the rows of its own shards; the optimizer starts fresh."""
    init_key_prefix: str = ""
    """Strip this prefix from the key names in ``init_from`` before matching them to
    ``model.state_dict()`` (e.g. ``model.`` or ``module.``)."""


class SyntheticDatasetConfig(_Section):
    kind: Literal["synthetic"] = "synthetic"
    """A learnable synthetic language-modelling dataset (no downloads)."""
    num_samples: PositiveInt = 4096
    """Number of sequences."""
    seq_len: PositiveInt = 64
    """Tokens per sequence."""
    vocab_size: PositiveInt = 256
    """Vocabulary size; must equal ``model.vocab_size``."""


class ParquetDatasetConfig(_Section):
    kind: Literal["parquet"] = "parquet"
    """Token sequences from Parquet files (any pyarrow.fs URI)."""
    uri: str
    """A Parquet file or a directory of them."""
    column: str = "tokens"
    """The fixed-length token column."""
    seq_len: PositiveInt | None = None
    """Expected tokens per row (checked on read); None: not checked."""


def _dataset_kind(value: object) -> str | None:
    # ``kind`` may be omitted for the synthetic default.
    if isinstance(value, dict):
        return value.get("kind", "synthetic")
    return getattr(value, "kind", None)


DatasetConfig = Annotated[
    Union[Annotated[SyntheticDatasetConfig, Tag("synthetic")],
          Annotated[ParquetDatasetConfig, Tag("parquet")]],
    Discriminator(_dataset_kind),
]


class DataConfig(_Section):
    global_batch_size: PositiveInt = 32
    """Samples per optimizer step, whatever the world size."""
    micro_batch_size: PositiveInt = 8
    """Samples per forward/backward on one rank (gradient accumulation over the rest)."""
    seed: int = Field(0, ge=0)
    """Seed of the sample order (a pure function of seed and epoch)."""
    shuffle: bool = True
    """Shuffle each epoch; False keeps dataset order."""
    dataset: DatasetConfig = SyntheticDatasetConfig()
    """The dataset used when ``ElasticTrainer`` is not given one (e.g. ``jobs/train.py``)."""


class OptimConfig(_Section):
    lr: PositiveFloat = 3e-3
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps from 0 to ``lr``."""
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Decay after warm-up, keyed on the global step."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Final LR as a fraction of ``lr`` for cosine/linear decay."""
    grad_clip_norm: PositiveFloat | None = 1.0
    """Clip the global gradient norm to this (None: no clipping)."""


class EvalConfig(_Section):
    """Held-out evaluation (needs an eval dataset: ``ElasticTrainer(eval_dataset=...)`` or
    ``eval.dataset``)."""

    interval_steps: PositiveInt | None = None
    """Evaluate every this many steps; the last step is always evaluated (None: only then)."""
    max_samples: PositiveInt | None = None
    """Evaluate the first this many samples of the eval set (None: all of it)."""
    micro_batch_size: PositiveInt | None = None
    """Samples per eval forward on one rank (None: ``data.micro_batch_size``)."""
    dataset: DatasetConfig | None = None
    """The eval dataset used when ``ElasticTrainer`` is not given one (None: no eval)."""


class ParallelConfig(_Section):
    """How ``default_parallelize`` wraps the model (ignored by a user ``parallelize_fn``)."""

    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (HF models: their own gradient
    checkpointing); saves activation memory for ~1/3 more compute."""
    reshard_after_forward: bool = True
    """Free each block's gathered parameters after its forward (ZeRO-3); False keeps them
    until backward (ZeRO-2-like: less communication, more memory)."""
    compile: bool = False
    """``torch.compile`` each block (in place: parameter names do not change)."""


class FailureConfig(_Section):
    max_failures: int | None = Field(3, ge=0)
    """Crashes tolerated before ``fit()`` raises (preemptions don't count; None: unlimited)."""
    step_timeout_s: float | None = Field(600.0, gt=0)
    """The hang watchdog: when no rank reports progress (a step, an eval, a checkpoint) for
    this long, the group is declared hung. The ranks whose process no longer answers (all of
    them when every process answers) are SIGKILLed, never waited for, and training restarts
    from the latest checkpoint; it counts as a failure. Must exceed the longest step, eval or
    blocking save. None: no watchdog after the first step."""
    first_step_timeout_s: float | None = Field(1800.0, gt=0)
    """The watchdog's limit before a group's first step: build, restore, compilation and
    warm-up. None: no limit."""
    survivor_timeout_s: float = Field(10.0, ge=0)
    """After a worker or node dies, how long the other workers get to leave the broken group
    (their collectives fail) before they are killed too. Those that leave in time keep their
    process for the next group; after a training error every process is replaced."""


class LoggingConfig(_Section):
    """Metrics sinks beyond ``<run_dir>/metrics.jsonl`` and Ray metrics (always on)."""

    tensorboard: bool = False
    """Write TensorBoard scalars to ``<run_dir>/tensorboard`` (needs the tensorboard package)."""


class ModelConfig(_Section):
    """The built-in GPT-style model ``jobs/train.py`` builds when no ``model_fn`` is given."""

    kind: Literal["gpt"] = "gpt"
    """The built-in GPT (the default)."""
    vocab_size: PositiveInt = 256
    """Vocabulary size."""
    d_model: PositiveInt = 128
    """Hidden size."""
    n_layers: PositiveInt = 4
    """Transformer blocks (each is one ``fully_shard`` unit)."""
    n_heads: PositiveInt = 4
    """Attention heads; must divide ``d_model``."""
    max_seq_len: PositiveInt = 64
    """Positional-embedding length; must be >= the dataset's ``seq_len``."""
    mlp_ratio: PositiveInt = 4
    """MLP hidden size as a multiple of ``d_model``."""

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        return self


class HFModelConfig(_Section):
    """A Hugging Face causal LM built with ``AutoModelForCausalLM.from_config`` (parameters on
    the meta device, materialized after sharding) and trained with next-token loss. Needs
    ``transformers`` (``pip install elastic_ckpt[hf]``)."""

    kind: Literal["hf"]
    """A ``transformers`` causal language model."""
    config: dict[str, Any] | None = None
    """HF config fields, with ``model_type`` (e.g. ``{model_type: llama, hidden_size: 64}``)."""
    path: str | None = None
    """A directory (any pyarrow.fs URI) holding the model's ``config.json``; for its weights
    set ``checkpoint.init_from`` to the same directory."""
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    """The attention kernel."""

    @model_validator(mode="after")
    def _check(self) -> "HFModelConfig":
        if (self.config is None) == (self.path is None):
            raise ValueError("set exactly one of model.config (HF config fields) and "
                             "model.path (a directory with config.json)")
        if self.config is not None and not self.config.get("model_type"):
            raise ValueError("model.config needs model_type (e.g. llama, gpt2)")
        return self


def _model_kind(value: object) -> str | None:
    if isinstance(value, dict):
        return value.get("kind", "gpt")
    return getattr(value, "kind", None)


AnyModelConfig = Annotated[
    Union[Annotated[ModelConfig, Tag("gpt")], Annotated[HFModelConfig, Tag("hf")]],
    Discriminator(_model_kind),
]


class TrainConfig(_Section):
    """Everything an elastic training run needs, validated once."""

    max_steps: PositiveInt = 500
    """Global optimizer steps to train for."""
    scaling: ScalingConfig = ScalingConfig()
    """Worker counts and resources."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Where and how often to checkpoint."""
    data: DataConfig = DataConfig()
    """Batching and sample order."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and LR schedule."""
    failure: FailureConfig = FailureConfig()
    """Crash tolerance."""
    eval: EvalConfig = EvalConfig()
    """Held-out evaluation."""
    parallel: ParallelConfig = ParallelConfig()
    """FSDP2 wrapping options of the default ``parallelize_fn``."""
    model: AnyModelConfig = ModelConfig()
    """The model built when no ``model_fn`` is given: the built-in GPT or an HF causal LM."""
    mixed_precision: Literal["none", "bf16"] = "none"
    """``bf16``: bf16 parameters for compute, fp32 gradient reduction (GPU)."""
    seed: int = Field(0, ge=0)
    """Seed of model initialization and of per-step RNG."""
    log_interval_steps: PositiveInt = 25
    """Print progress every this many steps."""
    run_dir: str = "./runs/latest"
    """Where the event timeline (events.jsonl) and metrics are written."""
    logging: LoggingConfig = LoggingConfig()
    """Optional metrics sinks (TensorBoard)."""

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        data = self.data
        if data.micro_batch_size > data.global_batch_size:
            raise ValueError(f"data.micro_batch_size ({data.micro_batch_size}) must be <= "
                             f"data.global_batch_size ({data.global_batch_size})")
        if self.optim.warmup_steps >= self.max_steps and self.optim.warmup_steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be < "
                             f"max_steps ({self.max_steps})")
        # An HF model is often trained on the user's own dataset: check the synthetic default
        # against it only when the config names that dataset.
        explicit = isinstance(self.model, ModelConfig) or "dataset" in data.model_fields_set
        for where, ds in (("data.dataset", data.dataset if explicit else None),
                          ("eval.dataset", self.eval.dataset)):
            if isinstance(ds, SyntheticDatasetConfig):
                self._check_tokens(where, ds)
        if self.mixed_precision == "bf16" and not self.scaling.use_gpu:
            raise ValueError("mixed_precision='bf16' needs scaling.use_gpu=true")
        return self

    @property
    def process_group_timeout_s(self) -> float:
        """The collectives' timeout the ranks get (``scaling.process_group_timeout_s``, or
        the watchdog's larger limit, or 600 s)."""
        if self.scaling.process_group_timeout_s is not None:
            return self.scaling.process_group_timeout_s
        limits = [t for t in (self.failure.step_timeout_s, self.failure.first_step_timeout_s)
                  if t is not None]
        return max(limits) if limits else 600.0

    def _check_tokens(self, where: str, ds: SyntheticDatasetConfig) -> None:
        """A synthetic dataset's tokens must fit the model's vocabulary and positions."""
        model = self.model
        if isinstance(model, ModelConfig):
            vocab, positions, name = model.vocab_size, model.max_seq_len, "model.max_seq_len"
        elif model.config is not None:  # an HF config: check what it states
            vocab = model.config.get("vocab_size")
            positions = model.config.get("max_position_embeddings",
                                         model.config.get("n_positions"))
            name = "model.config.max_position_embeddings"
        else:
            return  # model.path: checked when the model is built
        if isinstance(model, ModelConfig) and ds.vocab_size != vocab:
            raise ValueError(f"{where}.vocab_size ({ds.vocab_size}) must equal "
                             f"model.vocab_size ({vocab})")
        if vocab is not None and ds.vocab_size > vocab:  # an HF vocabulary: tokens must fit
            raise ValueError(f"{where}.vocab_size ({ds.vocab_size}) must be <= "
                             f"model.config.vocab_size ({vocab})")
        if positions is not None and ds.seq_len > positions:
            raise ValueError(f"{where}.seq_len ({ds.seq_len}) must be <= {name} ({positions})")

