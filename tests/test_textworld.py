"""trl_aem/TextWorld-v0 (optional extra `textworld`): real TextWorld games generated here, played through TextWorld;
the walkthrough wins, invalid commands are flagged, games are cached, train/eval seeds are disjoint, a corrupt cached
game is generated again, and AEMGRPOTrainer(env="trl_aem/TextWorld-v0") trains."""

import gymnasium
import pytest

pytest.importorskip("textworld", reason='the optional extra: pip install "trl-aem[textworld]"')

from conftest import train_one_env_step  # noqa: E402

import trl_aem  # noqa: E402,F401  (registers the ids)
from trl_aem.envs.textworld_env import TextWorldEnv, game_path  # noqa: E402


@pytest.fixture(scope="module")
def cache(textworld_cache):
    return textworld_cache


def test_walkthrough_wins_a_generated_game_and_the_convention_holds(cache):
    env = gymnasium.make("trl_aem/TextWorld-v0", cache_dir=str(cache)).unwrapped
    observation, info = env.reset(seed=3)
    assert "coin" in observation and info["task"] in observation and not info["success"]
    assert "take coin" in info["admissible_actions"] and info["max_score"] == 1
    total, steps = 0.0, 0
    while True:
        observation, reward, terminated, truncated, info = env.step(env.expert_action())
        total, steps = total + reward, steps + 1
        assert not info["invalid_action"]
        if terminated or truncated:
            break
    assert terminated and info["success"] and total == 1 + 10.0  # score increase + success reward
    # a command that is not admissible is flagged (and costs the penalty when one is set)
    strict = TextWorldEnv(cache_dir=cache, invalid_action_penalty=0.1)
    strict.reset(seed=3)
    _, reward, terminated, truncated, info = strict.step("dance with the coin")
    assert info["invalid_action"] and reward == pytest.approx(-0.1) and not terminated


def test_games_are_cached_by_settings_and_train_eval_seeds_are_disjoint(cache):
    env = TextWorldEnv(cache_dir=cache)
    path = env.game_file(3)
    assert path == game_path(cache, "tw-coin_collector", {"level": 1}, 6) and path.exists()
    stamp = path.stat().st_mtime_ns
    env.reset(seed=3)
    assert path.stat().st_mtime_ns == stamp  # reused, not generated again
    held_out = TextWorldEnv(cache_dir=cache, split="eval")
    assert held_out.game_file(3) == game_path(cache, "tw-coin_collector", {"level": 1}, 7)
    other = TextWorldEnv(cache_dir=cache, settings={"level": 2})
    assert other.game_file(3).parent != path.parent  # other settings, other folder
    with pytest.raises(ValueError, match="challenge"):
        TextWorldEnv(challenge="tw-unknown")


def test_a_corrupt_cached_game_is_generated_again(cache):
    env = TextWorldEnv(cache_dir=cache)
    path = env.game_file(5)
    good = path.read_bytes()
    path.write_bytes(good[:100])  # half a game (TextWorld's interpreter would end the process if it loaded it)
    observation, info = env.reset(seed=5)
    assert "coin" in observation and path.read_bytes() == good  # generated again, identical (same seed)
    path.unlink()  # missing: generated again too
    assert "coin" in env.reset(seed=5)[0]


def test_aem_trains_on_textworld(tmp_path, cache):
    words = ["take", "coin", "go", "north", "south", "east", "west", "examine", "look", "inventory", "the", "a"]
    train_one_env_step("trl_aem/TextWorld-v0", words, tmp_path, env_kwargs={"cache_dir": str(cache)})


def test_episodes_reset_concurrently_into_different_games(cache):
    # The trainer resets a turn's episodes in threads; TextWorld's logic parser is process-global state, so
    # generating or loading two games at once used to fail with "Duplicate rule" / "pop from empty list".
    from concurrent.futures import ThreadPoolExecutor

    def play(seed):
        env = TextWorldEnv(cache_dir=cache, settings={"level": 2})
        observation, info = env.reset(seed=seed)
        env.close()
        return info["task"]

    with ThreadPoolExecutor(max_workers=6) as pool:
        tasks = list(pool.map(play, range(20, 26)))
    assert len(tasks) == 6 and all("coin" in task for task in tasks)


def test_random_policy_and_vocabulary_work_on_textworld(cache):
    from trl_aem import evaluate
    from trl_aem.envs import env_vocabulary

    result = evaluate("trl_aem/TextWorld-v0", "random", num_tasks=2, max_turns=3, env_kwargs={"cache_dir": str(cache)})
    assert result.num_tasks == 2 and 1 <= result.mean_turns <= 3
    words = env_vocabulary("trl_aem/TextWorld-v0", probe_games=2, cache_dir=str(cache), settings={"level": 2})
    assert {"take", "coin", "go"} <= set(words) and words == sorted(words)
    assert set(words) & {"north", "south", "east", "west"}


@pytest.mark.slow
def test_tiny_textworld_recipe_runs_warm_start_rl_and_evaluation(tmp_path, monkeypatch, cache):
    """examples/recipes/tiny-textworld-cpu.yaml end to end (shortened): vocabulary from probe games, warm start on
    walkthroughs, AEM-GRPO on generated games, held-out evaluation before and after."""
    from conftest import load_script

    monkeypatch.setenv("TRL_AEM_CACHE", str(cache))
    script = load_script("examples/train_agent.py", "train_agent")
    trainer = script.main(["--config", "examples/recipes/tiny-textworld-cpu.yaml", "--max_steps", "1",
                           "--eval_tasks", "2", "--warm_start_steps", "1", "--warm_start_tasks", "2",
                           "--num_train_tasks", "4", "--per_device_train_batch_size", "8", "--num_generations", "4",
                           "--output_dir", str(tmp_path), "--logging_steps", "1",
                           "--eval_env_kwargs", '{"split": "eval"}'])
    log = next(e for e in trainer.state.log_history if "env/success_rate" in e)
    assert log["env/episode_errors"] == 0 and "aem/alpha_mean" in log
    # the evaluation played the eval split (game seed 2s + 1 for eval seed s = 100000), training the train split
    games = {p.name for p in (cache / "textworld").rglob("game-*.z8")}
    assert "game-200001.z8" in games and "game-0.z8" in games and "game-200000.z8" not in games
    results = (tmp_path / "eval_results.json").read_text()
    assert "before_success_rate" in results and "after_success_rate" in results


def test_an_overlong_command_is_invalid_and_quiet(cache):
    import warnings

    env = TextWorldEnv(cache_dir=cache)
    env.reset(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the interpreter would warn that it truncates input
        observation, reward, terminated, truncated, info = env.step("take " + "x" * 600)
    assert info["invalid_action"] and not terminated and isinstance(observation, str)
