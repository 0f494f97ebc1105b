"""The coordinator's decisions as pure functions: fair slot shares and task placement."""

from collections import Counter

from asyncfl.cluster.coordinator import plan_grants, plan_owners


def _after(slots, moves):
    owner = {slot: sel for slot, sel, _ in slots}
    for slot, old, new in moves:
        assert owner[slot] == old
        owner[slot] = new
    return owner


def test_free_unassigned_slots_are_dealt_in_fair_shares():
    slots = [(i, None, False) for i in range(7)]
    owner = _after(slots, plan_grants(slots, ["a", "b", "c"]))
    assert sorted(Counter(owner.values()).values()) == [2, 2, 3]


def test_a_dead_selectors_free_slots_move_and_its_leased_ones_stay():
    slots = [(0, "a", False), (1, "a", True), (2, "dead", False), (3, "dead", True)]
    moves = plan_grants(slots, ["a", "b"])
    assert moves == [(2, "dead", "b")]
    assert plan_grants(_as_slots(slots, moves), ["a", "b"]) == []  # balanced: nothing more moves


def _as_slots(slots, moves):
    owner = _after(slots, moves)
    return [(slot, owner[slot], leased) for slot, _, leased in slots]


def test_a_new_selector_gets_free_slots_of_one_over_its_share_but_never_leased_ones():
    slots = [(i, "a", i < 3) for i in range(4)]  # a holds all 4, 3 of them leased
    moves = plan_grants(slots, ["a", "b"])
    assert moves == [(3, "a", "b")]
    owner = _after(slots, moves)
    assert Counter(owner.values()) == {"a": 3, "b": 1}  # a's leased slots move once their leases end


def test_balanced_holdings_do_not_churn():
    slots = [(0, "a", False), (1, "a", False), (2, "b", False)]
    assert plan_grants(slots, ["a", "b"]) == []
    assert plan_grants(slots, []) == []


def test_orphan_tasks_go_to_the_least_loaded_aggregator():
    moves = plan_owners([("t1", "x"), ("t2", None), ("t3", "gone")], ["x", "y"])
    assert moves == [("t2", None, "y"), ("t3", "gone", "x")]


def test_three_tasks_over_two_aggregators_rebalance_one_at_a_time():
    tasks = [("t1", "x"), ("t2", "x"), ("t3", "x")]
    moves = plan_owners(tasks, ["x", "y"])
    assert moves == [("t3", "x", "y")]
    assert plan_owners([("t1", "x"), ("t2", "x"), ("t3", "y")], ["x", "y"]) == []
    assert plan_owners(tasks, []) == []
