"""minicw.serialize against cloudpickle's behaviour: which names are globals,
relative imports, deeply nested data.  Shipped to a real spawn process, as in
test_serialize.py."""
import sys

import pytest

from minicw import serialize
from minicw.errors import SerializationError
from test_serialize import define_in_main, pool, ship  # noqa: F401  (fixture)


def test_attribute_names_are_not_globals(pool):
    # "exit" is an attribute here (sys.exit) and also a global of the module,
    # one that cannot be pickled: it must not travel.
    main = define_in_main("""
        import sys, threading
        exit = threading.Lock()
        def leave_quietly(code):
            if code is None:
                sys.exit(0)
            return code + 1
    """)
    leave_quietly = main["leave_quietly"]
    serialize.dumps(leave_quietly)       # the lock would fail to pickle
    assert ship(pool, lambda: leave_quietly(1)) == 2


def test_globals_written_and_deleted_travel_and_class_body_names_too(pool):
    main = define_in_main("""
        COUNT = 5
        LIMIT = 3
        def bump():
            global COUNT
            COUNT += 1
            return COUNT
        def make_class():
            class Holder:
                size = LIMIT          # a name lookup of a class body
            return Holder.size
    """)
    bump, make_class = main["bump"], main["make_class"]
    assert ship(pool, lambda: (bump(), make_class())) == (6, 3)


def test_relative_imports_inside_a_function_sent_by_value(pool, tmp_path, monkeypatch):
    package = tmp_path / "relpkg_minicw"
    package.mkdir()
    # In the package's __init__: its __name__ has no dot, so only __package__
    # tells a relative import where it is.
    (package / "__init__.py").write_text(
        "def make():\n"
        "    def inner():\n"
        "        from . import helper\n"
        "        from .helper import VALUE\n"
        "        return helper.VALUE + VALUE\n"
        "    return inner\n")
    (package / "helper.py").write_text("VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    inner = importlib.import_module("relpkg_minicw").make()   # by value: <locals>
    payload = serialize.dumps(inner)
    sys.modules.pop("relpkg_minicw.helper", None)
    sys.modules.pop("relpkg_minicw")
    # The spawn worker finds the package on the path this test gave it.
    assert ship(pool, lambda: _run_with_path(str(tmp_path), payload)) == 84


def _run_with_path(folder, payload):
    import sys
    from minicw import serialize as worker_serialize
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return worker_serialize.loads(payload)()


def test_too_deep_nesting_is_a_clear_error_and_the_process_goes_on():
    deep = []
    for _ in range(sys.getrecursionlimit() * 10):
        deep = [deep]
    with pytest.raises(SerializationError, match="nested more deeply than Python's "
                                                 "recursion limit"):
        serialize.dumps(deep)
    assert serialize.loads(serialize.dumps(lambda: 7))() == 7


DETERMINISM_SOURCE = '''
import math
K = 3
def scaled(x, y=2):
    "doc"
    return [math.sqrt(x * K + i) for i in range(y)]
class Point:
    origin = (0, 0)
    def norm(self):
        return math.hypot(*self.xy) + K
    @property
    def xy(self):
        return self.x, self.y
def make_adder(a):
    return lambda b: a + b + K
point = Point()
point.x, point.y = 3, 4
'''

DETERMINISM_SCRIPT = """
import hashlib, sys, textwrap
from minicw import serialize
namespace = {"__name__": "__main__"}
exec(compile(%r, "<main>", "exec"), namespace)
for name in ("scaled", "Point", "point", "adder"):
    obj = namespace["make_adder"](5) if name == "adder" else namespace[name]
    print(name, hashlib.sha256(serialize.dumps(obj)).hexdigest())
""" % DETERMINISM_SOURCE


def _digests_of_a_fresh_process():
    import os
    import subprocess
    from test_serialize import subprocess_env
    env = dict(subprocess_env())
    env.pop("PYTHONHASHSEED", None)   # each process hashes strings its own way
    done = subprocess.run([sys.executable, "-c", DETERMINISM_SCRIPT], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env,
                          timeout=60, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_same_objects_give_the_same_bytes_in_two_fresh_processes():
    first, second = _digests_of_a_fresh_process(), _digests_of_a_fresh_process()
    assert first == second and len(first.splitlines()) == 4


def test_the_same_objects_give_the_same_bytes_twice_and_after_a_round_trip(pool):
    main = define_in_main(DETERMINISM_SOURCE)
    for obj in (main["scaled"], main["Point"], main["point"], main["make_adder"](5)):
        payload = serialize.dumps(obj)
        assert serialize.dumps(obj) == payload
        # Loaded in a spawn process and dumped there again: the same bytes.
        assert pool.submit(_dump_again, payload).result(timeout=60) == payload


def _dump_again(payload):
    from minicw import serialize as worker_serialize
    return worker_serialize.dumps(worker_serialize.loads(payload))


def test_dict_views_of_dicts_and_ordered_dicts(pool):
    import collections
    plain = {"a": 1, "b": 2}
    ordered = collections.OrderedDict([("z", 26), ("y", 25)])
    views = (plain.keys(), plain.values(), plain.items(),
             ordered.keys(), ordered.values(), ordered.items())
    got = ship(pool, lambda: [(type(view).__name__, list(view)) for view in views])
    assert got == [("dict_keys", ["a", "b"]), ("dict_values", [1, 2]),
                   ("dict_items", [("a", 1), ("b", 2)]), ("odict_keys", ["z", "y"]),
                   ("odict_values", [26, 25]), ("odict_items", [("z", 26), ("y", 25)])]


def test_memoryviews_large_sliced_and_non_contiguous(pool):
    import array
    large = memoryview(bytes(range(256)) * 40000)                  # 10 MB
    sliced = memoryview(bytearray(b"abcdefgh"))[2:6]
    strided = memoryview(bytearray(b"abcdefgh"))[::3]
    typed = memoryview(array.array("i", [1, -2, 3, -4])).cast("B").cast("i", (2, 2))
    got = ship(pool, lambda: [(bytes(large) == bytes(range(256)) * 40000, large.readonly),
                              (bytes(sliced), sliced.readonly), bytes(strided),
                              (typed.format, typed.shape, typed.tolist())])
    assert got == [(True, True), (b"cdef", False), b"adg", ("i", (2, 2), [[1, -2], [3, -4]])]


def test_a_weakset_keeps_the_identity_of_members_sent_with_it(pool):
    main = define_in_main("""
        import weakref
        class Node:
            pass
        first, second = Node(), Node()
        members = weakref.WeakSet([first, second])
    """)
    first, second, members = main["first"], main["second"], main["members"]
    assert ship(pool, lambda: (len(members), first in members, second in members,
                               type(first) is type(second))) == (2, True, True, True)


def test_getset_and_member_descriptors_of_builtin_types(pool):
    import types
    getset = type.__dict__["__dict__"]
    member = types.FunctionType.__dict__["__globals__"]
    assert ship(pool, lambda: (getset is type.__dict__["__dict__"],
                               member is types.FunctionType.__dict__["__globals__"])) \
        == (True, True)


def test_files_open_for_reading_travel_with_their_contents_and_position(pool, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("line one\nline two\n")
    text = open(str(path))
    text.readline()
    binary = open(str(path), "rb")
    binary.read(5)
    try:
        assert ship(pool, lambda: (text.read(), binary.read())) == ("line two\n",
                                                                     b"one\nline two\n")
        assert text.tell() == 9           # the sender's file is where it was
    finally:
        text.close()
        binary.close()
    with pytest.raises(SerializationError, match="closed file"):
        serialize.dumps(text)
    with open(str(tmp_path / "out.txt"), "w") as written:
        with pytest.raises(SerializationError, match="not open for reading"):
            serialize.dumps(written)


def test_dynamic_classes_keep_their_identity_across_payloads_and_coming_back(pool):
    main = define_in_main("""
        class Box:
            def __init__(self, value):
                self.value = value
        def same_class(a, b):
            return type(a) is type(b), isinstance(b, type(a))
    """)
    Box, same_class = main["Box"], main["same_class"]
    first = serialize.dumps(Box(1))
    second = serialize.dumps(Box(2))
    assert pool.submit(_load_two_and_compare, first, second).result(timeout=60) == (True, True)
    back = pool.submit(_box_again, first).result(timeout=60)
    returned = serialize.loads(back)
    assert type(returned) is Box and returned.value == 2


def _load_two_and_compare(first, second):
    from minicw import serialize as worker_serialize
    a, b = worker_serialize.loads(first), worker_serialize.loads(second)
    return type(a) is type(b), isinstance(b, type(a))


def _box_again(payload):
    from minicw import serialize as worker_serialize
    box = worker_serialize.loads(payload)
    return worker_serialize.dumps(type(box)(box.value + 1))


def test_abstract_classes_from_main_keep_their_registrations(pool):
    main = define_in_main("""
        import abc
        class Shape(abc.ABC):
            @abc.abstractmethod
            def area(self): ...
        class Square:
            def area(self):
                return 4
        Shape.register(Square)
    """)
    Shape, Square = main["Shape"], main["Square"]
    payload = serialize.dumps((Shape, Square()))
    assert b"_abc_impl" not in payload                 # no ABC caches
    assert pool.submit(_registered, payload).result(timeout=60) == (True, True)


def _registered(payload):
    from minicw import serialize as worker_serialize
    shape, square = worker_serialize.loads(payload)
    return isinstance(square, shape), issubclass(type(square), shape)


def test_dynamic_modules_travel_by_value(pool):
    import types
    module = types.ModuleType("made_at_run_time")
    exec("import sys\nscale = 3\ndef triple(x):\n    return x * scale\n", module.__dict__)
    assert ship(pool, lambda: (module.triple(2), module.__name__)) == (6, "made_at_run_time")


def test_a_typevar_from_main_is_one_object_in_a_payload(pool):
    main = define_in_main("""
        import typing
        T = typing.TypeVar("T", bound=int)
        def first(items: typing.List[T]) -> T:
            return items[0]
    """)
    T, first = main["T"], main["first"]
    assert ship(pool, lambda: (T is first.__annotations__["return"], T.__name__,
                               T.__bound__ is int, first([5, 6]))) == (True, "T", True, 5)
