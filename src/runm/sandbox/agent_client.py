"""Typed calls of the guest agent's API over a ttrpc client."""

from __future__ import annotations

import logging
from typing import TypeVar

from runm.proto import agent as api
from runm.proto.codec import Message
from runm.ttrpc import Client

R = TypeVar("R", bound=Message)
log = logging.getLogger("runm.sandbox")


class AgentClient:
    def __init__(self, client: Client) -> None:
        self.client = client

    async def _call(self, method: str, request: Message, response_type: type[R],
                    timeout: float | None = None) -> R:
        return await self.client.call(api.SERVICE, method, request, response_type,
                                      timeout=timeout)

    async def setup(self, time_ns: int, entropy: bytes, hostname: str = "",
                    timeout: float | None = None,
                    report_free_pages: bool = True) -> api.SetupResponse:
        return await self._call("Setup", api.SetupRequest(time_ns, entropy, hostname,
                                                          report_free_pages),
                                api.SetupResponse, timeout)

    async def mount(self, source: str, target: str, fstype: str, options: list[str],
                    wait_ms: int = 0) -> None:
        await self._call("Mount", api.MountRequest(source, target, fstype, options, wait_ms),
                         api.Empty)

    async def setup_network(self, request: api.NetworkRequest) -> None:
        await self._call("SetupNetwork", request, api.Empty)

    async def create_container(self, container_id: str, bundle: str, stdio: api.Stdio,
                               *, no_pivot: bool = False, vm_network: bool = False,
                               pid_alias: tuple[int, int] = (0, 0), start: bool = False) -> int:
        """Create the container (start: and start it, in one runc run); its init's pid."""
        req = api.CreateContainerRequest(container_id, bundle, stdio, no_pivot, vm_network,
                                         *pid_alias, start)
        resp = await self._call("CreateContainer", req, api.CreateContainerResponse)
        for note in resp.notes:
            log.info("adapted the spec of %s for the VM: %s", container_id, note)
        return resp.pid

    async def start_container(self, container_id: str) -> None:
        await self._call("StartContainer", api.ContainerRequest(container_id), api.Empty)

    async def exec_process(self, container_id: str, exec_id: str, process_json: str,
                           stdio: api.Stdio) -> int:
        req = api.ExecProcessRequest(container_id, exec_id, process_json, stdio)
        return (await self._call("ExecProcess", req, api.ProcessResponse)).pid

    async def wait_process(self, container_id: str, exec_id: str = "") -> api.WaitResponse:
        return await self._call("WaitProcess", api.ProcessRequest(container_id, exec_id),
                                api.WaitResponse)

    async def wait_oom(self, container_id: str, seen: int) -> api.OomWaitResponse:
        """Returns once the container has more than `seen` OOM kills, or its init exited."""
        return await self._call("WaitOom", api.OomWaitRequest(container_id, seen),
                                api.OomWaitResponse)

    async def signal_process(self, container_id: str, signal: int, exec_id: str = "",
                             all: bool = False) -> None:
        await self._call("SignalProcess", api.SignalRequest(container_id, exec_id, signal, all),
                         api.Empty)

    async def resize_pty(self, container_id: str, rows: int, cols: int,
                         exec_id: str = "") -> None:
        await self._call("ResizePty", api.ResizeRequest(container_id, exec_id, rows, cols),
                         api.Empty)

    async def delete_container(self, container_id: str, force: bool = False) -> None:
        await self._call("DeleteContainer", api.DeleteRequest(container_id, force), api.Empty)

    async def state(self, container_id: str) -> str:
        resp = await self._call("State", api.ContainerRequest(container_id), api.StateResponse)
        return resp.state_json

    async def pause_container(self, container_id: str) -> None:
        await self._call("PauseContainer", api.ContainerRequest(container_id), api.Empty)

    async def resume_container(self, container_id: str) -> None:
        await self._call("ResumeContainer", api.ContainerRequest(container_id), api.Empty)

    async def list_processes(self, container_id: str) -> list[int]:
        resp = await self._call("ListProcesses", api.ContainerRequest(container_id),
                                api.PsResponse)
        return list(resp.pids)

    async def stats(self, container_id: str) -> str:
        return (await self._call("Stats", api.ContainerRequest(container_id),
                                 api.JsonMessage)).json

    async def update(self, container_id: str, resources_json: str) -> None:
        await self._call("Update", api.JsonMessage(container_id, resources_json), api.Empty)

    async def quiesce(self, for_snapshot: bool = False, timeout: float | None = None) -> None:
        """End this connection on the agent's side (before a snapshot or a hand-over)."""
        await self._call("Quiesce", api.QuiesceRequest(for_snapshot), api.Empty, timeout)

    async def warm_up(self, source: str, bundle: str, wait_ms: int, fstype: str = "",
                      options: tuple[str, ...] | list[str] = (),
                      timeout: float | None = None) -> None:
        """Run the busybox bundle mounted from `source` at `bundle` in the guest (see
        AgentService.warm_up)."""
        await self._call("WarmUp", api.WarmUpRequest(source, bundle, wait_ms, fstype,
                                                     list(options)), api.Empty, timeout)

    async def shutdown(self, timeout: float | None = None) -> None:
        await self._call("Shutdown", api.Empty(), api.Empty, timeout)
