"""The pure block-streaming schedule: which block is where when, and what is prefetched."""

import pytest

from stepvideo_core.offload.schedule import (Action, copies_per_pass, initial_state, plan_pass, simulate, slot_count,
                                             split_blocks)

CASES = [(n, k) for n in (1, 2, 3, 5, 8, 48) for k in (0, 1, 2, n - 2, n - 1, n, None) if k is None or k >= 0]


def test_split_and_slot_count():
    assert split_blocks(48, 40) == (list(range(40)), list(range(40, 48)))
    assert split_blocks(4, None) == ([0, 1, 2, 3], [])
    assert split_blocks(4, 9) == ([0, 1, 2, 3], [])
    assert [slot_count(48, k) for k in (0, 46, 47, 48, None)] == [2, 2, 1, 0, 0]
    with pytest.raises(ValueError):
        split_blocks(4, -1)


def test_known_sequence_five_blocks_two_resident():
    first, second = simulate(5, 2, passes=2)
    f, c = "fetch", "compute"
    assert first == [Action(f, 2, 0), Action(f, 3, 1), Action(c, 0), Action(c, 1), Action(c, 2, 0),
                     Action(f, 4, 0), Action(c, 3, 1), Action(f, 2, 1), Action(c, 4, 0)]
    # warm: block 2 was prefetched by the previous call, block 3 fills the other slot during the resident blocks
    assert second == [Action(f, 3, 0), Action(c, 0), Action(c, 1), Action(c, 2, 1), Action(f, 4, 1),
                      Action(c, 3, 0), Action(f, 2, 0), Action(c, 4, 1)]


@pytest.mark.parametrize("n, k", CASES)
def test_invariants_over_several_calls(n, k):
    resident, streamed = split_blocks(n, k)
    slots = {}  # slot -> block whose copy was issued into it last
    busy_fetches = 0
    for p, actions in enumerate(simulate(n, k, passes=3)):
        computed = [a.block for a in actions if a.kind == "compute"]
        assert computed == list(range(n))  # every block once, in order
        fetches = [a for a in actions if a.kind == "fetch"]
        if p > 0:
            assert len(fetches) == copies_per_pass(n, k)
        for i, action in enumerate(actions):
            if action.kind == "fetch":
                assert action.block in streamed and action.slot < slot_count(n, k)
                # never into the slot of the block about to compute
                upcoming = next(a for a in actions[i + 1:] + [None] if a is None or a.kind == "compute")
                if upcoming is not None and upcoming.slot is not None:
                    assert action.slot != upcoming.slot or upcoming.block == action.block
                slots[action.slot] = action.block
            elif action.block in resident:
                assert action.slot is None
            else:
                assert slots.get(action.slot) == action.block  # computed from the slot its copy went into
        # fetches running ahead of the computing block: at most one (two during resident blocks)
        for i, action in enumerate(actions):
            if action.kind == "compute" and action.slot is not None:
                ahead = [a for a in actions[:i] if a.kind == "fetch"]
                done = {a.block for a in actions[:i] if a.kind == "compute"}
                pending = [a for a in ahead if a.block not in done and a.block != action.block]
                assert len({a.block for a in pending}) <= 1
        if streamed:  # wrap-around: the next call's first streamed block is already in place
            assert streamed[0] in slots.values()
        busy_fetches += len(fetches)
    assert busy_fetches <= 3 * len(streamed) + 2


def test_state_must_match_the_plan():
    with pytest.raises(ValueError, match="slots"):
        plan_pass(5, 2, (None,))
    assert initial_state(5, 2) == (None, None) and initial_state(5, None) == ()


def test_few_streamed_blocks_are_copied_once():
    assert copies_per_pass(48, 46) == 0 and copies_per_pass(48, 45) == 3
    later = simulate(48, 46, passes=3)[1:]
    assert all(a.kind == "compute" for actions in later for a in actions)
