"""``python -m minicw status``: what a cluster is doing, as text or JSON.

    python -m minicw status [HOST:PORT] [--json] [--watch S]
        |  address: HOST:PORT > $MINICW_MASTER > a launcher's record > SLURM > default
        |  key: --authkey-file > $MINICW_AUTHKEY > the run directory's key file
        v
    fetch(): one connection, the client role's status() call (no session: the
             command is not a client of the master and appears in no list)
        v
    document(): the JSON document        render(): the text tables

The JSON document (``--json``), one object:

    master          "host:port"
    uptime_s        seconds since the master started
    throughput_1m   jobs finished per second over the last minute
    jobs_done       jobs that gave a result since the master started
    jobs_failed     jobs that raised, crashed, timed out or were killed
    queued_chunks, leased_chunks, blobs     the master's queues and blob store
    nodes           one object per worker node: node_id, hostname, pid, python,
                    platform, start_method, processes, busy_processes, jobs_done,
                    jobs_failed, seen_s_ago (since its last heartbeat)
    clients         one object per client session: client_id, hostname, pid, python,
                    queued, running, done, failed, connected_s
    recent_failures the newest first: time (Unix), client_id, node, job
                    ("chunk/index"), kind (raised, crashed, timed out, killed,
                    no Python), error (one line), traceback
"""
from __future__ import annotations

import json
import time

from minicw import transport


def fetch(address: tuple, authkey: bytes) -> dict:
    """The master's status() at ``address`` (the connection is closed after)."""
    api = transport.connect_master(address, authkey).client()
    try:
        return api.status()
    finally:
        connection = getattr(api._tls, "connection", None)
        if connection is not None:
            connection.close()


def document(status: dict, address: tuple) -> dict:
    """The JSON document of the module docstring."""
    return {
        "master": transport.format_address(address),
        "uptime_s": status.get("uptime_s"),
        "throughput_1m": status.get("throughput_1m"),
        "jobs_done": status.get("jobs_done"),
        "jobs_failed": status.get("jobs_failed"),
        "queued_chunks": status.get("queued_chunks"),
        "leased_chunks": status.get("leased_chunks"),
        "blobs": status.get("blobs"),
        "nodes": [{
            "node_id": node.node_id, "hostname": node.hostname, "pid": node.pid,
            "python": node.python, "platform": node.platform,
            "start_method": node.start_method, "processes": node.nprocs,
            "busy_processes": node.busy_processes, "jobs_done": node.jobs_done,
            "jobs_failed": node.jobs_failed, "seen_s_ago": node.seen_s_ago,
        } for node in status["nodes"]],
        "clients": [dict(client) for client in status["clients"]],
        "recent_failures": list(status.get("recent_failures", [])),
    }


def render(doc: dict, failures_shown: int = 5) -> str:
    """The text the command prints."""
    nodes, clients = doc["nodes"], doc["clients"]
    processes = sum(node["processes"] for node in nodes)
    busy = sum(node["busy_processes"] for node in nodes)
    lines = [
        "minicw master %s, up %s: %d worker node%s (%d processes, %d busy), %d client%s"
        % (doc["master"], duration(doc["uptime_s"]), len(nodes), _s(len(nodes)), processes,
           busy, len(clients), _s(len(clients))),
        "throughput %s jobs/s over the last minute; %s done and %s failed since the start"
        % (number(doc["throughput_1m"]), number(doc["jobs_done"]), number(doc["jobs_failed"])),
    ]
    if nodes:
        lines.append("")
        lines += table(["NODE", "HOST", "PYTHON", "PLATFORM", "PROCS", "BUSY", "DONE",
                        "FAILED", "HEARD"],
                       [[node["node_id"], "%s pid %s" % (node["hostname"], node["pid"]),
                         node["python"] or "?", node["platform"] or "?",
                         node["processes"], node["busy_processes"], number(node["jobs_done"]),
                         number(node["jobs_failed"]), "%.1fs ago" % node["seen_s_ago"]]
                        for node in nodes])
    else:
        lines += ["", "no worker node is connected"]
    if clients:
        lines.append("")
        lines += table(["CLIENT", "HOST", "PYTHON", "QUEUED", "RUNNING", "DONE", "FAILED",
                        "CONNECTED"],
                       [[client["client_id"], "%s pid %s" % (client["hostname"], client["pid"]),
                         client["python"] or "?", number(client["queued"]),
                         number(client["running"]), number(client["done"]),
                         number(client["failed"]), duration(client["connected_s"])]
                        for client in clients])
    failures = doc["recent_failures"][:failures_shown]
    if failures:
        lines += ["", "recent failures (newest first):"]
        now = time.time()
        for failure in failures:
            lines.append("  %s ago  client %s  job %s  %s on %s: %s" % (
                duration(now - failure["time"]), failure["client_id"], failure["job"],
                failure["kind"], failure["node"] or "-", failure["error"]))
    return "\n".join(lines)


def table(header: list, rows: list) -> list:
    """Left-aligned columns, two spaces apart."""
    cells = [[str(cell) for cell in row] for row in [header] + rows]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in cells]


def number(value) -> str:
    if value is None:
        return "?"
    if isinstance(value, float) and not value.is_integer():
        return "{:,.1f}".format(value)
    return "{:,}".format(int(value))


def duration(seconds) -> str:
    """"3.2s", "4m 05s", "2h 07m"."""
    if seconds is None:
        return "?"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return "%.1fs" % seconds
    minutes, seconds = divmod(int(seconds), 60)
    if minutes < 60:
        return "%dm %02ds" % (minutes, seconds)
    hours, minutes = divmod(minutes, 60)
    return "%dh %02dm" % (hours, minutes)


def _s(count: int) -> str:
    return "" if count == 1 else "s"


def dumps(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)
