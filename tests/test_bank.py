"""The JSON memory bank: a kill at any moment leaves the old or the new file, never a broken one;
a corrupt or foreign file is refused and never overwritten."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import common

ROOT = Path(__file__).resolve().parent.parent

WRITER = """
import sys
sys.path.insert(0, {root!r})
import common
path = {path!r}
bank = common.load_bank(path, "library")
v = len(bank["entries"])
while True:                      # each version is big enough that a write takes a while
    v += 1
    bank["entries"].append({{"id": v, "text": "lesson " * 2000}})
    common.save_bank(path, bank)
    print(v, flush=True)
"""


def test_bank_survives_kill_mid_write(tmp_path):
    path = tmp_path / "library.json"
    script = WRITER.format(root=str(ROOT), path=str(path))
    for trial in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()                       # at least one version written
        time.sleep(0.05 + 0.07 * trial)              # then kill at an arbitrary moment
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        bank = common.load_bank(path, "library")     # must parse: old or new, never torn
        ids = [e["id"] for e in bank["entries"]]
        assert ids == list(range(1, len(ids) + 1))   # a complete version, nothing lost or duplicated
    # temp files may be left by a kill; they never shadow the bank and are named as temporaries
    assert all(p.name.startswith(".library.json.") for p in tmp_path.iterdir() if p != path)


def test_new_bank_round_trip(tmp_path):
    path = tmp_path / "b.json"
    bank = common.load_bank(path, "pmd-memory")
    assert bank["entries"] == [] and not path.exists()
    bank["entries"].append({"level": "insight", "text": "check units"})
    common.save_bank(path, bank)
    raw = json.loads(path.read_text())
    assert raw["schema"] == "introspect-bank" and raw["version"] == 1 and raw["kind"] == "pmd-memory"
    assert common.load_bank(path, "pmd-memory")["entries"] == bank["entries"]


@pytest.mark.parametrize("content, message", [
    ('{"schema": "introspect-bank", "version": 1, "kind": "library", "entries": [{"id": 1}', "not a readable JSON bank"),
    ('{"weights": [1, 2, 3]}', "not an introspect-bank file"),
    ('{"schema": "introspect-bank", "version": 99, "kind": "library", "entries": []}', "bank version 99"),
    ('{"schema": "introspect-bank", "version": 1, "kind": "pmd-memory", "entries": []}', "expected 'library'"),
    ('{"schema": "introspect-bank", "version": 1, "kind": "library", "entries": {}}', "not a list"),
])
def test_corrupt_or_foreign_bank_is_refused_and_untouched(tmp_path, content, message):
    path = tmp_path / "library.json"
    path.write_text(content)
    before = os.stat(path).st_mtime_ns
    with pytest.raises(common.BankError, match=message):
        common.load_bank(path, "library")
    assert path.read_text() == content and os.stat(path).st_mtime_ns == before


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "library.json"
    common.save_bank(path, {"schema": "introspect-bank", "version": 1, "kind": "library", "entries": [1]})
    old = path.read_text()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(common.os, "replace", boom)
    with pytest.raises(OSError):
        common.save_bank(path, {"schema": "introspect-bank", "version": 1, "kind": "library", "entries": [1, 2]})
    assert path.read_text() == old
    assert [p.name for p in tmp_path.iterdir()] == ["library.json"]
