"""CPU demo: a tiny agent learns a multi-turn code-breaking game with AEM, in about a minute, offline.

    python examples/cpu_demo.py                   # CodeBreaker (default)
    python examples/cpu_demo.py --env household   # pick-and-place; harder for a tiny model, see docs

What happens (everything is built in code; nothing is downloaded):
1. A word-level tokenizer over the environment's vocabulary and a tiny Qwen2 model (random weights).
2. Success of the untrained model, of a random policy and of the scripted expert, on 200 held-out tasks.
3. A very short supervised warm start (TRL's SFTTrainer) on expert trajectories, stopped far short of expert
   level: a model built in code knows nothing, not even the action format (real agents start from an
   instruct model instead).
4. AEM-GRPO training in the environment (AEMGRPOTrainer with env=...), G = 8 episodes per task.
5. Success after each phase (sampled at the rollout temperature, the policy RL optimises; greedy too), and what
   AEM did (alpha spread and token entropy in the training summary; span entropy, negative-advantage share, gated
   groups).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402

from trl_aem import (  # noqa: E402
    DEFAULT_PROMPT,
    AEMGRPOConfig,
    AEMGRPOTrainer,
    evaluate,
    expert_sft_dataset,
    make_env_dataset,
    warm_start,
)
from trl_aem.envs import CodeBreaker  # noqa: E402
from trl_aem.tiny import build_agent_tokenizer, build_tiny_qwen2  # noqa: E402

#: Built-in settings a tiny model can learn on CPU: (gymnasium id, difficulty knobs, max turns, tokens per turn).
PRESETS = {
    # Code breaking: one secret symbol out of 4, 4 guesses; the feedback after each guess rules symbols out, so a
    # policy that never repeats a failed guess always wins (random guessing: about 68%).
    "codebreaker": ("trl_aem/CodeBreaker-v0", dict(CodeBreaker.EASIEST), 3, 4),
    # Pick-and-place, 2 locations, the agent starts where the object is: take, go, put.
    "household": ("trl_aem/Household-v0", {"num_locations": 2, "num_distractors": 0, "task_types": ["pick"],
                                           "start_at_object": True, "open_containers": True}, 5, 10),
}
SYSTEM_PROMPT = "you are a helpful agent ."


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", choices=sorted(PRESETS), default="codebreaker", help="built-in environment preset")
    parser.add_argument("--sft-steps", type=int, default=8, help="supervised warm-start steps")
    parser.add_argument("--rl-steps", type=int, default=40, help="AEM-GRPO optimizer steps")
    parser.add_argument("--tasks-per-step", type=int, default=4, help="prompts (tasks) per RL step")
    parser.add_argument("--num-generations", type=int, default=8, help="episodes per task (group size G)")
    parser.add_argument("--eval-tasks", type=int, default=200, help="held-out tasks per evaluation")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="RL learning rate")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the RL rollouts")
    parser.add_argument("--loss-type", default="grpo", help="TRL loss_type: grpo, dapo, dr_grpo, bnpo")
    parser.add_argument("--no-aem", action="store_true", help="train with plain GRPO (use_aem=False)")
    parser.add_argument("--logging-steps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="where TRL writes (a temp folder by default)")
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns the evaluation results by phase."""
    args = parse_args(argv)
    set_seed(args.seed)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="trl_aem_demo_")
    started = time.time()
    ENV_ID, ENV_KWARGS, max_turns, tokens_per_turn = PRESETS[args.env]
    limits = {"max_turns": max_turns, "max_new_tokens_per_turn": tokens_per_turn}

    tokenizer = build_agent_tokenizer(ENV_ID, ENV_KWARGS, DEFAULT_PROMPT, SYSTEM_PROMPT)
    model = build_tiny_qwen2(tokenizer, hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                             num_attention_heads=4, num_key_value_heads=2, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[setup] {ENV_ID} {json.dumps(ENV_KWARGS)}; tiny Qwen2 with {n_params / 1e6:.2f}M parameters, "
          f"vocabulary {len(tokenizer)} words")

    def success(policy="model", greedy=False):
        # Sampled at the rollout temperature (what RL optimises), same held-out tasks every time.
        torch.manual_seed(args.seed)
        return evaluate(ENV_ID, policy, model=model, tokenizer=tokenizer, num_tasks=args.eval_tasks,
                        env_kwargs=ENV_KWARGS, system_prompt=SYSTEM_PROMPT, greedy=greedy,
                        temperature=args.temperature, **limits)

    results = {"expert": success("expert"), "random": success("random"), "untrained": success()}
    for name in ("expert", "random", "untrained"):
        print(f"[eval] {name:<10} {results[name]}")

    sft_data = expert_sft_dataset(ENV_ID, range(10_000, 10_200), env_kwargs=ENV_KWARGS, system_prompt=SYSTEM_PROMPT)
    t0 = time.time()
    warm_start(model, tokenizer, sft_data, max_steps=args.sft_steps, output_dir=os.path.join(output_dir, "sft"),
               seed=args.seed)
    results["warm_start"], results["warm_start_greedy"] = success(), success(greedy=True)
    print(f"[eval] warm start {results['warm_start']}   ({args.sft_steps} SFT steps, {time.time() - t0:.0f}s)")
    print(f"[eval] warm start, greedy {results['warm_start_greedy']}")

    config = AEMGRPOConfig(
        output_dir=os.path.join(output_dir, "rl"),
        use_aem=not args.no_aem,
        max_steps=args.rl_steps,
        per_device_train_batch_size=args.tasks_per_step * args.num_generations,
        num_generations=args.num_generations,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        max_completion_length=256,
        env_max_turns=limits["max_turns"],
        env_max_new_tokens_per_turn=limits["max_new_tokens_per_turn"],
        env_system_prompt=SYSTEM_PROMPT,
        env_kwargs=ENV_KWARGS,
        temperature=args.temperature,
        beta=0.0,
        scale_rewards="batch",  # success (10) dominates the -0.1 invalid-action penalties in the advantage
        loss_type=args.loss_type,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=True,
        seed=args.seed,
    )
    trainer = AEMGRPOTrainer(model=model, args=config, processing_class=tokenizer, env=ENV_ID,
                             train_dataset=make_env_dataset(args.rl_steps * args.tasks_per_step))
    t0 = time.time()
    trainer.train()
    model = trainer.model
    results["rl"], results["rl_greedy"] = success(), success(greedy=True)
    method = "GRPO" if args.no_aem else "AEM-GRPO"
    print(f"[eval] after RL   {results['rl']}   ({args.rl_steps} {method} steps, {time.time() - t0:.0f}s)")
    print(f"[eval] after RL, greedy {results['rl_greedy']}")

    # Training printed its progress bar and a one-line summary ([train] ...); every metric is in the log history.
    logs = [entry for entry in trainer.state.log_history if "env/success_rate" in entry]
    if logs and "aem/alpha_std" in logs[-1]:
        first, last = logs[0], logs[-1]
        print(f"[aem] span entropy {first['aem/response_entropy_mean']:.3f} -> "
              f"{last['aem/response_entropy_mean']:.3f}; negative advantage share {first['aem/neg_adv_frac']:.2f} -> "
              f"{last['aem/neg_adv_frac']:.2f}; gated {last['aem/gated_frac']:.2f}")
    print(f"[summary] success on {args.eval_tasks} held-out tasks (sampled, temperature {args.temperature}): "
          f"untrained {results['untrained'].success_rate:.1%} -> warm start {results['warm_start'].success_rate:.1%} "
          f"-> {method} {results['rl'].success_rate:.1%}; greedy {results['warm_start_greedy'].success_rate:.1%} -> "
          f"{results['rl_greedy'].success_rate:.1%}"
          f"  (expert {results['expert'].success_rate:.1%}, random {results['random'].success_rate:.1%});"
          f" total {time.time() - started:.0f}s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({name: result.as_dict() for name, result in results.items()}, handle, indent=2)
    results["train_logs"] = logs
    return results


if __name__ == "__main__":
    from trl_aem.scripts import quiet_known_noise

    quiet_known_noise()  # transformers' FutureWarnings about names TRL uses, datasets' progress bars
    main()
