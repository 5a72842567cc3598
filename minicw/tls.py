"""TLS on every connection of the cluster, with nothing but the standard library's ``ssl``.

    peer (client, node, worker process)                 master
    -----------------------------------                 ------
    transport.connect(): TCP connect                    transport._Server.handle_request
    wrap_client(sock) ---------- TLS 1.2+ handshake --> _Server._secure(conn)  (the connection's
      verifies the master: against a CA (and its          own thread, under the handshake
      host name), or its pinned SHA-256 fingerprint       deadline; a client certificate
                                                          when it is required)
    TlsConnection (a multiprocessing Connection         TlsConnection, then the event loop
    over the SSLSocket) --- authkey challenge, then     (reactor.py) reads and writes the
                            every call, inside TLS ---> non-blocking SSLSocket itself

The authkey check still runs, inside the encrypted link: TLS hides the
traffic and proves the master's identity; the key proves the peer's.

Settings (``Settings``) come from keyword arguments, else the environment:

    MINICW_TLS_CERT, MINICW_TLS_KEY   the master's certificate and private key (PEM)
    MINICW_TLS_CA                     peers verify the master against this CA (or
                                      self-signed certificate); on the master, it
                                      verifies client certificates
    MINICW_TLS_FINGERPRINT            peers pin the master's certificate by its SHA-256
                                      (hex, colons optional): no CA needed
    MINICW_TLS_CHECK_HOSTNAME=0       with a CA, do not check the master's host name
    MINICW_TLS_CLIENT_CERT, _KEY      a peer's own certificate (mutual TLS)
    MINICW_TLS_REQUIRE_CLIENT_CERT=1  the master refuses peers without a certificate
                                      signed by MINICW_TLS_CA

A master serves TLS when it has a certificate and key; a peer speaks it when
it has a CA or a fingerprint.  One side with TLS and the other without fails
within the handshake timeout with a message that says so.
"""
from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import shutil
import socket
import ssl
import subprocess
from multiprocessing import connection
from typing import NamedTuple, Optional

from minicw.errors import TlsError, TlsSetupError

ENV_CERT = "MINICW_TLS_CERT"
ENV_KEY = "MINICW_TLS_KEY"
ENV_CA = "MINICW_TLS_CA"
ENV_FINGERPRINT = "MINICW_TLS_FINGERPRINT"
ENV_CHECK_HOSTNAME = "MINICW_TLS_CHECK_HOSTNAME"
ENV_CLIENT_CERT = "MINICW_TLS_CLIENT_CERT"
ENV_CLIENT_KEY = "MINICW_TLS_CLIENT_KEY"
ENV_REQUIRE_CLIENT_CERT = "MINICW_TLS_REQUIRE_CLIENT_CERT"

READ_CHUNK = 1 << 20    # a TlsConnection reads at most this much per recv()
PLAIN_PEER_WAIT_S = 2.0   # a peer silent this long after connecting to a TLS master is plain
# What a TLS master sends a plain peer, framed as the authkey challenge it waits
# for: the peer's multiprocessing handshake fails on it, naming it, and
# transport.connect turns that into a TlsError that says what to do.
TLS_REQUIRED = b"#MINICW-TLS-REQUIRED#"
PEER_HINT = ("give this peer the master's certificate fingerprint (--tls-fingerprint, "
             "$%s) or its CA (--tls-ca, $%s)" % (ENV_FINGERPRINT, ENV_CA))


class Settings(NamedTuple):
    """What one process knows of TLS (paths, not key material; picklable, so a node
    hands it to its worker processes)."""

    cert: Optional[str] = None          # the master's certificate (PEM)
    key: Optional[str] = None           # ... and its private key
    ca: Optional[str] = None            # what peers verify the master against
    fingerprint: Optional[str] = None   # the master's certificate SHA-256, 64 hex digits
    check_hostname: bool = True         # with a CA: the master's host name too
    client_cert: Optional[str] = None   # a peer's own certificate (mutual TLS)
    client_key: Optional[str] = None
    require_client_cert: bool = False   # the master: refuse peers without one

    @property
    def serves(self) -> bool:
        """A master with these settings serves TLS."""
        return bool(self.cert)

    @property
    def dials(self) -> bool:
        """A peer with these settings speaks TLS to its master."""
        return bool(self.ca or self.fingerprint)


def settings(cert=None, key=None, ca=None, fingerprint=None, check_hostname=None,
             client_cert=None, client_key=None, require_client_cert=None) -> Settings:
    """The TLS settings: each argument given, else its environment variable.

    Raises TlsSetupError for settings that cannot work (a certificate without
    its key, a file that is missing, a fingerprint that is not 64 hex digits).
    """
    env = os.environ.get
    chosen = Settings(
        cert=_path(cert, ENV_CERT), key=_path(key, ENV_KEY), ca=_path(ca, ENV_CA),
        fingerprint=normal_fingerprint(fingerprint if fingerprint is not None
                                       else env(ENV_FINGERPRINT) or None),
        check_hostname=_flag(check_hostname, ENV_CHECK_HOSTNAME, True),
        client_cert=_path(client_cert, ENV_CLIENT_CERT),
        client_key=_path(client_key, ENV_CLIENT_KEY),
        require_client_cert=_flag(require_client_cert, ENV_REQUIRE_CLIENT_CERT, False))
    if bool(chosen.cert) != bool(chosen.key):
        raise TlsSetupError("a TLS certificate needs its private key and the reverse: give "
                            "both --tls-cert and --tls-key ($%s and $%s)" % (ENV_CERT, ENV_KEY))
    if bool(chosen.client_cert) != bool(chosen.client_key):
        raise TlsSetupError("a client certificate needs its private key: give both $%s and $%s"
                            % (ENV_CLIENT_CERT, ENV_CLIENT_KEY))
    if chosen.require_client_cert and not chosen.ca:
        raise TlsSetupError("requiring client certificates needs the CA that signs them "
                            "(--tls-ca, $%s)" % ENV_CA)
    return chosen


def _path(explicit, variable: str):
    value = explicit if explicit is not None else os.environ.get(variable) or None
    if value is None:
        return None
    value = os.path.abspath(os.path.expanduser(str(value)))
    if not os.path.isfile(value):
        raise TlsSetupError("TLS file %s (%s) does not exist or is not a file"
                            % (value, variable))
    return value


def _flag(explicit, variable: str, default: bool) -> bool:
    if explicit is not None:
        return bool(explicit)
    text = os.environ.get(variable, "").strip().lower()
    if not text:
        return default
    return text not in ("0", "no", "false", "off")


def normal_fingerprint(text):
    """A SHA-256 fingerprint as 64 lower-case hex digits (colons and case as
    ``openssl x509 -fingerprint`` prints them are accepted); None stays None."""
    if text is None:
        return None
    digits = re.sub(r"[\s:]", "", str(text)).lower()
    if digits.startswith("sha256fingerprint="):
        digits = digits[len("sha256fingerprint="):]
    if not re.fullmatch(r"[0-9a-f]{64}", digits):
        raise TlsSetupError("%r is not a SHA-256 certificate fingerprint (64 hex digits, "
                            "colons optional, as the master prints it)" % (text,))
    return digits


def shown_fingerprint(digits: str) -> str:
    """``AB:CD:...``, as the master prints it and ``openssl`` does."""
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2)).upper()


def fingerprint_of(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


def file_fingerprint(cert_path: str) -> str:
    """The SHA-256 fingerprint of the first certificate in a PEM file."""
    try:
        with open(cert_path, encoding="ascii", errors="replace") as handle:
            text = handle.read()
        match = re.search(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text,
                          re.DOTALL)
        if match is None:
            raise ValueError("no PEM certificate in it")
        return fingerprint_of(ssl.PEM_cert_to_DER_cert(match.group(0)))
    except (OSError, ValueError) as exc:
        raise TlsSetupError("cannot read the certificate %s: %s" % (cert_path, exc)) from None


# --- contexts -------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def server_context(chosen: Settings) -> ssl.SSLContext:
    """The master's context: its certificate, TLS 1.2 or later, client
    certificates verified against the CA when required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, chosen.cert, chosen.key)
    if chosen.require_client_cert:
        _load_ca(context, chosen.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@functools.lru_cache(maxsize=8)
def client_context(chosen: Settings) -> ssl.SSLContext:
    """A peer's context: the master verified against the CA (and its host name,
    unless turned off), or not verified here but pinned by fingerprint after
    the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if chosen.ca:
        _load_ca(context, chosen.ca)
        context.check_hostname = chosen.check_hostname
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE   # the fingerprint is checked instead
    if chosen.client_cert:
        _load_chain(context, chosen.client_cert, chosen.client_key)
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError("cannot use the certificate %s with the key %s: %s (are they PEM "
                            "files of one pair, and is the key unencrypted?)"
                            % (cert, key, exc)) from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise TlsSetupError("cannot use %s as the TLS CA: %s" % (ca, exc)) from None


# --- handshakes -------------------------------------------------------------------------------

def wrap_client(sock: socket.socket, address: tuple, chosen: Settings,
                timeout_s: float) -> ssl.SSLSocket:
    """``sock`` (connected to the master at ``address``) after a verified TLS handshake.

    Raises TlsError naming what went wrong: a master that answers in plain
    text, a certificate that does not verify, one that is not the pinned one.
    """
    host = address[0]
    where = "%s:%s" % address
    sock.settimeout(timeout_s)
    context = client_context(chosen)
    try:
        secured = context.wrap_socket(sock, server_hostname=host if context.check_hostname
                                      else None)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        why = exc.verify_message or exc.reason
        if "mismatch" in str(why):
            why = "%s (a name the master is reached by belongs in its certificate; to skip " \
                  "this check: --tls-no-check-hostname, $%s=0)" % (why, ENV_CHECK_HOSTNAME)
        raise TlsError("the master at %s presented a certificate that does not verify against "
                       "%s: %s" % (where, chosen.ca, why), address) from None
    except ssl.SSLError as exc:
        sock.close()
        raise TlsError(client_handshake_failure(where, exc), address) from None
    except socket.timeout:
        sock.close()
        raise TlsError("the peer at %s accepted the connection but did not complete a TLS "
                       "handshake within %.3gs; is it a minicw master started with "
                       "--tls-cert and --tls-key?" % (where, timeout_s), address) from None
    except (ConnectionError, EOFError) as exc:
        sock.close()
        raise TlsError("the master at %s closed the connection during the TLS handshake (%s); "
                       "it may require a client certificate ($%s, $%s)"
                       % (where, type(exc).__name__, ENV_CLIENT_CERT, ENV_CLIENT_KEY),
                       address) from None
    if chosen.fingerprint and not chosen.ca:
        presented = fingerprint_of(secured.getpeercert(binary_form=True) or b"")
        if presented != chosen.fingerprint:
            secured.close()
            raise TlsError("the master at %s presented a certificate whose SHA-256 fingerprint "
                           "is %s, not the pinned %s ($%s, --tls-fingerprint): another machine "
                           "answers there, or the master has a new certificate"
                           % (where, shown_fingerprint(presented),
                              shown_fingerprint(chosen.fingerprint), ENV_FINGERPRINT),
                           address) from None
    return secured


def client_handshake_failure(where: str, exc: ssl.SSLError) -> str:
    reason = (exc.reason or str(exc)).upper()
    if any(word in reason for word in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                       "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL",
                                       "HTTP_REQUEST")):
        return ("the master at %s does not speak TLS (it answered in plain text); start it "
                "with --tls-cert and --tls-key, or give this peer no TLS settings" % where)
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
        return ("the master at %s refused the TLS handshake (%s); it may require a client "
                "certificate ($%s, $%s)" % (where, exc.reason, ENV_CLIENT_CERT, ENV_CLIENT_KEY))
    return "the TLS handshake with the master at %s failed: %s" % (where, exc)


def plain_peer(sock: socket.socket) -> bool:
    """True when an accepted peer sends nothing for PLAIN_PEER_WAIT_S: a TLS peer
    opens with its ClientHello at once, while a plain minicw peer waits for the
    master's challenge.  The plain peer is then told, in the framing it reads."""
    import selectors
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        if selector.select(PLAIN_PEER_WAIT_S):
            return False
    try:
        sock.sendall(len(TLS_REQUIRED).to_bytes(4, "big") + TLS_REQUIRED)
    except OSError:
        pass
    return True


def told_tls_required(exc: BaseException) -> bool:
    """Whether a failed plain handshake failed on a TLS master's notice."""
    return repr(TLS_REQUIRED)[2:-1] in str(exc) or TLS_REQUIRED.decode() in str(exc)


def describe_server_failure(exc: BaseException) -> str:
    """Why a peer's TLS handshake with the master failed, for the master's log."""
    reason = (getattr(exc, "reason", None) or str(exc)).upper()
    if any(word in reason for word in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST",
                                       "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE")):
        return "the peer spoke plain text where TLS was expected (it needs %s)" % PEER_HINT
    if "CERTIFICATE" in reason:
        return "the peer's certificate was refused (%s)" % (getattr(exc, "reason", None) or exc)
    return "%s: %s" % (type(exc).__name__, exc)


# --- a multiprocessing Connection over TLS ----------------------------------------------------

class TlsConnection(connection.Connection):
    """``multiprocessing.connection.Connection``'s framing over an SSLSocket.

    Connection reads and writes its descriptor with os.read / os.write, which
    would bypass TLS; this one goes through the SSLSocket.  The socket is
    blocking, with the socket's own receive and send timeouts (transport.tune
    sets them, as for a plain connection; a read that times out raises
    SSLWantReadError, an OSError): one SSL_read per record, where Python's
    own timeouts would poll and try again.  A message is read a record at a
    time into a buffer, so a small one costs one SSL_read, not two (its
    header, then its body).  ``poll`` also counts bytes buffered here or in
    TLS but not handed out yet."""

    def __init__(self, secured: ssl.SSLSocket):
        self._secured = secured
        self._inbox = bytearray()      # bytes read from TLS, not handed out yet
        self._scratch = memoryview(bytearray(READ_CHUNK))   # what one read takes
        super().__init__(secured.fileno())

    def blocking(self) -> None:
        """After the handshake: block in the kernel (socket options give the timeouts)."""
        self._secured.settimeout(None)

    def take_socket(self) -> tuple:
        """(the SSLSocket, bytes already read from it), now the caller's; this
        connection is closed without closing the socket."""
        secured, self._secured = self._secured, None
        self._handle = None
        return secured, bytes(self._inbox)

    def _close(self, _close=None):
        if self._secured is not None:
            self._secured.close()

    def _send(self, buf, write=None):
        # The C object's write and read (SSLSocket's Python layers around them
        # cost more than the cryptography of a small message): on a blocking
        # socket it writes all or raises, as SSLSocket.sendall does.
        self._secured._sslobj.write(buf)

    def _recv(self, size, read=None):
        inbox = self._inbox
        while len(inbox) < size:   # a small message usually came whole, in one record
            try:
                count = self._secured._sslobj.read(READ_CHUNK, self._scratch)
            except ssl.SSLEOFError:   # closed without TLS's goodbye: an end of file,
                count = 0             # as SSLSocket's own reads take it
            if not count:
                if not inbox:
                    raise EOFError
                raise OSError("got end of file during message")
            inbox += self._scratch[:count]
        taken = io.BytesIO(inbox[:size])
        del inbox[:size]
        return taken

    def _poll(self, timeout):
        if self._inbox or self._secured.pending():
            return True
        return super()._poll(timeout)


# --- python -m minicw tls-selfsigned DIR ------------------------------------------------------

def make_selfsigned(directory: str, host: str, days: int = 3650) -> tuple:
    """Write ``cert.pem`` and ``key.pem`` (mode 600) into ``directory`` with the
    ``openssl`` command; returns (cert path, key path, fingerprint).  Raises
    TlsSetupError when openssl is missing or fails."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsSetupError(
            "the openssl command is not installed here, and Python's ssl module cannot make "
            "certificates; install it (apt install openssl, dnf install openssl, brew install "
            "openssl), or run this command on a machine that has it and copy %s/cert.pem and "
            "key.pem here" % directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    names = ["DNS:%s" % host, "DNS:localhost", "IP:127.0.0.1"]
    try:
        names.extend("IP:%s" % address for address in
                     sorted({info[4][0] for info in socket.getaddrinfo(host, None, socket.AF_INET)})
                     if address != "127.0.0.1")
    except OSError:
        pass
    old_umask = os.umask(0o077)   # the key is never readable by others, not even briefly
    try:
        done = subprocess.run(
            [openssl, "req", "-x509", "-newkey", "rsa:2048", "-sha256", "-nodes",
             "-days", str(days), "-keyout", key, "-out", cert, "-subj", "/CN=%s" % host,
             "-addext", "subjectAltName=%s" % ",".join(names)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    finally:
        os.umask(old_umask)
    if done.returncode != 0:
        raise TlsSetupError("openssl failed to make the certificate: %s"
                            % done.stderr.strip()[-500:])
    os.chmod(key, 0o600)
    return cert, key, file_fingerprint(cert)
