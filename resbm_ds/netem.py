"""A real network between "nodes" on one machine: network namespaces joined by kernel-shaped links.

    python -m resbm_ds.netem check                         # root, iproute2 and tbf available?
    python -m resbm_ds.netem up --nodes 2 --rate 80mbit    # or --rates 80mbit,2mbit,... (one per link)
    python -m resbm_ds.netem down                          # removes every namespace of that --id

Each node is a namespace `resbm-<id>-n<k>` with the address 10.77.0.<k+1>/24 on an interface
named `resbm0`. Two nodes are joined by one veth pair; more nodes by a hub: a namespace
`resbm-<id>-hub` holding a bridge, with one veth pair from each node to it. Every link is shaped
by a `tbf` qdisc on both of its ends, one per direction, so each link has its own rate and is full
duplex (like a real Ethernet link); on a hub, traffic from node i to node j crosses link i (node i's
upload) and then link j (node j's download). This kernel has no `netem` qdisc, so the links add no
delay: use wire.link_latency_ms of the in-process emulator for latency.

`launch()` starts one real launcher per node inside its namespace (`ip netns exec NS torchrun
--nnodes N --node_rank K --master_addr 10.77.0.1 ...`), with GLOO_SOCKET_IFNAME and
RESBM_NET_IFACE set to the node's interface: gloo then talks over the shaped links, and the trainer
records the interface's kernel byte counters per step (metrics.NetCounters).

Teardown always happens: `Cluster` is a context manager, and an `up()` cluster is also torn down at
interpreter exit and on SIGTERM/SIGINT (unless `keep=True`, which the `up` command uses).
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "resbm-"
IFACE = "resbm0"                  # each node's interface, in its own namespace
SUBNET = "10.77.0"
HEADER_BYTES = 14 + 20 + 32       # Ethernet + IPv4 + TCP with the timestamp option (Linux's default)


class NetemError(RuntimeError):
    """A one-line reason why the emulated cluster cannot be built or run here."""


_RATE = re.compile(r"^(\d+(?:\.\d+)?)(bit|kbit|mbit|gbit)$")
_UNIT = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


def rate_bps(rate: str) -> float:
    """'80mbit' -> 80e6 bit/s (tc's units, 1 mbit = 1e6 bit)."""
    m = _RATE.match(rate.strip().lower())
    if not m or float(m.group(1)) <= 0:
        raise NetemError(f"bad rate {rate!r}: expected a positive number with bit, kbit, mbit or gbit "
                         "(e.g. 80mbit, 1.1mbit, 10gbit)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def tbf_args(rate: str) -> list[str]:
    """tbf for one direction. The bucket holds ~4 ms of traffic (at least 4 KiB: a few full-size
    packets), so a link idle between bursts does not let a large burst through at memory speed; the
    queue holds 500 ms, so TCP sees a deep buffer rather than drops."""
    burst = max(4096, int(rate_bps(rate) / 8 * 0.004))
    return ["tbf", "rate", rate, "burst", str(burst), "latency", "500ms"]


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if check and p.returncode != 0:
        msg = (p.stderr or p.stdout).strip().splitlines()
        raise NetemError(f"`{' '.join(cmd)}` failed: {msg[-1] if msg else f'exit {p.returncode}'}")
    return p


def namespaces(cluster_id: str | None = None) -> list[str]:
    """resbm-* namespaces on this machine (of one cluster id, if given)."""
    if shutil.which("ip") is None:
        return []
    out = _run(["ip", "netns", "list"], check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    want = f"{PREFIX}{cluster_id}-" if cluster_id else PREFIX
    return [n for n in names if n.startswith(want)]


def check_support():
    """Raise NetemError (one line) unless this machine can build shaped namespaces: root, iproute2
    and the kernel's tbf qdisc (tried on the loopback of a scratch namespace)."""
    if os.geteuid() != 0:
        raise NetemError("network namespaces need root (run as root, or skip the real-network runs)")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetemError(f"`{tool}` not found: install iproute2 (apt-get install iproute2)")
    ns = f"{PREFIX}check{os.getpid()}-probe"
    _run(["ip", "netns", "add", ns])
    try:
        p = _run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", *tbf_args("1mbit")], check=False)
        if p.returncode != 0:
            raise NetemError(f"the kernel has no tbf qdisc ({p.stderr.strip() or 'tc failed'}): links cannot be shaped")
    finally:
        _run(["ip", "netns", "del", ns], check=False)


@dataclass
class Cluster:
    """N nodes, `rates[i]` for link i (one link for 2 nodes; link k joins node k to the hub otherwise)."""
    nodes: int = 2
    rates: list[str] = field(default_factory=lambda: ["80mbit"])
    cluster_id: str = field(default_factory=lambda: f"p{os.getpid()}")
    keep: bool = False             # leave it up when this process exits (the `up` command)

    def __post_init__(self):
        if self.nodes < 2:
            raise NetemError(f"--nodes {self.nodes}: a cluster needs at least 2 nodes")
        if self.nodes > 250:
            raise NetemError(f"--nodes {self.nodes}: at most 250 nodes fit in {SUBNET}.0/24")
        if not re.fullmatch(r"[a-z0-9]{1,16}", self.cluster_id):
            raise NetemError(f"--id {self.cluster_id!r}: 1-16 lowercase letters or digits")
        links = 1 if self.nodes == 2 else self.nodes
        if len(self.rates) == 1:
            self.rates = self.rates * links
        if len(self.rates) != links:
            raise NetemError(f"{len(self.rates)} rates for {links} links ({self.nodes} nodes: "
                             f"{'one veth pair' if links == 1 else 'one link per node to the hub'})")
        for r in self.rates:
            rate_bps(r)
        self._up = False
        self._old_handlers = {}

    # names
    def ns(self, k: int) -> str:
        return f"{PREFIX}{self.cluster_id}-n{k}"

    @property
    def hub(self) -> str:
        return f"{PREFIX}{self.cluster_id}-hub"

    def address(self, k: int) -> str:
        return f"{SUBNET}.{k + 1}"

    def exec_prefix(self, k: int) -> list[str]:
        return ["ip", "netns", "exec", self.ns(k)]

    # lifecycle
    def up(self) -> "Cluster":
        check_support()
        if namespaces(self.cluster_id):
            raise NetemError(f"namespaces of cluster id {self.cluster_id!r} exist already "
                             f"({', '.join(namespaces(self.cluster_id))}): "
                             f"python -m resbm_ds.netem down --id {self.cluster_id}")
        if not self.keep:
            atexit.register(self.down)
            self._install_signal_handlers()
        self._up = True
        try:
            for k in range(self.nodes):
                _run(["ip", "netns", "add", self.ns(k)])
                _run(["ip", "-n", self.ns(k), "link", "set", "lo", "up"])
            if self.nodes == 2:
                _run(["ip", "link", "add", IFACE, "netns", self.ns(0), "type", "veth",
                      "peer", "name", IFACE, "netns", self.ns(1)])
                for k in range(2):
                    self._shape(self.ns(k), IFACE, self.rates[0])
            else:
                _run(["ip", "netns", "add", self.hub])
                _run(["ip", "-n", self.hub, "link", "add", "br0", "type", "bridge"])
                _run(["ip", "-n", self.hub, "link", "set", "br0", "up"])
                for k in range(self.nodes):
                    port = f"p{k}"
                    _run(["ip", "link", "add", IFACE, "netns", self.ns(k), "type", "veth",
                          "peer", "name", port, "netns", self.hub])
                    _run(["ip", "-n", self.hub, "link", "set", port, "master", "br0"])
                    _run(["ip", "-n", self.hub, "link", "set", port, "up"])
                    self._shape(self.ns(k), IFACE, self.rates[k])     # node k's upload
                    self._shape(self.hub, port, self.rates[k])        # node k's download
            for k in range(self.nodes):
                _run(["ip", "-n", self.ns(k), "addr", "add", f"{self.address(k)}/24", "dev", IFACE])
                _run(["ip", "-n", self.ns(k), "link", "set", IFACE, "up"])
        except BaseException:
            self.down()
            raise
        return self

    @staticmethod
    def _shape(ns: str, dev: str, rate: str):
        _run(["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf_args(rate)])

    def set_rate(self, rate: str, link: int | None = None):
        """Change the rate of one link (or all) in place, on both of its ends."""
        for i in ([link] if link is not None else range(len(self.rates))):
            self.rates[i] = rate
            ends = [(self.ns(0), IFACE), (self.ns(1), IFACE)] if self.nodes == 2 else \
                [(self.ns(i), IFACE), (self.hub, f"p{i}")]
            for ns, dev in ends:
                _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf_args(rate)])

    def down(self):
        """Delete every namespace of this cluster id (deleting a namespace deletes its veth ends)."""
        down(self.cluster_id)
        self._up = False
        self._restore_signal_handlers()

    def __enter__(self) -> "Cluster":
        return self.up()

    def __exit__(self, *exc):
        self.down()

    def _install_signal_handlers(self):
        def handler(signum, frame):
            self.down()
            old = self._old_handlers.get(signum)
            if callable(old):
                old(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old_handlers[s] = signal.signal(s, handler)
            except ValueError:      # not the main thread: atexit and the context manager remain
                pass

    def _restore_signal_handlers(self):
        for s, old in self._old_handlers.items():
            try:
                signal.signal(s, old if old is not None else signal.SIG_DFL)
            except ValueError:
                pass
        self._old_handlers = {}


def payload_bytes(row: dict) -> tuple[int, int]:
    """(sent, received) bytes above TCP of one metrics.jsonl row's kernel counters: the interface's
    bytes less HEADER_BYTES per packet (what is left is gloo's messages, its framing and any
    retransmissions)."""
    return (row["net_tx_bytes"] - HEADER_BYTES * row["net_tx_packets"],
            row["net_rx_bytes"] - HEADER_BYTES * row["net_rx_packets"])


def down(cluster_id: str) -> list[str]:
    """Remove every resbm-<id>-* namespace; -> the names removed."""
    gone = []
    for ns in namespaces(cluster_id):
        _run(["ip", "netns", "del", ns], check=False)
        gone.append(ns)
    return gone


# ---- launching across the nodes -----------------------------------------------------------------

def torchrun_command(cluster: Cluster, k: int, port: int, train_args: list[str], nproc_per_node: int = 1) -> list[str]:
    """One node's launcher, inside its namespace; the master is node 0."""
    return cluster.exec_prefix(k) + [
        sys.executable, "-m", "torch.distributed.run", f"--nnodes={cluster.nodes}", f"--node_rank={k}",
        f"--nproc_per_node={nproc_per_node}", f"--master_addr={cluster.address(0)}", f"--master_port={port}",
        *train_args]


def deepspeed_command(cluster: Cluster, k: int, port: int, train_args: list[str], nproc_per_node: int = 1,
                      hostfile: str = "") -> list[str]:
    """The same with DeepSpeed's launcher: `deepspeed --no_ssh --node_rank K --hostfile H`. Its runner
    needs a hostfile to count the nodes (without one it forces master_addr=127.0.0.1); with --no_ssh
    the host names in it are never contacted."""
    if train_args[:1] == ["-m"]:
        train_args = ["--module", *train_args[1:]]
    return cluster.exec_prefix(k) + [
        shutil.which("deepspeed") or "deepspeed", "--no_ssh", f"--node_rank={k}", f"--hostfile={hostfile}",
        f"--master_addr={cluster.address(0)}", f"--master_port={port}", *train_args]


def write_hostfile(cluster: Cluster, path, nproc_per_node: int = 1) -> str:
    Path(path).write_text("".join(f"node{k} slots={nproc_per_node}\n" for k in range(cluster.nodes)))
    return str(path)


def node_env(env: dict | None = None) -> dict:
    """What every node's launcher needs: gloo on the shaped interface, and the trainer told which
    interface's counters to record."""
    e = dict(os.environ if env is None else env)
    e["GLOO_SOCKET_IFNAME"] = IFACE
    e["RESBM_NET_IFACE"] = IFACE
    return e


def launch(cluster: Cluster, train_args: list[str], logs: list, env: dict | None = None,
           launcher: str = "torchrun", port: int = 29577, timeout_s: float = 1800, cwd=None,
           started=None) -> list[int]:
    """Run one launcher per node (each writes to logs[k], a file object); -> their exit codes.
    If one node fails or time runs out, the others are killed (each in its own process group;
    `started(pid)` learns each group)."""
    e, scratch = node_env(env), None
    if launcher == "torchrun":
        cmds = [torchrun_command(cluster, k, port, train_args) for k in range(cluster.nodes)]
    elif launcher == "deepspeed":
        scratch = tempfile.mkdtemp(prefix="resbm-netem-")
        hostfile = write_hostfile(cluster, Path(scratch) / "hostfile")
        cmds = [deepspeed_command(cluster, k, port, train_args, hostfile=hostfile) for k in range(cluster.nodes)]
    else:
        raise NetemError(f"launcher {launcher!r}: expected torchrun or deepspeed")
    try:
        return run_nodes(cmds, logs, e, timeout_s, cwd, started)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def run_nodes(cmds: list[list[str]], logs: list, env: dict, timeout_s: float, cwd=None, started=None) -> list[int]:
    """Run one command per node (each writes to logs[k]); -> their exit codes. If one fails or time
    runs out, the others are killed (each in its own process group; `started(pid)` learns each)."""
    procs = []
    for k, cmd in enumerate(cmds):
        procs.append(subprocess.Popen(cmd, stdout=logs[k], stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                      start_new_session=True))
        if started:
            started(procs[-1].pid)
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p in procs):
            failed = any(p.returncode not in (None, 0) for p in procs)
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
    return [p.returncode for p in procs]


# ---- CLI ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    from .cli import ArgumentParser, int_at_least   # here: the module itself loads standalone (tests)
    p = ArgumentParser(prog="python -m resbm_ds.netem", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up_p = sub.add_parser("up", help="create the namespaces and shaped links, and leave them up")
    up_p.add_argument("--nodes", type=int_at_least(2), default=2)
    up_p.add_argument("--rate", default="80mbit", help="every link's rate (tc units: 80mbit, 1.1mbit, 10gbit)")
    up_p.add_argument("--rates", help="one rate per link, comma-separated (2 nodes: 1 link; N > 2: N links)")
    for s in (up_p, sub.add_parser("down", help="delete every namespace of the cluster id")):
        s.add_argument("--id", default="cli", help="cluster id (namespace names resbm-<id>-...)")
    sub.add_parser("check", help="say whether this machine can build the cluster (root, iproute2, tbf)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "check":
            check_support()
            print("netem: ok (root, iproute2 and the tbf qdisc are available)")
        elif args.cmd == "down":
            gone = down(args.id)
            print(f"netem: removed {', '.join(gone)}" if gone else f"netem: no namespaces of id {args.id!r}")
        else:
            rates = args.rates.split(",") if args.rates else [args.rate]
            c = Cluster(args.nodes, rates, args.id, keep=True).up()
            for k in range(c.nodes):
                link = 0 if c.nodes == 2 else k
                print(f"{c.ns(k)}  {c.address(k)}/24 dev {IFACE}  link {link}: {c.rates[link]}")
            print(f"run a command on node k: ip netns exec {c.ns(0)} CMD; "
                  f"remove: python -m resbm_ds.netem down --id {c.cluster_id}")
    except NetemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
