"""LoRA through peft_config on a tiny Qwen2 with Qwen2.5's module names: single and multi-turn, beta > 0 without a
second model copy, gradient checkpointing, saving the adapter, loading it back and merging it."""

import math

import torch
from conftest import base_args, red_reward
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel
from test_env_trainer import env_dataset
from test_rollout import WORDS, SayEnv

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer

QWEN25_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config():
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=QWEN25_MODULES, task_type="CAUSAL_LM")


def text_length(completions, **kwargs):
    """A reward with spread (the tiny random policy fails every episode alike), so the gradient is not zero."""
    return [0.01 * len(c[0]["content"]) for c in completions]


def test_multi_turn_lora_with_kl_and_gradient_checkpointing(tmp_path):
    tokenizer = build_word_tokenizer(WORDS + ["say", "wrong", "done"])
    model = build_tiny_qwen2(tokenizer, hidden_size=32)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = AEMGRPOConfig(**base_args(tmp_path, max_completion_length=64, env_max_turns=3,
                                     env_max_new_tokens_per_turn=4, beta=0.05, gradient_checkpointing=True,
                                     aem_min_entropy_range=0.0, learning_rate=5e-2))
    trainer = AEMGRPOTrainer(model=model, args=args, train_dataset=env_dataset(), processing_class=tokenizer,
                             env=SayEnv, peft_config=lora_config(), reward_funcs=[text_length])
    # beta > 0 with a fresh adapter: the reference is the base model with the adapter disabled, no second copy.
    assert trainer.ref_model is None
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert {m for m in QWEN25_MODULES if any(f".{m}.lora_A" in n for n in trainable)} == set(QWEN25_MODULES)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "env/success_rate" in e]
    assert len(logs) == 2 and all(math.isfinite(e["loss"]) and "kl" in e for e in logs)
    assert any(e["aem/alpha_std"] > 0 for e in logs)
    # Only adapter weights moved: every base weight is unchanged.
    base_after = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
                  for n, p in trainer.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: training moved it


def test_adapter_save_load_and_merge(tmp_path, make_model, tokenizer, color_dataset):
    args = AEMGRPOConfig(**base_args(tmp_path / "run", aem_min_entropy_range=0.0, learning_rate=5e-2))
    trainer = AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                             processing_class=tokenizer, peft_config=lora_config())
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    assert "model.safetensors" not in saved  # only the adapter is saved, not a copy of the base model

    inputs = tokenizer("say a color .", return_tensors="pt")
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path / "adapter")).eval()
    merged = loaded.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(make_model()(**inputs).logits, expected)  # the adapter changed the model
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert AutoPeftModelForCausalLM is not None  # the standard loader is available for saved adapters
