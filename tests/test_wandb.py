"""AEM's and the environment's metrics reach wandb through TRL's logging (offline run, nothing leaves the machine)."""

from conftest import base_args
from test_env_trainer import env_dataset
from test_rollout import WORDS, SayEnv

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer
from trl_aem.tiny import build_tiny_qwen2, build_word_tokenizer


def test_metrics_are_in_the_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "trl-aem-test")
    tokenizer = build_word_tokenizer(WORDS + ["say", "wrong", "done"])
    args = AEMGRPOConfig(**base_args(tmp_path / "out", report_to="wandb", max_completion_length=64, env_max_turns=2,
                                     env_max_new_tokens_per_turn=4, aem_min_entropy_range=0.0, run_name="aem-test"))
    trainer = AEMGRPOTrainer(model=build_tiny_qwen2(tokenizer, hidden_size=32), args=args, train_dataset=env_dataset(),
                             processing_class=tokenizer, env=SayEnv)
    trainer.train()
    import wandb

    wandb.finish()
    runs = list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "no offline wandb run was written"
    # wandb >= 0.2x writes the run as a protobuf record log (read back by its Go core); history keys are stored as
    # plain strings in it, so look for every metric's key in the run file itself.
    data = runs[0].read_bytes()
    for key in ("train/aem/alpha_mean", "train/aem/alpha_std", "train/aem/gated_frac", "train/aem/neg_adv_frac",
                "train/aem/response_entropy_mean", "train/aem/nonfinite_entropy_spans", "train/aem/turn0/alpha_mean",
                "train/env/success_rate", "train/env/return_mean", "train/env/turns_mean", "train/env/episode_errors"):
        assert key.encode() in data, key
