"""The heap trimmer (tsproxy/daemon/memtrim.py): when it trims (after the load fell to half its peak
by enough, not too often) and that a real malloc_trim gives freed heap back."""

import gc

from tsproxy.daemon import memtrim


def test_trims_once_the_load_fell_to_half_its_peak():
    t = memtrim.HeapTrimmer(min_drop=64, min_interval=10.0, trim_fn=lambda: None)
    assert not t.observe(10, 0.0)
    assert not t.observe(1000, 2.0)                 # the peak
    assert not t.observe(600, 4.0)                  # not yet half
    assert t.observe(400, 6.0)
    assert not t.observe(10, 8.0)                   # the peak was reset to 400: no new peak...
    assert not t.observe(1000, 20.0)
    assert t.observe(5, 30.0)                       # ...until a new one


def test_small_drops_and_close_repeats_do_not_trim():
    t = memtrim.HeapTrimmer(min_drop=64, min_interval=10.0, trim_fn=lambda: None)
    t.observe(100, 0.0)
    assert not t.observe(40, 1.0)                   # a drop of 60 < min_drop
    t.observe(1000, 2.0)
    assert t.observe(0, 3.0)
    t.observe(1000, 4.0)
    assert not t.observe(0, 5.0)                    # 2 s after the last trim
    assert t.observe(0, 14.0)


def test_trim_counts_and_a_real_trim_gives_memory_back():
    t = memtrim.HeapTrimmer()
    if t._trim_fn is None:                          # not glibc: nothing to give back
        assert t.trim() == 0
        return
    junk = [bytearray(3000) for _ in range(40_000)]  # ~120 MB of small blocks
    junk2 = [bytes(100) for _ in range(100_000)]     # interleaved: the heap cannot shrink by itself
    del junk
    gc.collect()
    released = t.trim()
    assert released > 50_000_000
    assert t.counters["heap_trims"] == 1 and t.counters["heap_trim_released_bytes"] == released
    del junk2
