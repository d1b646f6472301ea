"""Calls of earlier examples go first: the priority semaphore and what it buys the evaluation's
early stop on a multi-node chain."""
from __future__ import annotations

import asyncio

import pytest

from autodiff_cli.data.loaders import Example
from autodiff_cli.engine.evaluate import evaluate
from autodiff_cli.llm.client import ModelClient
from autodiff_cli.llm.fake import reset_fake_state
from autodiff_cli.llm.priority import PrioritySemaphore, call_priority
from autodiff_cli.llm.usage import Usage
from autodiff_cli.nodes.compiler import compile_spec
from autodiff_cli.spec.loader import load_spec
from autodiff_cli.spec.prompts_file import initial_values
from tests.conftest import write


def run(coro):
    return asyncio.run(coro)


async def served_order(sem: PrioritySemaphore, priorities: list[int], cancel: set[int] = frozenset()) -> list[int]:
    """Hold the only slot, queue one waiter per priority (in list order), then let them through."""
    order: list[int] = []
    await sem.acquire()

    async def waiter(i: int, p: int) -> None:
        call_priority.set(p)
        async with sem:
            order.append(i)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(waiter(i, p)) for i, p in enumerate(priorities)]
    await asyncio.sleep(0)  # every waiter is queued
    for i in cancel:
        tasks[i].cancel()
    sem.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    return order


def test_waiters_are_served_by_priority_then_arrival():
    assert run(served_order(PrioritySemaphore(1), [5, 1, 3, 1, 0])) == [4, 1, 3, 2, 0]


def test_a_cancelled_waiter_is_skipped_and_no_slot_is_lost():
    async def scenario():
        sem = PrioritySemaphore(1)
        order = await served_order(sem, [2, 1, 3], cancel={1})
        await asyncio.wait_for(sem.acquire(), 1)  # the slot came back
        return order

    assert run(scenario()) == [0, 2]


def test_a_slot_handed_to_a_task_cancelled_before_it_runs_is_passed_on():
    async def scenario():
        sem = PrioritySemaphore(1)
        await sem.acquire()
        first = asyncio.create_task(sem.acquire())
        second = asyncio.create_task(sem.acquire())
        await asyncio.sleep(0)
        sem.release()  # hands the slot to `first`...
        first.cancel()  # ...which is cancelled before it resumes
        await asyncio.gather(first, return_exceptions=True)
        await asyncio.wait_for(second, 1)  # so `second` gets it
        return first.cancelled()

    assert run(scenario())


def test_slots_are_never_exceeded():
    async def scenario():
        sem, busy, most = PrioritySemaphore(3), 0, 0

        async def job(p: int) -> None:
            nonlocal busy, most
            call_priority.set(p)
            async with sem:
                busy += 1
                most = max(most, busy)
                await asyncio.sleep(0.001)
                busy -= 1

        await asyncio.gather(*(job(p % 7) for p in range(60)))
        return most

    assert run(scenario()) == 3


CHAIN = """
name: chain
models:
  task: {model: fake/script.yaml, concurrency: 2}
data: {val: val.jsonl}
nodes:
  listing: {kind: llm, user: "List: {{ input.question }}"}
  tally: {kind: llm, user: "Tally: {{ listing }}"}
  answer: {kind: llm, user: "Answer: {{ tally }}"}
output: answer
metric: {fn: exact_match, args: {pred: answer, target: input.answer}}
"""


@pytest.fixture(autouse=True)
def fresh_fake():
    reset_fake_state()


def wrong_chain(tmp_path, latency: float):
    """The chain, a fake model whose every answer is wrong (after `latency` s), and 12 examples."""
    write(tmp_path / "script.yaml", f"default: wrong\nlatency: {latency}\n")
    write(tmp_path / "val.jsonl", "")
    loaded = load_spec(write(tmp_path / "spec.yaml", CHAIN))
    program = compile_spec(loaded)
    client = ModelClient(loaded.spec.models, config_dir=tmp_path, usage=Usage(), cache=None, base_delay=0)
    examples = [Example(f"e{i}", {"question": f"q{i}", "answer": "right"}) for i in range(12)]
    return loaded, program, client, examples


def test_early_stop_on_a_chain_comes_after_about_half_the_calls(tmp_path):
    # every answer is wrong; with the bar at 0.5 the evaluation is hopeless once 6 of 12 examples
    # are scored. Earlier examples' calls go first, so those 6 finish after about 6 x 3 calls
    # (FIFO would send all 12 `listing` and 12 `tally` calls before the 6th `answer`: 30 calls).
    loaded, program, client, examples = wrong_chain(tmp_path, latency=0.01)
    report = run(evaluate(program, examples, initial_values(loaded.spec), client, stop_unless_above=0.5))
    assert report.stopped_early
    calls = client.usage.role("task")["calls"]
    assert calls <= 6 * 3 + 2, calls  # the 6 scored examples plus what was in flight
    assert sorted(r.id for r in report.results)[:6] == [f"e{i}" for i in range(6)]


def test_cancelling_an_early_stopping_evaluation_leaves_no_unread_errors(tmp_path):
    # Ctrl-C during a validation that may stop early: every future it made is collected, so
    # asyncio has no "exception was never retrieved" traceback to print when the run exits
    import gc

    loaded, program, client, examples = wrong_chain(tmp_path, latency=0.2)

    async def scenario() -> list[str]:
        unread: list[str] = []
        asyncio.get_running_loop().set_exception_handler(lambda _loop, context: unread.append(context["message"]))
        task = asyncio.create_task(evaluate(program, examples, initial_values(loaded.spec), client,
                                            stop_unless_above=0.5))
        await asyncio.sleep(0.1)  # calls in flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task
        gc.collect()  # an unread future reports itself when it is collected
        await asyncio.sleep(0)
        return unread

    assert run(scenario()) == []
