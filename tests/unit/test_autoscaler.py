"""The autoscaling policy (nexus/supervisor/autoscaler.py) with plain numbers: samples of
a group's lag at given times in, decisions out; and its config section."""

from __future__ import annotations

import pytest

from nexus import config
from nexus.errors import ConfigError
from nexus.supervisor.autoscaler import EVERY, Autoscaler


def scaler(min: int = 1, max: int = 4, target_lag: float = 100, cooldown: float = 10, **groups) -> Autoscaler:
    auto = config.AutoscaleConfig(min=min, max=max, target_lag=target_lag, cooldown=config.Duration(cooldown))
    workers = {"g": config.WorkerGroupConfig(handler="m:f", autoscale=auto), **groups}
    return Autoscaler(workers)


class Run:
    """Feeds one sample a second and applies each decision, as the launcher does."""

    def __init__(self, a: Autoscaler, members: int, now: float = 1000.0):
        self.a, self.members, self.now = a, members, now
        self.counts: list[int] = []
        self.decisions = []

    def feed(self, *lags: int) -> Run:
        for lag in lags:
            d = self.a.decide("g", self.now, lag, self.members)
            if d is not None:
                assert d.current == self.members
                self.decisions.append(d)
                self.members = d.desired
            self.counts.append(self.members)
            self.now += EVERY
        return self


def test_sustained_high_lag_scales_up_in_proportion_to_lag_over_target():
    run = Run(scaler(max=8), members=1).feed(350)
    assert run.decisions == []  # one sample is not sustained
    run.feed(320)
    (d,) = run.decisions
    assert (d.current, d.desired, d.direction) == (1, 4, "up")  # ceil(320/100): the smaller of the two
    assert d.lag == 320 and d.lag_per_member == 320.0
    assert "above target 100" in d.reason


def test_scale_up_is_capped_at_max_and_adds_at_least_one():
    assert Run(scaler(max=3), members=1).feed(5000, 5000).members == 3
    # barely above the target: ceil(lag/target) is the current count, still one more
    assert Run(scaler(max=3), members=2).feed(201, 201).members == 3
    at_max = Run(scaler(max=3), members=3).feed(*[9000] * 20)
    assert at_max.decisions == [] and at_max.members == 3


def test_low_lag_for_cooldown_scales_down_one_at_a_time_to_min():
    run = Run(scaler(min=1, max=4, cooldown=5), members=4).feed(*[0] * 40)
    assert [d.desired for d in run.decisions] == [3, 2, 1]
    assert all(d.direction == "down" for d in run.decisions)
    # the first after `cooldown` of low lag, then one per cooldown (never within it of the last)
    first = run.counts.index(3)
    assert first == 5
    assert run.counts.index(2) - first >= 5 and run.counts.index(1) - run.counts.index(2) >= 5
    assert run.members == 1 and run.counts[-1] == 1


def test_lag_between_low_water_and_target_is_steady():
    run = Run(scaler(target_lag=100, cooldown=2), members=3).feed(*[90 * 3] * 30, *[30 * 3] * 30)
    assert run.decisions == [] and run.members == 3  # 90 and 30 per member: neither high nor low


def test_cooldown_is_respected_after_a_change():
    a = scaler(max=10, cooldown=10)
    run = Run(a, members=1).feed(300, 300)
    assert run.members == 3
    run.feed(*[900] * 4)  # still high (300 per member) but within cooldown * UP_WAIT of the change
    assert run.members == 3
    run.feed(900, 900)  # 5 s after the change: up again
    assert run.members == 9
    assert a.groups["g"].up == 2
    # low right after a scale-up: down waits the full cooldown from the change
    change_at = run.now - EVERY
    run.feed(*[0] * 12)
    down_at = change_at + (run.counts[-12:].index(8) + 1) * EVERY
    assert down_at - change_at >= 10


def test_flapping_lag_does_not_flap_the_count():
    run = Run(scaler(target_lag=100, cooldown=3), members=2).feed(*[1000, 0] * 30)
    assert run.decisions == [] and run.members == 2
    # nor one high sample now and then inside a long low stretch that is shorter than cooldown
    run = Run(scaler(target_lag=100, cooldown=3), members=2).feed(*([0, 0, 1000] * 10))
    assert run.decisions == []


def test_a_burst_rises_to_max_then_falls_back_to_min():
    run = Run(scaler(min=1, max=3, target_lag=50, cooldown=2), members=1)
    run.feed(800, 1500, 1400, 900, 400, 60, 0, *[0] * 12)
    assert [(d.current, d.desired) for d in run.decisions] == [(1, 3), (3, 2), (2, 1)]
    assert max(run.counts) == 3 and run.members == 1


def test_out_of_bounds_moves_into_them_at_once():
    a = scaler(min=2, max=3)
    d = a.decide("g", 0.0, 0, 1)
    assert d is not None and (d.desired, d.reason) == (2, "below min 2")
    d = a.decide("g", 0.5, 0, 5)  # even within the cooldown of the last change
    assert d is not None and (d.desired, d.reason) == (3, "above max 3")


def test_scale_to_zero_wakes_on_any_lag():
    run = Run(scaler(min=0, max=2, target_lag=100, cooldown=2), members=0).feed(0, 0, 3)
    assert run.members == 0
    run.feed(3)
    assert run.members == 1 and run.decisions[-1].direction == "up"


def test_configure_keeps_state_and_takes_new_bounds():
    a = scaler(max=4, cooldown=10)
    Run(a, members=1).feed(400, 400)
    assert a.groups["g"].up == 1
    tighter = config.AutoscaleConfig(min=1, max=2, target_lag=100, cooldown=config.Duration(10))
    a.configure({"g": config.WorkerGroupConfig(handler="m:f", autoscale=tighter), "h": config.WorkerGroupConfig("m:f")})
    assert set(a.groups) == {"g"} and a.groups["g"].up == 1
    d = a.decide("g", 2000.0, 0, 4)
    assert d is not None and d.desired == 2
    a.configure({"g": config.WorkerGroupConfig(handler="m:f")})  # autoscale removed
    assert a.groups == {} and not a.due(5000.0)


def test_observe_reads_router_groups_and_skips_what_it_cannot_judge():
    a = scaler(max=3, target_lag=10, cooldown=2)
    router = {"g": {"lag": 100}}
    assert a.observe(0.0, router, {"g": 1}) == []
    (d,) = a.observe(1.0, router, {"g": 1})
    assert (d.group, d.desired) == ("g", 3)
    b = scaler(max=3, target_lag=10, cooldown=2)
    for t, lag in enumerate(["recovering", ">=500", ">=500"]):
        out = b.observe(float(t), {"g": {"lag": lag}}, {"g": 1})
    assert [x.desired for x in out] == [3]  # a lower bound counts, "recovering" is no sample
    c = scaler(max=3, target_lag=10, cooldown=2)
    for t in range(5):
        assert c.observe(float(t), router, {"g": 1}, paused={"g"}) == []  # given up on: not scaled


def test_due_at_most_once_per_interval():
    a = scaler()
    assert a.due(10.0) and not a.due(10.5) and a.due(11.0)
    assert not Autoscaler({"h": config.WorkerGroupConfig(handler="m:f")}).due(10.0)


def test_manual_scale_within_bounds_restarts_the_cooldown_outside_is_refused():
    a = scaler(min=1, max=3, cooldown=10)
    assert a.manual("other", 50, 0.0) is None  # not autoscaled: no rule
    refused = a.manual("g", 5, 0.0)
    assert refused == (
        "group g autoscales within [1, 3]: N must be in that range "
        "(change workers.g.autoscale and reload to move the bounds)"
    )
    assert a.manual("g", 3, 100.0) is None
    run = Run(a, members=3, now=101.0).feed(*[0] * 9)
    assert run.decisions == []  # the cooldown counts from the manual change
    run.feed(*[0] * 3)
    assert run.members == 2


def test_status_shape():
    a = scaler(min=1, max=3, target_lag=10, cooldown=2)
    a.decide("g", 100.0, 50, 1)
    a.decide("g", 101.0, 50, 1)
    s = a.status(now=103.0, wall=1_700_000_003.0, running={"g": 2})["g"]
    assert s == {
        "min": 1,
        "max": 3,
        "target_lag": 10,
        "cooldown": 2.0,
        "members": 2,
        "lag": 50,
        "lag_per_member": 50.0,
        "last_change": 1_700_000_001.0,
        "last_reason": "lag per member 50.0 above target 10 for 2 samples",
        "decisions": {"up": 1, "down": 0},
    }


# -- config ---------------------------------------------------------------------------
def load(tmp_path, auto: str, processes: int | None = None) -> config.Config:
    extra = f", processes: {processes}" if processes is not None else ""
    path = tmp_path / "nexus.yaml"
    path.write_text(f"workers: {{w: {{handler: 'a:b'{extra}, autoscale: {auto}}}}}\n")
    return config.load(path)


def test_autoscale_config_and_starting_count(tmp_path):
    cfg = load(tmp_path, "{min: 2, max: 5, target_lag: 500, cooldown: 30s}")
    auto = cfg.workers["w"].autoscale
    assert auto == config.AutoscaleConfig(min=2, max=5, target_lag=500, cooldown=config.Duration(30))
    assert cfg.workers["w"].initial_processes() == 2  # processes 1, clamped into [2, 5]
    assert load(tmp_path, "{max: 3, target_lag: 5}", processes=9).workers["w"].initial_processes() == 3
    assert load(tmp_path, "{max: 3, target_lag: 5}", processes=2).workers["w"].initial_processes() == 2
    assert config.from_bytes(config.to_bytes(cfg)).workers["w"].autoscale == auto  # handed to children intact


@pytest.mark.parametrize(
    "auto,needle",
    [
        ("{min: 4, max: 2, target_lag: 5}", "workers.w.autoscale: min 4 is above max 2"),
        ("{max: 300, target_lag: 5}", "workers.w.autoscale.max: Expected `int` <= 256"),
        ("{max: 3, target_lag: 0}", "workers.w.autoscale.target_lag: Expected `float` > 0"),
        ("{max: 3, target_lag: 5, cooldown: soon}", "workers.w.autoscale.cooldown: 'soon' is not a duration"),
        ("{max: 3, target_lag: 5, cooldown: 0}", "workers.w.autoscale.cooldown: must be positive"),
        ("{target_lag: 5}", "workers.w.autoscale.max: required key is missing"),
        ("{max: 3, target: 5}", "workers.w.autoscale.target: unknown key"),
        (
            "{max: 17, target_lag: 5}",
            "workers.w.autoscale.max (17) exceeds workers.w.partitions (16): members beyond 16 would own no partition",
        ),
    ],
)
def test_bad_autoscale_is_one_line(tmp_path, auto, needle):
    with pytest.raises(ConfigError) as err:
        load(tmp_path, auto)
    msg = str(err.value)
    assert needle in msg and "\n" not in msg and err.value.exit_code == 3


def test_lag_per_member_counts_only_members_that_own_a_partition():
    # config refuses max above partitions; a count above them can still be sampled once (a
    # group scaled by hand, then made autoscaled by a reload): 2 members own the lag, 2 idle
    auto = config.AutoscaleConfig(min=1, max=4, target_lag=100, cooldown=config.Duration(10))
    a = Autoscaler({"g": config.WorkerGroupConfig(handler="m:f", partitions=2, autoscale=auto)})
    assert a.decide("g", 0.0, 300, 4) is None
    assert a.groups["g"].lag_per_member == 150.0  # 300 / min(4, 2), not 300 / 4
