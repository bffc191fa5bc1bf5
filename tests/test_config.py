"""``TrainConfig``: validated once, frozen, unknown fields refused, errors naming the field;
YAML + ``--set`` loading; and a resume that would change the sample order is refused."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from elastic_ckpt.train.local import run_ranks
from elastic_ckpt.config import (
    CheckpointConfig,
    DataConfig,
    HFModelConfig,
    ModelConfig,
    ParquetDatasetConfig,
    ScalingConfig,
    SyntheticDatasetConfig,
    TrainConfig,
    dump_config,
    load_config,
    validate_config,
)
from elastic_ckpt.errors import ConfigError
from elastic_ckpt.train import lr_at
from train_jobs import restore_errors, smallest_config


def _write(tmp_path, text: str, name: str = "job.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _sections(model: type[BaseModel]):
    yield model
    for field in model.model_fields.values():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _sections(ann)


# -- the models -----------------------------------------------------------------------------------
def test_defaults_are_valid_and_loading_nothing_gives_them():
    cfg = TrainConfig()
    assert cfg.data.micro_batch_size <= cfg.data.global_batch_size
    assert cfg.model.vocab_size == cfg.data.dataset.vocab_size
    assert load_config() == cfg


def test_every_field_has_a_docstring():
    models = [*_sections(TrainConfig), SyntheticDatasetConfig, ParquetDatasetConfig]
    missing = [f"{m.__name__}.{name}" for m in models
               for name, field in m.model_fields.items() if not field.description]
    assert not missing


def test_nested_sections_accept_plain_dicts():
    cfg = TrainConfig(data={"global_batch_size": 64, "micro_batch_size": 4,
                            "dataset": {"num_samples": 10, "seq_len": 8}},
                      scaling={"min_workers": 2, "max_workers": 4})
    assert isinstance(cfg.data, DataConfig) and isinstance(cfg.scaling, ScalingConfig)
    assert cfg.data.global_batch_size == 64 and cfg.scaling.max_workers == 4
    # ``kind`` may be omitted for the synthetic dataset; parquet is chosen by kind.
    assert isinstance(cfg.data.dataset, SyntheticDatasetConfig)
    pq = TrainConfig(data={"dataset": {"kind": "parquet", "uri": "s3://b/tokens"}})
    assert isinstance(pq.data.dataset, ParquetDatasetConfig)
    assert pq.data.dataset.uri == "s3://b/tokens"


@pytest.mark.parametrize("raw,field", [
    ({"max_step": 3}, "max_step"),
    ({"data": {"shuffel": False}}, "data.shuffel"),
    ({"optim": {"lr": 1e-3, "momentum": 0.9}}, "optim.momentum"),
    ({"checkpoint": {"uri": "/x", "keep": 2}}, "checkpoint.keep"),
])
def test_unknown_fields_are_refused_naming_the_field(raw, field):
    with pytest.raises(ValidationError) as info:
        TrainConfig(**raw)
    assert field in str(info.value) and "Extra inputs are not permitted" in str(info.value)
    with pytest.raises(ConfigError) as err:
        validate_config(raw, "job.yaml")
    assert err.value.field == field and field in str(err.value)


def test_frozen():
    cfg = TrainConfig()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.max_steps = 5
    with pytest.raises(ValidationError, match="frozen"):
        cfg.data.global_batch_size = 5
    changed = cfg.model_copy(update={"max_steps": 5})  # the way to derive a variant
    assert changed.max_steps == 5 and cfg.max_steps == TrainConfig().max_steps != 5


@pytest.mark.parametrize("raw,words", [
    ({"data": {"global_batch_size": 4, "micro_batch_size": 8}},
     ["data.micro_batch_size (8)", "data.global_batch_size (4)"]),
    ({"scaling": {"min_workers": 3, "max_workers": 2}}, ["min_workers (3)", "max_workers (2)"]),
    ({"model": {"d_model": 30, "n_heads": 4}}, ["n_heads (4)", "d_model (30)"]),
    ({"model": {"vocab_size": 100}}, ["data.dataset.vocab_size (256)", "model.vocab_size (100)"]),
    ({"data": {"dataset": {"seq_len": 128}}}, ["data.dataset.seq_len (128)", "max_seq_len (64)"]),
    ({"mixed_precision": "bf16"}, ["mixed_precision", "use_gpu"]),
    ({"max_steps": 10, "optim": {"warmup_steps": 10}}, ["optim.warmup_steps (10)", "max_steps"]),
    ({"scaling": {"resources_per_worker": {"CPU": -1}}}, ["resources_per_worker"]),
])
def test_cross_field_rules(raw, words):
    with pytest.raises(ValidationError) as info:
        TrainConfig(**raw)
    for word in words:
        assert word in str(info.value)
    with pytest.raises(ConfigError) as err:
        validate_config(raw, "job.yaml")
    assert all(word in str(err.value) for word in words)


def test_cross_field_rules_accept_the_boundary():
    TrainConfig(data={"global_batch_size": 8, "micro_batch_size": 8})
    TrainConfig(scaling={"min_workers": 2, "max_workers": 2})
    TrainConfig(mixed_precision="bf16", scaling={"use_gpu": True})
    TrainConfig(model={"vocab_size": 100}, data={"dataset": {"vocab_size": 100}})
    TrainConfig(max_steps=10, optim={"warmup_steps": 9})
    assert ScalingConfig(use_gpu=True).bundle == {"CPU": 1.0, "GPU": 1.0}
    assert ModelConfig(d_model=30, n_heads=5).n_heads == 5


@pytest.mark.parametrize("raw,field", [
    ({"max_steps": 0}, "max_steps"),
    ({"optim": {"schedule": "step"}}, "optim.schedule"),
    ({"checkpoint": {"interval_steps": -1}}, "checkpoint.interval_steps"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"data": {"seed": -1}}, "data.seed"),
    ({"optim": {"betas": [0.9, "x"]}}, "optim.betas.1"),
    # Not the union tag pydantic puts in its loc (data.dataset.synthetic.seq_len): the key the
    # user wrote, which ``--set`` accepts.
    ({"data": {"dataset": {"seq_len": 0}}}, "data.dataset.seq_len"),
    ({"data": {"dataset": {"kind": "parquet"}}}, "data.dataset.uri"),
    ({"data": {"dataset": {"kind": "parquet", "uri": "x", "colum": "t"}}}, "data.dataset.colum"),
    ({"data": {"dataset": {"kind": "csv"}}}, "data.dataset"),
])
def test_bad_values_name_the_field(raw, field):
    with pytest.raises(ConfigError) as err:
        validate_config(raw, "job.yaml")
    assert err.value.field == field and field in str(err.value)


# -- loading ------------------------------------------------------------------------------------
JOB = """\
max_steps: 40
data:
  global_batch_size: 24
  micro_batch_size: 6
optim:
  lr: 0.001
  schedule: linear
checkpoint:
  uri: s3://bucket/run
"""


def test_load_yaml_with_overrides(tmp_path):
    path = _write(tmp_path, JOB)
    cfg = load_config(path)
    assert (cfg.max_steps, cfg.data.global_batch_size, cfg.optim.schedule) == (40, 24, "linear")
    assert cfg.checkpoint.uri == "s3://bucket/run" and cfg.optim.warmup_steps == 0  # default
    cfg = load_config(path, ["data.global_batch_size=48", "optim.schedule=cosine",
                             "checkpoint.interval_steps=null", "scaling.max_workers=8",
                             "scaling.resources_per_worker={CPU: 2, memory: 1e9}",
                             "run_dir=/tmp/r1"])
    assert cfg.data.global_batch_size == 48 and cfg.data.micro_batch_size == 6  # merged
    assert cfg.optim.schedule == "cosine" and cfg.optim.lr == 0.001
    assert cfg.checkpoint.interval_steps is None and cfg.checkpoint.uri == "s3://bucket/run"
    assert cfg.scaling.max_workers == 8
    assert cfg.scaling.resources_per_worker == {"CPU": 2.0, "memory": 1e9}
    assert cfg.run_dir == "/tmp/r1"
    # Without a file, overrides apply to the defaults.
    assert load_config(None, ["max_steps=7"]) == TrainConfig(max_steps=7)


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, JOB), ["data.dataset.seq_len=32"])
    assert load_config(_write(tmp_path, dump_config(cfg), "dumped.yaml")) == cfg


def test_bad_yaml_file_names_the_file_and_the_field(tmp_path):
    path = _write(tmp_path, JOB.replace("lr: 0.001", "lr: -1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.file == path and err.value.field == "optim.lr"
    assert path in str(err.value) and "optim.lr" in str(err.value)
    # The same for a value that only an override makes bad, and for unknown keys.
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, JOB, "ok.yaml"), ["data.micro_batch_size=100"])
    assert "ok.yaml" in str(err.value) and "data.micro_batch_size (100)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, JOB + "optimizer: {lr: 1}\n", "typo.yaml"))
    assert err.value.field == "optimizer" and "typo.yaml" in str(err.value)


@pytest.mark.parametrize("text,words", [
    ("data: [unclosed\n", ["not valid YAML"]),
    ("- a\n- b\n", ["top level must be a mapping", "list"]),
])
def test_unreadable_yaml_names_the_file(tmp_path, text, words):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.file == path and path in str(err.value)
    assert all(word in str(err.value) for word in words)


def test_missing_file_names_it(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="cannot read config file") as err:
        load_config(path)
    assert err.value.file == path


@pytest.mark.parametrize("item,field", [
    ("data.global_batch_size", "data.global_batch_size"),  # no '='
    ("=3", "=3"),
    ("max_steps.x=1", "max_steps.x"),  # max_steps is a value, not a section
])
def test_bad_overrides(tmp_path, item, field):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, JOB), [item])
    assert err.value.field == field


def test_config_error_survives_pickling():
    with pytest.raises(ConfigError) as err:
        validate_config({"optim": {"lr": 0}}, "job.yaml")
    again = pickle.loads(pickle.dumps(err.value))
    assert type(again) is ConfigError and isinstance(again, ValueError)
    assert (again.file, again.field, str(again)) == ("job.yaml", "optim.lr", str(err.value))



# -- errors a person can act on -------------------------------------------------------------------
@pytest.mark.parametrize("item,key,suggestion", [
    ("max_step=10", "max_step", "max_steps"),
    ("checkpoint.intreval_steps=5", "checkpoint.intreval_steps", "checkpoint.interval_steps"),
    ("checkpont.uri=s3://b/run", "checkpont", "checkpoint.uri"),  # a misspelled section
    ("data.lr=0.1", "data.lr", "optim.lr"),  # the right name in the wrong section
    ("data.dataset.num_sample=9", "data.dataset.num_sample", "data.dataset.num_samples"),
    ("data.dataset={kind: parquet, uri: x, colum: t}", "data.dataset.colum",
     "data.dataset.column"),
])
def test_unknown_keys_get_did_you_mean(item, key, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    assert str(err.value) == f"--set {item}: {key}: unknown field; did you mean {suggestion}?"
    assert err.value.field == key


def test_unknown_key_without_a_close_match_lists_the_section():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.zzz=1"])
    assert str(err.value) == ("--set data.zzz=1: data.zzz: unknown field; data has: "
                              f"{', '.join(DataConfig.model_fields)}")


def test_errors_name_the_yaml_line_or_the_set_item(tmp_path):
    path = _write(tmp_path, JOB + "  interval_step: 5\n")  # line 10, under checkpoint
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}:10: checkpoint.interval_step: unknown field; "
                              "did you mean checkpoint.interval_steps?")
    assert (err.value.file, err.value.field) == (path, "checkpoint.interval_step")
    # A value from the file names its line; one from --set names the item, whatever the file.
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, JOB.replace("lr: 0.001", "lr: -1"), "lr.yaml"))
    assert str(err.value).startswith(f"{tmp_path / 'lr.yaml'}:6: optim.lr: ")
    assert "(got -1)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["checkpoint.interval_steps=5", "checkpoint.x=1"])
    assert str(err.value).startswith(f"{path}: 2 configuration errors:\n")
    lines = str(err.value).splitlines()[1:]
    assert lines == [f"  {path}:10: checkpoint.interval_step: unknown field; did you mean "
                     "checkpoint.interval_steps?",
                     "  --set checkpoint.x=1: checkpoint.x: unknown field; checkpoint has: "
                     f"{', '.join(CheckpointConfig.model_fields)}"]
    # A missing field names where its section was written.
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, "data:\n  dataset:\n    kind: parquet\n", "pq.yaml"))
    assert str(err.value) == f"{tmp_path / 'pq.yaml'}:2: data.dataset.uri: required, not set"
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.dataset.kind=parquet"])
    assert str(err.value) == "--set data.dataset.kind=parquet: data.dataset.uri: required, not set"


def test_errors_without_a_file_do_not_say_defaults():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.micro_batch_size=64"])
    assert str(err.value) == ("--set overrides: data.micro_batch_size (64) must be <= "
                              "data.global_batch_size (32)")
    assert err.value.file is None and err.value.field == "data.micro_batch_size"
    with pytest.raises(ConfigError) as err:
        validate_config({"max_step": 3})
    assert str(err.value) == "the configuration: max_step: unknown field; did you mean max_steps?"


@pytest.mark.parametrize("raw,text", [
    ({"data": {"global_batch_size": 32, "micro_batch_size": 64}},
     "job.yaml: data.micro_batch_size (64) must be <= data.global_batch_size (32)"),
    ({"mixed_precision": "bf16"}, "job.yaml: mixed_precision='bf16' needs scaling.use_gpu=true"),
    ({"model": {"d_model": 30}}, "job.yaml: model: n_heads (4) must divide d_model (30)"),
    ({"scaling": {"min_workers": 3}},
     "job.yaml: scaling: min_workers (3) must be <= max_workers (2)"),
])
def test_rule_errors_read_as_sentences(raw, text):
    with pytest.raises(ConfigError) as err:
        validate_config(raw, "job.yaml")
    assert str(err.value) == text
    assert "<root>" not in str(err.value) and "Value error" not in str(err.value)


def _kinds(*models) -> str:
    return ", ".join(f"{m.model_fields['kind'].annotation.__args__[0]} "
                     f"({', '.join(n for n in m.model_fields if n != 'kind')})" for m in models)


def test_a_key_of_another_kind_names_that_kind(tmp_path):
    datasets = _kinds(SyntheticDatasetConfig, ParquetDatasetConfig)
    assert datasets == ("synthetic (num_samples, seq_len, vocab_size), "
                        "parquet (uri, column, seq_len)")
    path = _write(tmp_path, "data:\n  dataset:\n    uri: s3://b/tokens\n    column: ids\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (
        f"{path}:3: data.dataset: `uri`, `column` are not fields of the synthetic dataset (the "
        "default kind); set kind: parquet for token sequences from Parquet files (any "
        f"pyarrow.fs URI). Kinds: {datasets}")
    assert err.value.field == "data.dataset.uri"
    with pytest.raises(ConfigError) as err:  # the same for eval.dataset
        load_config(None, ["eval.dataset.uri=x"])
    assert "eval.dataset: `uri` is not a field of the synthetic dataset" in str(err.value)
    with pytest.raises(ConfigError) as err:  # a kind given explicitly
        validate_config({"data": {"dataset": {"kind": "parquet", "uri": "x", "seq_len": 8,
                                              "num_samples": 9}}})
    assert ("data.dataset: `num_samples` is not a field of the parquet dataset (kind: parquet); "
            "set kind: synthetic for a learnable synthetic") in str(err.value)
    # model: an HF config without kind: hf.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.config={model_type: llama}"])
    assert str(err.value) == (
        "--set model.config={model_type: llama}: model: `config` is not a field of the gpt "
        "model (the default kind); set kind: hf for a `transformers` causal language model. "
        f"Kinds: {_kinds(ModelConfig, HFModelConfig)}")
    # An unknown kind lists the kinds, and suggests the close one.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.dataset.kind=parquett"])
    assert str(err.value) == ("--set data.dataset.kind=parquett: data.dataset: unknown kind "
                              f"'parquett'; did you mean parquet? Kinds: {datasets}")


def test_train_job_exits_2_with_did_you_mean():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "jobs/train.py", "--set", "max_step=10"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "did you mean max_steps?" in proc.stderr
    assert proc.stderr.strip() == ("error: --set max_step=10: max_step: unknown field; "
                                   "did you mean max_steps?")

# -- a resume must not change the sample order ----------------------------------------------------
@pytest.mark.dist
@pytest.mark.timeout(120)
def test_restore_with_changed_data_settings_is_refused(tmp_path):
    uri = str(tmp_path / "ckpt")
    original = smallest_config(uri, max_steps=3)
    changed = [
        smallest_config(uri, max_steps=5, global_batch_size=5),
        smallest_config(uri, max_steps=5, data_seed=1),
        smallest_config(uri, max_steps=5, num_samples=21),
        # Last, as it succeeds and checkpoints: settings that keep the order may change; a
        # changed schedule is allowed but reported.
        smallest_config(uri, max_steps=5, micro_batch_size=1, lr=1e-3),
    ]
    out = run_ranks(1, restore_errors, original, changed, timeout_s=100)[0]
    assert out["first"]["final_step"] == 3 and out["first"]["checkpoint_step"] == 3
    assert out["first"]["warnings"] == []
    *refused, allowed = out["outcomes"]
    for outcome, what in zip(refused, ["'global_batch_size': 5", "'seed': 1",
                                       "'num_samples': 21"]):
        assert outcome["error"] == "ConfigError" and outcome["field"] == "data", outcome
        assert "sample order" in outcome["message"] and what in outcome["message"]
    assert (allowed["error"], allowed["restored_step"]) == (None, 3)
    [warning] = allowed["warnings"]
    assert "max_steps 3 -> 5" in warning and "optim.lr 0.003 -> 0.001" in warning, warning
    assert "the LR at step 3 is" in warning and "saved run's schedule gives" in warning
    # ... and what it says is what happens: the resumed step trains at the new schedule's LR.
    new = smallest_config(uri, max_steps=5, micro_batch_size=1, lr=1e-3)
    assert allowed["lrs"] == pytest.approx([lr_at(3, new.optim, 5)])
    assert f"the LR at step 3 is {lr_at(3, new.optim, 5):.3g}" in warning
