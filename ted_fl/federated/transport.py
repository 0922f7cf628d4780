"""The server's transport over Flower's Grid: which node serves which site (discovery), sending and
receiving with retries, and the books of what travelled (byte counts per kind, the audit log, faults).

Used by composition: the schedule's executor (`ted_fl.federated.server_app.FlowerExecutor`) and the
GKD server send their messages through one `Transport`; what the messages say is theirs.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from ted_fl.config import ExperimentConfig, dump_toml, to_dict
from ted_fl.data import site_order
from ted_fl.errors import TedFlError
from ted_fl.federated import messages as M
from ted_fl.federated.message_log import record_message
from ted_fl.run import processes
from ted_fl.run.directory import RunDir


def short_reason(reason: str) -> str:
    """The client's own message, without Ray's wrapping of remote tracebacks."""
    text = reason.rsplit("Message: ", 1)[-1] if "Message: " in reason else reason
    lines = [ln.strip() for ln in text.strip().strip("'>").splitlines() if ln.strip()]
    return (lines[-1] if lines else text).strip("'>\" ")


def simulated_federation() -> bool:
    """Whether this ServerApp runs inside Flower's simulation (all nodes exist from the start)."""
    return os.path.basename(sys.argv[0]).startswith("flwr-simulation")


PULL_MIN_S = 0.002  # first polls for replies: a round's reply is seen within ~2 ms of its arrival
PULL_MAX_S = 0.1  # never slower than Flower's own send_and_receive (pull_interval 0.1 s)
PULL_SHARE = 0.02  # later polls: every 2% of the time waited so far, so a long wait polls rarely


def send_and_receive(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """`Grid.send_and_receive` with a shorter wait for the replies, on Flower's public Grid API.

    Flower's own sleeps `pull_interval` (0.1 s) between pulls: on average 50 ms lost per exchange,
    i.e. per round. Here the interval grows with the wait, from PULL_MIN_S to PULL_MAX_S (PULL_SHARE
    of the time waited so far), so a reply is seen within max(2 ms, 2% of the round), and the
    number of pulls (an RPC each on a deployed SuperLink) grows with the log of the wait."""
    ids = set(grid.push_messages(messages))
    start = time.monotonic()
    end = start + timeout
    out: list[Message] = []
    while ids:
        got = list(grid.pull_messages(ids))
        out.extend(got)
        ids.difference_update(m.metadata.reply_to_message_id for m in got)
        now = time.monotonic()
        if not ids or now >= end:
            break
        time.sleep(min(end - now, PULL_MAX_S, max(PULL_MIN_S, PULL_SHARE * (now - start))))
    return out


class ClientFailure(TedFlError):
    """A client that raised or did not answer, after the configured retries."""


class Transport:
    """Discovery, retries, fault counting and the audit of one schedule's (or the GKD server's) messages."""

    SETTLE_S = 3.0  # a simulated federation whose node count held this long is complete

    def __init__(self, grid: Grid, cfg: ExperimentConfig, run: RunDir | None = None,
                 simulated: bool | None = None, nodes: list[int] | None = None, discover: bool = True,
                 settle_s: float | None = None) -> None:
        """`nodes`: the SuperNodes this schedule may use (its block of a simulation that runs several
        schedules at once, `node_blocks`); default: every node the federation has. `discover`: say
        hello to the nodes now (learn which site each serves)."""
        self.grid, self.cfg, self.run = grid, cfg, run
        self.only = list(nodes) if nodes is not None else None
        self.simulated = simulated_federation() if simulated is None else simulated
        if settle_s is not None:
            self.SETTLE_S = settle_s
        self.experiment_toml = dump_toml(to_dict(cfg))
        self.bytes_sent = self.bytes_received = 0
        self.bytes_by_kind: dict[str, int] = {}
        self.faults: list[dict[str, Any]] = []  # one entry per failed attempt (see fault_counts)
        self.audit: dict[str, dict[str, Any]] = {}  # what travelled, per site, kind, direction and record
        self.audit_hello: dict[str, dict[str, Any]] = {}
        self.site_of: dict[int, tuple[str, int]] = {}
        self.node_of: dict[tuple[str, int], int] = {}
        if discover:
            self.discover()

    # ------------------------------------------------------------------ nodes
    def wait_for_nodes(self, expected: int, what: str) -> list[int]:
        """The federation's node ids once `expected` have connected (a simulated one: once its count holds)."""
        wait = max(self.cfg.federated.timeout, self.cfg.federated.connect_timeout)
        simulated = self.simulated
        deadline = time.monotonic() + wait
        node_ids: list[int] = []
        seen, stable_since = -1, time.monotonic()

        stop = processes.STOP
        while time.monotonic() < deadline:
            if stop.is_set():
                raise processes.Terminated("stopped")
            node_ids = list(self.grid.get_node_ids()) if self.only is None else list(self.only)
            if len(node_ids) >= expected:
                break
            if len(node_ids) != seen:
                seen, stable_since = len(node_ids), time.monotonic()
            # A simulated federation registers all its nodes at once: no more will come.
            if simulated and node_ids and time.monotonic() - stable_since > self.SETTLE_S:
                break
            time.sleep(0.5)
        if len(node_ids) < expected:
            need = f"this experiment needs {expected} SuperNodes ({what})"
            if simulated:
                raise TedFlError(f"{need}, the federation simulates {len(node_ids)}; run "
                                 f"`flwr run . --stream --federation-config num-supernodes={expected}`")
            raise TedFlError(
                f"{need}; only {len(node_ids)} connected within {wait:.0f} s; start one SuperNode per site and client"
            )
        return node_ids

    def discover(self) -> None:
        order = site_order(self.cfg.data)
        k = self.cfg.federated.clients_per_site
        expected = len(order) * k
        node_ids = self.wait_for_nodes(expected, f"{len(order)} sites x {k} client(s) per site")
        if self.only is None:  # a block's schedule: node_blocks has said it for the whole federation
            self.say(f"federation: {expected} SuperNodes serve {len(order)} sites x {k} client(s)"
                      + (f"; {len(node_ids) - expected} more stay idle" if len(node_ids) > expected else ""))
        content = {n: RecordDict({M.CONFIG: ConfigRecord({"experiment_toml": self.experiment_toml})})
                   for n in node_ids}
        replies = self.exchange(content, "query", "hello", {n: f"node {n}" for n in node_ids})
        hello_sites = {n: str(r.content[M.IDENTITY]["site"]) for n, r in replies.items()}
        for n, r in replies.items():
            record_message(self.audit_hello, hello_sites[n], "hello", "down", content[n])
            record_message(self.audit_hello, hello_sites[n], "hello", "up", r.content)
        self.nodes: dict[str, list[tuple[int, int, int]]] = {s: [] for s in order}
        self.sizes: dict[str, tuple[int, int, int]] = {}
        shape: tuple[int, ...] | None = None
        identity: dict[int, dict[str, Any]] = {n: dict(r.content[M.IDENTITY]) for n, r in replies.items()}
        self.partition_of = {n: int(identity[n].get("partition", -1)) for n in replies}
        for node in replies:
            ident = identity[node]
            site = str(ident["site"])
            if bool(ident.get("idle", False)):  # an idle node of a larger simulated federation
                continue
            if self.only is None and self.partition_of[node] >= expected:  # another block's: idle here
                continue
            if site not in self.nodes:
                raise TedFlError(f"node {node} serves unknown site '{site}'; sites: {', '.join(order)}")
            self.nodes[site].append((node, int(ident["client"]), int(ident["n_train"])))
            shape = tuple(int(x) for x in ident["image_shape"])
        missing = [s for s, v in self.nodes.items() if not v]
        if missing:
            raise TedFlError(f"no client node serves site(s) {', '.join(missing)}")
        for v in self.nodes.values():
            v.sort(key=lambda t: t[1])
        self.sites = order
        self.train_sizes = {s: sum(n for _, _, n in v) for s, v in self.nodes.items()}
        self.image_shape = shape or (1, self.cfg.data.size, self.cfg.data.size)
        self.site_of = {node: (site, client) for site, v in self.nodes.items() for node, client, _ in v}
        self.node_of = {sc: node for node, sc in self.site_of.items()}

    # --------------------------------------------------------------- messages
    def count(self, kind: str, nbytes: int, up: bool) -> None:
        if up:
            self.bytes_received += nbytes
        else:
            self.bytes_sent += nbytes
        key = f"{kind}_{'up' if up else 'down'}"
        self.bytes_by_kind[key] = self.bytes_by_kind.get(key, 0) + nbytes

    def exchange(self, contents: dict[int, RecordDict], category: str, action: str, labels: dict[int, str],
                 where: str = "", on_retry: Callable[[int, RecordDict], None] | None = None) -> dict[int, Message]:
        """Send, wait (never longer than the timeout), retry failures (`on_retry` may amend a message
        before it is sent again); return replies by node."""
        fed = self.cfg.federated
        mtype = category if action == "default" else f"{category}.{action}"
        pending = dict(contents)
        got: dict[int, Message] = {}
        reasons: dict[int, str] = {}
        attempts = 1 + (fed.retries if fed.on_failure == "retry" else 0)
        # The hello also waits for the clients to start (Ray actors, imports, reading the data).
        timeout = max(fed.timeout, fed.connect_timeout) if action == "hello" else fed.timeout
        for attempt in range(attempts):
            msgs = [Message(content, dst_node_id=node, message_type=mtype) for node, content in pending.items()]
            kind = action if action != "default" else category
            for node, content in pending.items():
                self.count(kind, M.record_bytes(content), up=False)
                if node in self.site_of:
                    record_message(self.audit, self.site_of[node][0], kind, "down", content)
            replies = send_and_receive(self.grid, msgs, timeout)
            by_node = {r.metadata.src_node_id: r for r in replies}
            failed: dict[int, RecordDict] = {}
            for node, content in pending.items():
                reply = by_node.get(node)
                if reply is None:
                    reasons[node] = f"no reply within {timeout:g} s"
                    failed[node] = content
                elif reply.has_error():
                    reasons[node] = short_reason(reply.error.reason or "")
                    failed[node] = content
                else:
                    self.count(kind, M.record_bytes(reply.content), up=True)
                    if node in self.site_of:
                        record_message(self.audit, self.site_of[node][0], kind, "up", reply.content)
                    got[node] = reply
            for node in failed:
                retry = attempt + 1 < attempts
                text = (f"{labels[node]} failed {where}({mtype}, attempt {attempt + 1}/{attempts}): {reasons[node]}"
                        + ("; retrying" if retry else ""))
                self.note(text)
                self.faults.append(dict(site=self.site(node), node=node, label=labels[node], where=where.strip(),
                                        type=mtype, attempt=attempt + 1, reason=reasons[node],
                                        outcome="retried" if retry else "unrecovered"))
            pending = failed
            if not pending:
                break
            if on_retry is not None:  # e.g. the stage's teacher again, for a node that restarted
                for node, content in pending.items():
                    on_retry(node, content)
        for node in pending:
            if fed.on_failure == "abort" or (fed.on_failure != "skip" and len(pending) == len(contents)):
                raise ClientFailure(f"{labels[node]} failed {where}({mtype}) after {attempts} attempt(s): "
                                    f"{reasons[node]}; see federated.retries, federated.on_failure")
        return got

    def say(self, text: str) -> None:
        print(text, flush=True)
        if self.run is not None:
            self.run.log(text)

    def note(self, text: str) -> None:
        print(f"warning: {text}", file=sys.stderr)
        if self.run is not None:
            self.run.log(f"warning: {text}")

    def site(self, node: int) -> str:
        return self.site_of[node][0] if node in self.site_of else f"node {node}"

    def label(self, node: int) -> str:
        site, client = self.site_of[node]
        return f"site {site}" + (f" client {client}" if self.cfg.federated.clients_per_site > 1 else "")


def fault_counts(faults: list[dict[str, Any]], sites: list[str]) -> dict[str, int]:
    """summary.csv's fault columns: failed attempts seen, retried, and messages never answered
    (unrecovered), in all and per site (`faults_seen[BMC]`, ...)."""
    out: dict[str, int] = {}
    for scope in [None, *sites]:
        mine = [f for f in faults if scope is None or f.get("site") == scope]
        tag = "" if scope is None else f"[{scope}]"
        out[f"faults_seen{tag}"] = len(mine)
        out[f"faults_retried{tag}"] = sum(f.get("outcome") == "retried" for f in mine)
        out[f"faults_unrecovered{tag}"] = sum(f.get("outcome", "unrecovered") == "unrecovered" for f in mine)
    return out
