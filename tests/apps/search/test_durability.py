"""Search durability (docs/trust.md): a torn last journal record is repaired before a search
resumes, a transient storage error does not stop a heartbeat, a call to an SQL database waits
for the database, one output folder serves one search at a time, and a worker's host identity
can be set (the same on a PostgreSQL server: tests/apps/search/test_postgresql.py)."""
import os
import socket
import subprocess
import sys
import time

import optuna
import pytest
from conftest import REPO
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import IntegrityError, OperationalError

from d2kd.apps.search.storage import (
    HOST_ENV,
    Heartbeat,
    ReconnectingStorage,
    SearchInUse,
    is_stale,
    lock_output,
    open_storage,
    record_worker,
    repair_journal,
)


def _journal_with_trials(output_dir, count: int) -> str:
    storage = open_storage("", str(output_dir))
    study = optuna.create_study(storage=storage, study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=count)
    return os.path.join(output_dir, "journal.log")


def test_a_torn_last_record_is_removed_and_the_search_goes_on(tmp_path):
    journal = _journal_with_trials(tmp_path, 3)
    whole = open(journal, "rb").read()
    torn = b'{"op_code": 5, "worker_id": "w", "trial_id": 2, "user_a'  # killed mid-write
    with open(journal, "ab") as f:
        f.write(torn)
    assert repair_journal(journal) == len(torn)
    assert open(journal, "rb").read() == whole  # exactly the records that took effect
    assert repair_journal(journal) == 0
    study = optuna.load_study(storage=open_storage("", str(tmp_path)), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again = optuna.load_study(storage=open_storage("", str(tmp_path)), study_name="s")
    assert [t.state for t in again.trials] == [optuna.trial.TrialState.COMPLETE] * 5


def test_a_journal_that_is_one_torn_record_is_emptied(tmp_path):
    journal = tmp_path / "journal.log"
    journal.write_bytes(b'{"op_code": 0, "worker_id"')
    assert repair_journal(str(journal)) == 26 and journal.read_bytes() == b""


class FlakyStorage:
    """Fails its first two writes (a database restarting), then records them."""

    def __init__(self):
        self.calls, self.recorded = 0, []

    def set_trial_user_attr(self, trial_id, key, value):
        self.calls += 1
        if self.calls <= 2:
            raise OSError("database is restarting")
        self.recorded.append((trial_id, key))


def test_a_transient_storage_error_does_not_stop_the_heartbeat():
    storage = FlakyStorage()
    with Heartbeat(storage, 7, period=0.01) as heartbeat:
        deadline = time.monotonic() + 10
        while len(storage.recorded) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert heartbeat._thread.is_alive()
    assert storage.recorded[:3] == [(7, "heartbeat")] * 3


class UnreachableDatabase:
    """``get_trial`` fails ``failures`` times as RDBStorage does when the server is down (or
    with ``error``), then answers."""

    def __init__(self, failures: int, error=OperationalError("SELECT", {}, OSError("refused"))):
        self.failures, self.error, self.calls = failures, error, 0

    def get_trial(self, trial_id):
        self.calls += 1
        if self.calls <= self.failures:
            raise StorageInternalError("An exception is raised during the commit.") from self.error
        return f"trial {trial_id}"


def test_a_database_call_is_made_again_until_the_database_answers():
    backend = UnreachableDatabase(failures=2)
    assert ReconnectingStorage(backend, patience=10).get_trial(7) == "trial 7"
    assert backend.calls == 3


def test_a_database_call_gives_up_after_its_patience_and_other_errors_at_once():
    backend = UnreachableDatabase(failures=5)
    with pytest.raises(StorageInternalError):
        ReconnectingStorage(backend, patience=0.5).get_trial(7)  # tries at 0, 0.25 s
    assert backend.calls == 2
    backend = UnreachableDatabase(failures=1, error=IntegrityError("INSERT", {}, OSError("dup")))
    with pytest.raises(StorageInternalError):
        ReconnectingStorage(backend, patience=10).get_trial(7)
    assert backend.calls == 1


def test_the_host_identity_can_be_set_and_decides_whose_pids_are_checked(monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = optuna.create_study()
    for host in (socket.gethostname(), "machine-x"):  # two trials of dead pids, fresh heartbeats
        trial = study.ask()
        for key, value in (("host", host), ("pid", dead.pid), ("heartbeat", time.time())):
            trial.set_user_attr(key, value)
    monkeypatch.setenv(HOST_ENV, "machine-x")
    # the real host's trial is another machine's now: judged by its heartbeat, not its pid
    assert [is_stale(t, stale_seconds=60) for t in study.trials] == [False, True]
    own = study.ask()
    record_worker(own, "session")
    assert (own.user_attrs["host"], own.user_attrs["pid"]) == ("machine-x", os.getpid())
    monkeypatch.setenv(HOST_ENV, "")  # unset: the host name again
    assert [is_stale(t, stale_seconds=60) for t in study.trials] == [True, False, False]


def test_one_output_folder_serves_one_search(tmp_path):
    held = lock_output(str(tmp_path))
    with pytest.raises(SearchInUse,
                       match=rf"another search runs on {tmp_path} \(pid {os.getpid()} "):
        lock_output(str(tmp_path))
    held.close()  # the first search ends (a kill releases it as well)
    lock_output(str(tmp_path)).close()


def test_search_net_refuses_a_second_search_on_the_same_output(tmp_path, monkeypatch):
    """tools/search_net.py: a second search on a folder in use stops in one line, after its
    config passed and before anything is written or started."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import search_net

    monkeypatch.setattr(search_net, "load_search_config", lambda args: None)
    started = []
    monkeypatch.setattr(search_net, "build_search", lambda *a: started.append(a))
    output = tmp_path / "search"
    held = lock_output(str(output))
    with pytest.raises(SystemExit) as stop:
        search_net.main(["--config-file", "unused.yaml", "--output", str(output)])
    held.close()
    assert str(stop.value.code).startswith(f"error: another search runs on {output} (pid ")
    assert not started and sorted(os.listdir(output)) == ["search.lock"]
