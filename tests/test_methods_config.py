"""The method section: every refused combination's message, the DeepSpeed keys a method owns, the
pure layer-wise functions (depths, freeze selection, unfreezing gate, LR groups), and the
refusals that need the built model. No ranks; peft is imported only by the last tests."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from launcher.config import ConfigError
from launcher.load import load_config
from launcher.rules import validate
from launcher.ds_config import render_ds_config
from trainer import layerwise as L

ROOT = Path(__file__).resolve().parent.parent
BASE = {"run_dir": "runs/x", "model": {"name_or_path": "base"}, "data": {"train": "d.jsonl"},
        "train": {"max_steps": 10}}


def cfg(**sections):
    d = copy.deepcopy(BASE)
    for key, value in sections.items():
        node = d
        parts = key.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return d


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(data)
    return e.value.problems


def one(data) -> str:
    got = problems(data)
    assert len(got) == 1, got
    return got[0]


# --------------------------------------------------------------------------- refused before launch


def test_peft_needs_a_pretrained_base():
    msg = one({**cfg(method__name="lora"), "model": {"config": {"model_type": "llama"}, "tokenizer": "tok"}})
    assert "'method.name' = 'lora'" in msg and "model.name_or_path" in msg and "method.name=full" in msg


def test_qlora_refuses_zero3():
    msg = one(cfg(method__name="qlora", zero__stage=3))
    assert "zero.stage=3" in msg and "4-bit" in msg and "use zero.stage=2" in msg


def test_dora_refuses_zero3_and_flags_only_fit_lora():
    msg = one(cfg(method__name="lora", method__lora={"use_dora": True}, zero__stage=3))
    assert "use_dora" in msg and "zero.stage=3" in msg and "size of tensor a (0)" in msg
    msg = one(cfg(method__name="ia3", method__lora={"use_dora": True}))
    assert msg.startswith("'method.lora.use_dora' = true applies to method.name lora or qlora, not 'ia3'")
    msg = one(cfg(method__name="adalora", method__lora={"use_rslora": True}))
    assert msg.startswith("'method.lora.use_rslora' = true applies to method.name lora or qlora, not 'adalora'")


def test_adalora_budget_rules():
    msg = one(cfg(method__name="adalora", method__lora={"r": 4}, method__adalora={"target_r": 8}))
    assert "'method.adalora.target_r' = 8 exceeds" in msg and "'method.lora.r' = 4" in msg
    msg = one(cfg(method__name="adalora", method__adalora={"warmup_fraction": 0.5, "final_fraction": 0.5}))
    assert "must be below 1" in msg and "(0.5)" in msg


def test_merge_rules():
    assert "applies to peft methods" in one(cfg(method__merge_adapter=True))
    for name in ("prefix", "prompt"):
        msg = one(cfg(method__name=name, method__merge_adapter=True))
        assert f"method.name={name!r}" in msg and "nothing to merge" in msg and "PeftModel.from_pretrained" in msg
    msg = one(cfg(method__name="lora", method__merge_adapter=True, checkpoint__export=False))
    assert "needs checkpoint.export=true" in msg


def test_prefix_refuses_gradient_checkpointing():
    msg = one(cfg(method__name="prefix", model={"name_or_path": "base", "gradient_checkpointing": True}))
    assert "model.gradient_checkpointing=true" in msg and "PREFIX_TUNING does not work" in msg


def test_full_model_options_refused_with_peft_and_vice_versa():
    assert "applies to peft methods" in one(cfg(method__modules_to_save=["lm_head"]))
    msg = one(cfg(method__name="lora", method__freeze={"head_only": True}))
    assert "'method.freeze.head_only' applies to method.name=full" in msg
    msg = one(cfg(method__name="ia3", method__unfreeze_every_steps=5))
    assert "'method.unfreeze_every_steps' = 5 applies to method.name=full, not 'ia3'" in msg
    msg = one(cfg(method__name="prompt", method__layer_lr_decay=0.8))
    assert "'method.layer_lr_decay' = 0.8 applies to method.name=full, not 'prompt'" in msg


def test_freeze_selectors_are_exclusive_and_unfreezing_needs_something_to_unfreeze():
    msg = one(cfg(method__freeze={"head_only": True, "train_last_k_blocks": 2}))
    assert "method.freeze.train_last_k_blocks, method.freeze.head_only; choose one" in msg
    msg = one(cfg(method__freeze={"head_only": True}, method__unfreeze_every_steps=4))
    assert "nothing to unfreeze" in msg


def test_8bit_optimizer_with_offload_needs_the_opt_in():
    bad = cfg(train={"max_steps": 10, "optimizer": "adamw8bit"}, zero={"stage": 2, "offload_optimizer": True})
    msg = one(bad)
    assert "'train.optimizer' = 'adamw8bit' with zero.offload_optimizer=true" in msg
    assert "train.allow_bnb_offload=true" in msg and "zero_force_ds_cpu_optimizer" in msg
    ok = validate(cfg(train={"max_steps": 10, "optimizer": "adamw8bit", "allow_bnb_offload": True},
                      zero={"stage": 2, "offload_optimizer": True}))
    assert render_ds_config(ok)["zero_force_ds_cpu_optimizer"] is False
    for plain in (cfg(train={"max_steps": 10, "optimizer": "adamw8bit"}),
                  cfg(zero={"stage": 2, "offload_optimizer": True})):
        assert "zero_force_ds_cpu_optimizer" not in render_ds_config(validate(plain))


def test_unknown_method_and_optimizer_list_the_choices():
    msg = one(cfg(method__name="loha"))
    assert "'method.name' = 'loha' is not allowed" in msg and "'adalora'" in msg and "'prompt'" in msg
    msg = one(cfg(train={"max_steps": 10, "optimizer": "sgd"}))
    assert "'lion8bit'" in msg and "'deepspeed_adamw'" in msg


def test_problems_are_reported_together():
    got = problems(cfg(method__name="qlora", zero__stage=3, method__merge_adapter=True, checkpoint__export=False,
                       method__freeze={"head_only": True}))
    assert len(got) == 3, got


def test_qlora_is_refused_on_a_cpu_at_trainer_start():
    from trainer.methods import check_method_device

    qlora = validate(cfg(method__name="qlora"))
    with pytest.raises(ConfigError) as e:
        check_method_device(qlora, is_cuda=False)
    assert "'method.name' = 'qlora' needs a CUDA GPU" in str(e.value) and "method.name=lora" in str(e.value)
    check_method_device(qlora, is_cuda=True)
    check_method_device(validate(cfg(method__name="lora")), is_cuda=False)


def test_every_method_example_validates():
    names = {}
    for path in sorted((ROOT / "examples").glob("method-*.yaml")):
        c = load_config(path, disk=False)  # their model is the tiny-sft export, made by running it
        names[path.name] = c.method.name
    assert set(names.values()) == {"full", "lora", "qlora", "adalora", "ia3", "prefix", "prompt"}
    assert len(names) == 9


# --------------------------------------------------------------------------- layer-wise, pure

LLAMA_NAMES = ["model.embed_tokens.weight",
               *[f"model.layers.{i}.{m}" for i in range(3) for m in ("self_attn.q_proj.weight", "input_layernorm.weight")],
               "model.norm.weight", "lm_head.weight"]


def test_depths_count_from_the_top():
    d = L.depths(LLAMA_NAMES, "model.layers", 3)
    assert d["lm_head.weight"] == d["model.norm.weight"] == 0
    assert [d[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(3)] == [3, 2, 1]
    assert d["model.embed_tokens.weight"] == 4
    assert [L.unit_name(x, 3) for x in range(5)] == ["head", "block2", "block1", "block0", "embeddings"]


def test_freeze_selections():
    d = L.depths(LLAMA_NAMES, "model.layers", 3)
    sel = lambda **kw: L.select_trainable(LLAMA_NAMES, d, 3, **kw)  # noqa: E731
    assert sel() == set(LLAMA_NAMES)
    assert sel(train_last_k_blocks=1) == {"model.norm.weight", "lm_head.weight", "model.layers.2.self_attn.q_proj.weight",
                                          "model.layers.2.input_layernorm.weight"}
    assert sel(head_only=True) == {"model.norm.weight", "lm_head.weight"}
    assert sel(freeze_embeddings=True) == set(LLAMA_NAMES) - {"model.embed_tokens.weight"}
    assert sel(trainable_patterns=[r"q_proj", r"^lm_head"]) == {
        "lm_head.weight", *(f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3))}
    with pytest.raises(L.FreezeError, match=r"'method.freeze.train_last_k_blocks' = 4 but the model has 3 blocks"):
        sel(train_last_k_blocks=4)
    with pytest.raises(L.FreezeError, match=r"entry 'v_proj' matches no parameter; names look like model.embed"):
        sel(trainable_patterns=["v_proj"])


@pytest.mark.parametrize("every,step,expected", [
    (0, 0, [1, 1, 1, 1]),            # no unfreezing: everything from the start
    (3, 0, [1, 0, 0, 0]), (3, 2, [1, 0, 0, 0]), (3, 3, [1, 1, 0, 0]), (3, 8, [1, 1, 1, 0]), (3, 9, [1, 1, 1, 1])])
def test_gradual_unfreezing_gate(every, step, expected):
    assert [int(L.unfrozen(d, step, every)) for d in range(4)] == expected


def test_lr_multiplier_is_decay_to_the_depth_once_unfrozen():
    assert L.lr_multiplier(0, 0, 0.5, 0) == 1.0
    assert L.lr_multiplier(3, 0, 0.5, 0) == 0.125
    assert L.lr_multiplier(2, 3, 0.5, 2) == 0.0 and L.lr_multiplier(2, 4, 0.5, 2) == 0.25


def test_layer_groups_and_scheduler_follow_the_formula():
    import torch

    from launcher.config import TrainConfig
    from trainer.optim import build_scheduler, lr_factor

    named = [(n, torch.nn.Parameter(torch.zeros(2, 2) if n.endswith("proj.weight") or n.startswith(("lm_head", "model.embed"))
                                    else torch.zeros(2))) for n in LLAMA_NAMES]
    d = L.depths(LLAMA_NAMES, "model.layers", 3)
    trainable = L.select_trainable(LLAMA_NAMES, d, 3, freeze_embeddings=True)
    groups = L.layer_groups(named, trainable, d, 3, lr=1e-2, decay=0.5, weight_decay=0.1)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [
        ("head", 0.1), ("head", 0.0), ("block2", 0.1), ("block2", 0.0), ("block1", 0.1), ("block1", 0.0),
        ("block0", 0.1), ("block0", 0.0)]
    assert [g["lr"] for g in groups[::2]] == pytest.approx([1e-2, 5e-3, 2.5e-3, 1.25e-3])
    t = TrainConfig(lr=1e-2, scheduler="cosine", warmup_steps=2, max_steps=12)
    opt = torch.optim.SGD(groups, lr=t.lr)
    sched = build_scheduler(opt, t, 12, unfreeze_every_steps=3)
    for step in range(12):
        for g in opt.param_groups:
            want = 1e-2 * 0.5 ** g["depth"] * L.unfrozen(g["depth"], step, 3) * lr_factor(step, 2, 12, "cosine", 0.0)
            assert g["lr"] == pytest.approx(want, abs=1e-12), (step, g["name"])
        opt.step()
        sched.step()


# --------------------------------------------------------------------------- refused once the model exists


def test_runtime_refusals_name_the_reason():
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from trainer.methods import apply_peft, peft_config

    ada = peft_config(validate(cfg(method__name="adalora", method__adalora={"warmup_fraction": 0.2})), "CAUSAL_LM", 50,
                      "llama")  # the rank budget's phases come from the trainer's total step count
    assert (ada.total_step, ada.tinit, ada.tfinal, ada.init_r, ada.target_r) == (50, 10, 10, 8, 4)
    with pytest.raises(ConfigError, match=r"method.name=ia3 has no default target modules for model type 'olmo2'"):
        peft_config(validate(cfg(method__name="ia3")), "CAUSAL_LM", 10, "olmo2")
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=2, pad_token_id=0))
    with pytest.raises(ConfigError, match=r"method.name=prompt cannot work with LlamaForSequenceClassification"):
        apply_peft(clf, validate(cfg(method__name="prompt")), 10, 2)
    with pytest.raises(ConfigError, match=r"entry 'nope' matches no parameter"):
        from trainer.methods import apply_partial

        apply_partial(clf, validate(cfg(method__freeze={"trainable_patterns": ["nope"]})))
