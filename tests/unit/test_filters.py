import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.filters import Selector, matcher, parse
from snapshotter.store import Kind, Snapshot

REF = "containerd.io/snapshot.ref"


def snap(key: str, parent: str = "", kind: Kind = Kind.COMMITTED, **labels: str) -> Snapshot:
    return Snapshot(1, key, parent, kind, dict(labels), 0, 0)


def test_parse_the_filter_containerd_sends_after_already_exists() -> None:
    f = parse(f'labels."{REF}"==sha256:abc,parent=="default/2/sha256:def"')
    assert f == [
        Selector(("labels", REF), "==", "sha256:abc"),
        Selector(("parent",), "==", "default/2/sha256:def"),
    ]


def test_label_key_with_dots_unquoted_is_joined() -> None:
    match = matcher(["labels.containerd.io/snapshot.ref==x"])
    assert match(snap("a", **{REF: "x"}))
    assert not match(snap("a", **{REF: "y"}))


@pytest.mark.parametrize(
    "filters, key, expected",
    [
        ([], "a", True),
        (['name=="a"'], "a", True),
        (["name==b"], "a", False),
        (["name!=b"], "a", True),
        (["name~=^a"], "a", True),
        (["kind==committed"], "a", True),
        (["kind==active"], "a", False),
        (["labels.foo"], "a", True),
        (["labels.missing"], "a", False),
        (["name==b", "name==a"], "a", True),  # separate filters: any
        (["name==a,parent==p"], "a", True),  # selectors in a filter: all
        (["name==a,parent==q"], "a", False),
    ],
)
def test_matcher(filters: list[str], key: str, expected: bool) -> None:
    assert matcher(filters)(snap(key, parent="p", foo="bar")) is expected


def test_empty_parent_matches_quoted_empty_string() -> None:
    assert matcher(['parent==""'])(snap("a"))
    assert not matcher(['parent==""'])(snap("a", parent="p"))


def test_quoted_value_keeps_commas_and_escapes() -> None:
    assert parse(r'labels.x=="a,b\"c"') == [Selector(("labels", "x"), "==", 'a,b"c')]


@pytest.mark.parametrize("bad", ['name=="open', "name==", "==a", "name==a,,", "name~=(", "name==a b"])
def test_malformed_filters_are_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid filter"):
        parse(bad)
