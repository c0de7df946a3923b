"""IdentityMemo: values for lists of the very same objects, never for equal but other ones."""
from orchestrate.checkpoint.identity_memo import IdentityMemo


def test_a_value_is_found_for_the_same_objects_in_another_list_and_only_for_them():
    memo = IdentityMemo(capacity=3)
    first, second = [1000.5], [1000.5]  # equal, not the same
    items = [first, second]
    assert memo.get(items) is None
    assert memo.put(items, "laid out") == "laid out"
    assert memo.get(list(items)) == "laid out"  # a copy of the list: the same objects
    assert memo.get([first, [1000.5]]) is None  # an equal object is not the same one
    assert memo.get([second, first]) is None  # order counts
    del items
    assert memo.get([first, second]) == "laid out"  # held by the memo, so no other object took their ids


def test_it_forgets_everything_when_full_or_cleared():
    memo = IdentityMemo(capacity=2)
    lists = [[object()] for _ in range(3)]
    memo.put(lists[0], 0)
    memo.put(lists[1], 1)
    memo.put(lists[2], 2)  # full: the earlier ones are dropped
    assert memo.get(lists[0]) is None and memo.get(lists[1]) is None and memo.get(lists[2]) == 2
    memo.clear()
    assert memo.get(lists[2]) is None
