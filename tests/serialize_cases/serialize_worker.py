"""Worker-side helpers for tests/test_serialize.py.

These run inside a ``spawn`` process: they receive payload bytes, rebuild the
objects with minicw and return plain values the test can assert on.
"""
import pickle
import sys

from minicw import serialize


def run_probe(payload: bytes, plain_pickle: bool = False):
    """Load a shipped zero-argument callable and return what it returns."""
    probe = pickle.loads(payload) if plain_pickle else serialize.loads(payload)
    return probe()


def call_loaded(payload: bytes, *args, **kwargs):
    """Load a shipped callable and call it with plain arguments."""
    return serialize.loads(payload)(*args, **kwargs)


def load_error(payload: bytes):
    """Load a payload that should fail; return (error type name, message)."""
    try:
        serialize.loads(payload)
    except Exception as exc:  # the test asserts the type by name
        return type(exc).__name__, str(exc)
    return None, None


def main_module_names():
    """Names defined in this worker's own __main__ (it must not be the client's)."""
    return sorted(vars(sys.modules["__main__"]))


def same_class_across_payloads(class_payload: bytes, instance_payload: bytes):
    """Load a class and, separately, an instance of it; is it the same class?"""
    cls = serialize.loads(class_payload)
    instance = serialize.loads(instance_payload)
    return type(instance) is cls, instance.describe()
