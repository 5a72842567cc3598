"""The layout holds: no import cycle, peers never load the master's internals,
one wire contract (documented as it is), every user-visible error in errors.py."""
import ast
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import minicw
from minicw import errors, protocol, server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "minicw")
MASTER_INTERNALS = {"minicw.server", "minicw.scheduler", "minicw.reactor"}
MODULES = sorted("minicw." + info.name for info in pkgutil.iter_modules([PACKAGE]))
OPTIONAL_PACKAGES = {"joblib"}   # what a module for another library needs (minicw.joblib)


def _imported_modules(name: str) -> set:
    """Every minicw module that ``name`` imports anywhere: at the top, inside
    functions, under ``if __name__ == "__main__"``."""
    path = os.path.join(PACKAGE, name.split(".", 1)[1] + ".py")
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError("%s uses a relative import" % name)
            found.add(node.module)
            found.update("%s.%s" % (node.module, alias.name) for alias in node.names)
    return {module for module in found if module in MODULES and module != name}


def _graph() -> dict:
    return {name: _imported_modules(name) for name in MODULES}


def _reachable(graph: dict, start: str) -> set:
    seen, todo = set(), [start]
    while todo:
        for module in graph[todo.pop()]:
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    cycles = sorted(name for name in graph if name in _reachable(graph, name))
    assert cycles == [], "modules on an import cycle: %s" % cycles


@pytest.mark.parametrize("peer", ["minicw.node", "minicw.worker", "minicw.worker_process",
                                  "minicw.client", "minicw.dispatch", "minicw.executor",
                                  "minicw.client_thread", "minicw.master_node",
                                  "minicw.local", "minicw.discover"])
def test_peers_never_import_the_masters_internals(peer):
    assert _reachable(_graph(), peer) & MASTER_INTERNALS == set()


JOB_SCRIPT = r'''
import json, sys
from minicw import LocalCluster

def loaded(_):
    import sys
    return sorted(name for name in sys.modules if name.startswith("minicw"))

with LocalCluster(n_workers=1) as cluster:
    executor = cluster.executor()
    in_worker = executor.submit(loaded, 0).result(timeout=60)
    executor.shutdown()
    cluster.load_envir("import sys\ndef f(x):\n    return sorted(m for m in sys.modules "
                       "if m.startswith('minicw'))\n", from_file=False)
    cluster.register_target_function("f")
    cluster.load_args([1])
    in_envir_job = cluster.execute()[1]
print(json.dumps({"client": loaded(0), "worker": in_worker, "envir": in_envir_job}))
'''


def test_a_job_run_through_a_local_cluster_loads_no_master_internals(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(JOB_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MINICW_MASTER", None)
    done = subprocess.run([sys.executable, str(script)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=env,
                          timeout=120, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "minicw.worker_process" in loaded["worker"]   # it did run in a worker process
    for where in ("client", "worker", "envir"):
        assert set(loaded[where]) & MASTER_INTERNALS == set(), (where, loaded[where])


def test_each_api_class_is_the_contract():
    for role, api_class in server.API_CLASSES.items():
        server.check_api(role, api_class)   # raises on any difference

    class Extra(server.ProcessAPI):
        def steal(self):
            pass
    with pytest.raises(TypeError, match="steal"):
        server.check_api("process", Extra)

    class Reordered(server.ProcessAPI):
        def exchange(self, on_reply, slot, node_id, reports, want, timeout_s):
            pass
    with pytest.raises(TypeError, match="does not match the contract"):
        server.check_api("process", Reordered)


def test_the_architecture_document_shows_the_contract():
    with open(os.path.join(ROOT, "ARCHITECTURE.md"), encoding="utf-8") as handle:
        document = handle.read()
    assert protocol.message_table() in document, (
        "ARCHITECTURE.md's message table differs from protocol.message_table(); paste:\n"
        + protocol.message_table())


def test_every_public_exception_is_in_errors():
    outside = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            if exc.name in OPTIONAL_PACKAGES:   # minicw.joblib without joblib
                continue
            raise
        for attribute, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException)
                    and value.__module__.startswith("minicw")
                    and not attribute.startswith("_")
                    and getattr(errors, attribute, None) is not value):
                outside.append("%s.%s" % (name, attribute))
    assert outside == []
    for attribute in dir(minicw):
        value = getattr(minicw, attribute)
        if inspect.isclass(value) and issubclass(value, BaseException):
            assert getattr(errors, attribute) is value
