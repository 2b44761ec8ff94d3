"""torchft parts that listen and advertise on the address we choose rather than the machine's host name.

torchft 0.2.0 hard-codes two things that break across machines when the host name does not resolve
on the peers (common in containers): its HTTP checkpoint server advertises ``socket.gethostname()``,
and its gloo process group builds gloo's default device (whatever the host name resolves to). These
two small subclasses change only that: the checkpoint server still listens on every interface, and gloo
binds to ``bind_host`` and tells peers that address through the quorum's store. Imported by replica
processes only (torch is already loaded there).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from torch.distributed import ProcessGroup, Store
from torch.distributed import ProcessGroupGloo as GlooBackend
from torchft.checkpointing.http_transport import HTTPTransport
from torchft.process_group import ProcessGroupGloo

from tuneforge.distributed.network import format_host, is_wildcard


class AdvertisedHTTPTransport(HTTPTransport):  # type: ignore[type-arg]
    """torchft's HTTP checkpoint transport, advertising ``host`` to the peers that heal from us."""

    def __init__(self, host: str, timeout: timedelta) -> None:
        self._advertised = format_host(host)  # set first: the parent logs address() while starting
        self.last_source: str | None = None
        super().__init__(timeout=timeout, num_chunks=0)

    def address(self) -> str:
        port = self._server.socket.getsockname()[1]
        return f"http://{self._advertised}:{port}/checkpoint/"

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout: timedelta) -> object:
        self.last_source = metadata  # the peer we healed from, for the event log
        return super().recv_checkpoint(src_rank, metadata, step, timeout)


class BoundProcessGroupGloo(ProcessGroupGloo):
    """torchft's reconfigurable gloo group with gloo's sockets on ``bind_host``.

    A wildcard ``bind_host`` (or an explicit ``GLOO_SOCKET_IFNAME``) keeps gloo's own choice, because
    gloo advertises the address it binds to and ``0.0.0.0`` is not an address peers can reach.
    """

    def __init__(self, bind_host: str, timeout: timedelta) -> None:
        super().__init__(timeout=timeout)
        self._bind_host = bind_host.strip("[]")

    def _create_pg(self, store: Store, rank: int, world_size: int) -> ProcessGroup:
        if is_wildcard(self._bind_host) or os.environ.get("GLOO_SOCKET_IFNAME"):
            return super()._create_pg(store, rank, world_size)
        options = GlooBackend._Options()
        options._timeout = self._timeout
        options._devices = [GlooBackend.create_device(hostname=self._bind_host)]
        options._threads = 2  # what the timeout-only constructor uses for one device
        if self._global_ranks:
            options.global_ranks_in_group = self._global_ranks
        if self._group_rank and self._group_world_size:  # as torchft does
            options.group_name = f"torchft_quorum_{self._quorum_id}_rank_{self._group_rank % self._group_world_size}"
        backend = GlooBackend(store, rank, world_size, options)
        backend._set_sequence_number_for_group()
        pg = ProcessGroup(store, rank, world_size)
        pg._set_default_backend(ProcessGroup.BackendType.GLOO)
        pg._register_backend(torch.device("cpu"), ProcessGroup.BackendType.GLOO, backend)
        if torch.cuda.is_available():
            pg._register_backend(torch.device("cuda"), ProcessGroup.BackendType.GLOO, backend)
        return pg
