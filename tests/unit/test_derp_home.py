"""Home-region choice and DERP reply routing (issue 16 defect 4), sans-IO."""

from types import SimpleNamespace

from tsproxy.magicsock.derp_home import HISTORY, HomeSelector, derp_route

R = {r: SimpleNamespace(no_measure_no_home=False) for r in (1, 2, 3)}


def sel_with(samples, now=100.0, seed=b"k"):
    s = HomeSelector(seed)
    s.start_round()
    for region, lat in samples.items():
        s.add_sample(region, lat, now)
    return s


def test_fastest_region_wins_first_time():
    assert sel_with({1: 0.050, 2: 0.020, 3: 0.030}).choose(R, now=100.0) == 2


def test_hysteresis_keeps_a_reachable_home_unless_clearly_better():
    # 8 ms better: below the 10 ms absolute difference
    assert sel_with({1: 0.030, 2: 0.022}).choose(R, now=100.0, current=1) == 1
    # 15 ms better but more than 2/3 of the old latency (0.050 * 2/3 = 0.0333 < 0.035)
    assert sel_with({1: 0.050, 2: 0.035}).choose(R, now=100.0, current=1) == 1
    # clearly better on both counts
    assert sel_with({1: 0.050, 2: 0.020}).choose(R, now=100.0, current=1) == 2


def test_unreachable_home_is_left_even_for_a_small_gain():
    s = HomeSelector()
    s.add_sample(1, 0.030, 0.0)               # home measured once, long ago in this history
    s.start_round()
    s.add_sample(2, 0.025, 10.0)              # this round only region 2 answered
    assert s.choose(R, now=10.0, current=1, current_active=False) == 2
    assert s.choose(R, now=10.0, current=1, current_active=True) == 1


def test_region_score_scales_latency():
    s = sel_with({1: 0.020, 2: 0.030})
    assert s.choose(R, now=100.0, scores={1: 2.0}) == 2
    assert s.choose(R, now=100.0, scores={1: 0, 2: "x"}) == 1          # bad scores ignored


def test_no_measure_no_home_never_wins():
    regions = {1: SimpleNamespace(no_measure_no_home=True), 2: R[2]}
    assert sel_with({1: 0.001, 2: 0.090}).choose(regions, now=100.0) == 2


def test_samples_expire_after_five_minutes():
    s = HomeSelector()
    s.add_sample(1, 0.001, 0.0)
    s.add_sample(2, 0.050, HISTORY)
    assert s.choose(R, now=HISTORY + 1) == 2
    assert s.best_recent(HISTORY + 1) == {2: 0.050}


def test_nothing_measured_keeps_home_or_falls_back_deterministically():
    s = HomeSelector(b"node-a")
    assert s.choose(R, now=1.0, current=3) == 3
    first = s.choose(R, now=1.0)
    assert first in R and all(HomeSelector(b"node-a").choose(R, now=t) == first for t in (2, 3))
    picks = {HomeSelector(bytes([i])).choose(R, now=1.0) for i in range(40)}
    assert picks == {1, 2, 3}                   # spread over regions, not always the lowest id
    assert HomeSelector().choose({}, now=1.0) == 0


def test_route_prefers_the_peers_home_when_open():
    assert derp_route(2, 1, {1, 2}) == 2        # the old "last heard wins forever" bug
    assert derp_route(2, 1, {1}) == 1           # reply where we heard it while that is open
    assert derp_route(2, 1, set()) == 2         # dial the peer's home
    assert derp_route(2, 0, {1}) == 2
    assert derp_route(0, 1, {1}) == 1
    assert derp_route(0, 0, {1}) == 0
