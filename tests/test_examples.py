"""Dynamic examples: the k most similar successful calls of a route fill `{{examples}}`, from a real SQLite store,
never an eval, held-out or failed call; the index is refreshed with new calls; examples as conversation turns."""

from app.backends.chat_format import to_turns
from app.capture.store import CaptureStore
from app.hermes import tools_prompt
from app.wire import Message
from prompts.evolve import EXAMPLES_VAR, Example
from prompts.examples import DynamicExamples, ExampleIndex, with_example_turns
from tests.test_evolve import FENCED, SEARCH, hermes, record

TRIANGLE = Example("area of a triangle with base 10 and height 5", "<tool_call>area</tool_call>", "t")
FACTORIAL = Example("factorial of 5", "<tool_call>fact</tool_call>", "f")
ROOTS = Example("roots of the quadratic equation 1, -3, 2", "<tool_call>roots</tool_call>", "r")


def test_nearest_ranks_by_the_words_of_the_request():
    index = ExampleIndex([TRIANGLE, FACTORIAL, ROOTS])
    assert index.nearest("the area of a triangle, base 3, height 4", 2)[0] == TRIANGLE
    assert index.nearest("quadratic roots please", 1) == [ROOTS]
    assert index.nearest("zebra", 2) == [] and index.nearest("", 2) == []  # nothing alike: no examples at all
    assert index.nearest("factorial of 5", 2, exclude="f") == []  # the request's own call is never its example


def test_added_examples_are_found_after_the_next_search_and_an_id_is_held_once():
    index = ExampleIndex([TRIANGLE])
    assert index.nearest("factorial", 1) == []
    assert index.add([FACTORIAL, FACTORIAL, TRIANGLE]) == 1 and len(index) == 2
    assert index.nearest("factorial", 1) == [FACTORIAL]


def test_fill_uses_only_successful_calls_that_may_teach_and_refreshes_with_new_ones(tmp_path):
    with CaptureStore.open(f"sqlite:///{tmp_path / 'c.db'}") as store:
        store.record(record(hermes("search", {"query": "fjords of norway"}), user="fjords in norway", n=1))
        store.record(record(hermes("search", {"query": "EVAL fjords"}), user="fjords eval", source="eval", n=2))
        store.record(record(hermes("search", {"query": "HELD fjords"}), user="fjords held", held_out=True, n=3))
        store.record(record(FENCED, user="fjords fenced", n=4))
        store.record(record(hermes("search", {"query": "OTHER"}), user="fjords other", route="other", n=5))
        dynamic = DynamicExamples(store, k=3)
        text = dynamic.fill("r", "Find things.\n\n" + EXAMPLES_VAR, "which fjords are in norway?")
        assert text.startswith("Find things.\n\nWorked examples:\nUser: fjords in norway\nAnswer: <tool_call>")
        for absent in ("EVAL", "HELD", "fenced", "OTHER", EXAMPLES_VAR):
            assert absent not in text
        store.record(record(hermes("search", {"query": "lakes"}), user="lakes of norway", n=6))
        assert "lakes" not in dynamic.fill("r", EXAMPLES_VAR, "lakes of norway")  # not refreshed yet
        assert dynamic.refresh("r") == 1 and dynamic.refresh("r") == 0
        assert "User: lakes of norway" in dynamic.fill("r", EXAMPLES_VAR, "lakes of norway")


def test_examples_as_turns_go_before_the_first_user_message():
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    turns = with_example_turns(messages, [FACTORIAL])
    assert [m["role"] for m in turns] == ["system", "user", "assistant", "user"]
    assert turns[1]["content"] == FACTORIAL.user and turns[2]["content"] == FACTORIAL.answer and turns[3] == messages[1]


def test_a_system_prompt_that_places_the_tool_list_keeps_it_there_once():
    functions = [SEARCH["function"]]
    placed = f"Intro.\n\n{tools_prompt(functions)}\n\nRules after the list."
    system = to_turns([Message(role="system", content=placed), Message(role="user", content="q")], functions)[0].text
    assert system == placed and system.count("# Tools") == 1
    plain = to_turns([Message(role="system", content="Intro."), Message(role="user", content="q")], functions)[0].text
    assert plain == "Intro.\n\n" + tools_prompt(functions)


def test_the_prompt_node_fills_examples_with_the_calls_most_like_the_runs_query(tmp_path):
    import random

    from prompts.prompt_node import current_templates
    from prompts.store import add_template

    with CaptureStore.open(f"sqlite:///{tmp_path / 'c.db'}") as store:
        add_template(store, "r", "Find things.\n\n{{examples}}", origin="manual", template_id="r/manual@1")
        store.record(record(hermes("search", {"query": "fjords"}), user="fjords in norway", template_id="r/manual@1"))
        store.record(record(hermes("search", {"query": "cats"}), user="cats of egypt", template_id="r/manual@1", n=1))
        chosen = current_templates(store, ["r"], rng=random.Random(0), query="norway fjords",
                                   examples=DynamicExamples(store, k=1))["r"]
        plain = current_templates(store, ["r"], rng=random.Random(0))["r"]
    assert chosen["id"] == "r/manual@1" and "User: fjords in norway" in chosen["text"] and "cats" not in chosen["text"]
    assert plain["text"].strip() == "Find things."  # no store calls asked for: the variable renders empty
