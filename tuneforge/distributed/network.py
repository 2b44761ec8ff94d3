"""Addresses in a multi-node elastic run: the lighthouse URL, node names, what replicas advertise.

One run can span several machines: a single torchft lighthouse (started with
``python -m tuneforge.distributed lighthouse``) and one supervisor per machine, each given
``resilience.lighthouse`` and ``resilience.node``. What every replica process exposes to its peers on
other machines, and which name it gives them to reach it, is decided here:

* the replica group's TCPStore (the quorum's rendezvous point for the gloo/NCCL group),
* torchft's manager server (commit votes; recovery metadata),
* torchft's HTTP checkpoint server (a healing peer downloads the live state from it),
* gloo's own sockets (the all-reduce).

torchft 0.2.0 binds the first three on every interface at an ephemeral port and advertises
``socket.gethostname()`` by default; gloo binds to whatever the machine's hostname resolves to. On a
cluster that name often does not resolve on the other nodes, so we advertise ``advertise_host`` (or the
concrete ``bind_host``) instead and bind gloo to ``bind_host`` (see :mod:`.endpoints`).

Pure string handling, no torch: the supervisor, the recipe schema and the lighthouse command use it.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from tuneforge.errors import RecipeError

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", "[::]"})
_HOSTNAME = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def is_wildcard(host: str) -> bool:
    """True for "listen on every interface" addresses, which peers cannot connect to."""
    return host in WILDCARD_HOSTS


def _strip_brackets(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def host_problem(host: object) -> str | None:
    """Why ``host`` is not a bare host name or IP address (no scheme, no port), or None if it is."""
    if not isinstance(host, str) or not host:
        return "a host name or IP address"
    if "://" in host or "/" in host:
        return "a host name or IP address without a scheme or path"
    bare = _strip_brackets(host)
    if ":" in bare:  # only IPv6 literals may contain colons
        try:
            ipaddress.IPv6Address(bare)
        except ValueError:
            return "a host name or IP address without a port"
        return None
    if not _HOSTNAME.match(bare):
        return "a host name or IP address (letters, digits, '.', '-', '_')"
    return None


def format_host(host: str) -> str:
    """Bracket an IPv6 literal for use in ``host:port`` / URLs."""
    bare = _strip_brackets(host)
    return f"[{bare}]" if ":" in bare else bare


def split_host_port(text: str, what: str) -> tuple[str, int]:
    """``"host:port"`` / ``"[v6]:port"`` -> (host, port), with a RecipeError naming ``what`` otherwise."""
    host, sep, port_text = str(text).rpartition(":")
    problem = host_problem(host) if sep else "the ':PORT' part is missing"
    if problem is None and not (port_text.isdigit() and 0 <= int(port_text) <= 65535):
        problem = "a port number 0..65535 after the colon"
    if problem is not None:
        raise RecipeError(f"{what}: got {text!r}, expected HOST:PORT ({problem})")
    return _strip_brackets(host), int(port_text)


def lighthouse_url(text: str, what: str = "resilience.lighthouse") -> str:
    """``"host:port"`` or ``"http://host:port"`` -> ``"http://host:port"`` (what torchft's Manager takes)."""
    raw = str(text).strip()
    rest = raw
    if "://" in raw:
        scheme, _, rest = raw.partition("://")
        if scheme != "http":
            raise RecipeError(
                f"{what}: got {text!r}, expected http://HOST:PORT or HOST:PORT (torchft speaks plain http)"
            )
        rest = rest.rstrip("/")
    host, port = split_host_port(rest, what)
    if port == 0 or is_wildcard(host):
        raise RecipeError(f"{what}: got {text!r}, expected the address peers connect to (a real host and port)")
    return f"http://{format_host(host)}:{port}"


def node_problem(node: object) -> str | None:
    """Why ``node`` cannot name a node (it becomes part of torchft replica ids, which use ':' as separator)."""
    if not isinstance(node, str) or not _NODE.match(node):
        return "a name of letters, digits, '.', '-' or '_' (at most 128, e.g. the host name)"
    return None


def default_node_name() -> str:
    """This machine's host name, made safe for a node name."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()).strip("-.") or "node"
    return name[:128]


def replica_id(node: str | None, slot: int) -> str:
    """The torchft replica id of a slot: unique across the nodes of a run (torchft appends a uuid)."""
    return f"tuneforge_replica_{slot}" if node is None else f"{node}_replica_{slot}"


def advertised_host(bind_host: str, advertise_host: str | None) -> str:
    """The name peers use to reach this replica: explicit, else the concrete bind address, else the host name."""
    if advertise_host:
        return advertise_host
    if not is_wildcard(bind_host):
        return _strip_brackets(bind_host)
    return socket.gethostname()


def wait_for_port(host: str, port: int, timeout_s: float) -> bool:
    """Poll until a TCP connection to ``host:port`` succeeds (True) or ``timeout_s`` passes (False)."""
    import time

    end = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout_s))):
                return True
        except OSError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.2)
