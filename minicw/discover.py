"""Where the master is and what its key is, for clients given neither.

    ClientThread(cb) / ClusterExecutor()       (host, port, authkey all None)
        |
        v
    master_address(host, port):  explicit host  >  $MINICW_MASTER ("host:port")
                                 >  127.0.0.1 and the default port
    authkey(explicit):           explicit  >  $MINICW_AUTHKEY  >  MinicwError

So one program runs unchanged on a laptop and on a cluster: the launchers
export the variables, or the program is given them explicitly.
"""
from __future__ import annotations

import os

from minicw import config, transport
from minicw.errors import MinicwError


def parse_master(text: str) -> tuple:
    """("host", port) from "host:port" (a bare "host" gets the default port)."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if not sep:
        return text or config.DEFAULT_HOST, config.DEFAULT_PORT
    try:
        return host.strip("[]") or config.DEFAULT_HOST, int(port)
    except ValueError:
        raise MinicwError("%s=%r is not host:port" % (config.ENV_MASTER, text)) from None


def master_address(host: str | None = None, port: int | None = None) -> tuple:
    """The master's (host, port) from the arguments, the environment, or the default."""
    if host is None:
        text = os.environ.get(config.ENV_MASTER)
        if text:
            env_host, env_port = parse_master(text)
            return env_host, int(port) if port is not None else env_port
        host = config.DEFAULT_HOST
    return host, int(port) if port is not None else config.DEFAULT_PORT


def authkey(explicit=None) -> bytes:
    """The cluster's key: the argument, else $MINICW_AUTHKEY; an error naming both if neither."""
    if explicit is not None:
        return transport.as_authkey(explicit)
    text = os.environ.get(config.ENV_AUTHKEY)
    if text:
        return transport.as_authkey(text)
    raise MinicwError("no authkey: pass authkey=... or set %s to the cluster's key"
                      % config.ENV_AUTHKEY)
