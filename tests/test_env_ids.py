"""Environment ids everywhere one is taken: a registered id, or gymnasium's ``"module:EnvId"`` form, which imports
``module`` (the code that registers ``EnvId``) first; clear errors naming the argument and the value otherwise."""

import sys
import uuid

import gymnasium
import pytest
from conftest import base_args
from datasets import Dataset

from trl_aem import AEMGRPOConfig, AEMGRPOTrainer, evaluate
from trl_aem.envs import CodeBreaker, env_class, env_vocabulary, expert_trajectories, resolve_env_id
from trl_aem.rollout import make_env_factory
from trl_aem.tiny import build_agent_tokenizer, build_tiny_qwen2, build_word_tokenizer

# A user's module: a small text environment (with a scripted expert), plus a trl_aem text environment for
# env_vocabulary; importing it registers both ids, as a user's own package would.
USER_MODULE = '''
import gymnasium
from trl_aem.envs import CodeBreaker

WORDS = ("red", "blue", "green")


class Echo(gymnasium.Env):
    """Say the word shown; one turn; reward 10 if right."""

    metadata = {"render_modes": []}
    observation_space = action_space = gymnasium.spaces.Text(64, charset="abcdefghijklmnopqrstuvwxyz ")

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.word = WORDS[int(self.np_random.integers(len(WORDS)))]
        return f"say {self.word}", {}

    def step(self, action):
        ok = action.strip() == self.word
        return "done", 10.0 * ok, True, False, {"success": ok, "invalid_action": not ok}

    def expert_action(self):
        return self.word


class TinyCode(CodeBreaker):
    """CodeBreaker under another id."""


gymnasium.register(id="{namespace}/Echo-v0", entry_point=Echo)
gymnasium.register(id="{namespace}/Code-v0", entry_point=TinyCode)
'''


@pytest.fixture
def user_envs(tmp_path, monkeypatch):
    """Write a fresh module that registers ``<namespace>/Echo-v0`` and ``<namespace>/Code-v0`` to a folder put on
    ``sys.path``; yields ``(module name, namespace)``. Not imported yet: resolving a ``module:id`` must import it."""
    name = f"user_envs_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE.replace("{namespace}", name))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, name
    sys.modules.pop(name, None)
    for env_id in (f"{name}/Echo-v0", f"{name}/Code-v0"):
        gymnasium.registry.pop(env_id, None)


def test_resolve_env_id_imports_the_module_and_returns_the_id(user_envs):
    module, namespace = user_envs
    assert module not in sys.modules
    assert resolve_env_id(f"{module}:{namespace}/Echo-v0") == f"{namespace}/Echo-v0"
    assert module in sys.modules and f"{namespace}/Echo-v0" in gymnasium.registry
    # a registered id is returned unchanged (resolving twice is harmless)
    assert resolve_env_id(f"{namespace}/Echo-v0") == f"{namespace}/Echo-v0"
    assert resolve_env_id("trl_aem/Household-v0") == "trl_aem/Household-v0"


def test_make_env_factory_evaluate_and_the_env_helpers_take_module_ids(user_envs):
    module, namespace = user_envs
    env = make_env_factory(f"{module}:{namespace}/Echo-v0")()
    try:
        assert env.spec.id == f"{namespace}/Echo-v0"
        observation, _ = env.reset(seed=0)
        assert observation.startswith("say ")
    finally:
        env.close()
    result = evaluate(f"{module}:{namespace}/Echo-v0", "expert", num_tasks=4)
    assert result.success_rate == 1.0 and result.mean_return == 10.0 and result.num_tasks == 4
    # env_vocabulary, env_class, expert_trajectories and the tiny agent's tokenizer
    code_id = f"{module}:{namespace}/Code-v0"
    assert env_class(code_id).__name__ == "TinyCode"
    assert env_vocabulary(code_id, **CodeBreaker.EASIEST) == env_vocabulary("codebreaker", **CodeBreaker.EASIEST)
    assert expert_trajectories(code_id, [0, 1], env_kwargs=CodeBreaker.EASIEST)[1]["success"]
    tokenizer = build_agent_tokenizer(code_id, CodeBreaker.EASIEST, "answer .")
    assert tokenizer.unk_token_id not in tokenizer("guess", add_special_tokens=False)["input_ids"]


def test_trainer_takes_a_module_id(user_envs, tmp_path):
    module, namespace = user_envs
    tokenizer = build_word_tokenizer(["say", "done", "red", "blue", "green"])
    model = build_tiny_qwen2(tokenizer, hidden_size=32)
    args = AEMGRPOConfig(**base_args(tmp_path, max_completion_length=16, env_max_turns=1,
                                     env_max_new_tokens_per_turn=4))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "say ."}], "seed": i} for i in range(8)])
    trainer = AEMGRPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             env=f"{module}:{namespace}/Echo-v0")
    env = trainer.env_runner.env_factory()
    try:
        assert env.spec.id == f"{namespace}/Echo-v0"
    finally:
        env.close()


@pytest.mark.parametrize("make, name", [
    (lambda env_id: resolve_env_id(env_id), "env_id"),
    (lambda env_id: make_env_factory(env_id), "env"),
    (lambda env_id: evaluate(env_id, "expert", num_tasks=1), "env"),
    (lambda env_id: env_vocabulary(env_id), "env_id"),
], ids=["resolve_env_id", "make_env_factory", "evaluate", "env_vocabulary"])
def test_bad_ids_are_clear_errors(make, name, user_envs):
    """Errors name the argument (``env=`` of the Python API, ``env_id`` of the CLI and the env helpers) and value."""
    module, namespace = user_envs
    # the module cannot be imported
    with pytest.raises(ValueError, match=rf"^{name} 'no_such_module_x:x/Y-v0': cannot import the module "
                                         r"'no_such_module_x' before ':'"):
        make("no_such_module_x:x/Y-v0")
    # the module imports, but does not register that id
    with pytest.raises(ValueError, match=rf"^{name} '{module}:{namespace}/Nope-v0' is not a registered gymnasium "
                                         r"id .*`trl-aem env list`"):
        make(f"{module}:{namespace}/Nope-v0")
    # a plain id nobody registered
    with pytest.raises(ValueError, match=rf"^{name} 'trl_aem/Houshold-v0' is not a registered gymnasium id "
                                         r"\(.*Did you mean: `Household`\?\)"):
        make("trl_aem/Houshold-v0")
    with pytest.raises(ValueError, match="needs both a module and an id"):
        make(f"{module}:")
