"""A search on a device the latency database does not know profiles it first; that profile reports kernel models done
of a known total through the search's own ``progress`` callback (issue 18 item 4), so ``presso search`` and ``presso
run`` without --model show the bar with time remaining that ``presso db profile`` shows, not a spinner at "0/?"."""

from __future__ import annotations

import pytest

import presso
from presso.progress import ProgressEvent
from presso.search.nas import SearchConfig


class _Profiled(Exception):
    """Raised where the search would go on to its warm start: the profile is what is tested here."""


def test_the_device_profile_a_search_starts_reports_kernels_done_of_the_total(tmp_path, monkeypatch):
    import presso.bench as bench
    from presso.bench.calibration import kernel_set
    from presso.bench.networks import network_set
    from presso.search import nas

    real, calls = bench.profile_device, []

    def quick(device, **kwargs):  # the smallest kernel set, without waiting for quiet moments: seconds, not minutes
        calls.append(kwargs)
        return real(device, **{**kwargs, "size": "quick", "quiet": False})

    def stop(self):
        raise _Profiled

    monkeypatch.setattr(bench, "profile_device", quick)
    monkeypatch.setattr(nas._Search, "warm_start", stop)
    events: list[ProgressEvent] = []
    cfg = SearchConfig(latency_ms=1.0, trials=1, threads=1)
    with pytest.raises(_Profiled):
        presso.search("digits:size=12", cfg, output_dir=tmp_path / "s", db=str(tmp_path / "lat.db"),
                      progress=events.append)  # fmt: skip

    assert len(calls) == 1 and calls[0]["progress"] == events.append  # the caller's callback, passed through
    profile = [e for e in events if e.stage == "profile"]
    total = len(kernel_set("quick")) + len(network_set("quick"))  # kernel models, then calibration networks
    assert profile and all(e.total == total for e in profile)  # a known total from the first event on
    done = [e.done for e in profile]
    assert done[0] == 0 and done[-1] == total and done == sorted(done)
    assert not [e for e in events if e.total is None and "profil" in e.stage]  # no spinner without a total
    # the profile is stored: the next search on this device does not profile again
    calls.clear()
    with pytest.raises(_Profiled):
        presso.search("digits:size=12", cfg, output_dir=tmp_path / "s", db=str(tmp_path / "lat.db"))
    assert calls == []
