"""Tests for minicw.serialize: every object is shipped to a real ``spawn``
process (whose ``__main__`` is not ours) and checked there.

Most tests build a zero-argument *probe* closure that uses the shipped objects
and returns plain values; the probe is dumped with minicw (so the objects it
captures travel by value with it), run in the spawn worker, and its result is
asserted here.  Things "defined in __main__" are compiled into a namespace
whose ``__name__`` is ``"__main__"``; the script, ``python -`` and interactive
console cases run as real subprocesses.
"""
import asyncio
import base64
import concurrent.futures
import functools
import io
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

import minicw
from minicw import serialize
from minicw.errors import IncompatiblePythonError, SerializationError

CASES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serialize_cases")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if CASES_DIR not in sys.path:
    # The spawn worker inherits sys.path, so it can import the helper too.
    sys.path.insert(0, CASES_DIR)

import serialize_worker  # noqa: E402

SUBPROCESS_TIMEOUT_S = 60
PYENV_VERSIONS = "/root/.pyenv/versions"


@pytest.fixture(scope="module")
def pool():
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=1, mp_context=multiprocessing.get_context("spawn"))
    # Start the worker now, outside any test, so that the per-test leak check
    # (tests/conftest.py) sees it as already running.
    executor.submit(serialize_worker.main_module_names).result(timeout=60)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True)


def ship(pool, probe):
    """Dump ``probe`` with minicw, run it in the spawn worker, return its result."""
    return pool.submit(serialize_worker.run_probe, serialize.dumps(probe)).result(timeout=60)


def define_in_main(source):
    """Execute ``source`` as if it were the body of a ``__main__`` module."""
    namespace = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(source), "<main-simulation>", "exec"), namespace)
    return namespace


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --- functions ------------------------------------------------------------------

def test_lambda(pool):
    square = lambda x: x * x  # noqa: E731
    assert ship(pool, lambda: (square(7), square.__name__)) == (49, "<lambda>")


def test_nested_function_with_closure_cells(pool):
    def make(a, b, c, d, e):
        def combine(x):
            return [a, b, c, d, e, x]
        return combine

    combine = make(1, "two", [3], {"four": 4}, (5,))
    assert ship(pool, lambda: combine(6)) == [1, "two", [3], {"four": 4}, (5,), 6]


def test_closure_referring_to_itself(pool):
    def make():
        def fib(n):
            return n if n < 2 else fib(n - 1) + fib(n - 2)
        return fib

    fib = make()
    assert ship(pool, lambda: (fib(10), fib.__closure__[0].cell_contents is fib)) == (55, True)


def test_empty_closure_cell(pool):
    def make():
        def read_later():
            return later  # noqa: F821 - bound after return, never assigned
        return read_later
        later = 1  # noqa: F841

    read_later = make()

    def probe():
        try:
            read_later()
        except NameError as exc:
            return "NameError", "later" in str(exc)
        return "no error", False

    assert ship(pool, probe) == ("NameError", True)


def test_closure_cells_shared_between_functions(pool):
    def make():
        count = 0

        def bump():
            nonlocal count
            count += 1
            return count

        def read():
            return count
        return bump, read

    bump, read = make()
    assert ship(pool, lambda: (bump(), bump(), read())) == (1, 2, 2)


def test_function_in_simulated_main(pool):
    main = define_in_main("""
        OFFSET = 100
        def shifted(x):
            return x + OFFSET
    """)
    shifted = main["shifted"]

    def probe():
        import sys
        return (shifted(1), shifted.__module__,
                "shifted" in vars(sys.modules["__main__"]))

    assert ship(pool, probe) == (101, "__main__", False)


def test_function_in_main_of_a_script(pool):
    completed = subprocess.run(
        [sys.executable, os.path.join(CASES_DIR, "main_script.py")],
        capture_output=True, env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT_S, check=True)
    payload = bytes.fromhex(completed.stdout.decode())
    result = pool.submit(serialize_worker.call_loaded, payload, 4).result(timeout=60)
    assert result == (120, 6, 5, "__main__", "__main__")


STDIN_SCRIPT = """
import base64, sys
from minicw import serialize
BASE = 7
def times_base(x):
    return [x * BASE for _ in range(2)]
sys.stdout.write(base64.b64encode(serialize.dumps(times_base)).decode())
"""


def test_function_from_python_stdin(pool):
    completed = subprocess.run(
        [sys.executable, "-"], input=STDIN_SCRIPT.encode(), capture_output=True,
        env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT_S, check=True)
    payload = base64.b64decode(completed.stdout)
    assert pool.submit(serialize_worker.call_loaded, payload, 3).result(timeout=60) == [21, 21]


CONSOLE_LINES = """\
import base64, sys
from minicw import serialize
factor = 5
def scaled(x):
    return x * factor

class Box:
    def __init__(self, item):
        self.item = item

def make_box(x):
    return Box(scaled(x)).item

sys.stdout.write("PAYLOAD:" + base64.b64encode(serialize.dumps(make_box)).decode() + "\\n")
"""


def test_function_from_interactive_console(pool):
    # code.interact() reads the lines from stdin exactly as typed at a prompt.
    completed = subprocess.run(
        [sys.executable, "-c", "import code; code.interact(banner='', exitmsg='')"],
        input=CONSOLE_LINES.encode(), capture_output=True, env=subprocess_env(),
        timeout=SUBPROCESS_TIMEOUT_S, check=True)
    # Prompts (">>> ") are written to stdout too, ahead of our line.
    line = next(line for line in completed.stdout.decode().splitlines() if "PAYLOAD:" in line)
    payload = base64.b64decode(line.split("PAYLOAD:", 1)[1])
    assert pool.submit(serialize_worker.call_loaded, payload, 4).result(timeout=60) == 20


# --- globals ----------------------------------------------------------------------

def test_only_referenced_globals_travel(pool):
    main = define_in_main("""
        import threading
        UNPICKLABLE = threading.Lock()
        USED_BY_COMPREHENSION = 2
        USED_BY_INNER = 3
        USED_BY_DEFAULT_LAMBDA = 4
        def work(values, pick=lambda: USED_BY_DEFAULT_LAMBDA):
            def inner():
                return USED_BY_INNER
            return [v * USED_BY_COMPREHENSION for v in values], inner(), pick()
    """)
    work = main["work"]
    payload = serialize.dumps(work)  # would fail if UNPICKLABLE were sent
    assert b"UNPICKLABLE" not in payload
    assert ship(pool, lambda: work([1, 2])) == ([2, 4], 3, 4)


def test_modules_travel_by_reference_with_aliases_and_submodules(pool):
    main = define_in_main("""
        import json as j
        import os.path
        import xml.etree.ElementTree
        def use_modules():
            return (j.dumps([1]), os.path.join("a", "b"),
                    xml.etree.ElementTree.fromstring("<root/>").tag)
    """)
    use_modules = main["use_modules"]
    payload = serialize.dumps(use_modules)
    assert b"xml.etree.ElementTree" in payload
    assert ship(pool, lambda: use_modules()) == ("[1]", os.path.join("a", "b"), "root")


def test_recursive_and_mutually_recursive_functions(pool):
    main = define_in_main("""
        def factorial(n):
            return 1 if n <= 1 else n * factorial(n - 1)
        def is_even(n):
            return True if n == 0 else is_odd(n - 1)
        def is_odd(n):
            return False if n == 0 else is_even(n - 1)
    """)
    factorial, is_even = main["factorial"], main["is_even"]
    assert ship(pool, lambda: (factorial(6), is_even(10), is_even(7))) == (720, True, False)


def test_functions_sharing_a_global_share_one_object(pool):
    main = define_in_main("""
        SHARED = []
        def append(x):
            SHARED.append(x)
            return len(SHARED)
        def read():
            return list(SHARED)
    """)
    append, read = main["append"], main["read"]

    def probe():
        append(1)
        append(2)
        return read(), append.__globals__ is read.__globals__

    assert ship(pool, probe) == ([1, 2], True)


def test_global_statement_writes_are_seen_by_other_functions(pool):
    main = define_in_main("""
        total = 0
        def add(x):
            global total
            total += x
        def get():
            return total
    """)
    add, get = main["add"], main["get"]
    assert ship(pool, lambda: (add(5), add(6), get())[2]) == 11


# --- function attributes ----------------------------------------------------------

def test_function_attributes_survive(pool):
    main = define_in_main("""
        def annotated(a, b=2, *, c=3, d=4) -> int:
            '''Adds things.'''
            return a + b + c + d
        annotated.__annotations__ = {"a": int, "return": int}
        annotated.tag = "custom"
    """)
    annotated = main["annotated"]
    annotated.__qualname__ = "Outer.annotated"

    def probe():
        f = annotated
        return (f(1), f(1, 10, c=100), f.__defaults__, f.__kwdefaults__, f.tag, f.__doc__,
                f.__name__, f.__qualname__, f.__module__, sorted(f.__annotations__))

    assert ship(pool, probe) == (10, 115, (2,), {"c": 3, "d": 4}, "custom", "Adds things.",
                                 "annotated", "Outer.annotated", "__main__", ["a", "return"])


def test_generator_coroutine_and_async_generator_functions(pool):
    main = define_in_main("""
        def count_up(n):
            yield from range(n)
        async def double(x):
            return 2 * x
        async def agen(n):
            for i in range(n):
                yield i * 10
    """)
    count_up, double, agen = main["count_up"], main["double"], main["agen"]

    def probe():
        async def collect():
            return [x async for x in agen(3)], await double(21)
        return list(count_up(3)), asyncio.run(collect())

    assert ship(pool, probe) == ([0, 1, 2], ([0, 10, 20], 42))


def test_partial_and_bound_method(pool):
    main = define_in_main("""
        def power(base, exp):
            return base ** exp
        class Greeter:
            def __init__(self, greeting):
                self.greeting = greeting
            def greet(self, name):
                return self.greeting + ", " + name
    """)
    cube = functools.partial(main["power"], exp=3)
    greet = main["Greeter"]("hello").greet
    nested = functools.partial(lambda a, b: a - b, 10)
    assert ship(pool, lambda: (cube(2), greet("ann"), nested(3))) == (8, "hello, ann", 7)


# --- classes --------------------------------------------------------------------------

CLASSES_SOURCE = """
    import collections
    class Base:
        kind = "base"
        def __init__(self, value):
            self.value = value
        def describe(self):
            return "%s:%s" % (self.kind, self.value)
        @classmethod
        def create(cls, value):
            return cls(value)
        @staticmethod
        def helper(x):
            return x + 1
        @property
        def doubled(self):
            return self.value * 2
    class Child(Base):
        kind = "child"
        def describe(self):
            return "child(" + super().describe() + ")"
    class Slotted:
        __slots__ = ("x", "y")
        def __init__(self, x, y):
            self.x, self.y = x, y
        def total(self):
            return self.x + self.y
    class Counts(collections.OrderedDict):
        def top(self):
            return next(iter(self))
"""


def test_class_features(pool):
    main = define_in_main(CLASSES_SOURCE)
    Base, Child, Slotted, Counts = main["Base"], main["Child"], main["Slotted"], main["Counts"]

    def probe():
        child = Child.create(5)
        slotted = Slotted(1, 2)
        counts = Counts(a=1, b=2)
        return (Base(1).describe(), child.describe(), child.doubled, Child.helper(1),
                isinstance(child, Base), Child.kind, slotted.total(), hasattr(slotted, "__dict__"),
                counts.top(), type(counts).__mro__[1].__name__)

    assert ship(pool, probe) == ("base:1", "child(child:5)", 10, 2, True, "child", 3, False,
                                 "a", "OrderedDict")


def test_instances_of_main_classes(pool):
    main = define_in_main(CLASSES_SOURCE)
    instances = [main["Child"](3), main["Slotted"](4, 5), main["Child"](6)]

    def probe():
        child, slotted, other_child = instances
        return (child.describe(), slotted.total(), type(child) is type(other_child),
                type(child).__qualname__)

    assert ship(pool, probe) == ("child(child:3)", 9, True, "Child")


def test_class_defined_inside_a_function(pool):
    def make():
        factor = 3

        class Local:
            def scaled(self, x):
                return x * factor
        return Local

    Local = make()
    assert ship(pool, lambda: (Local().scaled(2), Local.__qualname__.endswith("<locals>.Local"))) \
        == (6, True)


def test_dataclass(pool):
    main = define_in_main("""
        import dataclasses
        @dataclasses.dataclass(frozen=True)
        class Point:
            x: int
            y: int = 0
            tags: list = dataclasses.field(default_factory=list)
            def norm1(self):
                return abs(self.x) + abs(self.y)
    """)
    Point = main["Point"]
    point = Point(3, -4)

    def probe():
        import dataclasses
        made = Point(1)
        return (point.norm1(), made == Point(1), dataclasses.asdict(point),
                [f.name for f in dataclasses.fields(Point)], repr(made))

    assert ship(pool, probe) == (
        7, True, {"x": 3, "y": -4, "tags": []}, ["x", "y", "tags"],
        "Point(x=1, y=0, tags=[])")


def test_enum_members_keep_identity(pool):
    main = define_in_main("""
        import enum
        class Color(enum.Enum):
            RED = 1
            GREEN = 2
            CRIMSON = 1
            def label(self):
                return self.name.lower()
        class Perm(enum.IntFlag):
            R = 4
            W = 2
        class Planet(enum.Enum):
            EARTH = (5.97, 6.37)
            def __init__(self, mass, radius):
                self.mass = mass
    """)
    Color, Perm, Planet = main["Color"], main["Perm"], main["Planet"]
    values = [Color.RED, Color.GREEN, Color.RED]

    def probe():
        red, green, red_again = values
        return (red is red_again, Color(1) is red, Color.CRIMSON is red, green.label(),
                [m.name for m in Color], int(Perm.R | Perm.W), Planet.EARTH.mass,
                isinstance(red, Color))

    assert ship(pool, probe) == (True, True, True, "green", ["RED", "GREEN"], 6, 5.97, True)


MODERN_TYPES_SOURCE = """
    import dataclasses, enum, typing
    class Color(enum.Enum):
        RED = enum.auto()
        BLUE = enum.auto()
        def __str__(self):
            return "color-" + self.name
    class Flags(enum.Flag):
        A = 1
        B = 2
        AB = 3
    T = typing.TypeVar("T")
    class Box(typing.Generic[T]):
        def __init__(self, item: T):
            self.item = item
"""
if sys.version_info >= (3, 10):
    MODERN_TYPES_SOURCE += """
    @dataclasses.dataclass(slots=True, kw_only=True, order=True)
    class Record:
        a: int
        b: list = dataclasses.field(default_factory=list)
        def total(self):
            return self.a + len(self.b)
    """


def test_enum_auto_flags_generics_and_slotted_dataclasses(pool):
    main = define_in_main(MODERN_TYPES_SOURCE)
    Color, Flags, Box = main["Color"], main["Flags"], main["Box"]
    Record = main.get("Record")

    def probe():
        records = None
        if Record is not None:
            records = (Record(a=1) < Record(a=2), Record(a=2, b=[1]).total(),
                       hasattr(Record(a=1), "__dict__"))
        return (str(Color.BLUE), Color.BLUE.value, (Flags.A | Flags.B) is Flags.AB,
                Box(3).item, Box[int].__origin__ is Box, records)

    expected_records = (True, 3, False) if Record is not None else None
    assert ship(pool, probe) == ("color-BLUE", 2, True, 3, True, expected_records)


def test_importable_functions_and_classes_go_by_reference(pool):
    payload = serialize.dumps([os.path.join, collections_ordered_dict()])
    assert payload == pickle.dumps([os.path.join, collections_ordered_dict()],
                                   protocol=serialize.DEFAULT_PROTOCOL)
    assert b"_check_python" not in payload
    assert ship(pool, lambda: os.path.join("x", "y")) == os.path.join("x", "y")


def collections_ordered_dict():
    import collections
    return collections.OrderedDict


# --- payload format, errors ----------------------------------------------------------

def test_plain_pickle_loads_payloads_in_spawn_worker(pool):
    offset = 11
    payload = serialize.dumps(lambda: offset * 2)
    assert pool.submit(serialize_worker.run_probe, payload, True).result(timeout=60) == 22


def test_payload_through_multiprocessing_pool():
    # The payload is ordinary bytes: it rides any pickle-based channel.
    base = 3
    payload = serialize.dumps(lambda x: x + base)
    with multiprocessing.get_context("spawn").Pool(1) as mp_pool:
        assert mp_pool.apply(serialize_worker.call_loaded, (payload, 4)) == 7
        mp_pool.close()
        mp_pool.join()


def test_plain_data_is_exactly_pickle():
    data = [1, 2.5, "text", b"raw", (None, True), {"k": [1, 2]}, {1, 2}]
    assert serialize.dumps(data) == pickle.dumps(data, protocol=serialize.DEFAULT_PROTOCOL)
    assert serialize.loads(serialize.dumps(data)) == data


def test_dumps_is_stable_for_the_same_function():
    main = define_in_main(CLASSES_SOURCE + """
    def uses_all(x):
        return Child(x).describe(), Slotted(x, x).total(), Counts(), collections
    """)
    assert serialize.dumps(main["uses_all"]) == serialize.dumps(main["uses_all"])


def test_dump_and_load_files():
    scale = 4
    buffer = io.BytesIO()
    serialize.dump(lambda x: x * scale, buffer)
    buffer.seek(0)
    assert serialize.load(buffer)(2) == 8


def test_payload_header_records_python_version(monkeypatch):
    payload = serialize.dumps(lambda: 1)
    tag = serialize.PYTHON_TAG
    assert tag.encode() in payload[:80]
    fake = tag[:-1] + ("0" if tag[-1] != "0" else "1")  # same length, other version
    # Plain pickle runs the check inside the payload.
    with pytest.raises(minicw.IncompatiblePythonError) as info:
        pickle.loads(payload.replace(tag.encode(), fake.encode(), 1))
    assert fake in str(info.value) and tag in str(info.value)
    # A well-formed payload written under the fake tag.
    monkeypatch.setattr(serialize, "_HEADER_TAG", fake.encode())
    fake_payload = serialize.dumps(lambda: 1)
    monkeypatch.undo()
    with pytest.raises(IncompatiblePythonError) as info:
        serialize.loads(fake_payload)
    assert (info.value.payload_python, info.value.this_python) == (fake, tag)


def other_python():
    """A supported interpreter of another minor version, if installed."""
    wanted = "3.8.18" if sys.version_info[:2] != (3, 8) else "3.11.7"
    path = os.path.join(PYENV_VERSIONS, wanted, "bin", "python")
    if not os.path.exists(path):
        pytest.skip("no other Python version at " + path)
    return path


def test_payload_from_other_python_version_raises_incompatible():
    python = other_python()
    completed = subprocess.run(
        [python, "-c", "import sys; from minicw import serialize; "
                       "sys.stdout.write(serialize.dumps(lambda x: x + 1).hex())"],
        capture_output=True, env=subprocess_env(), timeout=SUBPROCESS_TIMEOUT_S, check=True)
    with pytest.raises(IncompatiblePythonError) as info:
        serialize.loads(bytes.fromhex(completed.stdout.decode()))
    assert info.value.this_python == serialize.PYTHON_TAG
    assert info.value.payload_python != serialize.PYTHON_TAG
    assert info.value.payload_python in str(info.value) and serialize.PYTHON_TAG in str(info.value)


def test_payload_to_other_python_version_raises_incompatible():
    python = other_python()
    payload = serialize.dumps(lambda x: x + 1)
    completed = subprocess.run(
        [python, "-c", "import sys; from minicw import serialize\n"
                       "try:\n    serialize.loads(bytes.fromhex(sys.stdin.read()))\n"
                       "except Exception as exc:\n"
                       "    print(type(exc).__name__, exc.payload_python, '|', exc.this_python)"],
        input=payload.hex().encode(), capture_output=True, env=subprocess_env(),
        timeout=SUBPROCESS_TIMEOUT_S, check=True)
    name, rest = completed.stdout.decode().strip().split(" ", 1)
    payload_python, this_python = rest.split(" | ")
    assert name == "IncompatiblePythonError"
    assert payload_python == serialize.PYTHON_TAG and this_python != serialize.PYTHON_TAG


def test_truncated_payloads_raise_serialization_error():
    factor = 2
    payload = serialize.dumps(lambda x: x * factor)
    for length in range(len(payload)):
        with pytest.raises(SerializationError):
            serialize.loads(payload[:length])


def test_every_corrupted_byte_raises_serialization_error():
    main = define_in_main("""
        def poly(x):
            return [x ** 2 + 1 for _ in range(2)]
    """)
    payload = serialize.dumps(main["poly"])
    for position in range(len(payload)):
        corrupted = bytearray(payload)
        corrupted[position] ^= 0x5A
        with pytest.raises(SerializationError):
            serialize.loads(bytes(corrupted))


def test_corrupted_plain_data_raises_serialization_error():
    payload = serialize.dumps({"key": [1, 2, 3], "other": "text"})
    with pytest.raises(SerializationError):
        serialize.loads(payload[:-3])
    with pytest.raises(SerializationError):
        serialize.loads(b"\x80\x05garbage")
    with pytest.raises(SerializationError):
        serialize.loads(b"")


def test_corrupted_bytecode_fails_its_checksum_even_with_plain_pickle():
    payload = bytearray(serialize.dumps(lambda: 12345))
    position = payload.index(b"<lambda>") - 1  # inside the marshalled code
    payload[position] ^= 0xFF
    with pytest.raises(SerializationError, match="checksum"):
        serialize.loads(bytes(payload))
    with pytest.raises(SerializationError, match="checksum"):
        pickle.loads(bytes(payload))


def test_error_names_object_and_path():
    main = define_in_main("""
        import threading
        lock = threading.Lock()
        def work():
            return lock
    """)
    with pytest.raises(SerializationError) as info:
        serialize.dumps(main["work"])
    message = str(info.value)
    assert "_thread.lock" in message
    assert "global 'lock' referenced by function 'work'" in message


def test_error_paths_through_closures_and_attributes():
    class Holder:
        def __init__(self):
            self.conn = socket.socket()

    holder = Holder()
    try:
        def uses_holder():
            return holder

        with pytest.raises(SerializationError) as info:
            serialize.dumps(uses_holder)
        message = str(info.value)
        assert "socket" in message
        assert "attribute 'conn'" in message and "closure variable 'holder'" in message
    finally:
        holder.conn.close()


def test_generator_object_cannot_be_serialized():
    generator = (i for i in range(3))
    with pytest.raises(SerializationError, match="generator"):
        serialize.dumps({"jobs": [generator]})


class UserReduceError(Exception):
    pass


class RaisesInReduce:
    def __reduce__(self):
        raise UserReduceError("no thanks")


class RaisesTypeErrorInReduce:
    def __reduce__(self):
        raise TypeError("user says no")


def test_user_exceptions_propagate_unchanged():
    with pytest.raises(UserReduceError):
        serialize.dumps([RaisesInReduce()])
    with pytest.raises(TypeError, match="user says no") as info:
        serialize.dumps([RaisesTypeErrorInReduce()])
    assert not isinstance(info.value, SerializationError)


def test_threading_lock_in_arguments_named():
    with pytest.raises(SerializationError, match="lock"):
        serialize.dumps(("arg", threading.Lock()))


def test_bad_protocol_rejected():
    with pytest.raises(ValueError):
        serialize.dumps(1, protocol=1)


def test_class_is_reused_across_payloads_in_one_worker(pool):
    main = define_in_main(CLASSES_SOURCE)
    Child = main["Child"]
    result = pool.submit(serialize_worker.same_class_across_payloads,
                         serialize.dumps(Child), serialize.dumps(Child(8))).result(timeout=60)
    assert result == (True, "child(child:8)")


def test_more_class_kinds(pool):
    main = define_in_main("""
        import abc
        import collections
        import typing
        Pair = collections.namedtuple("Pair", "left right")
        class Typed(typing.NamedTuple):
            a: int
            b: str = "b"
        class Shape(abc.ABC):
            @abc.abstractmethod
            def area(self): ...
        class Square(Shape):
            def __init__(self, side):
                self.side = side
            def area(self):
                return self.side ** 2
        class JobFailed(Exception):
            pass
    """)
    Pair, Typed, Shape, Square, JobFailed = (main[name] for name in (
        "Pair", "Typed", "Shape", "Square", "JobFailed"))
    values = [Pair(1, 2), Typed(3), Square(4), JobFailed("boom")]

    def probe():
        pair, typed, square, error = values
        try:
            Shape()
            abstract_enforced = False
        except TypeError:
            abstract_enforced = True
        try:
            raise error
        except JobFailed as caught:
            caught_message = str(caught)
        return (pair.right, tuple(Pair(5, 6)), typed.b, typed._replace(a=9).a, square.area(),
                isinstance(square, Shape), abstract_enforced, caught_message)

    assert ship(pool, probe) == (2, (5, 6), "b", 9, 16, True, True, "boom")


class NestedDumps:
    """Serializes part of itself with a nested serialize.dumps call."""

    def __init__(self, func):
        self.func = func

    def __reduce__(self):
        return serialize.loads, (serialize.dumps(self.func),)


def test_nested_dumps_inside_reduce_and_reuse_after_error():
    offset = 40
    payload = serialize.dumps([NestedDumps(lambda x: x + offset), lambda: offset])
    inner, outer = serialize.loads(payload)
    assert (inner(2), outer()) == (42, 40)
    with pytest.raises(SerializationError):
        serialize.dumps([threading.Lock()])
    assert serialize.loads(serialize.dumps(lambda: offset + 1))() == 41
    assert serialize.dumps([1, 2]) == pickle.dumps([1, 2], protocol=serialize.DEFAULT_PROTOCOL)


def test_concurrent_dumps_from_threads_are_independent():
    results = {}

    def worker(index):
        results[index] = [serialize.loads(serialize.dumps(lambda: index * step))()
                          for step in range(50)]

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {index: [index * step for step in range(50)] for index in range(4)}
