"""Ship functions, closures and classes to other processes by value.

Plain :mod:`pickle` sends a function or a class *by reference*: it writes
``module.qualname`` and the receiver imports it.  That fails for everything a
notebook or REPL user writes: lambdas, nested functions, anything defined in
``__main__`` (a worker started with ``spawn`` has another ``__main__``).  This
module sends those *by value*, with the standard library only::

    dumps(obj)
      |
      v
    _Pickler (C pickle.Pickler + reducer_override)
      |  builtin data (int, str, list, dict, ...) ----> C fast path, never
      |                                                 reaches reducer_override
      |  importable function / class -----------------> NotImplemented: plain
      |                                                 pickle writes a reference
      |  code object ---------------------------------> marshal.dumps + crc32
      |  dynamic function ---> skeleton: code, globals dict, empty cells
      |                        state:    referenced globals, cell contents,
      |                                  defaults, __dict__, names, annotations
      |  dynamic class ------> skeleton: metaclass, name, bases, __slots__
      |                        state:    the rest of the class __dict__
      |  module -------------------------------------> import by name
      v
    [header: _check_python(tag)] + ordinary pickle stream
                                   |
    loads(data) = pickle.loads ----+--> minicw.serialize._make_* functions

What goes through marshal, what through pickle.  Only code objects go through
:mod:`marshal` (bytecode cannot be pickled).  Everything around them - the
globals a function references, closure cell contents, defaults, class
attributes, instances - is pickled, so it benefits from pickle's memo, its
protocol 5 framing and every ``__reduce__`` a library defines.

How a dynamic function is rebuilt.  The reduce value has two steps.  The
*skeleton* (``_make_function_skeleton``) builds a function from its code, a
fresh globals dict and a tuple of empty cells.  Pickle memoizes it at once;
only then does it pickle the *state* (``_set_function_state``), which fills
the globals, the cells and the attributes.  A recursive function, two
functions calling each other, a closure whose cell holds the function itself:
each of these back-references meets the memo and becomes a reference to the
skeleton instead of an endless descent.  Functions that came from the same
globals dict share one new globals dict on the receiver (one per payload), so
two functions that share a global share one object there.  Only the globals a
function references are sent: the names of its code object and of every code
object nested in its constants (comprehensions, inner functions, lambdas).
Modules are sent by name and imported by the receiver, with the submodules the
code reaches through attributes (``os.path``).

How a dynamic class is rebuilt.  The same two steps: ``_make_class_skeleton``
creates the class with its metaclass, bases and ``__slots__`` (which must exist
at creation time), pickle memoizes it, then ``_set_class_state`` sets methods,
properties and class attributes, which may refer to the class (``super()``'s
``__class__`` cell, a method returning ``cls(...)``).  Slot descriptors,
``__dict__``/``__weakref__`` and ABC caches are recreated by ``type`` and not
sent.  Enum classes are created by their metaclass with their members in the
class body, so members keep their identity (``Color(1) is Color.RED``).  Each
dynamic class carries a token (``_class_token``); a receiver that already
rebuilt the class from an earlier payload (or defined it) reuses it, so
instances sent later are instances of the same class.

The payload header.  Bytecode only runs on the Python that compiled it, so a
payload that holds anything sent by value starts with a tiny pickle fragment::

    PROTO 5, GLOBAL minicw.serialize._check_python,
    "CPython 3.11", "<crc32 of tag and body, 8 hex digits>", TUPLE2, REDUCE, POP

followed by the body, the ordinary pickle stream (which has its own PROTO
opcode).  The fragment is part of the one pickle, so ``pickle.loads`` of a
payload works anywhere ``minicw`` is importable and runs the version check
*before* any code object is unmarshalled: one call, one string comparison.  On
a mismatch it raises :class:`minicw.errors.IncompatiblePythonError` naming
both versions.  :func:`loads` also reads the header itself and verifies the
CRC-32 first, so a truncated or corrupted payload is reported as such and never
reaches the unpickler (where a flipped byte can turn into an opcode that
allocates gigabytes, or into bad bytecode).  Each marshalled code object
carries its own CRC-32 too, which protects plain ``pickle.loads``.  A payload
of plain data (builtin types, importable classes) gets no header: it is byte
for byte what ``pickle.dumps`` writes, costs nothing extra on the hot path of
job arguments, and plain data does not depend on the Python version.

Errors.  A failure to pickle (TypeError/PicklingError raised by pickle or the
standard library) is re-raised as :class:`SerializationError` naming the
culprit and the path to it ("global 'lock' referenced by function 'work'").
The path is found after the fact by re-walking the object graph, so the
successful path pays nothing for it.  Exceptions raised by the user's own code
(a ``__reduce__`` that raises) propagate unchanged.  ``loads`` turns truncated
or corrupted input into :class:`SerializationError`.

Output is deterministic: the same function, class or closure gives the same
bytes twice, in two processes started the same way, and after a round trip
(dumped, loaded elsewhere, dumped again); the client caches functions by a
hash of their payload.  Referenced globals are sent sorted by name; code
objects are marshalled in version 2, which writes no back-references (later
versions mark an object for them by its reference count, which differs
between processes); names are interned before pickling, so pickle's memo,
which goes by identity, treats equal names alike everywhere; and a class's
token is its name, a digest of its definition and an ordinal, not a random
number.
"""
from __future__ import annotations

import abc
import binascii
import builtins
import collections
import copyreg
import dis
import hashlib
import enum
import functools
import io
import itertools
import logging
import marshal
import os
import pickle
import platform
import struct
import sys
import sysconfig
import threading
import types
import typing
import weakref
from typing import Any, BinaryIO, Iterator

from minicw.errors import IncompatiblePythonError, SerializationError

logger = logging.getLogger(__name__)

__all__ = ["dumps", "loads", "dump", "load", "DEFAULT_PROTOCOL", "PYTHON_TAG"]

#: Pickle protocol used when ``dumps`` is called without one.  Protocol 5 is
#: understood by every supported Python (3.8+).
DEFAULT_PROTOCOL = min(5, pickle.HIGHEST_PROTOCOL)

#: Implementation and major.minor version of this interpreter, as written in
#: the header of payloads that carry bytecode.
PYTHON_TAG = "%s %d.%d" % (platform.python_implementation(), *sys.version_info[:2])

# Module names whose objects are never importable by reference on a worker.
_MAIN_MODULE_NAMES = frozenset(("__main__", "__mp_main__"))

_HEAPTYPE_FLAG = 1 << 9  # Py_TPFLAGS_HEAPTYPE: the class was created at runtime

_SINGLETON_BY_BUILTIN_TYPE = {type(None): None, type(Ellipsis): Ellipsis,
                              type(NotImplemented): NotImplemented}
# Builtin types that no module offers under their own name (``function`` is
# not builtins.function): the names the types module gives them.
_TYPES_MODULE_NAMES = {value: name for name, value in sorted(vars(types).items())
                       if isinstance(value, type) and not name.startswith("_")}

# Class __dict__ entries that type() recreates by itself or that are sent in
# the class skeleton rather than in its state.
_CLASS_KEYS_NOT_IN_STATE = frozenset((
    "__dict__", "__weakref__", "__module__", "__qualname__", "__doc__",
    "__slots__", "__orig_bases__", "_abc_impl",
))

# Exceptions that pickle.loads raises on malformed input.
_MALFORMED_PAYLOAD_ERRORS = (pickle.UnpicklingError, EOFError, ValueError,
                             IndexError, KeyError, OverflowError, TypeError,
                             struct.error)

# Code outside these directories is the user's own: a TypeError it raises
# while being pickled is theirs and propagates unchanged.
_LIBRARY_DIRS = tuple(sorted({os.path.normcase(os.path.abspath(sysconfig.get_paths()[key]))
                              for key in ("stdlib", "platstdlib", "purelib", "platlib")}))


# --- payload header ---------------------------------------------------------

# The constant part of the header, after its PROTO opcode.
_HEADER_CALL = b"".join((pickle.GLOBAL, __name__.encode("ascii"), b"\n_check_python\n",
                         pickle.BINUNICODE))
_HEADER_TAG = PYTHON_TAG.encode("utf-8")
_CRC_HEX_LENGTH = 8


def _header_for(protocol: int, body: bytes) -> bytes:
    """The pickle fragment that calls ``_check_python(PYTHON_TAG, crc)`` and
    drops its result; ``crc`` covers the tag and ``body``."""
    crc_hex = b"%08x" % binascii.crc32(body, binascii.crc32(_HEADER_TAG))
    return b"".join((
        pickle.PROTO, bytes((protocol,)), _HEADER_CALL,
        struct.pack("<I", len(_HEADER_TAG)), _HEADER_TAG,
        pickle.BINUNICODE, struct.pack("<I", _CRC_HEX_LENGTH), crc_hex,
        pickle.TUPLE2, pickle.REDUCE, pickle.POP,
    ))


def bytecode_python(data: bytes) -> str | None:
    """The Python that ``data`` (from :func:`dumps`) must be loaded by: PYTHON_TAG
    when it carries bytecode, None when any Python can load it."""
    call_end = 2 + len(_HEADER_CALL)
    return PYTHON_TAG if data[2:call_end] == _HEADER_CALL else None


def _check_python(payload_python: str, crc_hex: str = "") -> None:
    """Run first when a payload carrying bytecode is unpickled.

    The checksum cannot be verified here (pickle does not expose the rest of
    the stream); :func:`loads` verifies it before unpickling.
    """
    if payload_python != PYTHON_TAG:
        raise IncompatiblePythonError(payload_python, PYTHON_TAG)


def _verify_header(data: bytes | bytearray | memoryview) -> None:
    """If ``data`` starts with a header, check its checksum, then its version.

    The checksum comes first so that a corrupted tag reads as corruption, not
    as another Python; and it guards the unpickler against malformed streams
    (a flipped byte can become an opcode that allocates gigabytes).
    """
    call_end = 2 + len(_HEADER_CALL)
    if data[2:call_end] != _HEADER_CALL:
        return
    try:
        (tag_length,) = struct.unpack_from("<I", data, call_end)
        tag_end = call_end + 4 + tag_length
        tag = bytes(data[call_end + 4:tag_end])
        crc_start = tag_end + 5
        crc_hex = bytes(data[crc_start:crc_start + _CRC_HEX_LENGTH])
        expected_crc = int(crc_hex, 16)
    except (struct.error, ValueError) as exc:
        raise SerializationError("payload is corrupted: unreadable header") from exc
    body_start = crc_start + _CRC_HEX_LENGTH + 3  # TUPLE2, REDUCE, POP
    if binascii.crc32(memoryview(data)[body_start:], binascii.crc32(tag)) != expected_crc:
        raise SerializationError("payload is truncated or corrupted: checksum mismatch")
    _check_python(tag.decode("utf-8", "replace"))


# --- reconstruction functions (called by pickle on the receiving side) ------

class _EmptyCell:
    """Marks a closure cell that held no value (a variable not yet bound)."""


def _load_code(marshalled: bytes, crc: int) -> types.CodeType:
    if binascii.crc32(marshalled) != crc:
        raise SerializationError("payload is corrupted: a code object fails its checksum")
    try:
        code = marshal.loads(marshalled)
    except (ValueError, EOFError, TypeError) as exc:
        raise SerializationError("payload is corrupted: bad code object (%s)" % exc) from exc
    if type(code) is not types.CodeType:
        raise SerializationError("payload is corrupted: expected a code object, got %s"
                                 % type(code).__name__)
    return code


def _make_empty_cell() -> types.CellType:
    return types.CellType()


def _import_module(name: str) -> types.ModuleType:
    __import__(name)
    return sys.modules[name]


def _make_dynamic_module(name: str, namespace: dict) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(namespace)
    return module


def _make_function_skeleton(code: types.CodeType, base_globals: dict, name: str,
                            closure: tuple | None) -> types.FunctionType:
    # base_globals is one dict per source globals dict in the payload; the
    # function state fills it.  Without __builtins__ Python 3.8/3.9 would give
    # the function an almost empty builtins namespace.
    base_globals.setdefault("__builtins__", builtins)
    return types.FunctionType(code, base_globals, name, None, closure)


def _set_function_state(func: types.FunctionType, state: tuple) -> None:
    (referenced_globals, _submodules, cell_values, defaults, kwdefaults,
     annotations, attributes, doc, qualname, module, extras) = state
    # _submodules were imported while this state was unpickled; nothing more
    # to do with them.
    namespace = func.__globals__
    if id(namespace) in _shared_namespace_ids:
        # A namespace shared across payloads keeps what it has: a global the
        # worker set (a pool's initializer) is not overwritten by the value
        # the client had when it sent a later function.
        for name, value in referenced_globals.items():
            namespace.setdefault(name, value)
    else:
        namespace.update(referenced_globals)
    if cell_values:
        for cell, value in zip(func.__closure__, cell_values):
            if value is not _EmptyCell:
                cell.cell_contents = value
    func.__defaults__ = defaults
    func.__kwdefaults__ = kwdefaults
    if annotations:
        func.__annotations__ = annotations
    if attributes:
        func.__dict__.update(attributes)
    func.__doc__ = doc
    func.__qualname__ = qualname
    func.__module__ = module
    if extras:
        for attribute, value in extras.items():
            setattr(func, attribute, value)


# Shared namespaces (dumps(namespace=token)): on the receiver, the functions of
# one module sent under one token get one globals dict, whatever payload
# brought them, as they share their module in the sender.  minicw.Pool sends
# under its own id, so that what its initializer sets in the worker is seen by
# its tasks.  The last NAMESPACES_KEPT are kept.
NAMESPACES_KEPT = 64
_shared_namespaces: collections.OrderedDict = collections.OrderedDict()  # (token, name) -> dict
_shared_namespace_ids: set = set()


class _SharedNamespace:
    """Stands for a function's globals in a payload sent under a namespace token."""

    __slots__ = ("token", "name", "package")

    def __init__(self, token: str, name: str, package):
        self.token = token
        self.name = name
        self.package = package

    def __reduce__(self):
        return _shared_namespace, (self.token, self.name, self.package)


def _shared_namespace(token: str, name: str, package) -> dict:
    key = (token, name)
    namespace = _shared_namespaces.get(key)
    if namespace is not None:
        _shared_namespaces.move_to_end(key)
        return namespace
    namespace = _shared_namespaces[key] = {"__name__": name, "__package__": package}
    _shared_namespace_ids.add(id(namespace))
    while len(_shared_namespaces) > NAMESPACES_KEPT:
        _, dropped = _shared_namespaces.popitem(last=False)
        _shared_namespace_ids.discard(id(dropped))
    return namespace


# Dynamic classes by token, on both sides: a class defined here, or rebuilt
# from an earlier payload, is reused instead of being created a second time.
_class_by_token: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_token_by_class: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Classes created by a skeleton whose state is still to be set; a reused
# class is not in here and keeps the attributes it has.
_classes_awaiting_state: weakref.WeakSet = weakref.WeakSet()
_class_registry_lock = threading.Lock()


_classes_seen_by_definition: dict = {}   # "qualname#digest" -> classes given a token


def _class_token(cls: type) -> str:
    """The class's token: its qualified name, a digest of its definition, and how
    many classes of that name and definition got a token before it in this
    process.  So two processes that define the same classes in the same order
    give the same tokens (and the same payload bytes), a class redefined in a
    notebook gets a new one, and two programs that share a long-lived worker
    meet under one token only with classes of the same definition."""
    with _class_registry_lock:
        token = _token_by_class.get(cls)
        if token is None:
            definition = "%s.%s#%s" % (cls.__module__, cls.__qualname__,
                                       _definition_digest(cls))
            ordinal = _classes_seen_by_definition.get(definition, 0)
            _classes_seen_by_definition[definition] = ordinal + 1
            token = "%s#%d" % (definition, ordinal)
            _token_by_class[cls] = token
            _class_by_token[token] = cls
        return token


def _definition_digest(cls: type) -> str:
    """A digest of what a class body defines: its bases, its attribute names, the
    code of its functions and the value of its plain constants, in order."""
    digest = hashlib.sha1()
    for base in cls.__bases__:
        digest.update(("%s.%s;" % (base.__module__, base.__qualname__)).encode())
    for key, value in cls.__dict__.items():
        digest.update(key.encode("utf-8", "surrogatepass") + b"=")
        function = getattr(value, "__func__", value)          # classmethod, staticmethod
        code = getattr(getattr(function, "fget", function), "__code__", None)  # property
        if type(code) is types.CodeType:
            digest.update(marshal.dumps(code, _MARSHAL_VERSION))
        elif type(value) in (int, float, str, bytes, bool, type(None)):
            digest.update(repr(value).encode("utf-8", "surrogatepass"))
        else:
            digest.update(type(value).__qualname__.encode())
        digest.update(b";")
    return digest.hexdigest()[:16]


def _register_new_class(cls: type, token: str) -> type:
    """Return the class already known under ``token``, else register ``cls``."""
    with _class_registry_lock:
        known = _class_by_token.get(token)
        if known is not None:
            return known
        _class_by_token[token] = cls
        _token_by_class[cls] = token
        _classes_awaiting_state.add(cls)
        return cls


def _make_class_skeleton(metaclass: type, name: str, bases: tuple,
                         skeleton_namespace: dict, token: str) -> type:
    known = _class_by_token.get(token)
    if known is not None:
        return known
    cls = types.new_class(name, bases, {"metaclass": metaclass},
                          lambda namespace: namespace.update(skeleton_namespace))
    return _register_new_class(cls, token)


def _make_enum_skeleton(metaclass: type, name: str, bases: tuple,
                        skeleton_namespace: dict, members: tuple, token: str) -> type:
    known = _class_by_token.get(token)
    if known is not None:
        return known
    # Members must be in the class body: the metaclass creates them, and
    # their identity (Color(1) is Color.RED) depends on its lookup tables.
    classdict = metaclass.__prepare__(name, bases)
    for key, value in skeleton_namespace.items():
        classdict[key] = value
    for member_name, value in members:
        classdict[member_name] = value
    cls = metaclass(name, bases, classdict)
    return _register_new_class(cls, token)


def _set_class_state(cls: type, state: tuple) -> None:
    if cls not in _classes_awaiting_state:
        return
    _classes_awaiting_state.discard(cls)
    attributes, member_attributes, registered = state
    for attribute, value in attributes:
        setattr(cls, attribute, value)
    for member_name, member_dict in member_attributes:
        getattr(cls, member_name).__dict__.update(member_dict)
    for subclass in registered:
        cls.register(subclass)


def _make_typevar(name: str, bound: Any, constraints: tuple, covariant: bool,
                  contravariant: bool) -> typing.TypeVar:
    return typing.TypeVar(name, *constraints, bound=bound, covariant=covariant,
                          contravariant=contravariant)


def _make_method(func: Any, instance: Any) -> types.MethodType:
    return types.MethodType(func, instance)


def _make_mappingproxy(mapping: dict) -> types.MappingProxyType:
    return types.MappingProxyType(mapping)


def _make_dict_view(mapping_type: type, kind: str, contents: Any) -> Any:
    """A keys, values or items view over a new ``mapping_type``: ``contents`` is the
    list of keys or values, or (items) a dict of the items."""
    if kind == "keys":
        mapping = mapping_type.fromkeys(contents)
    elif kind == "values":
        mapping = mapping_type(enumerate(contents))
    else:
        mapping = contents if mapping_type is dict else mapping_type(contents)
    return getattr(mapping, kind)()


def _make_memoryview(data: bytes, writable: bool, format: str, shape: tuple) -> memoryview:
    return memoryview(bytearray(data) if writable else data).cast(format, shape)


def _make_descriptor(owner: type, name: str) -> Any:
    return vars(owner)[name]


def _make_weakset(items: list) -> weakref.WeakSet:
    return weakref.WeakSet(items)


def _make_text_file(contents: str, position: int) -> io.StringIO:
    stream = io.StringIO(contents)
    stream.seek(position)
    return stream


def _make_binary_file(contents: bytes, position: int) -> io.BytesIO:
    stream = io.BytesIO(contents)
    stream.seek(position)
    return stream


def _dataclasses_attribute(name: str) -> Any:
    import dataclasses
    return getattr(dataclasses, name)


# --- deciding between by reference and by value -----------------------------

def _is_importable(obj: Any) -> bool:
    """True if the receiver can find ``obj`` as ``module.qualname``.

    The module must be loaded here under that name, must not be a main module,
    and walking the qualname must give back this very object.
    """
    module_name = getattr(obj, "__module__", None)
    if module_name is None or module_name in _MAIN_MODULE_NAMES:
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(qualname, str) or "<" in qualname:  # <locals>, <lambda>
        return False
    target = module
    try:
        for part in qualname.split("."):
            target = getattr(target, part)
    except Exception:  # a module __getattr__ may raise anything
        return False
    return target is obj


# Opcodes whose name argument is a global: functions use the *_GLOBAL ones,
# class bodies and module-level code the *_NAME ones.  co_names also holds
# attribute names (``sys.exit`` lists "exit"), which are not globals.
_GLOBAL_OPS = frozenset(("LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL",
                         "LOAD_NAME", "STORE_NAME", "DELETE_NAME",
                         "LOAD_FROM_DICT_OR_GLOBALS"))   # 3.12+: annotation scopes


@functools.lru_cache(maxsize=1024)
def _code_names(code: types.CodeType) -> tuple:
    """(global names, every name) of ``code`` and the code objects nested in it:
    the globals a function needs, and the names it may reach submodules by
    (``os.path.join`` reads the attribute "path")."""
    global_names = set()
    all_names = set()
    pending = [code]
    while pending:
        current = pending.pop()
        all_names.update(current.co_names)
        global_names.update(instruction.argval for instruction in dis.get_instructions(current)
                            if instruction.opname in _GLOBAL_OPS)
        pending.extend(const for const in current.co_consts if type(const) is types.CodeType)
    return frozenset(global_names), frozenset(all_names)


def _global_names(code: types.CodeType) -> frozenset:
    """The global names ``code`` and the code objects nested in it look up."""
    return _code_names(code)[0]


def _referenced_submodules(module: types.ModuleType, names: set) -> list:
    """Loaded submodules of ``module`` reachable through attribute names the
    code uses (``os.path`` for code reading ``os.path.join``)."""
    found = []
    prefixes = [module.__name__]
    while prefixes:
        prefix = prefixes.pop()
        for name in names:
            submodule = sys.modules.get(prefix + "." + name)
            if submodule is not None:
                found.append(submodule)
                prefixes.append(submodule.__name__)
    return found


# --- the pickler ------------------------------------------------------------

class _Pickler(pickle.Pickler):
    """C pickler that sends dynamic functions, classes and code by value.

    Per-payload attributes are class-level defaults overridden on first use,
    so that plain data pays nothing for them; ``reset_payload_state`` restores
    them before the pickler is reused.
    """

    wrote_by_value = False
    _base_globals_by_id = None
    namespace = None   # dumps(namespace=...): functions' globals shared across payloads

    def __init__(self, buffer: io.BytesIO, protocol: int):
        super().__init__(buffer, protocol)
        self.buffer = buffer

    def reset_payload_state(self) -> None:
        """Forget what the last payload set, before this pickler is reused."""
        del self.wrote_by_value
        self._base_globals_by_id = None
        self.namespace = None

    def reducer_override(self, obj: Any) -> Any:
        reducer = _REDUCER_BY_TYPE.get(type(obj))
        if reducer is not None:
            return reducer(self, obj)
        if isinstance(obj, type):  # classes with a custom metaclass
            return _reduce_class(self, obj)
        if type(obj).__module__ == "dataclasses":
            return _reduce_dataclasses_sentinel(obj)
        return NotImplemented

    def base_globals_for(self, source_globals: dict) -> dict:
        """The one new globals dict standing for ``source_globals`` in this payload."""
        if self._base_globals_by_id is None:
            self._base_globals_by_id = {}
        entry = self._base_globals_by_id.get(id(source_globals))
        if entry is None:
            # Keep source_globals alive with its entry so its id is not reused.
            # __package__ lets the function's relative imports resolve there.
            name = _name(source_globals.get("__name__"))
            package = _name(source_globals.get("__package__"))
            if self.namespace is not None and type(name) is str:
                stand_in = _SharedNamespace(self.namespace, name, package)
            else:
                stand_in = {"__name__": name, "__package__": package}
            entry = (source_globals, stand_in)
            self._base_globals_by_id[id(source_globals)] = entry
        return entry[1]


# marshal from version 3 on marks an object for back-references only when more
# than one reference to it exists, so its bytes follow reference counts, which
# differ between processes and after a round trip.  Version 2 writes no
# back-references: the same code object gives the same bytes everywhere.
_MARSHAL_VERSION = 2


def _reduce_code(pickler: _Pickler, code: types.CodeType) -> tuple:
    pickler.wrote_by_value = True
    marshalled = marshal.dumps(code, _MARSHAL_VERSION)
    return _load_code, (marshalled, binascii.crc32(marshalled))


def _reduce_cell(pickler: _Pickler, cell: types.CellType) -> tuple:
    # Always empty: the function owning the cell fills it in its state step,
    # after the function is memoized, so a cell may refer to its function.
    return _make_empty_cell, ()


def _reduce_function(pickler: _Pickler, func: types.FunctionType) -> Any:
    if _is_importable(func):
        return NotImplemented
    pickler.wrote_by_value = True
    code = func.__code__
    source_globals = func.__globals__
    global_names, all_names = _code_names(code)
    referenced_globals = {name: source_globals[name]
                          for name in sorted(global_names) if name in source_globals}
    submodules = []
    for value in referenced_globals.values():
        if type(value) is types.ModuleType:
            submodules.extend(_referenced_submodules(value, all_names))
    submodules.sort(key=lambda module: module.__name__)
    closure = func.__closure__
    cell_values = None
    if closure:
        cell_values = tuple(_cell_value(cell) for cell in closure)
    state = (
        referenced_globals, tuple(submodules), cell_values,
        func.__defaults__, func.__kwdefaults__, func.__annotations__ or None,
        func.__dict__ or None, func.__doc__, _name(func.__qualname__), _name(func.__module__),
        _function_extras(func),
    )
    skeleton_args = (code, pickler.base_globals_for(source_globals), _name(func.__name__),
                     closure)
    return _make_function_skeleton, skeleton_args, state, None, None, _set_function_state


def _name(text: Any) -> Any:
    """A name as the payload writes it: interned, so that pickle's memo (which
    goes by identity) writes equal names the same way in any process, also
    after a round trip, where unpickled strings are new objects."""
    return sys.intern(text) if type(text) is str else text


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # the variable was never assigned
        return _EmptyCell


def _function_extras(func: types.FunctionType) -> dict | None:
    type_params = getattr(func, "__type_params__", None)  # 3.12+ generics
    if type_params:
        return {"__type_params__": type_params}
    return None


def _reduce_class(pickler: _Pickler, cls: type) -> Any:
    if _is_importable(cls):
        return NotImplemented
    if not cls.__flags__ & _HEAPTYPE_FLAG:
        if cls in _SINGLETON_BY_BUILTIN_TYPE:
            return type, (_SINGLETON_BY_BUILTIN_TYPE[cls],)
        if cls in _TYPES_MODULE_NAMES:
            return getattr, (types, _TYPES_MODULE_NAMES[cls])
        return NotImplemented  # a C type pickle cannot find: let it explain
    pickler.wrote_by_value = True
    class_dict = cls.__dict__
    skeleton_namespace = {"__module__": _name(cls.__module__),
                          "__qualname__": _name(cls.__qualname__)}
    if class_dict.get("__doc__") is not None:
        skeleton_namespace["__doc__"] = class_dict["__doc__"]
    for key in ("__slots__", "__orig_bases__"):
        if key in class_dict:
            skeleton_namespace[key] = class_dict[key]
    token = _class_token(cls)
    if isinstance(cls, enum.EnumMeta):
        return _reduce_enum_class(cls, skeleton_namespace, token)
    attributes = tuple((key, value) for key, value in class_dict.items()
                       if key not in _CLASS_KEYS_NOT_IN_STATE
                       and not _is_own_slot_descriptor(cls, value))
    skeleton_args = (type(cls), _name(cls.__name__), cls.__bases__, skeleton_namespace, token)
    state = (attributes, (), _abc_registrations(cls))
    return _make_class_skeleton, skeleton_args, state, None, None, _set_class_state


def _abc_registrations(cls: type) -> tuple:
    """The classes registered with an abstract base class (``cls.register``), in
    a stable order; its caches are not sent (the receiver's ABC rebuilds them)."""
    if not isinstance(cls, abc.ABCMeta):
        return ()
    try:
        registry = abc._get_dump(cls)[0]                       # the C implementation
    except (AttributeError, TypeError):
        registry = getattr(cls, "_abc_registry", ())           # _py_abc
    registered = [ref() for ref in registry]
    return tuple(sorted((sub for sub in registered if sub is not None),
                        key=lambda sub: (sub.__module__, sub.__qualname__)))


def _is_own_slot_descriptor(cls: type, value: Any) -> bool:
    return (type(value) in (types.MemberDescriptorType, types.GetSetDescriptorType)
            and value.__objclass__ is cls)


@functools.lru_cache(maxsize=None)
def _enum_machinery_names() -> frozenset:
    """Class __dict__ keys the enum metaclass creates by itself."""
    names = set()
    for base in (enum.Enum, enum.IntEnum, enum.Flag, enum.IntFlag):
        names.update(vars(base("_Probe", "A")))
    return frozenset(names - {"A"})


def _reduce_enum_class(cls: type, skeleton_namespace: dict, token: str) -> tuple:
    member_map = cls._member_map_
    machinery = _enum_machinery_names()
    attributes = []
    for key, value in cls.__dict__.items():
        if key in member_map or key in _CLASS_KEYS_NOT_IN_STATE:
            continue
        # Keep a user's own override of a machinery name (a __str__ defined
        # in the enum body), drop what the metaclass would recreate.
        if key in machinery and not (type(value) is types.FunctionType
                                     and not _is_importable(value)):
            continue
        if _is_own_slot_descriptor(cls, value):
            continue
        attributes.append((key, value))
    members = tuple((name, member._value_) for name, member in member_map.items())
    skipped_member_keys = ("_value_", "_name_", "__objclass__", "_sort_order_")
    member_attributes = []
    for name in cls._member_names_:
        extra = {key: value for key, value in vars(member_map[name]).items()
                 if key not in skipped_member_keys}
        if extra:
            member_attributes.append((name, extra))
    skeleton_args = (type(cls), cls.__name__, cls.__bases__, skeleton_namespace,
                     members, token)
    state = (tuple(attributes), tuple(member_attributes), ())
    return _make_enum_skeleton, skeleton_args, state, None, None, _set_class_state


def _reduce_module(pickler: _Pickler, module: types.ModuleType) -> tuple:
    name = module.__name__
    if sys.modules.get(name) is module and name not in _MAIN_MODULE_NAMES:
        return _import_module, (name,)
    pickler.wrote_by_value = True
    namespace = {key: value for key, value in vars(module).items()
                 if key not in ("__builtins__", "__loader__", "__spec__")}
    return _make_dynamic_module, (name, namespace)


def _reduce_typevar(pickler: _Pickler, typevar: typing.TypeVar) -> Any:
    if _is_importable_by_name(typevar):
        return NotImplemented
    return _make_typevar, (typevar.__name__, typevar.__bound__, typevar.__constraints__,
                           typevar.__covariant__, typevar.__contravariant__)


def _is_importable_by_name(obj: Any) -> bool:
    """For objects without a __qualname__ (TypeVar): module attribute __name__."""
    module_name = getattr(obj, "__module__", None)
    module = sys.modules.get(module_name) if module_name not in _MAIN_MODULE_NAMES else None
    return module is not None and getattr(module, obj.__name__, None) is obj


def _reduce_mappingproxy(pickler: _Pickler, proxy: types.MappingProxyType) -> tuple:
    return _make_mappingproxy, (dict(proxy),)


def _reduce_method(pickler: _Pickler, method: types.MethodType) -> tuple:
    return _make_method, (method.__func__, method.__self__)


def _reduce_classmethod(pickler: _Pickler, wrapper: Any) -> tuple:
    return type(wrapper), (wrapper.__func__,)


def _reduce_property(pickler: _Pickler, prop: property) -> tuple:
    return property, (prop.fget, prop.fset, prop.fdel, prop.__doc__)


def _reduce_dataclasses_sentinel(obj: Any) -> Any:
    """dataclasses compares some values by identity (MISSING, the field kind
    markers): send them as references to the worker's own objects."""
    import dataclasses
    if obj is dataclasses.MISSING:
        return _dataclasses_attribute, ("MISSING",)
    if obj is getattr(dataclasses, "_HAS_DEFAULT_FACTORY", None):
        return _dataclasses_attribute, ("_HAS_DEFAULT_FACTORY",)
    if obj is getattr(dataclasses, "KW_ONLY", None):
        return _dataclasses_attribute, ("KW_ONLY",)
    field_kind_name = getattr(obj, "name", None)
    if (isinstance(field_kind_name, str)
            and getattr(dataclasses, field_kind_name, None) is obj):
        return _dataclasses_attribute, (field_kind_name,)
    return NotImplemented


# The views of dict and OrderedDict: (type of view, mapping type, view kind).
_DICT_VIEWS = {type(getattr(mapping_type(), kind)()): (mapping_type, kind)
               for mapping_type in (dict, collections.OrderedDict)
               for kind in ("keys", "values", "items")}


def _reduce_dict_view(pickler: _Pickler, view: Any) -> tuple:
    mapping_type, kind = _DICT_VIEWS[type(view)]
    if kind != "items":
        return _make_dict_view, (mapping_type, kind, list(view))
    # Items as a dict: pickle's C code writes a dict faster than a list of pairs;
    # from 3.10 the view names its dict, which copies faster than pairs rebuild it.
    mapping = getattr(view, "mapping", None)
    return _make_dict_view, (mapping_type, kind, mapping.copy() if mapping is not None
                             else dict(view))


def _reduce_memoryview(pickler: _Pickler, view: memoryview) -> tuple:
    # tobytes() copies a sliced or non-contiguous view into C order: the
    # receiver gets a contiguous view of the same format, shape and values.
    return _make_memoryview, (view.tobytes(), not view.readonly, view.format, view.shape)


def _reduce_weakset(pickler: _Pickler, weak_set: weakref.WeakSet) -> tuple:
    # Its members by reference to the objects elsewhere in the payload: those
    # keep their identity, and those sent nowhere else die with the set's load.
    return _make_weakset, (list(weak_set),)


def _reduce_descriptor(pickler: _Pickler, descriptor: Any) -> tuple:
    # From the class's own namespace: getattr(type, "__dict__") would run the
    # descriptor instead of returning it.
    return _make_descriptor, (descriptor.__objclass__, descriptor.__name__)


def _reduce_file(pickler: _Pickler, stream: Any) -> tuple:
    """A file open for reading: its contents, and the position it is at (what
    cloudpickle sends); the receiver reads from a StringIO or BytesIO."""
    if stream is sys.stdout or stream is sys.stderr or stream is sys.stdin:
        return getattr, (sys, {sys.stdout: "stdout", sys.stderr: "stderr",
                               sys.stdin: "stdin"}[stream])
    name = getattr(stream, "name", "<file>")
    if stream.closed:
        raise pickle.PicklingError("cannot send the closed file %r" % (name,))
    if not stream.readable():
        raise pickle.PicklingError("cannot send the file %r: it is not open for reading "
                                   "(mode %r)" % (name, getattr(stream, "mode", "?")))
    position = stream.tell()
    stream.seek(0)
    try:
        contents = stream.read()
    finally:
        stream.seek(position)
    maker = _make_text_file if isinstance(contents, str) else _make_binary_file
    return maker, (contents, position)


_REDUCER_BY_TYPE = {
    types.FunctionType: _reduce_function,
    type: _reduce_class,
    enum.EnumMeta: _reduce_class,
    types.CodeType: _reduce_code,
    types.CellType: _reduce_cell,
    types.ModuleType: _reduce_module,
    types.MethodType: _reduce_method,
    classmethod: _reduce_classmethod,
    staticmethod: _reduce_classmethod,
    property: _reduce_property,
    types.MappingProxyType: _reduce_mappingproxy,
    typing.TypeVar: _reduce_typevar,
    memoryview: _reduce_memoryview,
    weakref.WeakSet: _reduce_weakset,
    types.GetSetDescriptorType: _reduce_descriptor,
    types.MemberDescriptorType: _reduce_descriptor,
    io.TextIOWrapper: _reduce_file,
    io.BufferedReader: _reduce_file,
    io.BufferedRandom: _reduce_file,
    io.FileIO: _reduce_file,
    **{view_type: _reduce_dict_view for view_type in _DICT_VIEWS},
}


# --- public API -------------------------------------------------------------

def _resolve_protocol(protocol: int | None) -> int:
    if protocol is None:
        return DEFAULT_PROTOCOL
    if protocol < 0:
        return pickle.HIGHEST_PROTOCOL
    if protocol < 2 or protocol > pickle.HIGHEST_PROTOCOL:
        raise ValueError("minicw payloads need a pickle protocol between 2 and %d, got %d"
                         % (pickle.HIGHEST_PROTOCOL, protocol))
    return protocol


def dumps(obj: Any, protocol: int | None = None, namespace: str | None = None) -> bytes:
    """Serialize ``obj``, sending dynamic functions and classes by value.

    ``namespace``: the functions of one module sent under this token share one
    globals dict in the receiving process, across payloads (else each payload
    gets its own).

    Returns an ordinary pickle (``pickle.loads`` reads it wherever minicw is
    importable).  Raises :class:`SerializationError` naming the object and its
    path when something in ``obj`` cannot be serialized; exceptions raised by
    the user's own ``__reduce__``/``__getstate__`` propagate unchanged.
    """
    protocol = DEFAULT_PROTOCOL if protocol is None else _resolve_protocol(protocol)
    idle_picklers = _idle_picklers.__dict__  # this thread's, by protocol
    pickler = idle_picklers.pop(protocol, None)
    if pickler is None:
        pickler = _Pickler(io.BytesIO(), protocol)
    if namespace is not None:
        pickler.namespace = namespace
    try:
        pickler.dump(obj)
    except (TypeError, pickle.PicklingError) as exc:
        if _raised_by_user_code(exc):
            raise
        raise _explain_failure(obj, protocol, exc) from exc
    except RecursionError:
        # The pickler is dropped (its memo may be half full); the stack is unwound.
        raise SerializationError(
            "cannot serialize %s: it is nested more deeply than Python's recursion limit "
            "(%d) lets pickle follow; flatten it, or raise sys.setrecursionlimit"
            % (_describe(obj), sys.getrecursionlimit())) from None
    buffer = pickler.buffer
    body = buffer.getvalue()
    pickler.clear_memo()  # also drops references to the user's objects
    buffer.seek(0)
    buffer.truncate()
    if pickler.wrote_by_value:
        pickler.reset_payload_state()
        idle_picklers[protocol] = pickler
        return _header_for(protocol, body) + body
    if namespace is not None:
        pickler.namespace = None
    idle_picklers[protocol] = pickler
    return body


# Creating a C pickler and its buffer costs about as much as pickling a small
# dict, so each thread keeps one idle pickler per protocol for the next dumps.
# It is taken out while in use (a dumps nested in a __reduce__ gets a fresh
# one) and dropped after an error.
_idle_picklers = threading.local()


def loads(data: bytes | bytearray | memoryview) -> Any:
    """Rebuild an object from a :func:`dumps` payload.

    Raises :class:`IncompatiblePythonError` when the payload carries bytecode
    of another Python version, :class:`SerializationError` when it is
    truncated, corrupted or refers to something not importable here.
    """
    try:
        if data[2:3] == b"c":  # GLOBAL right after PROTO: maybe our header
            _verify_header(data)
        return pickle.loads(data)
    except SerializationError:
        raise
    except _MALFORMED_PAYLOAD_ERRORS as exc:
        raise SerializationError("cannot load payload: it is truncated or corrupted "
                                 "(%s: %s)" % (type(exc).__name__, exc)) from exc
    except (ImportError, AttributeError) as exc:
        raise SerializationError("cannot load payload: it refers to something not "
                                 "importable here (%s: %s)" % (type(exc).__name__, exc)) from exc


def dump(obj: Any, file: BinaryIO, protocol: int | None = None) -> None:
    """Write ``dumps(obj, protocol)`` to the binary file ``file``."""
    file.write(dumps(obj, protocol))


def load(file: BinaryIO) -> Any:
    """Read a :func:`dump` payload from the binary file ``file`` (to its end)."""
    return loads(file.read())


# --- explaining failures ----------------------------------------------------

_THIS_FILE = os.path.normcase(os.path.abspath(__file__))


def _raised_by_user_code(exc: BaseException) -> bool:
    """True if the innermost frame of ``exc`` is neither ours, nor the standard
    library's or an installed package's, nor C code called straight from
    ``dumps`` (whose errors show ``dumps`` itself as innermost frame)."""
    traceback = exc.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    filename = os.path.normcase(os.path.abspath(traceback.tb_frame.f_code.co_filename))
    return filename != _THIS_FILE and not filename.startswith(_LIBRARY_DIRS)


def _describe(obj: Any) -> str:
    if isinstance(obj, (types.FunctionType, type)):
        return "%s %r" % ("function" if isinstance(obj, types.FunctionType) else "class",
                          obj.__qualname__)
    obj_type = type(obj)
    module = obj_type.__module__
    prefix = "" if module == "builtins" else module + "."
    return "<%s%s object>" % (prefix, obj_type.__qualname__)


def _fails_to_pickle(obj: Any, protocol: int) -> bool:
    try:
        _Pickler(io.BytesIO(), protocol).dump(obj)
    except Exception:
        return True
    return False


def _explain_failure(root: Any, protocol: int, exc: BaseException) -> SerializationError:
    try:
        culprit, path = _find_culprit(root, protocol)
    except Exception:  # the search runs user code; never mask the real error
        logger.debug("could not locate the unpicklable object", exc_info=True)
        culprit, path = root, []
    where = ", in ".join(path) if path else "the object passed to dumps"
    logger.debug("cannot serialize %s: %s", _describe(culprit), where)
    return SerializationError("cannot serialize %s: %s (%s: %s)"
                              % (_describe(culprit), where, type(exc).__name__, exc))


def _find_culprit(root: Any, protocol: int) -> tuple:
    """Descend from ``root`` into the first child that fails to pickle, down to
    the deepest one; return it with the labels of the path, innermost first."""
    culprit, path = root, []
    seen = {id(root)}
    for _depth in range(64):
        for label, child in _children(culprit, protocol):
            if id(child) in seen:
                continue
            seen.add(id(child))
            if _fails_to_pickle(child, protocol):
                culprit = child
                path.insert(0, label)
                break
        else:
            break
    return culprit, path


def _children(obj: Any, protocol: int) -> Iterator:
    """(label, child) pairs for the parts of ``obj`` pickling descends into."""
    if isinstance(obj, types.FunctionType):
        yield from _function_children(obj)
    elif isinstance(obj, type):
        reduced = _reduce_class(_Pickler(io.BytesIO(), protocol), obj)
        if reduced is not NotImplemented and len(reduced) > 2:
            for key, value in reduced[2][0]:  # the attributes the state step sets
                yield "attribute %r of class %r" % (key, obj.__qualname__), value
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield "key %r of a dict" % (key,), key
            yield "value for key %r of a dict" % (key,), value
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for index, item in enumerate(obj):
            yield "item %d of a %s" % (index, type(obj).__name__), item
    elif isinstance(obj, types.MethodType):
        yield "instance of bound method %r" % obj.__func__.__qualname__, obj.__self__
        yield "function of bound method %r" % obj.__func__.__qualname__, obj.__func__
    elif isinstance(obj, functools.partial):
        yield "function of a partial", obj.func
        for index, arg in enumerate(obj.args):
            yield "argument %d of a partial" % index, arg
        for key, value in obj.keywords.items():
            yield "keyword argument %r of a partial" % key, value
    elif isinstance(obj, (classmethod, staticmethod)):
        yield "function of a %s" % type(obj).__name__, obj.__func__
    elif isinstance(obj, property):
        for role in ("fget", "fset", "fdel"):
            yield "%s of a property" % role, getattr(obj, role)
    else:
        yield from _instance_children(obj, protocol)


def _function_children(func: types.FunctionType) -> Iterator:
    qualname = func.__qualname__
    source_globals = func.__globals__
    for name in sorted(_global_names(func.__code__)):
        if name in source_globals:
            yield ("global %r referenced by function %r" % (name, qualname),
                   source_globals[name])
    for name, cell in zip(func.__code__.co_freevars, func.__closure__ or ()):
        value = _cell_value(cell)
        if value is not _EmptyCell:
            yield "closure variable %r of function %r" % (name, qualname), value
    for index, value in enumerate(func.__defaults__ or ()):
        yield "default value %d of function %r" % (index, qualname), value
    for name, value in (func.__kwdefaults__ or {}).items():
        yield "default of keyword-only argument %r of function %r" % (name, qualname), value
    for name, value in func.__dict__.items():
        yield "attribute %r of function %r" % (name, qualname), value
    for name, value in (func.__annotations__ or {}).items():
        yield "annotation of %r of function %r" % (name, qualname), value


def _instance_children(obj: Any, protocol: int) -> Iterator:
    try:
        reduced = obj.__reduce_ex__(protocol)
    except Exception:  # obj itself is the culprit
        return
    if not isinstance(reduced, tuple):
        return
    owner = _describe(obj)
    args = reduced[1] if len(reduced) > 1 else ()
    for index, arg in enumerate(args or ()):
        if index == 0 and reduced[0] is copyreg.__newobj__:
            continue  # the class itself
        yield "constructor argument %d of %s" % (index, owner), arg
    state = reduced[2] if len(reduced) > 2 else None
    if isinstance(state, tuple) and len(state) == 2:  # (__dict__, slots)
        state = dict(itertools.chain((state[0] or {}).items(), (state[1] or {}).items()))
    if isinstance(state, dict):
        for key, value in state.items():
            yield "attribute %r of %s" % (key, owner), value
    elif state is not None:
        yield "state of %s" % owner, state
