"""Reporting: training plots, the console (progress bar with a few numbers, a one-line summary, no raw metric
dictionaries unless asked for), tensorboard and trackio receiving AEM/env metrics."""

import math
import socket
import sys
from pathlib import Path

import pytest
from conftest import base_args, red_reward
from test_env_trainer import make_trainer
from test_rollout import WORDS

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer, Episode, evaluate
from trl_aem import callbacks as callbacks_module
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from trl_aem.callbacks import (
    AEMPlotCallback,
    SuccessProgressCallback,
    plot_training,
    training_summary,
    trajectory_records,
)
from trl_aem.tiny import build_word_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
AEM_KEYS = ("aem/alpha_mean", "aem/alpha_std", "aem/alpha_p10", "aem/alpha_p50", "aem/alpha_p90", "aem/gated_frac",
            "aem/response_entropy_mean", "aem/turn0/alpha_mean")
ENV_KEYS = ("env/success_rate", "env/return_mean", "env/turns_mean", "env/episode_errors")


@pytest.fixture(scope="module")
def say_tokenizer():
    return build_word_tokenizer(WORDS + ["say", "wrong", "done"])


def fake_history(multi_turn: bool, aem: bool = True) -> list[dict]:
    history = []
    for step in range(1, 6):
        entry = {"step": step, "loss": 0.1, "reward": 0.2 * step, "reward_std": 0.1, "entropy": 2.0 - 0.1 * step}
        if aem:
            entry.update({"aem/alpha_mean": 1.0, "aem/alpha_std": 0.1 * step, "aem/alpha_min": 0.7,
                          "aem/alpha_max": 1.4, "aem/alpha_p10": 0.8, "aem/alpha_p50": 0.98, "aem/alpha_p90": 1.2,
                          "aem/gated_frac": 0.0, "aem/response_entropy_mean": 1.5})
        if multi_turn:
            entry.update({"env/success_rate": 0.1 * step, "env/return_mean": step,
                          "aem/turn0/response_entropy_mean": 1.4, "aem/turn1/response_entropy_mean": 1.6})
        history.append(entry)
    history.append({"step": 5, "train_runtime": 1.0, "train_loss": 0.1})  # Trainer's end-of-training summary
    return history


def assert_pngs(directory: Path, names):
    assert sorted(p.name for p in directory.glob("*.png")) == sorted(names)
    for name in names:
        assert (directory / name).read_bytes()[:8] == PNG_MAGIC, name


def test_plot_training_multi_turn_single_turn_and_grpo(tmp_path):
    written = plot_training(fake_history(multi_turn=True), tmp_path / "multi")
    assert [p.name for p in written] == ["success.png", "reward.png", "entropy.png", "alpha.png"]
    assert_pngs(tmp_path / "multi", ["success.png", "reward.png", "entropy.png", "alpha.png"])
    plot_training(fake_history(multi_turn=False), tmp_path / "single")  # no env metrics: no success plot
    assert_pngs(tmp_path / "single", ["reward.png", "entropy.png", "alpha.png"])
    plot_training(fake_history(multi_turn=False, aem=False), tmp_path / "grpo")  # use_aem=False: no alpha plot
    assert_pngs(tmp_path / "grpo", ["reward.png", "entropy.png"])
    assert plot_training([], tmp_path / "empty") == []


def test_plot_callback_warns_instead_of_failing(tmp_path, monkeypatch):
    def broken(log_history, out_dir):
        raise RuntimeError("disk full")

    monkeypatch.setattr(callbacks_module, "plot_training", broken)
    args = AEMGRPOConfig(**base_args(tmp_path))

    class State:
        is_world_process_zero = True
        log_history = fake_history(True)

    with pytest.warns(UserWarning, match="disk full"):
        AEMPlotCallback().on_train_end(args, State(), None)
    calls = []
    monkeypatch.setattr(callbacks_module, "plot_training", lambda log_history, out_dir: calls.append(out_dir))
    AEMPlotCallback().on_train_end(args, State(), None)
    assert len(calls) == 1  # the main process plots
    State.is_world_process_zero = False  # other processes never plot
    AEMPlotCallback().on_train_end(args, State(), None)
    assert len(calls) == 1


def test_plot_callback_every_n_logs(tmp_path):
    args = AEMGRPOConfig(**base_args(tmp_path))
    history = fake_history(True)

    class State:
        is_world_process_zero = True
        log_history = history[:2]

    callback = AEMPlotCallback(every=2)
    callback.on_log(args, State(), None, logs=history[0])
    assert not (tmp_path / "plots").exists()
    callback.on_log(args, State(), None, logs=history[1])
    assert (tmp_path / "plots" / "success.png").exists()


def test_success_progress_postfix():
    class Bar:
        postfix = None

        def set_postfix(self, values):
            self.postfix = values

    class Progress:
        training_bar = Bar()

    class State:
        is_world_process_zero = True

    callback = SuccessProgressCallback([object(), Progress()])
    callback.on_train_begin(None, State(), None)
    callback.on_log(None, State(), None, logs={"env/success_rate": 0.5})
    callback.on_log(None, State(), None, logs={"env/success_rate": 1.0})
    assert Progress.training_bar.postfix == {"success": "100.0%", "success_avg": "75.0%"}
    callback.on_log(None, State(), None, logs={"reward": 0.25})
    assert Progress.training_bar.postfix == {"reward": "0.25"}


def test_progress_callback_takes_over_from_transformers_printing_callbacks():
    """transformers' ProgressCallback (bar + a raw dict per log) and PrinterCallback (raw dicts) leave the trainer's
    list; the bar is drawn only where ProgressCallback was; other displays (notebook, user's) stay."""
    other = object()
    callbacks = [other, ProgressCallback()]
    callback = SuccessProgressCallback(callbacks)
    assert callbacks == [other] and callback.owns_display and callback.progress is not None
    callbacks = [PrinterCallback(), other]
    callback = SuccessProgressCallback(callbacks)
    assert callbacks == [other] and callback.owns_display and callback.progress is None
    callbacks = [other]
    callback = SuccessProgressCallback(callbacks)
    assert callbacks == [other] and not callback.owns_display and callback.progress is None


def test_raw_metric_dicts_only_with_log_level_info(tmp_path, capsys):
    class State:
        is_world_process_zero = True
        log_history = []

    logs = {"loss": 0.5, "env/success_rate": 0.25, "total_flos": 1.0}
    quiet = AEMGRPOConfig(**base_args(tmp_path))
    SuccessProgressCallback([PrinterCallback()]).on_log(quiet, State(), None, logs=dict(logs))
    assert capsys.readouterr().out == ""
    verbose = AEMGRPOConfig(**base_args(tmp_path, log_level="info"))
    SuccessProgressCallback([PrinterCallback()]).on_log(verbose, State(), None, logs=dict(logs))
    assert capsys.readouterr().out == "{'loss': '0.5', 'env/success_rate': '0.25'}\n"


def test_training_summary_line():
    assert training_summary(fake_history(multi_turn=True)) == (
        "[train] 5 steps in 1s, 5 logs (first -> last): loss 0.1 -> 0.1, success 10.0% -> 50.0%, entropy 1.9 -> "
        "1.5, alpha std 0.1 -> 0.5")
    # single-turn: reward instead of success; no AEM: no alpha std; a custom tag
    assert training_summary(fake_history(multi_turn=False, aem=False), label="grpo") == (
        "[grpo] 5 steps in 1s, 5 logs (first -> last): loss 0.1 -> 0.1, reward 0.2 -> 1, entropy 1.9 -> 1.5")
    # one run shorter than logging_steps: TRL merges the metrics into the final log, which has only train_loss
    final = {"step": 4, "train_runtime": 3.2, "train_loss": -0.02, "env/success_rate": 0.125, "entropy": 2.5}
    assert training_summary([final]) == "[train] 4 steps in 3s: mean loss -0.02, success 12.5%, entropy 2.5"
    assert training_summary([]) is None


def test_trajectory_records_spread_over_the_batch():
    episodes = []
    for i in range(8):
        episode = Episode(prompt_ids=[1], observations=["say red", "say blue"], actions=["red", "green"],
                          rewards=[0.0, -0.1], invalid_actions=1, truncated=i % 2 == 1)
        episodes.append(episode)
    rows = [{"prompt": "p", "seed": 10 + i // 4} for i in range(8)]
    records = trajectory_records(rows, episodes, limit=2, step=3)
    assert [r["seed"] for r in records] == [10, 11]  # one episode of each group
    assert records[0]["transcript"] == "obs: say red\nact: red  (reward 0)\nobs: say blue\nact: green  (reward -0.1)"
    assert records[0]["turns"] == 2 and records[0]["return"] == pytest.approx(-0.1) and records[0]["step"] == 3
    assert trajectory_records(rows, episodes, limit=0, step=3) == []
    assert len(trajectory_records(rows, episodes, limit=20, step=3)) == 8


@pytest.mark.parametrize(("field", "value"), [("aem_plots", "yes"), ("aem_plot_every", -1), ("aem_plot_every", 1.5),
                                              ("env_log_trajectories", -2), ("env_log_trajectories", True)])
def test_bad_reporting_fields_raise_at_config(tmp_path, field, value):
    with pytest.raises(ValueError, match=field) as excinfo:
        AEMGRPOConfig(**base_args(tmp_path, **{field: value}))
    assert ("True or False" if field == "aem_plots" else "integer >= 0") in str(excinfo.value)


def test_env_training_plots_tensorboard_and_progress_bar(tmp_path, say_tokenizer, capsys):
    """One multi-turn run: plots in <output_dir>/plots, aem/* and env/* in tensorboard, success on the tqdm bar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tmp_path, say_tokenizer, report_to="tensorboard", disable_tqdm=False)
    trainer.train()
    assert_pngs(tmp_path / "plots", ["success.png", "reward.png", "entropy.png", "alpha.png"])
    entry = next(e for e in trainer.state.log_history if "aem/alpha_p50" in e)
    assert entry["aem/alpha_min"] <= entry["aem/alpha_p10"] <= entry["aem/alpha_p50"] <= entry["aem/alpha_p90"] \
        <= entry["aem/alpha_max"]

    events = list(tmp_path.rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"
    tags = set()
    for event_file in events:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    for key in AEM_KEYS + ENV_KEYS:
        assert f"train/{key}" in tags, key

    err = capsys.readouterr().err
    assert "success=" in err and "success_avg=" in err


def test_training_console_shows_a_bar_and_a_summary_not_raw_dicts(tmp_path, say_tokenizer, capsys):
    """A run with the progress bar: no raw metric dictionary on stdout or stderr, the bar shows loss, success, entropy
    and alpha std, one summary line at the end; every metric still reaches log_history."""
    trainer = make_trainer(tmp_path, say_tokenizer, disable_tqdm=False, aem_plots=False)
    trainer.train()
    out, err = capsys.readouterr()
    for text in (out, err):
        assert "{'loss'" not in text and "'env/success_rate'" not in text and "{'train_runtime'" not in text
    assert all(f"{key}=" in err for key in ("loss", "success", "success_avg", "entropy", "alpha_std")), err
    summaries = [line for line in out.splitlines() if line.startswith("[train] ")]
    assert len(summaries) == 1 and summaries[0].startswith("[train] 2 steps in "), out
    assert "success " in summaries[0] and "alpha std " in summaries[0]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in AEM_KEYS + ENV_KEYS + ("loss", "reward", "entropy", "grad_norm", "completions/mean_length"):
            assert key in entry, key


def test_single_turn_training_plots_reward_not_success(tmp_path, make_model, tokenizer, color_dataset):
    args = AEMGRPOConfig(**base_args(tmp_path, aem_plot_every=1))
    AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=args, train_dataset=color_dataset,
                   processing_class=tokenizer).train()
    assert_pngs(tmp_path / "plots", ["reward.png", "entropy.png", "alpha.png"])
    off = AEMGRPOConfig(**base_args(tmp_path / "off", aem_plots=False, max_steps=1))
    AEMGRPOTrainer(model=make_model(), reward_funcs=red_reward, args=off, train_dataset=color_dataset,
                   processing_class=tokenizer).train()
    assert not (tmp_path / "off" / "plots").exists()


def test_env_metrics_reach_trackio_locally(tmp_path, say_tokenizer, monkeypatch):
    """trackio (local mode) stores every aem/* and env/* metric in its sqlite database; nothing goes to the network."""
    trackio = pytest.importorskip("trackio")
    from trackio.sqlite_storage import SQLiteStorage

    store = tmp_path / "trackio"
    monkeypatch.setenv("TRACKIO_DIR", str(store))
    for name in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID", "SYSTEM",
                 "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    # trackio resolves its folder when imported (trl imports it): point every module-level copy at the temp folder.
    original = Path(trackio.utils.TRACKIO_DIR)
    for module in [m for key, m in sys.modules.items() if key == "trackio" or key.startswith("trackio.")]:
        for attr, value in list(vars(module).items()):
            if isinstance(value, Path) and (value == original or original in value.parents):
                monkeypatch.setattr(module, attr, store / value.relative_to(original))
    remote = []
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and sock.family != socket.AF_UNIX:
            remote.append(address)
            raise OSError(f"network disabled in this test: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)

    trainer = make_trainer(tmp_path / "out", say_tokenizer, report_to="trackio", project="trl-aem-test",
                           run_name="aem-trackio", aem_plots=False)
    trainer.train()
    assert not remote, f"trackio tried the network: {remote}"
    assert SQLiteStorage.get_project_db_path("trl-aem-test").parent == store
    assert SQLiteStorage.get_project_db_path("trl-aem-test").exists()
    logs = SQLiteStorage.get_logs("trl-aem-test", "aem-trackio")
    assert logs, "trackio stored no metrics"
    keys = set().union(*logs)
    for key in AEM_KEYS + ENV_KEYS:
        assert f"train/{key}" in keys, key
    values = [row["train/env/success_rate"] for row in logs if "train/env/success_rate" in row]
    assert len(values) == 2 and all(math.isfinite(v) for v in values)


def test_evaluate_progress_bar_shows_success(capsys):
    evaluate("trl_aem/CodeBreaker-v0", "expert", num_tasks=3, progress=True,
             env_kwargs={"code_length": 1, "num_symbols": 3, "max_guesses": 3})
    err = capsys.readouterr().err
    assert "evaluate" in err and "success=100.0%" in err
