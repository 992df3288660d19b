"""Environment rollouts through TRL's vLLM generation path.

vLLM cannot run on this CPU-only machine, so `trainer.vllm_generation` (TRL's client of the vLLM engine/server, an
external service) is replaced by a deterministic fake with the same `generate()` contract that samples from the
policy itself. Everything else is real: TRL's weight-sync call, its importance-sampling correction against the
sampling log-probabilities we return, the old-logps pass AEM reads its entropies from, and the loss.
"""

import math

import pytest
import torch
from conftest import base_args
from test_env_trainer import env_dataset
from test_rollout import WORDS, SayEnv

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer


class FakeVLLMGeneration:
    """Same contract as trl.generation.vllm_generation.VLLMGeneration.generate (server mode, one process)."""

    mode = "server"
    tensor_parallel_size = 1

    def __init__(self, model, tokenizer, temperature):
        self.model, self.tokenizer, self.temperature = model, tokenizer, temperature
        self.max_completion_length = 999
        self.calls, self.synced = [], 0

    def sync_weights(self):
        self.synced += 1

    def generate(self, prompts, images, num_generations, profiler=None):
        assert num_generations == 1 and images is None
        self.calls.append((len(prompts), self.max_completion_length))
        completions, logprobs = [], []
        for prompt in prompts:
            input_ids = torch.tensor([prompt])
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                          max_new_tokens=self.max_completion_length, do_sample=True,
                                          temperature=self.temperature, top_k=0, top_p=1.0,
                                          output_logits=True, return_dict_in_generate=True,
                                          pad_token_id=self.tokenizer.pad_token_id,
                                          eos_token_id=self.tokenizer.eos_token_id)
            ids = out.sequences[0, len(prompt):].tolist()
            lps = [torch.log_softmax(logits[0].float() / self.temperature, -1)[token].item()
                   for logits, token in zip(out.logits, ids)]
            completions.append(ids)
            logprobs.append([[lp] for lp in lps])
        return prompts, completions, logprobs, None


def test_env_rollouts_with_vllm_generation(tmp_path):
    tokenizer = build_word_tokenizer(WORDS + ["say", "wrong", "done"])
    model = build_tiny_qwen2(tokenizer, hidden_size=32)
    args = AEMGRPOConfig(**base_args(tmp_path, max_completion_length=64, env_max_turns=3, env_max_new_tokens_per_turn=4,
                                     aem_min_entropy_range=0.0))
    trainer = AEMGRPOTrainer(model=model, args=args, train_dataset=env_dataset(), processing_class=tokenizer,
                             env=SayEnv)
    # Switch the built trainer to TRL's vLLM path with the fake engine (vLLM itself cannot be installed here).
    fake = FakeVLLMGeneration(trainer.model, tokenizer, trainer.temperature)
    trainer.use_vllm, trainer.vllm_generation, trainer._last_loaded_step = True, fake, -1
    trainer.aem_entropy_source = trainer._resolve_entropy_source()
    assert trainer.aem_entropy_source == "old_logps"  # vLLM gives no entropies; TRL's IS pass does
    trainer.train()

    assert fake.synced >= 1
    assert fake.calls and all(budget == 4 for _, budget in fake.calls)  # one call per turn, per-turn budget
    assert fake.max_completion_length == 999  # restored after each turn
    logs = [entry for entry in trainer.state.log_history if "env/success_rate" in entry]
    assert len(logs) == 2
    for entry in logs:
        # The sampling log-probabilities line up token by token with TRL's recomputed ones (same weights).
        assert entry["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-3)
        assert entry["sampling/sampling_logp_difference/max"] < 1e-3
        assert math.isfinite(entry["loss"]) and entry["aem/alpha_mean"] == pytest.approx(1.0, abs=1e-5)
        assert entry["aem/alpha_std"] > 0


def test_collective_generation_stays_in_step_when_this_process_is_done():
    """With a sync function reporting other processes still active, a finished process keeps joining calls."""
    from test_rollout import PROMPT, bpe_tokenizer, runner, scripted_generate, seed_for

    tokenizer = bpe_tokenizer(chat_template=True)
    generate = scripted_generate(tokenizer, ["red<|im_end|>"])
    other_process_turns = iter([8, 8, 8, 8, 0])  # the other process needs 4 more calls after we finish

    def sync(local_budget):
        return max(local_budget, next(other_process_turns))

    seed = seed_for(["red"])  # solved in one turn
    [episode] = runner(lambda: SayEnv(length=1), tokenizer, max_turns=3).run([{"seed": seed}], [PROMPT], generate,
                                                                          sync=sync)
    assert episode.success and episode.num_turns == 1
    assert len(generate.calls) == 4  # turn 1 with our context, then 3 empty calls until everyone is done
    assert [n for n, _ in generate.calls] == [1, 0, 0, 0]


def test_vllm_prompts_are_padded_to_the_same_count_on_every_process(tmp_path):
    """TRL slices vLLM's answers by process assuming equal prompt counts: a process with fewer active episodes pads."""
    tokenizer = build_word_tokenizer(WORDS + ["say", "wrong", "done"])
    model = build_tiny_qwen2(tokenizer, hidden_size=32)
    args = AEMGRPOConfig(**base_args(tmp_path, max_completion_length=64, env_max_turns=3, env_max_new_tokens_per_turn=4))
    trainer = AEMGRPOTrainer(model=model, args=args, train_dataset=env_dataset(), processing_class=tokenizer,
                             env=SayEnv)
    fake = FakeVLLMGeneration(trainer.model, tokenizer, trainer.temperature)
    trainer.vllm_generation = fake
    trainer._max_over_processes = lambda value: max(value, 3)  # another process has 3 active episodes
    generate = trainer._vllm_generate_fn()
    context = tokenizer("say red", add_special_tokens=False)["input_ids"]
    tokens, entropies, logprobs = generate([context], 4)
    assert fake.calls == [(3, 4)]  # 1 real + 2 dummy prompts
    assert len(tokens) == 1 and len(logprobs) == 1 and len(logprobs[0]) == len(tokens[0]) and entropies is None
    tokens, _, _ = generate([], 4)  # done here, still joins the call
    assert tokens == [] and fake.calls[-1] == (3, 4)
