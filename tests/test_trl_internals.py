"""Guard: fail loudly, with a clear message, if the TRL internals AEM relies on move.

AEMGRPOTrainer overrides private methods of trl.GRPOTrainer and reads keys of its scored batch. If one of these
tests fails after a TRL upgrade, AEM must be re-checked against that TRL release before the pin in setup.cfg is
widened.
"""

import inspect

import trl
from packaging.version import Version
from trl import GRPOTrainer

from trl_aem.trainer import SCORED_BATCH_KEYS

SUPPORTED = (Version("1.16.0"), Version("1.17.0"))


def _fail(what: str) -> str:
    return f"TRL {trl.__version__} changed an internal that trl-aem relies on: {what}. Re-check trl_aem/trainer.py."


def test_trl_version_in_pinned_range():
    version = Version(trl.__version__)
    assert SUPPORTED[0] <= version < SUPPORTED[1], (
        f"trl-aem is tested against TRL >= {SUPPORTED[0]}, < {SUPPORTED[1]}; found {trl.__version__}"
    )


def test_private_methods_and_signatures():
    expected = {
        "_generate_and_score_completions": ["self", "inputs"],
        "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations"],
        "_get_per_token_logps_and_entropies": [
            "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
        ],
        "_compute_loss": ["self", "model", "inputs"],
    }
    for name, params in expected.items():
        method = getattr(GRPOTrainer, name, None)
        assert method is not None, _fail(f"GRPOTrainer.{name} is gone")
        actual = list(inspect.signature(method).parameters)
        assert actual[: len(params)] == params, _fail(f"GRPOTrainer.{name} now takes {actual}, expected {params}...")


def test_loss_accepts_per_token_advantages():
    source = inspect.getsource(GRPOTrainer._compute_loss)
    assert "advantages.dim() == 1" in source, _fail("_compute_loss no longer accepts (B, T) advantages")


def test_old_logps_pass_condition_unchanged():
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "self.args.gradient_accumulation_steps % generate_every != 0" in source, _fail(
        "the condition under which the old-logps pass runs"
    )
    assert "self.use_vllm and self.vllm_importance_sampling_correction" in source, _fail(
        "the vLLM importance-sampling condition of the old-logps pass"
    )
    # The old-logps pass must be the first scoring pass of the step (AEM captures the first one).
    old_pass = source.index("old_per_token_logps, _, _ = self._get_per_token_logps_and_entropies")
    ref_pass = source.index("ref_per_token_logps, _, _ = self._get_per_token_logps_and_entropies")
    assert old_pass < ref_pass, _fail("the old-logps pass no longer precedes the reference pass")


def test_scored_batch_keys_are_still_produced():
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in SCORED_BATCH_KEYS + ("tool_mask",):
        assert f'"{key}"' in source, _fail(f"the scored batch no longer has the key {key!r}")


def test_attributes_aem_reads():
    source = inspect.getsource(GRPOTrainer.__init__)
    for attribute in ("use_vllm", "vllm_importance_sampling_correction", "use_transformers_continuous_batching",
                      "num_iterations", "temperature", "num_generations", "num_generations_eval", "_metrics",
                      "tools", "rollout_func"):
        assert f"self.{attribute} =" in source, _fail(f"GRPOTrainer no longer sets self.{attribute}")


def test_loss_internals_the_sequence_token_form_relies_on():
    """compute_loss's GSPO token form: the loss's first forward precedes its read of old_per_token_logps, the ratio
    level is read from self.importance_sampling_level, and the clip metrics AEM rewrites are logged under these names."""
    source = inspect.getsource(GRPOTrainer._compute_loss)
    forward = source.index("self._get_per_token_logps_and_entropies(")
    old_read = source.index('inputs.get("old_per_token_logps")')
    assert forward < old_read, _fail("_compute_loss reads old_per_token_logps before its forward pass")
    assert 'if self.importance_sampling_level == "token":' in source, _fail(
        "_compute_loss no longer reads self.importance_sampling_level"
    )
    for metric in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                   "clip_ratio/high_max", "cispo_clip_ratio"):
        assert f'"{metric}"' in source, _fail(f"_compute_loss no longer logs {metric}")
    assert "GRPOTrainer does not support returning outputs" in inspect.getsource(GRPOTrainer.compute_loss), _fail(
        "compute_loss is no longer a thin call of _compute_loss"
    )


def test_reward_internals_failed_episodes_rely_on():
    """Failed episodes: _calculate_rewards returns the gathered (N, F) rewards, and rows whose rewards are all NaN
    are left out of the group baseline with zero advantage."""
    params = list(inspect.signature(GRPOTrainer._calculate_rewards).parameters)
    assert params == ["self", "inputs", "prompts", "completions", "completion_ids_list"], _fail(
        f"GRPOTrainer._calculate_rewards now takes {params}"
    )
    assert "rewards_per_func = gather(rewards_per_func)" in inspect.getsource(GRPOTrainer._calculate_rewards), _fail(
        "_calculate_rewards no longer returns rewards gathered over processes"
    )
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)" in source, _fail(
        "rows whose reward functions all returned None are no longer left out of the baseline"
    )
    assert 'self._logs["extra"]' in source or '"extra": defaultdict' in inspect.getsource(GRPOTrainer.__init__), _fail(
        "the completions table's extra columns (_logs['extra'])"
    )


def test_checkpoint_hooks_aem_overrides():
    from transformers import Trainer

    for name in ("_save_rng_state", "_load_rng_state"):
        method = getattr(Trainer, name, None)
        assert method is not None, _fail(f"transformers' Trainer.{name} is gone (AEM saves its shuffle generator there)")
        assert list(inspect.signature(method).parameters)[:2] in (["self", "output_dir"], ["self", "checkpoint"])
