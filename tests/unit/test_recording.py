"""A start profile's recording is attached to layers while its window is open, and then detached
from every one of them (released layers included), and from no other recording."""

from __future__ import annotations

from dataclasses import dataclass, field

from snapshotter.recording import Recording


@dataclass
class FakeLayer:
    recordings: list[Recording] = field(default_factory=list)


def test_detach_leaves_no_layer_touching_the_recording() -> None:
    a, b = FakeLayer(), FakeLayer()
    mine, other = Recording("img", ("a", "b"), 30.0), Recording("other", ("a",), 30.0)
    other.attach(a)
    mine.attach(a)
    mine.attach(b)
    assert a.recordings == [other, mine] and b.recordings == [mine]
    mine.detach()
    assert a.recordings == [other] and b.recordings == []
    mine.detach()  # twice is harmless
    assert a.recordings == [other]
