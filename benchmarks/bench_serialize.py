"""Benchmark minicw.serialize against pickle and (when installed) cloudpickle.

Each case times ``loads(dumps(obj))`` per serializer.  Serializers run
interleaved within each repeat, so a slow moment of the machine hits all of
them alike; the reported time is the median over the repeats.

    python benchmarks/bench_serialize.py [--quick]

``run(quick)`` returns the rows for ``benchmarks/run.py``.  cloudpickle is
optional and never a dependency: its column is None when it is not installed.
"""
from __future__ import annotations

import os
import pickle
import statistics
import sys
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from minicw import serialize  # noqa: E402

try:
    import cloudpickle
except ImportError:  # optional comparison only
    cloudpickle = None

# Compiled as if typed in a notebook: a ``__main__`` namespace, so every
# serializer must send these by value.
CASES_SOURCE = """
def make_closure(a, b, c, d, e):
    def combine(x):
        return a + b + c + d + e + x
    return combine

class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
    def norm1(self):
        return abs(self.x) + abs(self.y)

small_lambda = lambda x: x + 1
closure_5 = make_closure(1, 2, 3, 4, 5)
point = Point(3, 4)
"""


def _build_cases() -> list:
    namespace = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(CASES_SOURCE), "<bench-main>", "exec"), namespace)
    plain_data = {"ids": list(range(20)), "name": "job-17", "weights": (0.5, 1.5)}
    # (case, object, whether plain pickle can serialize it correctly)
    return [
        ("small lambda", namespace["small_lambda"], False),
        ("closure, 5 captured values", namespace["closure_5"], False),
        ("__main__ class instance", namespace["point"], False),
        ("importable function (os.path.join)", os.path.join, True),
        ("plain data (dict of list/str/tuple)", plain_data, True),
        ("dict items view (100 entries)", {i: str(i) for i in range(100)}.items(), False),
        ("memoryview, 64 KB sliced", memoryview(bytes(range(256)) * 512)[1024:-1024], False),
        ("getset descriptor (type.__dict__)", type.__dict__["__dict__"], False),
    ]


def _round_trips(dumps, loads) -> object:
    def round_trip(obj):
        return loads(dumps(obj))
    return round_trip


def _time_per_call_us(round_trip, obj, iterations: int) -> float:
    started = time.perf_counter()
    for _ in range(iterations):
        round_trip(obj)
    return (time.perf_counter() - started) / iterations * 1e6


def run(quick: bool = False) -> list:
    """Measure every case; return one dict per case.

    Keys: ``case``, ``minicw_us``, ``pickle_us`` (None where pickle cannot send
    the object by value), ``cloudpickle_us`` (None when not installed) and
    ``ratio_minicw_cloudpickle``.
    """
    iterations = 200 if quick else 2000
    repeats = 3 if quick else 7
    serializers = {"minicw": _round_trips(serialize.dumps, serialize.loads),
                   "pickle": _round_trips(pickle.dumps, pickle.loads)}
    if cloudpickle is not None:
        serializers["cloudpickle"] = _round_trips(cloudpickle.dumps, cloudpickle.loads)
    rows = []
    for case, obj, plain_pickle_works in _build_cases():
        samples = {name: [] for name in serializers
                   if name != "pickle" or plain_pickle_works}
        for _ in range(repeats):
            for name in samples:
                samples[name].append(_time_per_call_us(serializers[name], obj, iterations))
        medians = {name: statistics.median(values) for name, values in samples.items()}
        cloud_us = medians.get("cloudpickle")
        rows.append({
            "case": case,
            "minicw_us": medians["minicw"],
            "pickle_us": medians.get("pickle"),
            "cloudpickle_us": cloud_us,
            "ratio_minicw_cloudpickle": medians["minicw"] / cloud_us if cloud_us else None,
        })
    return rows


def _cell(value, spec: str = "%.2f") -> str:
    return "-" if value is None else spec % value


def format_table(rows: list) -> str:
    header = "%-38s %10s %10s %12s %8s" % ("case (dumps+loads)", "minicw us", "pickle us",
                                           "cloudpickle", "ratio")
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append("%-38s %10s %10s %12s %8s" % (
            row["case"], _cell(row["minicw_us"]), _cell(row["pickle_us"]),
            _cell(row["cloudpickle_us"]), _cell(row["ratio_minicw_cloudpickle"])))
    version = "cloudpickle %s" % cloudpickle.__version__ if cloudpickle else "no cloudpickle"
    lines.append("Python %s, %s; ratio = minicw / cloudpickle" % (
        sys.version.split()[0], version))
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_table(run(quick="--quick" in sys.argv[1:])))
