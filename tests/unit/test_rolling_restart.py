"""The rolling restart state machine (nexus/supervisor/rolling.py), ticked by hand: a
stand-in launcher records what the machine asks of it (terminate, spawn) and the test
plays the processes' part (exits, joins, crashes) between ticks."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import count

import msgspec

from nexus.config import Config, WorkerGroupConfig
from nexus.supervisor.children import Child, ChildState
from nexus.supervisor.rolling import RollingRestart

pids = count(1000)


@dataclass
class Proc:
    pid: int = field(default_factory=lambda: next(pids))
    killed: bool = False

    def kill(self) -> None:
        self.killed = True

    def is_alive(self) -> bool:
        return not self.killed


class Launcher:
    def __init__(self, names: list[str], now: float = 0.0):
        self.cfg = Config(shutdown_timeout=5, hang_timeout=10, workers={"g": WorkerGroupConfig(handler="new:f")})
        self.children = {n: Child(n, "worker", "g", process=Proc(), state=ChildState.RUNNING) for n in names}
        self.log: list[tuple[str, str]] = []
        self.ran: dict[str, str] = dict.fromkeys(names, "old:f")  # member -> the handler it runs
        self.restored = 0
        self.now = now
        for c in self.children.values():
            c.spawned = -1.0

    def spawn(self, child: Child) -> None:
        self.log.append(("spawn", child.name))
        self.ran[child.name] = self.cfg.workers["g"].handler
        child.process, child.state, child.spawned = Proc(), ChildState.RUNNING, self.now  # type: ignore[assignment]

    def restore(self) -> None:  # what the reloader's _restore_group does to the config
        self.restored += 1
        self.cfg = msgspec.structs.replace(self.cfg, workers={"g": WorkerGroupConfig(handler="old:f")})

    def terminate(self, child: Child) -> None:
        self.log.append(("terminate", child.name))
        child.state = ChildState.STOPPING

    def exited(self, name: str) -> None:  # what the launcher's _on_exit does for a stopping child
        self.children[name].state = ChildState.STOPPED


def joined(launcher: Launcher, *names: str) -> dict:
    members = [{"name": n, "pid": launcher.children[n].pid} for n in names]
    return {"groups": {"g": {"members": members}}}


def test_one_member_at_a_time_drained_spawned_joined():
    launcher = Launcher(["g-0", "g-1"])
    roll = RollingRestart("g", ["g-0", "g-1"], now=0.0)
    roll.tick(launcher, 0.0, None)
    assert launcher.log == [("terminate", "g-0")] and roll.describe()["phase"] == "draining"
    roll.tick(launcher, 0.1, None)  # still draining: nothing more
    assert launcher.log == [("terminate", "g-0")]
    launcher.exited("g-0")
    launcher.now = 0.2
    roll.tick(launcher, 0.2, None)
    assert launcher.log[-1] == ("spawn", "g-0") and roll.joining
    roll.tick(launcher, 0.3, {"groups": {"g": {"members": []}}})  # not joined yet
    assert roll.joining
    roll.tick(launcher, 0.4, joined(launcher, "g-0"))
    assert launcher.log[-1] == ("terminate", "g-1") and roll.describe()["step"] == 2
    launcher.exited("g-1")
    roll.tick(launcher, 0.5, None)
    roll.tick(launcher, 0.6, joined(launcher, "g-0", "g-1"))
    assert roll.done and not roll.error and roll.restarted == ["g-0", "g-1"]
    assert launcher.log == [("terminate", "g-0"), ("spawn", "g-0"), ("terminate", "g-1"), ("spawn", "g-1")]


def test_a_member_that_crashed_meanwhile_runs_the_new_config_and_is_passed_over():
    launcher = Launcher(["g-0", "g-1", "g-2"])
    roll = RollingRestart("g", ["g-0", "g-1", "g-2"], now=0.0)
    roll.tick(launcher, 0.0, None)
    # g-1 crashes and is in its restart backoff; g-2 crashed and already restarted
    launcher.children["g-1"].state = ChildState.BACKOFF
    launcher.now = 0.05
    launcher.spawn(launcher.children["g-2"])
    launcher.exited("g-0")
    roll.tick(launcher, 0.1, None)
    roll.tick(launcher, 0.2, joined(launcher, "g-0"))
    assert roll.done and roll.restarted == ["g-0"] and roll.passed == ["g-1", "g-2"] and not roll.error


def test_a_replacement_failing_on_the_new_config_stops_the_restart():
    launcher = Launcher(["g-0", "g-1"])
    roll = RollingRestart("g", ["g-0", "g-1"], now=0.0)
    roll.tick(launcher, 0.0, None)
    launcher.exited("g-0")
    roll.tick(launcher, 0.1, None)
    child = launcher.children["g-0"]
    child.state, child.last_exit = ChildState.FAILED, "config error: cannot import handler"
    roll.tick(launcher, 0.2, None)
    assert roll.done and "g-0 failed on the new config (config error: cannot import handler)" in roll.error
    assert "g-1 still run the old config" in roll.error
    assert ("terminate", "g-1") not in launcher.log  # the old members keep running


def test_a_replacement_that_never_joins_times_out():
    launcher = Launcher(["g-0"])
    roll = RollingRestart("g", ["g-0"], now=0.0)
    roll.tick(launcher, 0.0, None)
    launcher.exited("g-0")
    roll.tick(launcher, 0.1, None)
    roll.tick(launcher, 30.0, {"groups": {}})
    assert not roll.done
    roll.tick(launcher, 61.0, {"groups": {}})
    assert roll.done and "did not join the group within 60s" in roll.error


def test_a_member_that_does_not_drain_in_time_is_killed():
    launcher = Launcher(["g-0"])
    roll = RollingRestart("g", ["g-0"], now=0.0)
    roll.tick(launcher, 0.0, None)
    proc = launcher.children["g-0"].process
    roll.tick(launcher, 4.0, None)
    assert isinstance(proc, Proc) and not proc.killed
    roll.tick(launcher, 7.5, None)  # shutdown_timeout 5 + KILL_GRACE 2
    assert proc.killed


def test_failed_and_scaled_away_members():
    launcher = Launcher(["g-0", "g-1"])
    launcher.children["g-0"].state = ChildState.FAILED  # given up on under the old config
    launcher.children["g-0"].crashes = [1.0, 2.0]
    launcher.children["g-1"].retired = True  # scaled away
    roll = RollingRestart("g", ["g-0", "g-1", "g-9"], now=0.0)
    roll.tick(launcher, 0.0, None)
    assert launcher.log == [("spawn", "g-0")] and launcher.children["g-0"].crashes == []
    roll.tick(launcher, 0.1, joined(launcher, "g-0"))
    assert roll.done and roll.restarted == ["g-0"] and roll.passed == ["g-1", "g-9"]


def test_a_replacement_failing_on_the_new_config_rolls_the_group_back():
    launcher = Launcher(["g-0", "g-1", "g-2"])
    roll = RollingRestart("g", ["g-0", "g-1", "g-2"], now=0.0, restore=launcher.restore)
    roll.tick(launcher, 0.0, None)
    launcher.exited("g-0")
    launcher.now = 0.1
    roll.tick(launcher, 0.1, None)
    roll.tick(launcher, 0.2, joined(launcher, "g-0"))  # g-0 runs the new config; g-1 next
    launcher.exited("g-1")
    launcher.now = 0.3
    roll.tick(launcher, 0.3, None)
    failed = launcher.children["g-1"]
    failed.state, failed.last_exit = ChildState.FAILED, "config error: handler new:f: cannot import new"
    launcher.now = 0.4
    roll.tick(launcher, 0.4, None)
    # rolled back: the config first, then the failed member (no drain needed), then g-0
    assert launcher.restored == 1 and roll.rolling_back and not roll.done
    assert launcher.log[-1] == ("spawn", "g-1") and launcher.ran["g-1"] == "old:f" and roll.joining
    roll.tick(launcher, 0.5, joined(launcher, "g-0", "g-1"))
    assert launcher.log[-1] == ("terminate", "g-0")
    launcher.exited("g-0")
    launcher.now = 0.6
    roll.tick(launcher, 0.6, None)
    assert roll.tick(launcher, 0.7, joined(launcher, "g-0", "g-1")) is None and roll.done
    assert launcher.ran == {"g-0": "old:f", "g-1": "old:f", "g-2": "old:f"}  # g-2 was never touched
    assert ("terminate", "g-2") not in launcher.log
    assert roll.restarted == ["g-0"] and roll.reverted == ["g-1", "g-0"] and roll.describe()["rolled_back"]
    assert roll.error == (
        "g-1 failed on the new config (config error: handler new:f: cannot import new); rolled back to the old config"
    )


def test_a_replacement_that_never_joins_rolls_back_and_a_failing_rollback_stops():
    launcher = Launcher(["g-0", "g-1"])
    roll = RollingRestart("g", ["g-0", "g-1"], now=0.0, restore=launcher.restore)
    roll.tick(launcher, 0.0, None)
    launcher.exited("g-0")
    launcher.now = 0.1
    roll.tick(launcher, 0.1, None)
    roll.tick(launcher, 61.0, {"groups": {}})  # running, never joined: drained back
    assert launcher.restored == 1 and launcher.log[-1] == ("terminate", "g-0")
    launcher.exited("g-0")
    launcher.now = 61.1
    roll.tick(launcher, 61.1, None)
    assert launcher.ran["g-0"] == "old:f"
    launcher.children["g-0"].state = ChildState.FAILED  # the old config fails now too
    roll.tick(launcher, 61.2, None)
    assert roll.done and launcher.restored == 1 and ("terminate", "g-1") not in launcher.log
    assert "g-0 did not join the group within 60s on the new config; rolled back to the old config" in roll.error
    assert "; the rollback failed too: g-0 failed on the old config" in roll.error
