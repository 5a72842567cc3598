"""The master's live dashboard: a read-only web page served by ``http.server``.

    browser                                  the master process
    -------                                  ------------------
    GET /?token=T  ----------------------->  Dashboard: a ThreadingHTTPServer, one daemon
                                               thread per request (never the event loop)
                                             token first: anything else gets 403, no body
                                             scheduler.status()              } each takes the
                                             scheduler.throughput_series()   } Scheduler's lock
                                               |                               briefly
    <--- HTML: summary, nodes, clients,  <-----+ render_page(): no lock held while rendering
         an inline <svg> chart, failures
         (<meta refresh> reloads the same URL, token included;
          &paused=1 leaves it out, to read a traceback)
    GET /status.json?token=T  ------------>  the same status as JSON, every failure kept

The token is an HMAC-SHA256 of a fixed label keyed with the cluster's key
(``token()``): whoever holds the key can compute it, nobody else can, and
it says nothing about the key.  It travels as ``?token=``; the page's link
and its refresh keep it.  The page runs no script and loads nothing: the
style is inline, the chart is inline SVG, and a Content-Security-Policy
header forbids anything else.  Every text a peer sent (host names, error
messages, tracebacks) is escaped.

``server.Master`` starts one when given a dashboard address and closes it
at shutdown; ``python -m minicw.master --dashboard PORT`` prints its URL.
"""
from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
import math
import socket
import socketserver
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, quote

from minicw import activity, config, launch, tls, transport

log = logging.getLogger(__name__)

PAGE_PATH = "/"
JSON_PATH = "/status.json"
# No script, no frame, nothing fetched: only the page's own inline style.
CONTENT_SECURITY_POLICY = ("default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# --- the token and the URL -------------------------------------------------------------

def token(authkey: str | bytes) -> str:
    """The dashboard's token for a cluster key: hex of HMAC-SHA256(key, label), truncated."""
    digest = hmac.new(transport.as_authkey(authkey), config.DASHBOARD_TOKEN_LABEL, hashlib.sha256).hexdigest()
    return digest[:config.DASHBOARD_TOKEN_CHARS]


def page_url(host: str, port: int, authkey: str | bytes, here: bool = False,
             https: bool = False) -> str:
    """The page's full URL, token included, for a dashboard listening on (host, port).

    One listening on every interface is reached at 127.0.0.1 from its own
    machine (``here``), else at the machine's name.
    """
    host = reachable_host(host, here)
    if ":" in host:
        host = "[%s]" % host
    return "%s://%s:%d%s?token=%s" % ("https" if https else "http", host, port, PAGE_PATH,
                                      token(authkey))


def reachable_host(host: str, here: bool = False) -> str:
    """``host``, or for every interface 127.0.0.1 (``here``) or this machine's name."""
    if host in launch.WILDCARD_HOSTS:
        return "127.0.0.1" if here else socket.gethostname()
    return host


# --- the server ----------------------------------------------------------------------

class Dashboard:
    """The page of the master at ``master_address`` from its ``scheduler``
    (anything with its ``status()`` and ``throughput_series()``); ``start()``
    serves it."""

    def __init__(self, scheduler, authkey: str | bytes, master_address: tuple,
                 tls_settings=None):
        self.scheduler = scheduler
        self._tls = tls_settings      # a tls.Settings with a certificate: served over HTTPS
        self.title = "minicw master on %s:%d" % (reachable_host(master_address[0]),
                                                 master_address[1])
        self._authkey = authkey
        self._token = token(authkey).encode("ascii")
        self._server = None
        self._thread = None

    def start(self, host: str = config.DASHBOARD_HOST, port: int = 0) -> tuple:
        """Listen on (host, port) (port 0: a free one) and serve from a daemon
        thread; the address.  OSError naming the address if it cannot listen."""
        server_class = _Server6 if ":" in host else _Server
        try:
            self._server = server_class((host, port), _Handler)
        except OSError as exc:
            raise OSError(exc.errno, "cannot serve the dashboard on %s:%d: %s"
                          % (host, port, exc.strerror)) from None
        self._server.dashboard = self
        if self._tls is not None:
            # The handshake happens on a request's own thread (its first read),
            # so a slow browser does not hold the accepting thread.
            self._server.socket = tls.server_context(self._tls).wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(config.DASHBOARD_STOP_POLL_S,),
            name="minicw-dashboard", daemon=True)
        self._thread.start()
        log.info("dashboard on %s:%d", *self.address)
        return self.address

    @property
    def address(self) -> tuple:
        return tuple(self._server.server_address[:2])

    @property
    def url(self) -> str:
        """The page's full URL with its token (the machine's name if on every interface)."""
        return page_url(self.address[0], self.address[1], self._authkey,
                        https=self._tls is not None)

    def admits(self, given: str) -> bool:
        return hmac.compare_digest(given.encode("utf-8", "replace"), self._token)

    def close(self) -> None:
        """Stop serving (requests under way finish on their daemon threads)."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
            self._server.server_close()

    # --- what a request reads ---
    def page(self, paused: bool = False) -> str:
        status = self.scheduler.status(failures_shown=config.DASHBOARD_FAILURES_SHOWN)
        series = self.scheduler.throughput_series(config.DASHBOARD_CHART_S,
                                                  config.DASHBOARD_CHART_STEP_S)
        return render_page(status, series, self.title, self._token.decode("ascii"), paused)

    def status_json(self) -> str:
        status = self.scheduler.status(failures_shown=activity.RECENT_FAILURES)
        status = dict(status, nodes=[node._asdict() for node in status["nodes"]])
        status["throughput"] = self.scheduler.throughput_series(
            config.DASHBOARD_CHART_S, config.DASHBOARD_CHART_STEP_S)
        return json.dumps(status, indent=1, default=str)


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True     # a slow browser never holds up the master's exit
    dashboard = None          # the Dashboard it serves, set by Dashboard.start

    def server_bind(self):
        # HTTPServer's own looks up the host's fully qualified name, which can
        # stall for seconds on a machine whose resolver is unreachable.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address):
        # A browser that left mid-answer is not worth a traceback on stderr.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, socket.timeout)):
            log.debug("dashboard request from %s: connection lost", client_address[0])
        elif isinstance(error, ssl.SSLError):   # plain HTTP, or a certificate refused
            log.info("dashboard request from %s refused by TLS: %s", client_address[0],
                     error.reason or error)
        else:
            log.exception("dashboard request from %s failed", client_address[0])


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    """GET only; the token before anything else, so that a request without it
    learns nothing, not even which paths exist."""

    server_version = "minicw-dashboard"
    sys_version = ""
    error_message_format = ""      # errors (400, 404, 501) carry no page either
    error_content_type = "text/plain"
    timeout = config.DASHBOARD_REQUEST_TIMEOUT_S

    def version_string(self):
        return self.server_version   # the Server header: no Python version

    def do_GET(self):
        path, _, query = self.path.partition("?")
        fields = parse_qs(query)
        if not self.server.dashboard.admits(fields.get("token", [""])[0]):
            self._refuse()
        elif path == PAGE_PATH:
            paused = fields.get("paused", ["0"])[0] == "1"
            self._send(self.server.dashboard.page(paused), "text/html; charset=utf-8")
        elif path == JSON_PATH:
            self._send(self.server.dashboard.status_json(), "application/json")
        else:
            self.send_error(404)

    def _refuse(self):
        self.send_response(403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    # Read-only: every other method is refused the same way.
    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = _refuse

    def _send(self, text: str, content_type: str) -> None:
        body = text.encode("utf-8")
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the URL holds the token
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        # The path only: the query holds the token.
        log.debug("dashboard %s %s %s", self.client_address[0],
                  self.path.partition("?")[0], code)

    def log_message(self, format, *args):
        log.debug("dashboard %s: %s", self.client_address[0], format % args)


# --- the page ------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.2em 2em; color: #1d2430; background: #f6f7f9; }
h1 { font-size: 1.35em; margin: 0 0 .2em; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
.muted { color: #667085; }
.cards { display: flex; flex-wrap: wrap; gap: .6em; margin: .8em 0; }
.card { background: #fff; border: 1px solid #d9dde3; border-radius: 6px; padding: .4em .9em; }
.card b { display: block; font-size: 1.35em; }
table { border-collapse: collapse; background: #fff; border: 1px solid #d9dde3; }
th, td { padding: .25em .7em; text-align: left; border-bottom: 1px solid #eceef2; }
th { background: #eef0f4; font-weight: 600; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b42318; }
svg { max-width: 100%; height: auto; background: #fff; border: 1px solid #d9dde3; border-radius: 6px; }
svg text { font: 11px system-ui, sans-serif; fill: #667085; }
svg .bars { fill: #2e90fa; }
svg .grid { stroke: #eceef2; }
details { background: #fff; border: 1px solid #d9dde3; border-radius: 6px;
          padding: .3em .7em; margin: .3em 0; }
summary { cursor: pointer; }
pre { overflow-x: auto; font-size: 12px; background: #f6f7f9; padding: .5em; margin: .4em 0; }
"""


def render_page(status: dict, series: list, title: str, token_text: str,
                paused: bool = False) -> str:
    """The whole page for a ``status`` (Scheduler.status) and a throughput ``series``;
    ``paused``: it does not reload itself (a reload would fold an open traceback)."""
    refresh = ("" if paused else
               "<meta http-equiv=\"refresh\" content=\"%d\">" % config.DASHBOARD_REFRESH_S)
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">", refresh,
        "<link rel=\"icon\" href=\"data:,\">",  # or the browser asks for /favicon.ico
        "<title>%s</title><style>%s</style></head><body>" % (html.escape(title), STYLE),
        "<h1>%s</h1>" % html.escape(title),
        updated_line(quote(token_text), paused),
        summary_cards(status),
        "<h2>Throughput, last %d minutes</h2>" % (config.DASHBOARD_CHART_S // 60),
        throughput_chart(series),
        "<h2>Worker nodes (%d)</h2>" % len(status["nodes"]),
        nodes_table(status["nodes"]),
        "<h2>Clients (%d)</h2>" % len(status["clients"]),
        clients_table(status["clients"]),
        "<h2>Recent failures</h2>",
        failures_list(status["recent_failures"]),
        "</body></html>\n"])


def updated_line(token_text: str, paused: bool) -> str:
    """When the page was made, how to pause or resume its reloading, status.json."""
    if paused:
        state = "paused &middot; <a href=\"%s?token=%s\">resume</a>" % (PAGE_PATH, token_text)
    else:
        state = "every %d s &middot; <a href=\"%s?token=%s&amp;paused=1\">pause</a>" % (
            config.DASHBOARD_REFRESH_S, PAGE_PATH, token_text)
    return ("<div class=\"muted\">updated %s, %s &middot; <a href=\"%s?token=%s\">"
            "status.json</a></div>" % (time.strftime("%H:%M:%S"), state, JSON_PATH, token_text))


def summary_cards(status: dict) -> str:
    nodes = status["nodes"]
    processes = sum(node.nprocs for node in nodes)
    busy = sum(node.busy_processes for node in nodes)
    cards = [("worker nodes", len(nodes)),
             ("processes busy", "%d / %d" % (busy, processes)),
             ("clients", len(status["clients"])),
             ("jobs queued", sum(c["queued"] for c in status["clients"])),
             ("jobs done", status["jobs_done"]),
             ("jobs failed", status["jobs_failed"]),
             ("jobs/s, last minute", status["throughput_1m"]),
             ("up", duration(status["uptime_s"]))]
    return "<div class=\"cards\">%s</div>" % "".join(
        "<div class=\"card\"><b%s>%s</b>%s</div>" % (
            " class=\"bad\"" if label == "jobs failed" and value else "",
            html.escape(str(value)), label)
        for label, value in cards)


def nodes_table(nodes: list) -> str:
    rows = [[node.node_id, node.hostname, node.pid, node.python or "?",
             node.platform or "?", node.start_method or "?",
             "%d / %d" % (node.busy_processes, node.nprocs), node.jobs_done,
             node.jobs_failed, "%.1f s ago" % node.seen_s_ago] for node in nodes]
    return table(["node", "host", "pid", "Python", "platform", "start method",
                  "busy / processes", "jobs done", "failed", "last heard"],
                 rows, "no worker node is connected")


def clients_table(clients: list) -> str:
    rows = [[c["client_id"], c.get("hostname") or "?", c.get("pid") or "?",
             c.get("python") or "?", c["queued"], c["running"], c["done"], c["failed"],
             duration(c["connected_s"])] for c in clients]
    return table(["client", "host", "pid", "Python", "queued", "running", "done", "failed",
                  "connected for"], rows, "no client is connected")


def table(headers: list, rows: list, when_empty: str) -> str:
    """An HTML table of ``rows`` (values, escaped here); numbers align right."""
    head = "".join("<th>%s</th>" % html.escape(h) for h in headers)
    if not rows:
        body = "<tr><td colspan=\"%d\" class=\"muted\">%s</td></tr>" % (len(headers),
                                                                         when_empty)
    else:
        body = "".join("<tr>%s</tr>" % "".join(_cell(value) for value in row) for row in rows)
    return "<table><tr>%s</tr>%s</table>" % (head, body)


def _cell(value) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "<td class=\"n\">%s</td>" % value
    return "<td>%s</td>" % html.escape(str(value))


def failures_list(failures: list) -> str:
    """Newest first; each one's traceback (when the job raised) in a <details>,
    the newest one's open."""
    if not failures:
        return "<p class=\"muted\">none</p>"
    items = []
    for number, failure in enumerate(failures):
        where = "client %s, job %s%s" % (failure["client_id"], failure["job"],
                                         " on %s" % failure["node"] if failure["node"] else "")
        summary = "%s &middot; %s &middot; %s &middot; <b class=\"bad\">%s</b>" % (
            time.strftime("%H:%M:%S", time.localtime(failure["time"])), html.escape(where),
            html.escape(failure["kind"]), html.escape(failure["error"]))
        traceback_text = failure.get("traceback") or ""
        items.append("<details%s><summary>%s</summary>%s</details>" % (
            "" if number else " open", summary, "<pre>%s</pre>" % html.escape(traceback_text) if traceback_text
            else "<p class=\"muted\">no traceback</p>"))
    return "".join(items)


# --- the chart -------------------------------------------------------------------------

CHART_WIDTH, CHART_HEIGHT = 900, 180         # the SVG's own units (it scales to the page)
CHART_LEFT, CHART_BOTTOM, CHART_TOP = 56, 20, 10  # room for the axis labels


def throughput_chart(series: list) -> str:
    """An inline SVG bar chart of ``[(seconds ago, jobs/s)]``, oldest first.

    All bars are one <path> (its ``d`` is empty when nothing finished), under
    three grid lines labelled in jobs per second, and the time axis below.
    """
    plot_width = CHART_WIDTH - CHART_LEFT - 8
    plot_height = CHART_HEIGHT - CHART_BOTTOM - CHART_TOP
    base = CHART_TOP + plot_height
    top = nice_ceiling(max([rate for _, rate in series] or [0]))
    slot = plot_width / max(1, len(series))
    bars = []
    for index, (_, rate) in enumerate(series):
        height = plot_height * rate / top
        if height > 0:
            bars.append("M%.1f %.1fh%.1fv%.1fh%.1fz" % (
                CHART_LEFT + index * slot + 1, base, max(1.0, slot - 2), -height,
                -max(1.0, slot - 2)))
    parts = ["<svg viewBox=\"0 0 %d %d\" width=\"%d\" height=\"%d\" role=\"img\" "
             "aria-label=\"jobs finished per second\" xmlns=\"http://www.w3.org/2000/svg\">"
             % (CHART_WIDTH, CHART_HEIGHT, CHART_WIDTH, CHART_HEIGHT)]
    for fraction in (0.0, 0.5, 1.0):
        y = base - plot_height * fraction
        parts.append("<line class=\"grid\" x1=\"%d\" x2=\"%d\" y1=\"%.1f\" y2=\"%.1f\"/>"
                     "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%s/s</text>"
                     % (CHART_LEFT, CHART_WIDTH - 8, y, y, CHART_LEFT - 6, y + 4,
                        _number(top * fraction)))
    parts.append("<path class=\"bars\" d=\"%s\"/>" % "".join(bars))
    oldest_s = series[0][0] if series else 0
    for fraction, anchor in ((0.0, "start"), (0.5, "middle"), (1.0, "end")):
        label = "now" if fraction == 1.0 else "%s ago" % duration(oldest_s * (1 - fraction))
        parts.append("<text x=\"%.1f\" y=\"%d\" text-anchor=\"%s\">%s</text>" % (
            CHART_LEFT + plot_width * fraction, CHART_HEIGHT - 5, anchor, label))
    parts.append("</svg>")
    return "".join(parts)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten that is at least ``value`` (1 for 0)."""
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _number(value: float) -> str:
    return "%g" % round(value, 3)


def duration(seconds: float) -> str:
    """``seconds`` as people read it: 42 s, 3 min 05 s, 2 h 10 min."""
    seconds = int(seconds)
    if seconds < 60:
        return "%d s" % seconds
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return "%d min %02d s" % (minutes, seconds) if seconds else "%d min" % minutes
    return "%d h %02d min" % divmod(minutes, 60)
