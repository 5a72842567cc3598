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


ICACLS_PRIVATE = "C:\\Users\\ada\\.minicw\\run\\authkey VM\\ada:(F)\n\nSuccessfully processed 1 files\n"
ICACLS_SHARED = ("C:\\Shared\\run\\authkey VM\\ada:(F)\n"
                 "                        BUILTIN\\Users:(I)(RX)\n\nSuccessfully processed 1 files\n")


def test_the_key_file_on_windows_is_private_by_its_access_list(tmp_path, monkeypatch):
    # Windows' access lists cannot be had here (Wine's icacls is a stub that
    # prints nothing): icacls is a stand-in answering as Windows' does.
    calls = []
    answers = {"": ICACLS_PRIVATE}

    class Done:
        def __init__(self, stdout):
            self.returncode, self.stdout = 0, stdout

    def icacls(*args):
        calls.append(args)
        return Done(answers[""] if len(args) == 1 else "")
    monkeypatch.setattr(rundir, "WINDOWS", True)
    monkeypatch.setattr(rundir, "_icacls", icacls)
    monkeypatch.setenv("USERNAME", "ada")
    key_file = rundir.write_authkey(str(tmp_path), "k" * 32)
    [restrict] = [args for args in calls if len(args) > 1]
    assert restrict[1:] == ("/inheritance:r", "/grant:r", "ada:F")   # before the key went in
    assert rundir.read_key_file(key_file) == b"k" * 32
    answers[""] = ICACLS_SHARED
    with pytest.raises(MinicwError, match=r"readable by BUILTIN\\Users; run icacls"):
        rundir.read_key_file(key_file)
