"""A layer's fetch state is typed, and `lazysnap status` shows it as it always did."""

from __future__ import annotations

from snapshotter.fetch.progress import BACKGROUND, COMPLETE, ON_DEMAND, PREFETCHING, FetchState, Phase, Progress


def test_each_state_is_shown_as_before() -> None:
    shown = {state: Progress(state=state).shown() for state in (ON_DEMAND, PREFETCHING, BACKGROUND, COMPLETE)}
    assert list(shown.values()) == ["on demand", "prefetching", "background", "complete"]
    skipped = FetchState(Phase.BACKGROUND_SKIPPED, "9 MiB would take over 50% of the 8 MiB cache")
    assert Progress(state=skipped).shown() == "background skipped: 9 MiB would take over 50% of the 8 MiB cache"
    stopped = FetchState(Phase.BACKGROUND_STOPPED, "2 unit(s) from blob offset 40 fail verification")
    assert str(stopped) == "background stopped: 2 unit(s) from blob offset 40 fail verification"


def test_warming_is_shown_over_any_state_and_complete_is_a_phase() -> None:
    progress = Progress(state=COMPLETE, warming=True)
    assert progress.shown() == "warming" and progress.complete
    assert not Progress(state=FetchState(Phase.BACKGROUND_STOPPED, "why")).complete
    assert Progress().state == ON_DEMAND and Progress().state is not PREFETCHING
