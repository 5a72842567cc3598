"""TLS on every connection (issue 29), with certificates made at test time by the
``openssl`` command: a full run over TLS, fingerprint pinning right and wrong,
CA verification right and wrong, client certificates, plain and TLS peers that
meet each other, the bytes on the wire, the dashboard over HTTPS, and the
``tls-selfsigned`` command.
"""
import os
import re
import shutil
import ssl
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from minicw import ClusterExecutor, TlsError, tls, transport
from tests import helpers

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="the openssl command makes the test certificates")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _openssl(*args, cwd):
    subprocess.run(["openssl"] + list(args), cwd=str(cwd), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _signed(directory, ca, name, san):
    """``name``.pem and ``name``.key, signed by ``ca`` (ca.pem, ca.key in ``directory``)."""
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", name + ".key", "-out", name + ".csr", "-subj", "/CN=" + name,
             cwd=directory)
    with open(os.path.join(str(directory), name + ".ext"), "w") as handle:
        handle.write("subjectAltName=%s\n" % san)
    _openssl("x509", "-req", "-in", name + ".csr", "-CA", ca + ".pem", "-CAkey", ca + ".key",
             "-CAcreateserial", "-days", "2", "-sha256", "-extfile", name + ".ext",
             "-out", name + ".pem", cwd=directory)
    return str(directory / (name + ".pem")), str(directory / (name + ".key"))


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Self-signed master certificate; a CA with a master certificate for 127.0.0.1,
    one for another host name, and a client certificate; and a CA that signed none."""
    directory = tmp_path_factory.mktemp("certs")
    made = {}
    made["self_cert"], made["self_key"], made["self_fp"] = tls.make_selfsigned(
        str(directory / "self"), "localhost", days=2)
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-nodes", "-keyout", ca + ".key", "-out", ca + ".pem", "-days", "2",
                 "-subj", "/CN=" + ca, cwd=directory)
    made["ca"], made["other_ca"] = str(directory / "ca.pem"), str(directory / "other-ca.pem")
    made["ca_cert"], made["ca_key"] = _signed(directory, "ca", "master",
                                              "IP:127.0.0.1,DNS:localhost")
    made["elsewhere_cert"], made["elsewhere_key"] = _signed(directory, "ca", "elsewhere",
                                                            "DNS:elsewhere.invalid")
    made["client_cert"], made["client_key"] = _signed(directory, "ca", "client",
                                                      "DNS:client")
    return made


@pytest.fixture(autouse=True)
def no_tls_leftovers(monkeypatch):
    """Each test chooses its TLS settings: none from the environment, none kept
    from another test for the same address."""
    for variable in (tls.ENV_CERT, tls.ENV_KEY, tls.ENV_CA, tls.ENV_FINGERPRINT,
                     tls.ENV_CHECK_HOSTNAME, tls.ENV_CLIENT_CERT, tls.ENV_CLIENT_KEY,
                     tls.ENV_REQUIRE_CLIENT_CERT):
        monkeypatch.delenv(variable, raising=False)
    yield
    transport._tls_by_address.clear()


def _tls_master(cert, key, extra=()):
    return helpers.start_master(extra_args=["--tls-cert", cert, "--tls-key", key] + list(extra))


def square(x):
    return x * x


def echo_marked(text):
    return text + "-result"


def test_a_whole_cluster_runs_over_tls_pinned_by_fingerprint(certs):
    master, port = _tls_master(certs["self_cert"], certs["self_key"])
    shown = master.wait_for(r"SHA-256 fingerprint ([0-9A-F:]{95})").group(1)
    assert tls.normal_fingerprint(shown) == certs["self_fp"]
    node = helpers.start_worker(port, nprocs=2, extra_args=["--tls-fingerprint", shown])
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY,
                             tls_fingerprint=certs["self_fp"]) as executor:
            assert list(executor.map(square, range(200))) == [x * x for x in range(200)]
            # a result large enough to be read aside by the master (reactor.LARGE_FRAME)
            assert executor.submit(bytes, 12_000_000).result(timeout=60) == bytes(12_000_000)
            assert [record.pid for record in executor.list_workers()] == [node.pid]
    finally:
        node.stop()
        master.stop()


def test_a_wrong_fingerprint_is_refused_naming_both(certs):
    master, port = _tls_master(certs["self_cert"], certs["self_key"])
    try:
        started = time.monotonic()
        with pytest.raises(TlsError, match=re.escape(
                "presented a certificate whose SHA-256 fingerprint is %s, not the pinned %s"
                % (tls.shown_fingerprint(certs["self_fp"]), "AB:" * 31 + "AB"))):
            ClusterExecutor("127.0.0.1", port, helpers.KEY, tls_fingerprint="ab" * 32)
        assert time.monotonic() - started < 10
        with pytest.raises(ValueError, match="is not a SHA-256 certificate fingerprint"):
            ClusterExecutor("127.0.0.1", port, helpers.KEY, tls_fingerprint="12:34")
    finally:
        master.stop()


def test_a_ca_verifies_the_master_and_its_host_name(certs, monkeypatch):
    master, port = _tls_master(certs["ca_cert"], certs["ca_key"])
    elsewhere, elsewhere_port = _tls_master(certs["elsewhere_cert"], certs["elsewhere_key"])
    try:
        with ClusterExecutor("127.0.0.1", port, helpers.KEY, tls_ca=certs["ca"]) as executor:
            assert executor.list_workers() == []
        with pytest.raises(TlsError, match=re.escape(
                "presented a certificate that does not verify against %s: unable to get local "
                "issuer certificate" % certs["other_ca"])):
            ClusterExecutor("127.0.0.1", port, helpers.KEY, tls_ca=certs["other_ca"])
        with pytest.raises(TlsError, match=re.escape(
                "mismatch, certificate is not valid for '127.0.0.1'. (a name the master is "
                "reached by belongs in its certificate; to skip this check: "
                "--tls-no-check-hostname, $MINICW_TLS_CHECK_HOSTNAME=0)")):
            ClusterExecutor("127.0.0.1", elsewhere_port, helpers.KEY, tls_ca=certs["ca"])
        # ... unless the user turns the host name check off, explicitly
        monkeypatch.setenv(tls.ENV_CHECK_HOSTNAME, "0")
        with ClusterExecutor("127.0.0.1", elsewhere_port, helpers.KEY,
                             tls_ca=certs["ca"]) as executor:
            assert executor.list_workers() == []
    finally:
        master.stop()
        elsewhere.stop()


def test_a_master_may_require_client_certificates(certs, monkeypatch):
    master, port = _tls_master(certs["ca_cert"], certs["ca_key"],
                               ["--tls-ca", certs["ca"], "--tls-require-client-cert"])
    try:
        with pytest.raises(TlsError, match="client certificate"):
            ClusterExecutor("127.0.0.1", port, helpers.KEY, tls_ca=certs["ca"])
        monkeypatch.setenv(tls.ENV_CLIENT_CERT, certs["client_cert"])
        monkeypatch.setenv(tls.ENV_CLIENT_KEY, certs["client_key"])
        with ClusterExecutor("127.0.0.1", port, helpers.KEY, tls_ca=certs["ca"]) as executor:
            assert executor.list_workers() == []
    finally:
        master.stop()


def test_plain_and_tls_peers_that_meet_fail_fast_and_say_why(certs):
    tls_master, tls_port = _tls_master(certs["self_cert"], certs["self_key"])
    plain_master, plain_port = helpers.start_master()
    try:
        # A plain client at a TLS master: told so, in the framing it reads.
        started = time.monotonic()
        with pytest.raises(TlsError, match=re.escape(
                "the master at 127.0.0.1:%d serves TLS, and this peer has no TLS settings: "
                "give this peer the master's certificate fingerprint (--tls-fingerprint, "
                "$MINICW_TLS_FINGERPRINT) or its CA (--tls-ca, $MINICW_TLS_CA)" % tls_port)):
            ClusterExecutor("127.0.0.1", tls_port, helpers.KEY)
        assert time.monotonic() - started < 10
        # A TLS client at a plain master.
        started = time.monotonic()
        with pytest.raises(TlsError, match=re.escape(
                "the master at 127.0.0.1:%d does not speak TLS (it answered in plain text)"
                % plain_port)):
            ClusterExecutor("127.0.0.1", plain_port, helpers.KEY,
                            tls_fingerprint=certs["self_fp"])
        assert time.monotonic() - started < 10
        # A plain worker node at the TLS master says the same, and exits.
        node = helpers.Proc([sys.executable, "-m", "minicw.worker", "127.0.0.1", str(tls_port),
                             "-", "-n", "1"], env=helpers.env_with_key())
        started = time.monotonic()
        try:
            assert node.wait(15) == 2   # launch.command_error: a minicw error said on stderr
            assert time.monotonic() - started < 10
            assert any("serves TLS, and this peer has no TLS settings" in line
                       for line in node.err), node.err
        finally:
            node.stop()
        tls_master.wait_for("dropped a connection that spoke no TLS", stream="err")
    finally:
        tls_master.stop()
        plain_master.stop()


@pytest.mark.parametrize("over_tls", [True, False])
def test_nothing_of_a_job_crosses_the_wire_in_clear(certs, over_tls):
    marker = "marker-%s" % os.urandom(8).hex()
    if over_tls:
        master, port = _tls_master(certs["self_cert"], certs["self_key"])
        node = helpers.start_worker(port, nprocs=1,
                                    extra_args=["--tls-fingerprint", certs["self_fp"]])
    else:   # the control: without TLS the same test finds the marker
        master, port = helpers.start_master()
        node = helpers.start_worker(port, nprocs=1)
    relay = helpers.Relay(port, record=True)
    try:
        with ClusterExecutor("127.0.0.1", relay.port, helpers.KEY,
                             tls_fingerprint=certs["self_fp"] if over_tls else None) as executor:
            assert executor.submit(echo_marked, marker).result(timeout=30) == marker + "-result"
        with relay.lock:
            recorded = bytes(relay.recorded)
        assert len(recorded) > 1000
        found = marker.encode() in recorded or b"-result" in recorded
        assert found is not over_tls
        assert (b"echo_marked" in recorded) is not over_tls
    finally:
        relay.close()
        node.stop()
        master.stop()


def test_the_dashboard_is_served_over_https_with_the_masters_certificate(certs):
    from minicw import LocalCluster
    with LocalCluster(1, dashboard=True, tls_cert=certs["self_cert"],
                      tls_key=certs["self_key"]) as cluster:
        assert cluster.dashboard_url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=certs["self_cert"])
        with urllib.request.urlopen(cluster.dashboard_url, context=context, timeout=10) as page:
            assert page.status == 200
            assert "minicw master on" in page.read().decode()
        assert cluster.executor().submit(square, 3).result(timeout=30) == 9
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(cluster.dashboard_url.replace("https:", "http:"), timeout=10)


def test_the_tls_selfsigned_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "minicw", "tls-selfsigned", str(tmp_path / "t"),
                           "--host", "lab-master"], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert done.returncode == 0, done.stderr
    cert, key = tmp_path / "t" / "cert.pem", tmp_path / "t" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    shown = re.search(r"SHA-256 fingerprint: ([0-9A-F:]{95})", done.stdout).group(1)
    assert tls.normal_fingerprint(shown) == tls.file_fingerprint(str(cert))
    assert "python -m minicw master --tls-cert %s --tls-key %s" % (cert, key) in done.stdout
    again = subprocess.run([sys.executable, "-m", "minicw", "tls-selfsigned", str(tmp_path / "t")],
                           cwd=ROOT, stderr=subprocess.PIPE, universal_newlines=True, timeout=60)
    assert again.returncode == 1 and "already holds cert.pem" in again.stderr
    # Where openssl is missing, it says so plainly.
    bare = tmp_path / "bin"
    bare.mkdir()
    missing = subprocess.run([sys.executable, "-m", "minicw", "tls-selfsigned",
                              str(tmp_path / "u")], cwd=ROOT, stderr=subprocess.PIPE,
                             universal_newlines=True, timeout=60,
                             env=dict(os.environ, PATH=str(bare)))
    assert missing.returncode == 1
    assert "the openssl command is not installed here" in missing.stderr
    assert not (tmp_path / "u" / "key.pem").exists()


FOUND_CLIENT = """
from minicw import ClusterExecutor
with ClusterExecutor() as executor:   # given nothing: the run directory says where and how
    print(sum(executor.map(abs, range(-50, 50))))
"""


def test_the_local_launcher_starts_a_tls_cluster_its_clients_find(certs, tmp_path):
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, MINICW_RUN_DIR=run_dir, PYTHONPATH=ROOT)
    env.pop("MINICW_AUTHKEY", None)
    script = os.path.join(ROOT, "scripts", "local_start.py")

    def launcher(*args):
        return subprocess.run([sys.executable, script] + list(args), env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)
    started = launcher("-n", "1", "start", "--tls-cert", certs["self_cert"],
                       "--tls-key", certs["self_key"])
    try:
        assert started.returncode == 0, started.stderr
        assert "TLS      certificate fingerprint %s" % certs["self_fp"] in started.stdout
        client = tmp_path / "client.py"
        client.write_text(FOUND_CLIENT)
        done = subprocess.run([sys.executable, str(client)], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["2500"]
        with open(os.path.join(run_dir, "master.log")) as log:
            assert "TLS: certificate %s" % certs["self_cert"] in log.read()
    finally:
        assert launcher("stop").returncode == 0


def test_a_local_cluster_reaches_its_own_master_whatever_the_environment_says(
        certs, monkeypatch):
    from minicw import LocalCluster
    # Settings for the lab's cluster, exported in a shell, must not change how a
    # LocalCluster reaches the master it started, plain or over TLS.
    monkeypatch.setenv(tls.ENV_CA, certs["other_ca"])
    monkeypatch.setenv(tls.ENV_FINGERPRINT, "cd" * 32)
    with LocalCluster(1) as plain:
        assert plain.executor().submit(square, 4).result(timeout=30) == 16
    with LocalCluster(1, tls_cert=certs["self_cert"], tls_key=certs["self_key"]) as secured:
        assert secured.executor().submit(square, 5).result(timeout=30) == 25
