"""Waiting for a guest agent (sandbox.wait_agent): the probe, asking a silent restored guest
once more, and the errors. The VM and agent are stand-ins: this is the waiting logic only;
tests/e2e boot and restore real guests through it."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from runm.errors import RunmError
from runm.proto import agent as api
from runm.sandbox.sandbox import wait_agent


class SilentVM:
    class config:
        name = "vm1"

    def __init__(self) -> None:
        self.exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait_exit(self) -> int:
        return await asyncio.shield(self.exit)

    def console_tail(self, lines: int = 20) -> str:
        return "last console line"


class Agent:
    """Answers the probes numbered in `answers` (0: the first), never the others."""

    def __init__(self, answers: set[int]) -> None:
        self.answers = answers
        self.calls: list[tuple[int, bytes]] = []

    async def setup(self, time_ns: int, entropy: bytes, timeout: float | None = None,
                    report_free_pages: bool = True) -> Any:
        index = len(self.calls)
        self.calls.append((time_ns, entropy))
        if time_ns == 0 and index not in self.answers:
            await asyncio.Event().wait()  # a request the guest never saw
        return api.SetupResponse(kernel_release="6.1.0-test", agent_pid=1)


def run(agent: Agent, timeout: float, ask_again_after: float = 0.0) -> str:
    async def body() -> str:
        return await wait_agent(SilentVM(), agent, timeout,  # type: ignore[arg-type]
                                ask_again_after=ask_again_after)
    return asyncio.run(body())


def test_a_guest_that_answers_gets_the_clock_and_entropy_once() -> None:
    agent = Agent({0})
    assert run(agent, 5, ask_again_after=2) == "6.1.0-test"
    assert [t == 0 for t, _ in agent.calls] == [True, False]  # the probe, then Setup
    assert len(agent.calls[1][1]) == 64


def test_a_restored_guest_that_missed_the_probe_is_asked_again(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    agent = Agent({1})  # only the second probe gets through
    assert run(agent, 5, ask_again_after=0.05) == "6.1.0-test"
    assert [t == 0 for t, _ in agent.calls] == [True, True, False]
    (note,) = [r for r in caplog.records if "asking again" in r.getMessage()]
    # logged, but below what `runm run` prints on its stderr (the container's stderr too)
    assert "has not answered after" in note.getMessage() and note.levelno == logging.INFO


def test_a_silent_guest_is_asked_again_only_once_then_reported() -> None:
    agent = Agent(set())
    with pytest.raises(RunmError, match="guest agent did not answer within 0s") as err:
        run(agent, 0.3, ask_again_after=0.05)
    assert len(agent.calls) == 2
    assert "last console line" in err.value.message


def test_a_booting_guest_is_not_asked_again() -> None:
    agent = Agent(set())
    with pytest.raises(RunmError, match="did not answer"):
        run(agent, 0.2)
    assert len(agent.calls) == 1


def test_a_vm_that_exits_while_waited_for_is_reported() -> None:
    async def body() -> None:
        vm = SilentVM()
        vm.exit.set_result(1)
        await wait_agent(vm, Agent(set()), 5)  # type: ignore[arg-type]
    with pytest.raises(RunmError, match="booting VM: VM exited with 1"):
        asyncio.run(body())
