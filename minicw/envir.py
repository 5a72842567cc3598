"""Environment sources: code that defines the functions jobs call by name.

The minimalcluster style: the user hands the master a Python source (a file
or a string), names a function in it, and the workers run that function.

    MasterNode.load_envir(src) --> key = content hash of the source
        blob (BLOB_ENVIR_SOURCE, source, label) stored in the master under key
    register_target_function(name) --> blob (BLOB_ENVIR_NAME, key, name)
    worker process: register(key, source) once, lookup(key, name) per function

An environment becomes a real module, ``minicw_envir_<key>``, found through
a ``sys.meta_path`` finder that knows the registered sources.  Functions and
classes defined there therefore pickle by reference, and a process that
receives such an object (a client unpickling a result) imports the module
from the same source on first use.  Each process runs a given source at
most once, however many jobs and ``execute()`` calls use it.
"""
from __future__ import annotations

import ast
import importlib
import importlib.abc
import importlib.util
import linecache
import sys
import threading

from minicw import protocol
from minicw.errors import EnvirError

MODULE_PREFIX = "minicw_envir_"

_sources = {}          # key -> (source text, label)
_lock = threading.RLock()


def module_name(key: str) -> str:
    return MODULE_PREFIX + key


def make_source_blob(source: str, label: str) -> tuple[str, bytes]:
    """(key, blob bytes) for an environment source; the key names its module."""
    key = protocol.content_key(source.encode("utf-8"))
    blob = protocol.pack_blob(protocol.BLOB_ENVIR_SOURCE, source, label)[1]
    return key, blob


def check_syntax(source: str, label: str) -> None:
    """Raise EnvirError naming the line when ``source`` is not valid Python."""
    try:
        ast.parse(source, filename=label)
    except SyntaxError as exc:
        raise EnvirError("environment %s has a syntax error at line %s: %s"
                         % (label, exc.lineno, exc.msg)) from None


def register(key: str, source: str, label: str) -> None:
    """Make ``source`` importable as ``module_name(key)`` in this process."""
    with _lock:
        _sources.setdefault(key, (source, label))
        _install_finder()


def is_loaded(key: str) -> bool:
    return key in _sources


def load(key: str):
    """The module of a registered environment, running its source on first use."""
    name = module_name(key)
    with _lock:
        module = sys.modules.get(name)
        if module is not None:
            return module
        source, label = _sources[key]
        try:
            return importlib.import_module(name)
        except Exception as exc:
            raise EnvirError("environment %s failed to run: %s: %s"
                             % (label, type(exc).__name__, exc)) from exc


def lookup(key: str, name: str):
    """The callable ``name`` of environment ``key``; EnvirError if there is none."""
    module = load(key)
    label = _sources[key][1]
    value = getattr(module, name, None)
    if value is None:
        raise EnvirError("environment %s defines no function %r" % (label, name))
    if not callable(value):
        raise EnvirError("%r in environment %s is a %s, not a callable"
                         % (name, label, type(value).__name__))
    return value


class _EnvirFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``minicw_envir_<key>`` modules among the registered sources."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(MODULE_PREFIX):
            return None
        key = fullname[len(MODULE_PREFIX):]
        if key not in _sources:
            return None
        return importlib.util.spec_from_loader(fullname, self, origin=_sources[key][1])

    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        source, label = _sources[module.__name__[len(MODULE_PREFIX):]]
        # Tracebacks quote source lines through linecache; a source given as
        # a string has no file, so lend it ours.
        linecache.cache[label] = (len(source), None, source.splitlines(True), label)
        code = compile(source, label, "exec")
        exec(code, module.__dict__)


_finder = _EnvirFinder()


def _install_finder() -> None:
    if _finder not in sys.meta_path:
        sys.meta_path.append(_finder)
