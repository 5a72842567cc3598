"""The master's dashboard (minicw/dashboard.py): its token, what a request
without it gets, the page and status.json of a master with a run going, the
page as headless Chromium renders it (a screenshot in the test's tmp dir),
``LocalCluster(dashboard=True)``, and a dashboard port already taken.

The Chromium test is skipped, saying why, where no Chromium is installed
(.ci/run installs Debian's).  With $MINICW_WRITE_SCREENSHOT=PATH it also
copies its screenshot to PATH, after a longer run that gives the chart some
shape: that is how the README's docs/dashboard.png is made::

    MINICW_WRITE_SCREENSHOT=docs/dashboard.png python -m pytest tests/test_dashboard.py -k chromium
"""
import hashlib
import hmac
import json
import math
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from minicw import ClusterExecutor, LocalCluster, config, dashboard, protocol
from tests.helpers import KEY, PY, Proc, env_with_key, start_master, start_worker

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_TIMEOUT_S = 60
ENV_WRITE_SCREENSHOT = "MINICW_WRITE_SCREENSHOT"
SCREENSHOT_RUN_S = 75        # the run before the README's screenshot: a few bars of chart
FAILURE_TEXT = "ValueError: the dashboard test fails job 27 on purpose"
URL_LINE = r"dashboard \(read-only; the URL holds its token\): (http://\S+)"


# --- jobs ----------------------------------------------------------------------------

def square(x):
    return x * x


def nap(seconds):
    time.sleep(seconds)
    return seconds


def fail_on_purpose(x):
    raise ValueError("the dashboard test fails job %d on purpose" % x)


# --- helpers -------------------------------------------------------------------------

def fetch(url):
    """(HTTP status, body bytes) of a GET of ``url``."""
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def without_token(url):
    return url.split("?", 1)[0]


def chromium_binary():
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def run_chromium(binary, profile_dir, *arguments):
    """Headless Chromium with a throwaway profile; its stdout (text)."""
    done = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-breakpad", "--hide-scrollbars", "--user-data-dir=%s" % profile_dir]
        + list(arguments),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        universal_newlines=True, timeout=CHROMIUM_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def run_some_jobs(executor, seconds):
    """Jobs that finish, for the chart: waves of 200 jobs for ``seconds`` (one
    wave if 0), each wave's jobs shorter or longer, so that the rate varies."""
    deadline = time.monotonic() + seconds
    wave = 0
    while True:
        job_s = 0.004 + 0.006 * (1 + math.sin(wave / 4.0))
        assert list(executor.map(nap, [job_s] * 200)) == [job_s] * 200
        wave += 1
        if time.monotonic() >= deadline:
            return


@pytest.fixture
def run_going():
    """A master with its dashboard (the CLI, --dashboard 0), a worker node of 2
    processes, and a client that has run jobs, one of which raised on purpose,
    and still has jobs queued: yields (dashboard URL, master port)."""
    master, port = start_master(extra_args=["--dashboard", "0"])
    worker = executor = None
    try:
        url = master.wait_for(URL_LINE).group(1)
        worker = start_worker(port, nprocs=2)
        executor = ClusterExecutor("127.0.0.1", port, KEY)
        assert list(executor.map(square, range(300))) == [x * x for x in range(300)]
        run_some_jobs(executor, SCREENSHOT_RUN_S if os.environ.get(ENV_WRITE_SCREENSHOT) else 0)
        with pytest.raises(ValueError, match="on purpose"):
            executor.submit(fail_on_purpose, 27).result(timeout=30)
        for _ in range(40):                  # still going while the page is looked at
            executor.submit(nap, 0.25)
        yield url, port
    finally:
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        if worker is not None:
            worker.stop()
        master.stop()


# --- the token ------------------------------------------------------------------------

def test_the_token_is_an_hmac_of_the_key_and_the_url_holds_it():
    expected = hmac.new(KEY.encode(), config.DASHBOARD_TOKEN_LABEL,
                        hashlib.sha256).hexdigest()[:config.DASHBOARD_TOKEN_CHARS]
    assert dashboard.token(KEY) == dashboard.token(KEY.encode()) == expected
    assert dashboard.token("another key") != expected
    assert dashboard.page_url("127.0.0.1", 8899, KEY) == \
        "http://127.0.0.1:8899/?token=%s" % expected
    assert dashboard.page_url("0.0.0.0", 8899, KEY, here=True).startswith("http://127.0.0.1:")
    assert dashboard.page_url("0.0.0.0", 8899, KEY).startswith(
        "http://%s:8899/" % socket.gethostname())
    assert dashboard.page_url("::1", 8899, KEY).startswith("http://[::1]:8899/")


# --- the page, rendered from a made-up status ------------------------------------------

def hostile_status():
    node = protocol.NodeRecord(
        hostname="<script>alert(1)</script>", nprocs=4, pid=42, busy=True, node_id="n-1",
        python="CPython 3.11", platform="Linux", start_method="spawn", jobs_done=10,
        busy_processes=3, jobs_failed=1, seen_s_ago=0.4)
    return {
        "nodes": [node],
        "clients": [{"client_id": 1, "hostname": "<b>host</b>", "pid": 7, "python": "3.8",
                     "queued": 5, "running": 3, "done": 10, "failed": 1,
                     "connected_s": 125.0}],
        "queued_chunks": 1, "leased_chunks": 1, "blobs": 2, "uptime_s": 3700.0,
        "jobs_done": 10, "jobs_failed": 1, "throughput_1m": 0.2,
        "recent_failures": [{"time": time.time(), "client_id": 1, "node": "<i>n</i>",
                             "job": "3/0", "kind": "raised",
                             "error": "ValueError: <img src=x onerror=alert(1)>",
                             "traceback": "Traceback ...\n  <tag> & more\nValueError"}]}


def test_the_page_escapes_what_peers_sent_and_draws_the_chart():
    series = [(600 - 10 * i, 0.0) for i in range(59)] + [(10, 12.5)]
    page = dashboard.render_page(hostile_status(), series, "minicw master on h:1", "abc")
    assert "<script" not in page and "<img" not in page and "<b>host" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;tag&gt; &amp; more" in page            # the traceback, in a <pre>
    assert '<meta http-equiv="refresh" content="%d">' % config.DASHBOARD_REFRESH_S in page
    assert 'href="/status.json?token=abc"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    bars = re.search(r'<path class="bars" d="([^"]*)"', page).group(1)
    assert bars.count("M") == 1                         # one bar: the last ten seconds
    assert ">20/s<" in page                             # 12.5 jobs/s: the scale tops at 20
    assert "1 h 01 min" in page and "2 min 05 s" in page
    assert "<details open>" in page                     # the newest failure's traceback
    assert 'href="/?token=abc&amp;paused=1">pause<' in page


def test_a_paused_page_does_not_reload_itself():
    page = dashboard.render_page(hostile_status(), [], "t", "abc", paused=True)
    assert "http-equiv" not in page and 'href="/?token=abc">resume<' in page


def test_the_chart_of_an_idle_master_has_no_bars():
    chart = dashboard.throughput_chart([(600 - 10 * i, 0.0) for i in range(60)])
    assert '<path class="bars" d=""/>' in chart and "10 min ago" in chart


def test_nice_ceiling():
    assert [dashboard.nice_ceiling(v) for v in (0, 0.3, 1, 1.2, 3, 7, 12.5, 4100)] == \
        [1, 0.5, 1, 2, 5, 10, 20, 5000]


# --- a master with a run going ----------------------------------------------------------

def test_requests_without_the_token_get_403_and_nothing_else(run_going):
    url, _ = run_going
    page = without_token(url)
    base = page.rstrip("/")
    for refused in (page, page + "?token=", page + "?token=" + "0" * 32,
                    page + "?token=" + dashboard.token("another key"),
                    base + "/status.json", base + "/no-such-page", base + "/favicon.ico"):
        assert fetch(refused) == (403, b""), refused
    status, body = fetch(base + "/no-such-page?" + url.split("?", 1)[1])
    assert status == 404 and body == b""


def test_the_page_shows_nodes_clients_chart_and_the_failure(run_going):
    url, port = run_going
    assert url.endswith("?token=" + dashboard.token(KEY))   # whoever has the key knows it
    status, body = fetch(url)
    assert status == 200
    page = body.decode("utf-8")
    assert "minicw master on 127.0.0.1:%d" % port in page
    assert "Worker nodes (1)" in page and "Clients (1)" in page
    assert FAILURE_TEXT in page and "fail_on_purpose" in page   # the error, its traceback
    assert re.search(r'<path class="bars" d="M[^"]+"', page)
    status, body = fetch(url + "&paused=1")
    assert status == 200 and b"http-equiv" not in body and b"Worker nodes (1)" in body
    status, body = fetch(url.replace("/?", "/status.json?"))
    assert status == 200
    record = json.loads(body)
    assert len(record["nodes"]) == 1 and record["nodes"][0]["nprocs"] == 2
    assert record["jobs_done"] >= 300 and record["jobs_failed"] == 1
    assert any(f["error"] == FAILURE_TEXT for f in record["recent_failures"])


def test_chromium_renders_the_page(request, tmp_path):
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium (%s) on PATH: .ci/run installs Debian's chromium"
                    % ", ".join(CHROMIUM_NAMES))
    url, _ = request.getfixturevalue("run_going")   # only once there is a browser
    dom = run_chromium(binary, tmp_path / "profile", "--dump-dom", url)
    assert re.search(r'<div class="card"><b>1</b>worker nodes</div>', dom), dom[:3000]
    assert "Worker nodes (1)" in dom
    assert FAILURE_TEXT in dom
    assert re.search(r'<svg[^>]*>.*<path class="bars" d="M[^"]+"', dom, re.S)
    screenshot = tmp_path / "dashboard.png"
    run_chromium(binary, tmp_path / "profile", "--screenshot=%s" % screenshot,
                 "--window-size=1200,900", url)
    with open(str(screenshot), "rb") as handle:
        png = handle.read()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10000
    if os.environ.get(ENV_WRITE_SCREENSHOT):
        shutil.copyfile(str(screenshot), os.environ[ENV_WRITE_SCREENSHOT])


# --- LocalCluster, and a port already taken ----------------------------------------------

def test_local_cluster_with_a_dashboard_gives_its_url():
    with LocalCluster(n_workers=1, dashboard=True) as cluster:
        url = cluster.dashboard_url
        assert url.startswith("http://127.0.0.1:")
        assert url.endswith("?token=" + dashboard.token(cluster.authkey))
        executor = cluster.executor()
        assert executor.submit(square, 7).result(timeout=60) == 49
        status, body = fetch(url)
        assert status == 200 and b"Worker nodes (1)" in body
        assert fetch(without_token(url))[0] == 403
        executor.shutdown()
    assert cluster.dashboard_url is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)


def test_a_local_cluster_without_one_has_no_url():
    assert LocalCluster(n_workers=1).dashboard_url is None


def test_a_dashboard_port_in_use_stops_the_master_with_a_message():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        master = Proc([PY, "-m", "minicw.master", "--host", "127.0.0.1", "--port", "0",
                       "--dashboard", str(port)], env=env_with_key())
        assert master.wait(30) == 2
        master.wait_for(r"cannot serve the dashboard on 127\.0\.0\.1:%d" % port,
                        stream="err")
