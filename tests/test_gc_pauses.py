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
        assert mon.stats.public()["frozen_objects"] == frozen
        del junk
    finally:
        gc.unfreeze()
        mon.close()
    assert mon._callback not in gc.callbacks
