"""The typed config, batch arithmetic and DeepSpeed render: pure, no torch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from launcher.batch import BatchPlan, fit_world, plan_batch
from launcher.config import ConfigError
from launcher.load import load_config
from launcher.rules import parse_overrides, validate
from launcher.ds_config import OWNED, build_ds_config, render_ds_config

BASE = {"run_dir": "runs/x", "model": {"tokenizer": "tok", "config": {"model_type": "llama"}},
        "data": {"train": "d.jsonl"}, "train": {"max_steps": 3}}


def cfg_with(**over):
    import copy

    d = copy.deepcopy(BASE)
    for k, v in over.items():
        sec, key = k.split("__")
        d.setdefault(sec, {})[key] = v
    return d


def problems(data):
    with pytest.raises(ConfigError) as e:
        validate(data)
    return e.value.problems


def test_schema_imports_without_torch():
    code = "import sys, launcher.config, launcher.ds_config, launcher.batch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_key_names_it_suggests_and_lists_valid_keys():
    (msg,) = problems(cfg_with(train__lrr=0.1))
    assert "unknown key 'train.lrr'" in msg and "did you mean 'train.lr'" in msg
    assert "valid keys under train:" in msg and "micro_batch_size" in msg


def test_wrong_type_names_key_value_and_fix():
    (msg,) = problems(cfg_with(train__micro_batch_size="eight"))
    assert "'train.micro_batch_size' = 'eight'" in msg and "train.micro_batch_size=..." in msg


def test_all_problems_are_reported_at_once():
    data = cfg_with(train__lrr=1, zero__stage=5, precision__dtype="fp8")
    msgs = problems(data)
    assert len(msgs) == 3
    assert any("zero.stage" in m and "choose one of" in m for m in msgs)
    assert any("precision.dtype" in m and "'fp32', 'bf16' or 'fp16'" in m for m in msgs)


def test_cross_field_conflicts_are_reported_together():
    msgs = problems(cfg_with(zero__stage=2, zero__offload_param=True, train__epochs=1.0))
    assert any("'zero.offload_param' = true needs zero.stage=3 (it is 2)" in m for m in msgs)
    assert any("exactly one of 'train.max_steps' (3) and 'train.epochs' (1.0)" in m for m in msgs)


def test_global_batch_the_world_cannot_divide():
    (msg,) = problems(cfg_with(train__micro_batch_size=4, train__global_batch_size=20, dist__procs_per_node=2))
    assert "'train.global_batch_size' = 20 is not divisible by micro_batch_size x world size = 4 x 2 = 8" in msg
    assert "16 or 24" in msg


def test_overrides_are_yaml_typed_and_dotted(tmp_path):
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump(BASE))
    cfg = load_config(p, ["train.lr=1e-3", "zero.stage=3", "data.packing=true"], disk=False)
    assert cfg.train.lr == 1e-3 and cfg.zero.stage == 3 and cfg.data.packing is True
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.lr"])
    assert "is not key=value" in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["trian.lr=1"])
    assert "unknown key 'trian'" in str(e.value)
    assert parse_overrides(["a.b=[1, 2]"])[0] == {"a.b": [1, 2]}


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "nope.yaml")
    assert "does not exist" in str(e.value)


def test_batch_plan_and_world_fit():
    assert plan_batch(4, 2, None, 8).global_batch_size == 64
    assert plan_batch(4, 99, 64, 8) == BatchPlan(4, 2, 8)  # accumulation derived from the global batch
    plan, note = fit_world(BatchPlan(4, 2, 8), 16, "adapt")
    assert plan == BatchPlan(4, 1, 16) and "grad_accum 2 -> 1" in note
    with pytest.raises(ConfigError) as e:
        fit_world(BatchPlan(4, 1, 8), 16, "adapt")
    assert "world size 8" in str(e.value) and "started 16 ranks" in str(e.value) and "not divisible" in str(e.value)
    with pytest.raises(ConfigError) as e:
        fit_world(BatchPlan(4, 2, 8), 16, "error")
    assert "dist.on_world_mismatch=adapt" in str(e.value)
    assert fit_world(BatchPlan(4, 2, 8), 8, "error") == (BatchPlan(4, 2, 8), None)


def test_ds_config_is_explicit_and_follows_the_config():
    cfg = validate(cfg_with(zero__stage=3, zero__offload_param=True, zero__offload_optimizer=True,
                            precision__dtype="bf16", train__micro_batch_size=2, train__grad_accum=4,
                            dist__procs_per_node=2))
    ds = render_ds_config(cfg)
    assert "auto" not in json.dumps(ds)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (16, 2, 4)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu" and z["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    ds0 = render_ds_config(validate(cfg_with(zero__stage=0)))
    assert "offload_optimizer" not in ds0["zero_optimization"]


def test_base_json_contradictions_are_one_error_listing_every_mismatch(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32, "zero_optimization": {"stage": 3},
                                "fp16": {"enabled": True}, "bf16": {"enabled": True},
                                "optimizer": {"type": "Adam"}, "comms_logger": {"enabled": False},
                                "gradient_accumulation_steps": "auto"}))
    cfg = validate(cfg_with(zero__base_config=str(base)))
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg)
    msgs = e.value.problems
    assert len(msgs) == 5, msgs
    assert any("'zero_optimization.stage' = 3" in m and "gives 2" in m and "zero.stage" in m for m in msgs)
    assert any("'fp16.enabled' = True" in m for m in msgs) and any("'bf16.enabled' = True" in m for m in msgs)
    assert any("'optimizer.type'" in m and "trainer builds the optimizer" in m for m in msgs)
    # a compatible base passes its own keys through
    base.write_text(json.dumps({"comms_logger": {"enabled": False}, "zero_optimization": {"stage": 2,
                                "round_robin_gradients": True}}))
    merged = build_ds_config(cfg)
    assert merged["comms_logger"] == {"enabled": False}
    assert merged["zero_optimization"]["round_robin_gradients"] is True and merged["zero_optimization"]["stage"] == 2
    assert set(OWNED) >= {"train_batch_size", "zero_optimization.stage", "bf16.enabled"}


def test_base_json_defaults_survive_and_owned_keys_are_refused(tmp_path):
    """One table drives rendering and merging: a default key (steps_per_print, contiguous_gradients,
    fp16.loss_scale, ...) takes the base JSON's value; an owned key must agree with the run config."""
    from launcher.ds_config import TABLE

    base = tmp_path / "base.json"
    base.write_text(json.dumps({"steps_per_print": 7, "fp16": {"loss_scale": 128, "hysteresis": 4},
                                "zero_optimization": {"contiguous_gradients": False,
                                                      "stage3_prefetch_bucket_size": 123}}))
    cfg = validate(cfg_with(zero__base_config=str(base), zero__stage=3, precision__dtype="bf16"))
    ds = build_ds_config(cfg)
    assert ds["steps_per_print"] == 7 and ds["fp16"]["loss_scale"] == 128 and ds["fp16"]["hysteresis"] == 4
    assert ds["zero_optimization"]["contiguous_gradients"] is False
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 123
    plain = render_ds_config(cfg)  # without the base, our defaults
    assert (plain["steps_per_print"], plain["fp16"]["loss_scale"], plain["zero_optimization"]["contiguous_gradients"]) \
        == (1_000_000_000, 0, True)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True  # owned keys stay ours
    # every key we render is in the table, owned or default, and nothing else is rendered
    from launcher.config import flatten

    rendered = set(flatten(plain))
    assert rendered == {k.path for k in TABLE if k.when(cfg)}
    defaults = {k.path for k in TABLE if not k.owner}
    assert {"steps_per_print", "zero_optimization.contiguous_gradients", "fp16.loss_scale"} <= defaults
    # an owned key that the config does not render here (offload of a bnb optimizer) is still ours
    base.write_text(json.dumps({"zero_force_ds_cpu_optimizer": False, "zero_optimization": 3}))
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg)
    assert any("'zero_force_ds_cpu_optimizer' = False" in m and "train.allow_bnb_offload" in m for m in e.value.problems)
    assert any("'zero_optimization' = 3" in m and "must be a section" in m for m in e.value.problems)


@pytest.mark.parametrize("content", ["[1, 2]", "null", b"\x89PNG\x00\xff", "dir"])
def test_a_base_json_that_is_not_one_object_is_a_clear_error(tmp_path, content):
    base = tmp_path / "base.json"
    if content == "dir":
        base.mkdir()
    elif isinstance(content, bytes):
        base.write_bytes(content)
    else:
        base.write_text(content)
    cfg = validate(cfg_with(zero__base_config=str(base)))
    with pytest.raises(ConfigError) as e:
        build_ds_config(cfg)
    (msg,) = e.value.problems
    assert msg.startswith(f"'zero.base_config' = {str(base)!r}") and ("DeepSpeed" in msg or "JSON" in msg), msg
