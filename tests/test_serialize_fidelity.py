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
