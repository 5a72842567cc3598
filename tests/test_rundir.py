"""The run directory (minicw.rundir): its path, the key file, the JSON records."""
import os
import stat

import pytest

from minicw import config, rundir
from minicw.errors import MinicwError


def test_path_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(config.ENV_RUN_DIR, raising=False)
    assert rundir.path() == os.path.expanduser(os.path.join("~", ".minicw", "run"))
    monkeypatch.setenv(config.ENV_RUN_DIR, str(tmp_path / "env"))
    assert rundir.path() == str(tmp_path / "env")
    assert rundir.path(str(tmp_path / "given")) == str(tmp_path / "given")
    assert rundir.authkey_path() == str(tmp_path / "env" / "authkey")


def test_ensure_creates_a_private_directory(tmp_path):
    made = rundir.ensure(str(tmp_path / "a" / "run"))
    assert os.path.isdir(made)
    if os.name == "posix":
        assert stat.S_IMODE(os.stat(made).st_mode) & 0o077 == 0


def test_records_are_written_whole(tmp_path):
    run_dir = str(tmp_path)
    assert rundir.read_record(run_dir, "x.json") is None
    rundir.write_record(run_dir, "x.json", {"port": 5, "host": "h"})
    assert rundir.read_record(run_dir, "x.json") == {"port": 5, "host": "h"}
    assert os.listdir(run_dir) == ["x.json"]   # no temporary file left behind
    (tmp_path / "x.json").write_text("{half")
    with pytest.raises(MinicwError, match="cannot read .*x.json.*remove it if no cluster runs"):
        rundir.read_record(run_dir, "x.json")


def test_the_one_key_reader(tmp_path):
    key_file = str(tmp_path / "key")
    assert rundir.read_key_file(key_file, missing_ok=True) is None
    with pytest.raises(MinicwError, match="no key file .*key"):
        rundir.read_key_file(key_file)   # an explicit --authkey-file must exist
    rundir.write_authkey(str(tmp_path), "")
    with pytest.raises(MinicwError, match="is empty"):
        rundir.read_authkey(str(tmp_path))
    if os.name == "posix":
        with open(key_file, "w") as handle:
            handle.write("the-key\n")
        os.chmod(key_file, 0o640)
        with pytest.raises(MinicwError, match=r"readable by group or others \(mode 640\)"):
            rundir.read_key_file(key_file)
        os.chmod(key_file, 0o600)
        assert rundir.read_key_file(key_file) == b"the-key"


def test_tail_quotes_the_end_of_a_log(tmp_path):
    log = tmp_path / "x.log"
    assert rundir.tail(str(log)) == "(no log)"
    log.write_text("".join("line %d\n" % i for i in range(20)))
    assert rundir.tail(str(log), 2) == "line 18 | line 19"
