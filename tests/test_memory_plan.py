"""benchmarks/memory_plan.py: the tensor-memory tracer (hand-computed sizes), fake vs real tensors on a scaled-down
Qwen2, reading the recipes, and the check that fails loudly if TRL stops preparing its model as the plan does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "examples" / "recipes"


@pytest.fixture(scope="module")
def plan():
    return load_script("benchmarks/memory_plan.py", "memory_plan")


def test_tracer_counts_live_storages_rounded_to_512_bytes(plan):
    tracer = plan.PeakMemory()
    with tracer:
        a = torch.empty(1000, dtype=torch.float32)  # 4000 bytes -> 4096
        b = torch.empty(10, dtype=torch.float32)  # 40 bytes -> 512
        view = a[:10]  # a view: no new storage
        assert tracer.current == 4096 + 512
        del a  # the view keeps the storage alive
        assert tracer.current == 4096 + 512
        del view
        assert tracer.current == 512
        c = torch.empty(600, dtype=torch.bfloat16)  # 1200 bytes -> 1536
    assert tracer.current == 512 + 1536 and tracer.peak == 4096 + 512
    del b, c
    assert tracer.current == 0


def test_fake_trace_equals_the_real_one_on_a_scaled_down_qwen2(plan):
    result = plan.validate(layers=1, vocab=2048, batch=2, generation_batch=3, prompt=16, completion=48)
    for phase in ("generation", "training"):
        assert result[phase]["real_peak_bytes"] > result["real"]["weight_bytes"], phase
        assert result[phase]["ratio"] == pytest.approx(1.0, abs=0.01), (phase, result[phase])
    real, fake = result["real"], result["fake"]
    assert fake["weight_bytes"] == real["weight_bytes"] and fake["lora_params"] == real["lora_params"]
    assert fake["generation"]["kv_cache_bytes"] == real["generation"]["kv_cache_bytes"]
    # KV cache of a Qwen2 by hand: layers x (K and V) x kv_heads x head_dim x tokens x 2 bytes (bf16)
    arch = plan.VALIDATION_ARCH
    head_dim = arch["hidden_size"] // arch["num_attention_heads"]
    tokens = 3 * (16 + 48 + 1)  # prefill + one decoding step
    assert real["generation"]["kv_cache_bytes"] == 1 * 2 * arch["num_key_value_heads"] * head_dim * tokens * 2
    assert real["training"]["lora_grad_bytes"] == 4 * real["lora_params"]  # fp32 adapters, one gradient each
    assert real["adam_bytes"] == 8 * real["lora_params"]


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("qwen2.5-*.yaml")))
def test_recipes_are_read_into_a_plan(plan, recipe):
    read = plan.plan_from_recipe(str(RECIPES / recipe), prompt_length=512)
    assert read.model == ("7b" if "7b" in recipe else "1.5b")
    assert read.generation_batch_size == 128 and read.completion_length == 512 and read.lora_r == 64
    assert read.context == "window" and read.prompt_length == 2048  # env_max_prompt_length, not the argument
    assert read.training_rows == read.settings["env_rows_per_forward"]
    assert read.generation_chunk_size is not None and 128 % read.generation_chunk_size == 0
    # The header quotes the peak of the recorded trace of this model's recipe (Household and Shop have equal sizes).
    size = "7b" if "7b" in recipe else "1.5b"
    recorded = json.loads((ROOT / "benchmarks" / "results" / "memory_plan" / f"qwen2.5-{size}-household-lora.json")
                          .read_text())
    assert recorded["generation_chunk_size"] == read.generation_chunk_size
    assert recorded["batch_size"] == read.batch_size and recorded["fake"] and recorded["layers"] == 28
    assert recorded["training_rows"] == read.training_rows and recorded["sequence_length"] == 2048 + 512
    text = (RECIPES / recipe).read_text()
    assert f"GPU memory: {recorded['peak_bytes'] / 2**30:.1f} GiB" in text
    assert "TRACED, NOT MEASURED ON A GPU" in text and "benchmarks/memory_plan.py" in text


def test_an_unknown_model_in_a_recipe_is_refused(plan, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: meta-llama/Llama-3-8B\n")
    with pytest.raises(SystemExit, match="not a Qwen2.5 1.5B/7B"):
        plan.plan_from_recipe(str(recipe), 512)
    recipe.write_text("model_name_or_path: Qwen/Qwen2.5-1.5B-Instruct\nenv_context: window\n")
    with pytest.raises(SystemExit, match="env_max_prompt_length"):
        plan.plan_from_recipe(str(recipe), 512)


def test_a_model_prepared_differently_from_trl_fails_loudly(plan, tmp_path):
    from peft import LoraConfig

    tokenizer = plan.padded_word_tokenizer(plan.TASK_WORDS, 512)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
    trainer = plan.tiny_trainer({}, tokenizer, lora, str(tmp_path))
    config = plan.qwen_config(dict(plan.ARCHITECTURES["1.5b"], **plan.VALIDATION_ARCH), 1, len(tokenizer), tokenizer)
    model = plan.plan_model(config, lora, trainer, None, tokenizer)  # prepared as TRL prepares it: passes
    model.get_base_model().forward = type(model.get_base_model()).forward.__get__(model.get_base_model())
    with pytest.raises(RuntimeError, match="not prepared like GRPOTrainer"):
        plan.check_prepared_like(model, trainer.model)


@pytest.mark.slow
def test_the_recorded_1p5b_recipe_trace_is_current(plan):
    """Re-trace the 1.5B recipe at full size (fake tensors, ~1 minute): the recorded results the recipes and docs
    quote must still be what the code gives."""
    recipe = RECIPES / "qwen2.5-1.5b-household-lora.yaml"
    result = plan.run_plan(plan.plan_from_recipe(str(recipe), prompt_length=512))
    recorded = json.loads((ROOT / "benchmarks" / "results" / "memory_plan" / "qwen2.5-1.5b-household-lora.json")
                          .read_text())
    for key in ("weight_bytes", "adam_bytes", "peak_bytes"):
        assert result[key] == pytest.approx(recorded[key], rel=0.002), key
    for phase in ("generation", "training"):
        assert result[phase]["peak_bytes"] == pytest.approx(recorded[phase]["peak_bytes"], rel=0.002), phase
