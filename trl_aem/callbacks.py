"""Training plots and progress display for :class:`~trl_aem.AEMGRPOTrainer`.

* :func:`plot_training` draws PNGs of success, reward, entropy and the distribution of AEM's alpha from a
  ``Trainer``'s ``state.log_history`` (pure: no trainer needed, so it also works on a saved ``trainer_state.json``).
* :class:`AEMPlotCallback` calls it during and at the end of training (``<output_dir>/plots/``), on the main
  process only, and never lets a plotting failure stop training.
* :class:`SuccessProgressCallback` is the console display of training: a progress bar with loss, success (or reward),
  entropy and alpha std, and a one-line :func:`training_summary` at the end, instead of transformers' raw metric
  dictionaries (still printed with log level ``info``; every metric still reaches ``log_history`` and the trackers).
* :func:`trajectory_records` turns played episodes into the rows of the trajectory table the trainer logs to wandb.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .rollout import row_seed

#: The files :func:`plot_training` can write (each only when its metrics were logged).
PLOT_FILES = ("success.png", "reward.png", "entropy.png", "alpha.png")


def metric_series(log_history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of one metric over ``log_history``, skipping entries without a finite value for it."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        steps.append(float(entry.get("step", len(steps))))
        values.append(float(value))
    return steps, values


def _new_figure(rows: int = 1):
    """A matplotlib figure on the Agg canvas (no pyplot: leaves the user's backend and global state alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = 3.2 * rows
    figure = Figure(figsize=(7.0, height))  # fixed margins: a layout engine would double the drawing time
    FigureCanvasAgg(figure)
    figure.subplots_adjust(left=0.11, right=0.97, top=1 - 0.35 / height, bottom=0.5 / height, hspace=0.08)
    axes = figure.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return figure, list(axes)


def _line(ax, log_history, key: str, label: str | None = None, **style) -> bool:
    steps, values = metric_series(log_history, key)
    if not steps:
        return False
    style.setdefault("marker", "." if len(steps) > 1 else "o")
    ax.plot(steps, values, label=label or key, **style)
    return True


def _band(ax, log_history, low_key: str, high_key: str, label: str, **style) -> bool:
    low, high = dict(zip(*metric_series(log_history, low_key))), dict(zip(*metric_series(log_history, high_key)))
    steps = sorted(set(low) & set(high))
    if not steps:
        return False
    ax.fill_between(steps, [low[s] for s in steps], [high[s] for s in steps], label=label, linewidth=0, **style)
    return True


def _save(figure, axes, path: Path, title: str) -> Path:
    from matplotlib.ticker import MaxNLocator

    axes[0].set_title(title)
    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
    figure.savefig(path, dpi=100)
    return path


def plot_success(log_history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Episode success rate (``env/success_rate``, and ``eval_env/success_rate`` if evaluated) and mean return
    against step; ``None`` (nothing written) when no environment metrics were logged."""
    if not metric_series(log_history, "env/success_rate")[0]:
        return None
    figure, (top, bottom) = _new_figure(2)
    _line(top, log_history, "env/success_rate", "train")
    _line(top, log_history, "eval_env/success_rate", "eval")
    top.set_ylabel("success rate")
    top.set_ylim(-0.02, 1.02)
    _line(bottom, log_history, "env/return_mean", "train")
    _line(bottom, log_history, "eval_env/return_mean", "eval")
    bottom.set_ylabel("mean return")
    return _save(figure, [top, bottom], Path(path), "Episode success")


def plot_reward(log_history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """Mean total reward (``reward``, with a +-``reward_std`` band) against step; ``None`` without reward logs."""
    if not metric_series(log_history, "reward")[0]:
        return None
    figure, axes = _new_figure(1)
    ax = axes[0]
    mean = dict(zip(*metric_series(log_history, "reward")))
    std = dict(zip(*metric_series(log_history, "reward_std")))
    steps = sorted(set(mean) & set(std))
    if steps:
        ax.fill_between(steps, [mean[s] - std[s] for s in steps], [mean[s] + std[s] for s in steps], alpha=0.2,
                        linewidth=0, label="+- std")
    _line(ax, log_history, "reward", "reward (train)")
    _line(ax, log_history, "eval_reward", "reward (eval)")
    ax.set_ylabel("reward")
    return _save(figure, axes, Path(path), "Reward")


def plot_entropy(log_history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """TRL's token entropy (``entropy``), AEM's mean span entropy (``aem/response_entropy_mean``) and its per-turn
    means (``aem/turn{k}/response_entropy_mean``) against step; ``None`` when none was logged."""
    figure, axes = _new_figure(1)
    ax = axes[0]
    drawn = _line(ax, log_history, "entropy", "token entropy (TRL)")
    drawn |= _line(ax, log_history, "aem/response_entropy_mean", "span entropy (AEM)")
    turn_keys = sorted({key for entry in log_history for key in entry
                        if key.startswith("aem/turn") and key.endswith("/response_entropy_mean")},
                       key=lambda key: int(key.split("/")[1][4:]) if key.split("/")[1][4:].isdigit() else 0)
    for key in turn_keys:
        drawn |= _line(ax, log_history, key, f"turn {key.split('/')[1][4:]} (AEM)", linewidth=0.8, alpha=0.5,
                       marker=None)
    if not drawn:
        return None
    ax.set_ylabel("entropy (nats)")
    return _save(figure, axes, Path(path), "Policy entropy")


def plot_alpha(log_history: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path | None:
    """The distribution of AEM's alpha against step: min-max and 10-90% bands, mean and median (top); its standard
    deviation and the gated fraction (bottom). ``None`` when no ``aem/alpha_mean`` was logged (``use_aem=False``)."""
    if not metric_series(log_history, "aem/alpha_mean")[0]:
        return None
    figure, (top, bottom) = _new_figure(2)
    _band(top, log_history, "aem/alpha_min", "aem/alpha_max", "min-max", alpha=0.15, color="tab:blue")
    _band(top, log_history, "aem/alpha_p10", "aem/alpha_p90", "10-90%", alpha=0.3, color="tab:blue")
    _line(top, log_history, "aem/alpha_mean", "mean", color="tab:blue")
    _line(top, log_history, "aem/alpha_p50", "median", color="tab:orange", linestyle="--")
    top.axhline(1.0, color="grey", linewidth=0.8)
    top.set_ylabel("alpha")
    _line(bottom, log_history, "aem/alpha_std", "alpha std")
    _line(bottom, log_history, "aem/gated_frac", "gated fraction")
    bottom.set_ylabel("value")
    return _save(figure, [top, bottom], Path(path), "AEM alpha over spans")


def plot_training(log_history: Sequence[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Write every plot whose metrics appear in ``log_history`` (a ``Trainer``'s ``state.log_history``) to
    ``out_dir``: ``success.png`` (multi-turn environments), ``reward.png``, ``entropy.png``, ``alpha.png`` (AEM on).

    Returns the paths written. Plots are drawn on matplotlib's Agg canvas; pyplot is never touched.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in zip(PLOT_FILES, (plot_success, plot_reward, plot_entropy, plot_alpha)):
        path = plot(log_history, out / name)
        if path is not None:
            written.append(path)
    return written


class AEMPlotCallback(TrainerCallback):
    """Writes :func:`plot_training`'s PNGs to ``<output_dir>/plots`` at the end of training and, with ``every > 0``,
    every ``every`` training logs. Main process only; a plotting failure is a warning, never an error."""

    def __init__(self, every: int = 0, subdir: str = "plots"):
        self.every = int(every)
        self.subdir = subdir
        self.num_logs = 0
        self.last_paths: list[Path] = []

    def _plot(self, args, state) -> None:
        if not state.is_world_process_zero:
            return
        try:
            self.last_paths = plot_training(state.log_history, Path(args.output_dir) / self.subdir)
        except Exception as exc:  # noqa: BLE001 - plots are a convenience; training must go on
            warnings.warn(f"AEMPlotCallback could not write training plots: {type(exc).__name__}: {exc}",
                          stacklevel=2)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Count training logs; plot every ``every`` of them."""
        if not logs or not any(key in logs for key in ("loss", "reward", "env/success_rate", "aem/alpha_mean")):
            return
        self.num_logs += 1
        if self.every > 0 and self.num_logs % self.every == 0:
            self._plot(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        """Plot the whole run."""
        self._plot(args, state)


#: What the progress bar and the end-of-training summary show of a training log: (log key, label, format). Success
#: (multi-turn environments) replaces reward; alpha std appears when AEM is on.
CONSOLE_METRICS = (
    ("loss", "loss", "{:.3g}"),
    ("env/success_rate", "success", "{:.1%}"),
    ("reward", "reward", "{:.3g}"),
    ("entropy", "entropy", "{:.3g}"),
    ("aem/alpha_std", "alpha std", "{:.3g}"),
)


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def raw_logs_requested(args) -> bool:
    """Whether this process should print every training log as a raw metric dictionary, as transformers does: when
    its log level is ``info`` or ``debug`` (``log_level="info"`` / ``--log_level info`` in the training arguments, or
    ``TRANSFORMERS_VERBOSITY=info`` with the default ``log_level="passive"``)."""
    try:
        return args.get_process_log_level() <= logging.INFO
    except (AttributeError, KeyError, TypeError):
        return False


def _raw_log_line(logs: dict, max_str_len: int = 100) -> str:
    """A log as transformers' ``ProgressCallback`` writes it: floats to 4 significant digits, long strings cut,
    without ``total_flos``."""
    shown = {}
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if isinstance(value, str) and len(value) > max_str_len:
            value = f"[String too long to display, length: {len(value)} > {max_str_len}.]"
        elif isinstance(value, float):
            value = f"{value:.4g}"
        shown[key] = value
    return str(shown)


def training_summary(log_history: Sequence[dict[str, Any]], label: str = "train") -> str | None:
    """One line about a finished run from its ``log_history``: steps, run time, and the first -> last logged value
    of loss, success (or reward), entropy and AEM's alpha std. ``None`` when nothing was logged.

    Example: ``[train] 40 steps in 27s, 8 logs (first -> last): loss -0.00277 -> -0.0386, success 18.1% -> 60.0%,
    entropy 2.59 -> 0.946, alpha std 0.252 -> 0.241``.
    """
    logs = [entry for entry in log_history if not any(str(key).startswith("eval_") for key in entry)]
    if not logs:
        return None
    step = logs[-1].get("step")
    head = f"[{label}] " + (f"{int(step)} step{'' if step == 1 else 's'}" if _finite(step) else "training")
    end = next((entry for entry in reversed(logs) if "train_runtime" in entry), None)
    if end is not None and _finite(end.get("train_runtime")):
        head += f" in {end['train_runtime']:.0f}s"
    with_success = any(_finite(entry.get("env/success_rate")) for entry in logs)
    shown = [(key, name, fmt) for key, name, fmt in CONSOLE_METRICS if not (key == "reward" and with_success)]
    parts = []
    for key, name, fmt in shown:
        values = [fmt.format(entry[key]) for entry in logs if _finite(entry.get(key))]
        if values:
            parts.append(f"{name} {values[0]}" + (f" -> {values[-1]}" if len(values) > 1 else ""))
    if not any(_finite(entry.get("loss")) for entry in logs) and end is not None and _finite(end.get("train_loss")):
        parts.insert(0, f"mean loss {end['train_loss']:.3g}")
    count = sum(1 for entry in logs if any(_finite(entry.get(key)) for key, _, _ in shown))
    if count > 1:
        head += f", {count} logs (first -> last)"
    return f"{head}: {', '.join(parts)}" if parts else head


class SuccessProgressCallback(TrainerCallback):
    """The console side of training: a progress bar with a few live numbers and a one-line summary at the end, in
    place of the raw metric dictionaries ``transformers`` prints at every log.

    ``callbacks`` is the trainer's callback list (``trainer.callback_handler.callbacks``). The callback takes over
    from ``transformers``' ``ProgressCallback`` (a tqdm bar that also writes every log as a dictionary) and
    ``PrinterCallback`` (which prints them when ``disable_tqdm=True``): it removes them from that list, draws the
    same tqdm bar where ``ProgressCallback`` was (so never with ``disable_tqdm``), and shows on it the last logged
    loss, episode success rate and its running mean over the run (``env/success_rate``; the mean reward in
    single-turn runs), token entropy and, with AEM, the standard deviation of alpha. At the end of training it
    prints :func:`training_summary` (with ``summary=True``). Other progress displays (the notebook one, your own)
    are left in place; their bar gets the numbers when it has ``set_postfix``.

    Nothing is taken from the logs: ``state.log_history``, ``trainer_state.json`` and the trackers of ``report_to``
    receive every metric. To print the raw dictionaries too, set the log level to ``info``
    (:func:`raw_logs_requested`). Everything is shown by the main process only.

    Args:
        callbacks: the trainer's callback list, searched (and edited) as above.
        summary: print the one-line summary at the end of training.
        label: the summary's tag, ``[train] ...``.
    """

    def __init__(self, callbacks: list, summary: bool = True, label: str = "train"):
        self.callbacks = callbacks
        self.summary = summary
        self.label = label
        self.success: list[float] = []
        replaced = [callback for callback in callbacks if type(callback) in (ProgressCallback, PrinterCallback)]
        if replaced:
            callbacks[:] = [callback for callback in callbacks if all(callback is not r for r in replaced)]
        #: Whether this callback is the trainer's console display (it replaced transformers' own).
        self.owns_display = bool(replaced)
        #: The tqdm bar's callback when this one replaced ``ProgressCallback`` (bar events go to it), else ``None``.
        self.progress = ProgressCallback() if any(type(r) is ProgressCallback for r in replaced) else None

    @property
    def training_bar(self):
        """The tqdm training bar this callback draws (``None`` outside training or without a bar)."""
        return self.progress.training_bar if self.progress is not None else None

    def _bar(self):
        if self.training_bar is not None:
            return self.training_bar
        for callback in self.callbacks:
            if callback is self:
                continue
            bar = getattr(callback, "training_bar", None)
            if bar is not None and hasattr(bar, "set_postfix"):
                return bar
        return None

    def on_train_begin(self, args, state, control, **kwargs):
        """Open the bar; start a fresh running mean."""
        self.success = []
        if self.progress is not None:
            self.progress.on_train_begin(args, state, control, **kwargs)

    def on_step_end(self, args, state, control, **kwargs):
        """Advance the bar."""
        if self.progress is not None and self.progress.training_bar is not None:
            self.progress.on_step_end(args, state, control, **kwargs)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        """Advance the evaluation bar."""
        if self.progress is not None:
            self.progress.on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        """Close the evaluation bar."""
        if self.progress is not None:
            self.progress.on_evaluate(args, state, control, **kwargs)

    def on_predict(self, args, state, control, **kwargs):
        """Close the prediction bar."""
        if self.progress is not None:
            self.progress.on_predict(args, state, control, **kwargs)

    def _postfix(self, logs: dict[str, Any]) -> dict[str, str]:
        """The bar's numbers for one training log (updates the running mean of success); empty for other logs."""
        postfix = {}
        if _finite(logs.get("loss")):
            postfix["loss"] = f"{logs['loss']:.3g}"
        if _finite(logs.get("env/success_rate")):
            self.success.append(float(logs["env/success_rate"]))
            postfix["success"] = f"{logs['env/success_rate']:.1%}"
            postfix["success_avg"] = f"{sum(self.success) / len(self.success):.1%}"
        elif _finite(logs.get("reward")):
            postfix["reward"] = f"{logs['reward']:.3g}"
        if _finite(logs.get("entropy")):
            postfix["entropy"] = f"{logs['entropy']:.3g}"
        if _finite(logs.get("aem/alpha_std")):
            postfix["alpha_std"] = f"{logs['aem/alpha_std']:.3g}"
        return postfix

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Show a training log's numbers on the bar (and the raw dictionary when asked for)."""
        if not logs or not state.is_world_process_zero:
            return
        bar = self._bar()
        if self.owns_display and raw_logs_requested(args):
            line = _raw_log_line(logs)
            if bar is not None and hasattr(bar, "write"):
                bar.write(line)
            else:
                print(line, flush=True)
        postfix = self._postfix(logs)
        if postfix and bar is not None:
            try:
                bar.set_postfix(postfix)
            except Exception:  # noqa: BLE001 - a display nicety; never stop training for it
                pass

    def on_train_end(self, args, state, control, **kwargs):
        """Close the bar and print the summary."""
        if self.progress is not None and self.progress.training_bar is not None:
            self.progress.on_train_end(args, state, control, **kwargs)
        if self.summary and state.is_world_process_zero:
            line = training_summary(state.log_history, self.label)
            if line:
                print(line, flush=True)


#: Columns of the trajectory table (:func:`trajectory_records`).
TRAJECTORY_COLUMNS = ("step", "seed", "turns", "success", "return", "truncated", "invalid_actions", "transcript",
                      "error")


def episode_transcript(episode) -> str:
    """An episode as text: observations (``obs:``) and actions (``act:``) in order, with each step's reward."""
    lines = []
    for turn, action in enumerate(episode.actions):
        if turn < len(episode.observations):
            lines.append(f"obs: {episode.observations[turn]}")
        reward = f"  (reward {episode.rewards[turn]:g})" if turn < len(episode.rewards) else ""
        lines.append(f"act: {action}{reward}")
    if not episode.actions and episode.observations:
        lines.append(f"obs: {episode.observations[0]}")
    return "\n".join(lines)


def trajectory_records(rows: list[dict], episodes: list, limit: int, step: int) -> list[dict]:
    """Up to ``limit`` episodes, spread evenly over the batch (so over several groups), as table rows."""
    if limit <= 0 or not episodes:
        return []
    count = min(limit, len(episodes))
    picks = sorted({round(i * len(episodes) / count) for i in range(count)})
    return [
        {"step": int(step), "seed": row_seed(rows[i]) if i < len(rows) else None, "turns": episodes[i].num_turns,
         "success": bool(episodes[i].success), "return": episodes[i].episode_return,
         "truncated": bool(episodes[i].truncated), "invalid_actions": episodes[i].invalid_actions,
         "transcript": episode_transcript(episodes[i]), "error": episodes[i].error or ""}
        for i in picks
    ]
