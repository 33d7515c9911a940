"""The GC monitor counts and times real collections; freeze() takes objects out of them."""

from __future__ import annotations

import gc

from bci_decoder.runtime.gc_pauses import GcMonitor, freeze


def test_monitor_times_collections_and_freeze_shrinks_them():
    mon = GcMonitor()
    try:
        junk = [[i] for i in range(200_000)]  # tracked objects a full collection must walk
        gc.collect()
        st = mon.stats
        assert st.collections[2] >= 1 and st.longest_ms[2] > 0 and st.total_ms > 0
        before = len(gc.get_objects(generation=2))
        frozen = freeze()
        assert frozen >= 200_000
        assert len(gc.get_objects(generation=2)) < before - 200_000 + 1
        # the monitor reports the freeze count as it is: a frozen object freed since (a
        # thread of an earlier test in this worker letting go of it) leaves the count,
        # which only falls until the next freeze
        reported = mon.stats.public()["frozen_objects"]
        assert gc.get_freeze_count() <= reported <= frozen and reported > frozen - 1000
        del junk
    finally:
        gc.unfreeze()
        mon.close()
    assert mon._callback not in gc.callbacks
