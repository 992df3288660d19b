"""env_context="summary" and "echo": the prompts the policies rebuild, findings and selections read from answers, the
runner's budget boundaries, rebuild cap and memory spans, and the ClueRooms environment that needs a memory.

Rollouts here are played by a scripted *reader*: it answers from what its context shows (so it succeeds exactly when
its context still holds the clue), writes findings, selections and summaries, and needs no model."""

import re

import pytest
from test_rollout import bpe_tokenizer

from trl_aem.context import (
    CONTINUE,
    FINDING_INSTRUCTION,
    KEPT_HEADER,
    MEMORY_SPAN_OFFSET,
    NOT_SHOWN,
    SELECTION_HEADER,
    SELECTION_REQUEST,
    SUMMARY_REQUEST,
    EchoContext,
    FullContext,
    Memory,
    SummaryContext,
    TurnHistory,
    WindowContext,
    make_context_policy,
    memory_vocabulary,
)
from trl_aem.envs.base import split_words
from trl_aem.envs.clues import ClueRooms
from trl_aem.rollout import EnvRunner, ObservationRenderer, RolloutLimits

PROMPT = [{"role": "user", "content": "play ."}]


def reader_generate(tokenizer, select=lambda index: True, wrong=lambda index: False):
    """A scripted agent for ClueRooms that only knows what its context shows.

    It walks forward (with ``<finding>the note</finding>`` when the context asks for findings); at the vault it says
    the last color its context gives for the task's item (``say nothing`` when none: an invalid action), or, where
    ``wrong(episode)``, another admissible color; asked for a summary it writes that color; asked for a selection it
    names the turns whose finding is about the item (none unless ``select(episode)``)."""

    def generate(contexts, max_new_tokens, keys=None):
        out = []
        for position, context in enumerate(contexts):
            index = keys[position][1] if keys else 0
            text = tokenizer.decode(context)
            last = text[text.rfind("<|im_start|>user"):]
            item = re.search(r"color of the (\w+)", text).group(1)
            known = re.findall(rf"the {item} is (\w+)", text)
            if SELECTION_REQUEST in last:
                turns = re.findall(rf"turn (\d+) : the {item} is", last) if select(index) else []
                answer = "\n".join(f"turn {t} : the {item}" for t in turns) or "none"
            elif SUMMARY_REQUEST in last:
                answer = f"the {item} is {known[-1]}" if known else "nothing yet"
            elif "it asks" in last:
                colors = re.findall(r"say (\w+)", last)
                if wrong(index):
                    answer = "say " + next(c for c in colors if not known or c != known[-1])
                else:
                    answer = f"say {known[-1]}" if known else "say nothing"
            else:
                note = re.search(r"note says : (the \w+ is \w+)", last)
                answer = "go forward"
                if "<finding>" in text and note:
                    answer += f" <finding>{note.group(1)}</finding>"
            ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
            out.append(ids[:max_new_tokens])
        return out, [[0.5 + 0.1 * (j % 5) for j in range(len(t))] for t in out]

    generate.accepts_keys = True
    return generate


def clue_runner(tokenizer, context, max_turns=10, **env_kwargs):
    env_kwargs = {"num_rooms": 6, "clue_rooms": 3, **env_kwargs}
    return EnvRunner(lambda: ClueRooms(**env_kwargs), ObservationRenderer(tokenizer), RolloutLimits(max_turns, 64, 2048),
                     context=context)


SEED = 1  # ClueRooms(num_rooms=6, clue_rooms=3), seed 1: the lamp is green, the clue is in room 3 (seen at turn 3)


@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer(chat_template=True)


# ---------------------------------------------------------------- the policies, pure text
def history_of_five_turns():
    return TurnHistory(
        PROMPT, observations=["task . room 1", "room 2", "room 3", "room 4", "room 5", "room 6"],
        actions=["go", "go", "go", "go", "go"], findings=["one", "two", "", "four", "five"],
        memories=[Memory(turn=5, text="turn 2 : two\nturn_4 : four\nturn 2 again , turn 9", selected=[1, 3])])


def test_echo_rebuilt_prompt_lists_the_kept_turns_then_the_recent_turns_in_full():
    echo = EchoContext(budget=100, recent_turns=2)
    history = history_of_five_turns()
    assert echo.recent(history) == [3, 4] and echo.kept(history, history.memories[-1]) == [1]
    assert echo.messages(history) == [
        {"role": "user", "content": "\n".join(["play .", FINDING_INSTRUCTION, "task . room 1", KEPT_HEADER,
                                               "turn 2 : action : go , finding : two", CONTINUE, NOT_SHOWN, "room 4"])},
        {"role": "assistant", "content": "go <finding>four</finding>"},
        {"role": "user", "content": "room 5"},
        {"role": "assistant", "content": "go <finding>five</finding>"},
        {"role": "user", "content": "room 6"},
    ]
    # no recent turns: the kept records and the current observation
    assert EchoContext(budget=100, recent_turns=0).messages(history)[-1]["content"].endswith(
        "turn 4 : action : go , finding : four\n" + CONTINUE + "\n" + NOT_SHOWN + "\nroom 6")
    # before any rebuild: the first prompt, with the finding instruction
    first = TurnHistory(PROMPT, observations=["task . room 1"])
    assert echo.messages(first) == [{"role": "user", "content": f"play .\n{FINDING_INSTRUCTION}\ntask . room 1"}]


def test_echo_reads_findings_and_selections():
    echo = EchoContext(budget=100)
    assert echo.split_answer("go forward <finding>the key is red</finding>") == ("go forward", "the key is red")
    assert echo.split_answer("go < finding > the key is red < / finding > now") == ("go  now", "the key is red")
    assert echo.split_answer("go forward <finding>cut off") == ("go forward", "cut off")
    assert echo.split_answer("go forward") == ("go forward", None)
    history = history_of_five_turns()
    memory = echo.read_memory("turn 2 : two\nturn_4 : four\nTurn 2 again , turn 9 , turn 0", history)
    assert memory.selected == [1, 3] and memory.turn == 5  # 1-based in the text; repeats and unknown turns dropped
    request = echo.memory_request(history)
    assert request.split("\n") == ["room 6", SELECTION_HEADER, "turn 1 : one", "turn 2 : two", "turn 3 : go",
                                   "turn 4 : four", "turn 5 : five", SELECTION_REQUEST]


def test_summary_rebuilt_prompt_and_request():
    summary = SummaryContext(budget=100)
    history = history_of_five_turns()
    history.memories = [Memory(turn=5, text="all rooms had notes")]
    assert summary.memory_request(history) == f"room 6\n{SUMMARY_REQUEST}"
    assert summary.read_memory("  the key is red \n", history).text == "the key is red"
    assert summary.messages(history) == [{"role": "user", "content": "\n".join(
        ["play .", "task . room 1", "summary of steps 1 to 5 : all rooms had notes", CONTINUE, "room 6"])}]
    react = SummaryContext(budget=100, prompt_format=make_context_policy("full", prompt_format="react").prompt_format)
    assert react.messages(history)[0]["content"].startswith("play .\nsummary of steps 1 to 5 : all rooms had notes\n")


def test_make_context_policy_checks_the_memory_knobs():
    with pytest.raises(ValueError, match="env_context_budget"):
        make_context_policy("echo")
    with pytest.raises(ValueError, match="env_context_budget"):
        make_context_policy("summary", budget=0)
    with pytest.raises(ValueError, match="env_echo_recent_turns"):
        make_context_policy("echo", budget=10, recent_turns=-1)
    with pytest.raises(ValueError, match="env_max_rebuilds"):
        make_context_policy("summary", budget=10, max_rebuilds=-1)
    with pytest.raises(ValueError, match="env_context"):
        make_context_policy("rolling")
    assert isinstance(make_context_policy("echo", budget=10), EchoContext)
    words = set(memory_vocabulary())
    assert {"finding", "<", ">", "/", "turn", "summary", "kept", "none"} <= words


# ---------------------------------------------------------------- rollouts
def test_only_contexts_that_keep_the_clue_answer_the_vault(tokenizer):
    """The reader succeeds with the full context; with a window of one turn the clue is gone at the vault; a summary
    that carries it, or a selection that keeps its turn, brings it back."""
    results = {}
    for name, context in (("full", FullContext()), ("window", WindowContext(1)), ("summary", SummaryContext(400)),
                          ("echo", EchoContext(700, recent_turns=1))):
        [episode] = clue_runner(tokenizer, context).run([{"seed": SEED}], [PROMPT], reader_generate(tokenizer))
        results[name] = episode
    assert results["full"].success and len(results["full"].segments()) == 1
    assert not results["window"].success and results["window"].truncated  # never knew the color
    summary = results["summary"]
    assert summary.success and len(summary.memories) >= 1 and not summary.overlong
    assert all(m.text == "the lamp is green" for m in summary.memories if m.turn > 3)
    final_prompt = tokenizer.decode(summary.segments()[-1].prompt_ids)
    assert f"summary of steps 1 to {summary.memories[-1].turn} : the lamp is green" in final_prompt
    assert summary.rewards[-1] == 10.0


def test_an_echo_rollout_with_two_rebuilds(tokenizer):
    [episode] = clue_runner(tokenizer, EchoContext(700, recent_turns=1)).run(
        [{"seed": SEED}], [PROMPT], reader_generate(tokenizer))
    assert episode.success and episode.num_turns == 8  # the entrance, 6 rooms, the vault
    assert [m.turn for m in episode.memories] == [5, 7] and [m.selected for m in episode.memories] == [[3], [3]]
    assert episode.findings[3] == "the lamp is green" and episode.actions[3] == "go forward"
    assert episode.findings[0] == "" and episode.turn_segments == [0, 0, 0, 0, 0, 1, 1, 2]
    assert episode.records()[3] == {"turn": 3, "action": "go forward", "finding": "the lamp is green", "segment": 0}
    segments = episode.segments()
    assert len(segments) == 3
    # memory spans: the selection of rebuild k has span id MEMORY_SPAN_OFFSET + k, at the end of segment k; the
    # request before it is an observation (masked)
    for k, segment in enumerate(segments[:2]):
        spans = sorted(set(segment.span_ids) - {-1})
        assert spans[-1] == MEMORY_SPAN_OFFSET + k
        memory_tokens = [j for j, s in enumerate(segment.span_ids) if s == MEMORY_SPAN_OFFSET + k]
        assert memory_tokens == list(range(len(segment.span_ids) - len(memory_tokens), len(segment.span_ids)))
        assert all(segment.env_mask[j] == 1 for j in memory_tokens)
        request = tokenizer.decode(segment.completion_ids[: memory_tokens[0]])
        assert request.rstrip().endswith("<|im_start|>assistant") and SELECTION_REQUEST in request
    assert sorted(set(segments[2].span_ids) - {-1}) == [7]
    # the final prompt keeps turn 4's record (the clue; 1-based in the text) and shows the last turn in full
    final_prompt = tokenizer.decode(segments[2].prompt_ids)
    assert "turn 4 : action : go forward , finding : the lamp is green" in final_prompt
    assert "go forward <finding>the note" not in final_prompt and NOT_SHOWN in final_prompt


def test_echo_without_selecting_the_clue_fails_and_the_rebuild_cap_ends_the_episode_as_overlong(tokenizer):
    [forgetful] = clue_runner(tokenizer, EchoContext(700, recent_turns=1)).run(
        [{"seed": SEED}], [PROMPT], reader_generate(tokenizer, select=lambda index: False))
    assert not forgetful.success and all(m.selected == [] for m in forgetful.memories)
    [capped] = clue_runner(tokenizer, EchoContext(700, max_rebuilds=1, recent_turns=1)).run(
        [{"seed": SEED}], [PROMPT], reader_generate(tokenizer))
    assert capped.overlong and capped.truncated and capped.done and not capped.success
    assert len(capped.memories) == 1 and capped.num_turns == 7  # the second boundary (after turn 7) ended it


# ---------------------------------------------------------------- the environment
def test_clue_rooms_rules_and_vocabulary():
    env = ClueRooms(num_rooms=3, num_colors=3, filler_words=4)
    observation, info = env.reset(seed=5)
    assert info["task"] == f"find out the color of the {env.item}" and info["admissible_actions"] == ["go forward"]
    assert "you stand at the entrance ." in observation and "note" not in observation  # no clue in the task's turn
    assert env.expert_finding() == f"find out the color of the {env.item}"
    observation, reward, terminated, _, info = env.step("say red")  # not at the vault yet: invalid
    assert info["invalid_action"] and reward == pytest.approx(-0.1) and not terminated
    seen = [observation]
    for _ in range(4):
        seen.append(env.step("go forward")[0])
    assert env.at_vault and "what color is the" in seen[-1] and seen[1].count("the room is") == 1
    assert env.expert_finding() == f"the vault asks for the {env.item}"
    wrong = next(c for c in ("red", "blue", "green") if c != env.answer)
    observation, reward, terminated, _, info = env.step(f"say {wrong}")
    assert terminated and reward == 0.0 and not info["success"] and env.answer in observation
    vocabulary = set(ClueRooms.vocabulary(num_rooms=3))
    for text in seen:
        assert set(split_words(text)) <= vocabulary, set(split_words(text)) - vocabulary
    assert set(memory_vocabulary()) <= vocabulary
    with pytest.raises(ValueError, match="clue_rooms"):
        ClueRooms(num_rooms=3, clue_rooms=4)
    with pytest.raises(ValueError, match="num_colors"):
        ClueRooms(num_colors=1)


def test_clue_rooms_expert_and_clue_placement():
    for seed in range(30):
        env = ClueRooms(num_rooms=8, clue_rooms=4)
        env.reset(seed=seed)
        assert 1 <= env.clue_room <= 4
        turns, done = 0, False
        while not done:
            _, reward, done, _, info = env.step(env.expert_action())
            turns += 1
        assert info["success"] and reward == 10.0 and turns == 10
    plain = ClueRooms(num_rooms=4, clue_rooms=2, distractors=False, list_actions=False)
    observation, _ = plain.reset(seed=3)
    notes = 0
    while not plain.at_vault:
        notes += "note" in observation
        assert plain.room == 0 or plain.expert_finding() in (f"room {plain.room} has no note",
                                                             f"the {plain.item} is {plain.answer}")
        observation = plain.step("go forward")[0]
    assert notes == 1 and plain.room == 5 and "actions" not in observation
    with pytest.raises(ValueError, match="distractors"):
        ClueRooms(distractors="no")
    env = ClueRooms()
    env.reset(seed=0, options={"item": "coin", "seed": 0})  # unknown option keys are ignored
    assert env.item == "coin"
    with pytest.raises(ValueError, match="item"):
        env.reset(seed=0, options={"item": "cup"})  # not among the num_items=4 items
