"""Worker hosts of their own for the fault tests: network namespaces joined to this machine by veth pairs.

A test that needs workers on two hosts, one of which it can cut off from the network, runs
them in network namespaces. Each namespace is a "host": its own loopback, one veth link to the
root namespace, and a hostname of its own (the workers run in a UTS namespace too, so that
``Attempt.worker_host`` tells the hosts apart). PostgreSQL and Redis are private servers that
listen on the root side of every link as well as on 127.0.0.1; a host's workers reach them over
their link only, so that taking a link down cuts a host off the way a lost machine is: its
workers keep running, their packets go nowhere, and nothing tells the servers (which drop a lost
host's connections after a few seconds of silence). The test process itself, and what it starts
directly (``tests.faults.driver``, ``manage.py migrate``), stay in the root namespace and use
127.0.0.1. All traffic stays on this machine: a namespace has no route but its link, and the
packets for a host whose link is down are blackholed on the root side.

Usage (as root: CI runs as root; a missing ``ip`` skips the test, a refusal fails it)::

    from .harness import worker_env
    from .netns import hosts_postgres, hosts_redis, worker_hosts

    with (
        worker_hosts(2, log_dir=tmp_path) as (a, b),     # namespaces and links first
        hosts_postgres((a, b)) as postgres,               # then servers that listen on the links
        hosts_redis((a, b), tmp_path) as redis_server,
    ):
        env = worker_env(
            DATABASE_URL=postgres.url("db"), DJANGO_EVENTS_TEST_DATABASE_NAME=None, REDIS_URL=redis_server.url
        )
        postgres.migrated_database("db", env)        # from this (the root) namespace, over 127.0.0.1
        a.start(env)                                  # a rundramatiq in host a (1 process, 4 threads)
        b.start(env, count=2, threads=2)
        ...                                           # send from this namespace (tests.faults.driver)
        a.cut()                                       # host a is lost: its workers run on, unreachable
        assert not a.reaches(postgres.port)
        ...
        a.restore()                                   # back on the network, same processes

The API:

``worker_hosts(count=2, *, log_dir=None)``
    Context manager yielding a tuple of ``count`` :class:`WorkerHost` (named ``a``, ``b``, ...).
    On entry it removes what runs of dead processes left behind; on exit (also when the test
    fails) it kills every worker still running in a host and deletes the namespaces, the links
    and their routes.
``hosts_postgres(hosts, *options)``
    A private :class:`~.harness.PostgresCluster` (``options`` as for it) listening on 127.0.0.1 and
    on every host's gateway, trusting clients from :data:`NETWORK`, and dropping the connections of
    a lost host within seconds (:data:`LOST_CLIENT_SETTINGS`).
``hosts_redis(hosts, directory)``
    A private :class:`~.harness.RedisServer` listening on 127.0.0.1 and on every host's gateway
    (again after a restart).
:class:`WorkerHost`
    ``name``, ``namespace``, ``hostname`` (``worker-host-a``...: what its workers record as
    ``Attempt.worker_host``; ``worker_pid`` is the pid inside the host, the same as outside),
    ``gateway`` (the root side's address: where the host finds PostgreSQL and Redis), ``address``
    (its own), ``workers`` (a :class:`~.harness.Workers`: ``processes``, ``assert_alive()``,
    ``kill_one()``, ``tail()``, ...), and:

    * ``start(env, count=1, threads=4)``: start ``rundramatiq`` processes in the host, each in a
      process group of its own; in ``env``, 127.0.0.1 in ``DATABASE_URL`` and ``REDIS_URL`` becomes
      the gateway (the servers, seen from the host);
    * ``cut()`` / ``restore()``: take the link down / bring it up again and wait until it carries
      packets (``is_cut`` tells which); the workers are the same processes throughout;
    * ``reaches(port)``: whether a TCP connection from the host to ``gateway:port`` opens (1 s);
    * ``kill()``: SIGKILL every worker of the host (a power loss); ``stop()``: SIGTERM them and
      wait (up to 30 s each, then SIGKILL: a cut-off host cannot finish cleanly, ``kill()`` it).

The servers may be restarted (``restart()``, ``crash()``, ``stop()``/``start()``): they listen on
the links and trust the hosts again. Names carry the pid of the test process (namespace
``djev-<pid>-a``, links ``djev<pid>ah``/``djev<pid>an``), and each host of concurrent runs gets
a ``/30`` block of :data:`NETWORK` of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import psycopg
import pytest

from .harness import ROOT, PostgresCluster, RedisServer, Workers, wait_until

#: The addresses of the links: host ``i`` of a run gets the ``/30`` block 10.213.<k>.0 for a free ``k``,
#: its gateway (the root side) ``.1``, its own address ``.2``.
NETWORK = ipaddress.IPv4Network("10.213.0.0/16")

#: Namespaces, links and routes of this module are named with this prefix and the creating pid.
PREFIX = "djev"

#: PostgreSQL settings of :func:`hosts_postgres`, as a server with clients on other hosts should have:
#: it notices a lost client after 4 s of silence (TCP keepalives, not the system's two hours), so
#: that a transaction which a host had open when it was lost does not hold its row locks until then.
LOST_CLIENT_SETTINGS = (
    "tcp_keepalives_idle=1",
    "tcp_keepalives_interval=1",
    "tcp_keepalives_count=3",
    # Keepalives do not probe a connection with unacknowledged data: a host cut off just after the
    # server answered it would keep its transaction (and its row locks) for TCP's retransmission
    # time, minutes. This bounds that too.
    "tcp_user_timeout=4000",
)

#: Serialises the choice of free address blocks between runs that set up hosts at the same time.
_LOCK = Path(tempfile.gettempdir()) / "django-events-netns.lock"

#: The metric of the blackhole route of a host's block: above its link's own route (metric 0).
_BLACKHOLE_METRIC = "4000"

_NAMESPACE = re.compile(rf"^{PREFIX}-(\d+)-([a-z])$")
_LINK = re.compile(rf"^{PREFIX}(\d+)[a-z]h$")


def _ip_program() -> str | None:
    """The path of iproute2's ``ip``: on the PATH, else in the sbin directories a non-root PATH lacks."""
    return shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; fail, with its message, if it fails and ``check``."""
    program = _ip_program()
    assert program, "iproute2's `ip` is missing"
    result = subprocess.run([program, *args], capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode:
        raise AssertionError(
            f"`ip {' '.join(args)}` exited with {result.returncode}: {result.stderr.strip()}\n"
            "The two-host fault tests create network namespaces and veth links: they need root "
            "(CAP_SYS_ADMIN and CAP_NET_ADMIN), as in CI."
        )
    return result


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Hold the lock of every run's hosts: the choice of blocks, and removals, one run at a time."""
    with _LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process still running in ``namespace`` and wait until none is left."""

    def pids() -> list[int]:
        result = _ip("netns", "pids", namespace, check=False)
        return [int(pid) for pid in result.stdout.split()] if result.returncode == 0 else []

    for pid in pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pids(), timeout=20, what=f"no process left in network namespace {namespace}")


def _remove(namespace: str | None, link: str, block: ipaddress.IPv4Network | None) -> None:
    """Delete a host: its processes, its namespace (which takes the veth pair with it), its link and route."""
    if namespace is not None:
        _kill_inside(namespace)
        _ip("netns", "delete", namespace, check=False)
    if _ip("link", "show", "dev", link, check=False).returncode == 0:
        _ip("link", "delete", "dev", link, check=False)
    if block is not None:
        _ip("route", "delete", "blackhole", str(block), "metric", _BLACKHOLE_METRIC, check=False)


def remove_leftovers() -> list[str]:
    """Delete the namespaces, links and blackhole routes of runs whose process is gone; return their names."""
    removed = []
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        found = _NAMESPACE.match(name)
        if found and not _alive(int(found[1])):
            _kill_inside(name)
            _ip("netns", "delete", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        found = _LINK.match(name)
        if found and not _alive(int(found[1])):
            _ip("link", "delete", "dev", name, check=False)
            removed.append(name)
    # A blackhole route of a dead run has no link beside it: one with a live link is in use.
    used = _used_blocks()
    for line in _ip("-4", "route", "show", "type", "blackhole").stdout.splitlines():
        words = line.split()
        if words[:1] == ["blackhole"] and words[2:4] == ["metric", _BLACKHOLE_METRIC]:
            block = ipaddress.IPv4Network(words[1], strict=False)
            if block.subnet_of(NETWORK) and block not in used:
                _ip("route", "delete", "blackhole", str(block), "metric", _BLACKHOLE_METRIC, check=False)
                removed.append(f"blackhole {block}")
    return removed


def _used_blocks() -> set[ipaddress.IPv4Network]:
    """The ``/30`` blocks of :data:`NETWORK` that an interface of the root namespace has an address in."""
    used = set()
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        words = line.split()
        if "inet" in words:
            interface = ipaddress.IPv4Interface(words[words.index("inet") + 1])
            if interface.ip in NETWORK:
                used.add(ipaddress.IPv4Network(f"{interface.ip}/30", strict=False))
    return used


class HostWorkers(Workers):
    """``rundramatiq`` processes started inside a host: ``ip netns exec``, then a hostname of the host's own.

    Each process is still the leader of its own process group: ``ip netns exec``, ``unshare`` and
    ``sh`` each replace themselves with the next program, so the pid that ``Popen`` knows is the
    worker's main process, as for :class:`~.harness.Workers`.
    """

    def __init__(self, host: WorkerHost, env: dict[str, str], log_dir: Path, threads: int = 4) -> None:
        super().__init__(env, log_dir)
        self.host = host
        self.threads = threads

    def command(self) -> list[str]:
        """The command line of one worker: in the host's namespaces, ``manage.py rundramatiq``."""
        command = list(self.COMMAND)
        command[command.index("--threads") + 1] = str(self.threads)
        return [
            *(str(_ip_program()), "netns", "exec", self.host.namespace),
            *("unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', self.host.hostname),
            *(sys.executable, *command),
        ]

    def start(self, count: int = 1) -> None:
        for _ in range(count):
            log = self.log_dir / f"rundramatiq-{self.host.name}-{len(self.logs) + 1}.log"
            self.logs.append(log)
            with log.open("wb") as out:
                self.processes.append(
                    subprocess.Popen(
                        self.command(),
                        cwd=ROOT,
                        env=self.env,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )

    def kill_all(self) -> None:
        """SIGKILL every worker's process group at once, like a power loss, and reap them."""
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()
        self.killed += len(self.processes)
        self.processes = []


class WorkerHost:
    """One worker host: a network namespace joined to the root namespace by a veth pair.

    Made by :func:`worker_hosts`, which also removes it.
    """

    def __init__(self, name: str, block: ipaddress.IPv4Network, log_dir: Path) -> None:
        pid = os.getpid()
        self.name = name
        #: The network namespace (``ip netns``) of the host.
        self.namespace = f"{PREFIX}-{pid}-{name}"
        #: The hostname its workers see (and record in ``Attempt.worker_host``).
        self.hostname = f"worker-host-{name}"
        #: The root side of the veth pair (the link a cut takes down), and the host's side.
        self.link = f"{PREFIX}{pid}{name}h"
        self.peer = f"{PREFIX}{pid}{name}n"
        self.block = block
        hosts = list(block.hosts())
        #: The root side's address: the host reaches the machine's servers there.
        self.gateway = str(hosts[0])
        #: The host's own address.
        self.address = str(hosts[1])
        self.log_dir = log_dir
        self.workers = HostWorkers(self, {}, log_dir)
        self.is_cut = False
        self.created = False

    def __repr__(self) -> str:
        return f"<WorkerHost {self.name} {self.namespace} {self.address}{' cut' if self.is_cut else ''}>"

    def create(self) -> None:
        """The namespace, its loopback up, the veth pair with an address at each end, and the blackhole
        route that keeps the block's packets on this machine while the link is down."""
        prefix = self.block.prefixlen
        _ip("netns", "add", self.namespace)
        self.created = True
        _ip("link", "add", self.link, "type", "veth", "peer", "name", self.peer, "netns", self.namespace)
        _ip("addr", "add", f"{self.gateway}/{prefix}", "dev", self.link)
        _ip("link", "set", self.link, "up")
        _ip("-n", self.namespace, "link", "set", "lo", "up")
        _ip("-n", self.namespace, "addr", "add", f"{self.address}/{prefix}", "dev", self.peer)
        _ip("-n", self.namespace, "link", "set", self.peer, "up")
        # The link's own route (metric 0) wins while it is up; when it is down, this one.
        _ip("route", "add", "blackhole", str(self.block), "metric", _BLACKHOLE_METRIC)

    def remove(self) -> None:
        """Kill the host's workers and delete its namespace, link and route."""
        try:
            self.workers.kill_all()
        finally:
            _remove(self.namespace if self.created else None, self.link, self.block)
            self.created = False

    def local_env(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` as the host's workers need it: 127.0.0.1 in ``DATABASE_URL`` and ``REDIS_URL`` becomes
        the gateway."""
        local = dict(env)
        for key in ("DATABASE_URL", "REDIS_URL"):
            assert key in local, f"{key} is not set: the workers of a host reach their servers over its link"
            local[key] = (
                local[key]
                .replace("@127.0.0.1:", f"@{self.gateway}:")
                .replace("//127.0.0.1:", f"//{self.gateway}:")
            )
        assert local["DATABASE_URL"].startswith("postgres"), "hosts share a PostgreSQL database, not SQLite"
        return local

    def start(self, env: dict[str, str], count: int = 1, threads: int = 4) -> None:
        """Start ``count`` ``rundramatiq`` processes (one worker process of ``threads`` threads each)
        in the host, with ``env`` made local to it (:meth:`local_env`)."""
        self.workers.env = self.local_env(env)
        self.workers.threads = threads
        self.workers.start(count)

    def cut(self) -> None:
        """Cut the host off: take the root side of its link down. Its workers run on, but every
        packet they send is dropped, and the servers' packets to them are blackholed."""
        _ip("link", "set", self.link, "down")
        self.is_cut = True

    def restore(self) -> None:
        """Bring the host's link up again and wait until both ends are up: the same workers carry on."""
        _ip("link", "set", self.link, "up")

        def up() -> bool:
            ends = (
                _ip("-o", "link", "show", "dev", self.link),
                _ip("-n", self.namespace, "-o", "link", "show", "dev", self.peer),
            )
            return all(" state UP " in end.stdout for end in ends)

        # The kernel reports a link's state with a delay (up to a second): until then packets are dropped.
        wait_until(up, timeout=10, what=f"both ends of {self.link} up")
        # An address resolution left unanswered while the link was down would be retried only a
        # second later: start afresh, so that the next packet asks at once.
        _ip("neigh", "flush", "dev", self.link)
        _ip("-n", self.namespace, "neigh", "flush", "dev", self.peer)
        self.is_cut = False

    def reaches(self, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from inside the host to ``gateway:port`` opens within ``timeout`` s."""
        probe = (
            "import socket, sys\n"
            "try:\n"
            f"    socket.create_connection(({self.gateway!r}, {port}), timeout={timeout}).close()\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        result = subprocess.run(
            [str(_ip_program()), "netns", "exec", self.namespace, sys.executable, "-I", "-S", "-c", probe],
            capture_output=True,
            timeout=timeout + 20,
            check=False,
        )
        return result.returncode == 0

    def kill(self) -> None:
        """SIGKILL every worker of the host (main and worker processes at once): a power loss."""
        self.workers.kill_all()

    def stop(self) -> None:
        """SIGTERM every worker of the host and wait for them (SIGKILL after 30 s): a clean shutdown."""
        self.workers.stop()


@contextlib.contextmanager
def worker_hosts(count: int = 2, *, log_dir: Path | None = None) -> Iterator[tuple[WorkerHost, ...]]:
    """``count`` worker hosts (``a``, ``b``, ...), each a network namespace with a veth link to this one.

    Their workers' output goes to ``log_dir`` (default: a temporary directory, removed after).
    On exit every worker still running in a host is killed and the hosts are deleted, whatever
    happened; what runs of dead processes left behind is deleted on entry.
    """
    if _ip_program() is None:
        pytest.skip("the two-host fault tests need iproute2's `ip` (apt-get install iproute2)")
    assert shutil.which("unshare"), "`unshare` (util-linux) is needed to give each host its hostname"
    assert 1 <= count <= 26, count
    own_dir = log_dir is None
    directory = Path(tempfile.mkdtemp(prefix="django-events-hosts-")) if log_dir is None else log_dir
    hosts: list[WorkerHost] = []
    try:
        with _locked():
            remove_leftovers()
            used = _used_blocks()
            free = (block for block in NETWORK.subnets(new_prefix=30) if block not in used)
            for index in range(count):
                host = WorkerHost("abcdefghijklmnopqrstuvwxyz"[index], next(free), directory)
                hosts.append(host)
                host.create()
        yield tuple(hosts)
    finally:
        errors = []
        for host in hosts:
            print(host.workers.tail())  # shown by pytest when the test fails
            try:
                with _locked():  # else another run could take the block before its route is gone
                    host.remove()
            except Exception as exc:  # remove the others all the same
                errors.append(exc)
        if own_dir:
            shutil.rmtree(directory, ignore_errors=True)
        if errors:
            raise errors[0]


def _gateways(hosts: Sequence[WorkerHost]) -> list[str]:
    return [host.gateway for host in hosts]


class HostsPostgres(PostgresCluster):
    """A private PostgreSQL cluster that also listens on the hosts' gateways and trusts their clients."""

    def __init__(self, hosts: Sequence[WorkerHost], *options: str) -> None:
        self.hosts = list(hosts)
        addresses = ",".join(["127.0.0.1", *_gateways(hosts)])
        # The last -c of a setting wins: ``options`` override LOST_CLIENT_SETTINGS, and the addresses
        # the cluster's own 127.0.0.1.
        super().__init__(*LOST_CLIENT_SETTINGS, *options, f"listen_addresses={addresses}")

    def start(self) -> None:
        super().start()
        self.trust_hosts()

    def trust_hosts(self) -> None:
        """Add a ``host all all 10.213.0.0/16 trust`` line to ``pg_hba.conf`` (once) and reload."""
        hba = self.data / "pg_hba.conf"
        line = f"host all all {NETWORK} trust"
        if line not in hba.read_text().splitlines():
            with hba.open("a") as out:
                out.write(f"\n# the worker hosts of tests/faults/netns.py\n{line}\n")
            with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
                assert conn.execute("SELECT pg_reload_conf()").fetchone() == (True,)
        # The postmaster reloads when it gets to its signal: wait until a client from a gateway
        # address (this process, connecting to one) is let in.
        wait_until(self._trusts_hosts, timeout=10, what=f"PostgreSQL trusts clients from {NETWORK}")

    def _trusts_hosts(self) -> bool:
        # A gateway's address is this machine's, whether its link is up or down.
        gateway = self.hosts[0].gateway
        try:
            with psycopg.connect(self.url("postgres").replace("127.0.0.1", gateway), connect_timeout=3):
                return True
        except psycopg.OperationalError:
            return False


class HostsRedis(RedisServer):
    """A private ``redis-server`` that also listens on the hosts' gateways (again after a restart)."""

    def __init__(self, hosts: Sequence[WorkerHost], directory: Path) -> None:
        super().__init__(directory)
        self.addresses = ["127.0.0.1", *_gateways(hosts)]

    def start(self) -> None:
        super().start()
        client = self.client()
        try:
            # Without a password, protected mode would refuse every client but 127.0.0.1's.
            client.config_set("protected-mode", "no")
            client.config_set("bind", " ".join(self.addresses))
        finally:
            client.close()


@contextlib.contextmanager
def hosts_postgres(hosts: Sequence[WorkerHost], *options: str) -> Iterator[PostgresCluster]:
    """A running PostgreSQL cluster of the test's own that the ``hosts`` reach on their gateways, with
    :data:`LOST_CLIENT_SETTINGS` (``options``: more, as for :class:`~.harness.PostgresCluster`);
    removed after it."""
    cluster = HostsPostgres(hosts, *options)
    try:
        cluster.start()
        for host in hosts:
            assert host.reaches(cluster.port), f"{host!r} does not reach PostgreSQL on {host.gateway}"
        yield cluster
    finally:
        cluster.remove()


@contextlib.contextmanager
def hosts_redis(hosts: Sequence[WorkerHost], directory: Path) -> Iterator[RedisServer]:
    """A running ``redis-server`` of the test's own that the ``hosts`` reach on their gateways, stopped
    after it."""
    server = HostsRedis(hosts, directory)
    try:
        server.start()
        for host in hosts:
            assert host.reaches(server.port), f"{host!r} does not reach Redis on {host.gateway}"
        yield server
    finally:
        server.stop()
