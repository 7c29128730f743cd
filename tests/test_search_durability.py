"""Search durability (docs/trust.md): a torn last journal record is repaired before a search
resumes, a transient storage error does not stop a heartbeat, and one output folder serves one
search at a time."""
import os
import sys
import time

import optuna
import pytest
from conftest import REPO

from d2kd.apps.search.storage import (
    Heartbeat,
    SearchInUse,
    lock_output,
    open_storage,
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
