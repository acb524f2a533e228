"""The lineage picture: one box per version, an edge per parent, marks only where they apply."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET

import pytest

from pipeline.registry.picture import Node, lineage_svg

SVG = "{http://www.w3.org/2000/svg}"


def _detail(day: str) -> str:
    return f"verified · 2026-{day} · build 2026{day.replace('-', '')}t101010-abc123"


SAMPLE = [
    Node("debian@1.0.0", "debian 1.0.0", _detail("11-02"), "base", None),
    Node("debian@1.0.1", "debian 1.0.1", _detail("11-20"), "base", None),
    Node("web@1.0.0", "web 1.0.0", _detail("11-05"), "image", "debian@1.0.0", outdated=True),
    Node("web@1.0.1", "web 1.0.1", _detail("11-21"), "image", "debian@1.0.1", channels=("prod",)),
    Node(
        "web@1.0.2",
        "web 1.0.2",
        _detail("12-04"),
        "image",
        "debian@1.0.1",
        revoked="CVE-2026-1234 in openssl",
    ),
    Node("web@1.0.3", "web 1.0.3", _detail("12-09"), "image", "debian@1.0.1", channels=("dev",)),
]


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


def _groups(root: ET.Element) -> dict[str, ET.Element]:
    found = [g for g in root.iter(f"{SVG}g") if "node" in _classes(g)]
    by_id = {g.get("data-id", ""): g for g in found}
    assert len(by_id) == len(found), "two groups share a data-id"
    return by_id


def _edges(root: ET.Element) -> set[tuple[str, str]]:
    paths = [p for p in root.iter(f"{SVG}path") if "edge" in _classes(p)]
    return {(p.get("data-from", ""), p.get("data-to", "")) for p in paths}


def _rect(group: ET.Element) -> ET.Element:
    return next(r for r in group.iter(f"{SVG}rect") if "box" in _classes(r))


def _box(group: ET.Element) -> tuple[int, int, int, int]:
    rect = _rect(group)
    x, y, w, h = (int(rect.get(key, "")) for key in ("x", "y", "width", "height"))
    return x, y, w, h


def _texts(group: ET.Element, css: str) -> list[str]:
    """The texts of the badges of one class inside a node's group."""
    return [
        "".join(text.itertext())
        for badge in group.iter(f"{SVG}g")
        if badge is not group and css in _classes(badge)
        for text in badge.iter(f"{SVG}text")
    ]


def _size(root: ET.Element) -> tuple[int, int]:
    return int(root.get("width", "")), int(root.get("height", ""))


def test_the_picture_is_an_svg_document_shown_whole() -> None:
    root = _parse(lineage_svg(SAMPLE, title="web"))

    width, height = _size(root)
    assert root.tag == f"{SVG}svg"
    assert root.get("viewBox") == f"0 0 {width} {height}"
    for group in _groups(root).values():
        x, y, w, h = _box(group)
        assert x >= 0 and x + w <= width
        assert y >= 0 and y + h <= height


def test_the_title_is_at_the_top() -> None:
    root = _parse(lineage_svg(SAMPLE, title="Lineage of web"))

    title = next(t for t in root.iter(f"{SVG}text") if "title" in _classes(t))
    assert title.text == "Lineage of web"
    assert all(int(title.get("y", "")) < _box(g)[1] for g in _groups(root).values())


def test_each_version_is_one_group_classed_by_its_kind() -> None:
    groups = _groups(_parse(lineage_svg(SAMPLE, title="web")))

    assert list(groups) == [
        "debian@1.0.0",
        "web@1.0.0",
        "debian@1.0.1",
        "web@1.0.1",
        "web@1.0.2",
        "web@1.0.3",
    ]
    assert "base" in _classes(groups["debian@1.0.1"])
    assert "image" in _classes(groups["web@1.0.3"])
    assert "image" not in _classes(groups["debian@1.0.1"])


def test_each_parent_is_joined_to_each_of_its_children() -> None:
    root = _parse(lineage_svg(SAMPLE, title="web"))

    assert _edges(root) == {
        ("debian@1.0.0", "web@1.0.0"),
        ("debian@1.0.1", "web@1.0.1"),
        ("debian@1.0.1", "web@1.0.2"),
        ("debian@1.0.1", "web@1.0.3"),
    }


def test_children_stand_right_of_their_parent_which_is_centred_on_them() -> None:
    groups = _groups(_parse(lineage_svg(SAMPLE, title="web")))

    px, py, pw, _ = _box(groups["debian@1.0.1"])
    kids = [_box(groups[f"web@1.0.{n}"]) for n in (1, 2, 3)]
    assert all(x > px + pw for x, _, _, _ in kids)
    assert py == (kids[0][1] + kids[-1][1]) // 2
    assert [y for _, y, _, _ in kids] == sorted(y for _, y, _, _ in kids)


def test_channels_are_badges_on_the_version_they_point_at() -> None:
    groups = _groups(_parse(lineage_svg(SAMPLE, title="web")))

    assert _texts(groups["web@1.0.3"], "channel") == ["dev"]
    assert _texts(groups["web@1.0.1"], "channel") == ["prod"]
    assert _texts(groups["web@1.0.2"], "channel") == []


def test_channels_that_do_not_fit_are_counted() -> None:
    many = tuple(f"channel-{n}" for n in range(12))
    node = Node("web@2.0.0", "web 2.0.0", "built", "image", None, channels=many)
    group = _groups(_parse(lineage_svg([node], title="web")))["web@2.0.0"]

    shown = _texts(group, "channel")
    more = _texts(group, "more")
    assert shown == list(many[: len(shown)])
    assert more == [f"+{len(many) - len(shown)}"]
    assert "channel-11" in (group.findtext(f"{SVG}title") or "")


def test_revoked_and_outdated_are_marked_only_where_set() -> None:
    groups = _groups(_parse(lineage_svg(SAMPLE, title="web")))

    for node_id, group in groups.items():
        classes = _classes(group)
        reasons = [t for t in group.iter(f"{SVG}text") if "revoked-reason" in _classes(t)]
        dashed = _rect(group).get("stroke-dasharray") is not None
        assert ("revoked" in classes) == (node_id == "web@1.0.2")
        assert bool(reasons) == (node_id == "web@1.0.2")
        assert ("outdated" in classes) == (node_id == "web@1.0.0")
        assert dashed == (node_id == "web@1.0.0")
        assert _texts(group, "outdated") == (["outdated"] if node_id == "web@1.0.0" else [])

    reason = groups["web@1.0.2"].findtext(f"{SVG}text[@class='revoked-reason']")
    assert reason == "revoked: CVE-2026-1234 in openssl"


def test_text_from_users_survives_escaping() -> None:
    hostile = "<script>&\"'"
    node = Node(
        f'web@"{hostile}',
        "wéb 1.0.0 雪 <b>",
        'built & "verified"\tnow',
        "image",
        None,
        channels=("<prod>",),
        revoked=hostile,
    )
    svg = lineage_svg([node], title="Lineage & <friends> «ü»")
    root = _parse(svg)

    group = _groups(root)[f'web@"{hostile}']
    texts = {t.get("class"): "".join(t.itertext()) for t in group.iter(f"{SVG}text")}
    assert "<script>" not in svg
    assert texts["revoked-reason"] == f"revoked: {hostile}"
    assert texts["name"] == "wéb 1.0.0 雪 <b>"
    assert texts["detail"] == 'built & "verified" now'
    assert _texts(group, "channel") == ["<prod>"]
    assert "".join(root.itertext()).count("Lineage & <friends> «ü»") == 1


def test_characters_xml_cannot_carry_are_replaced() -> None:
    node = Node("web@1.0.0", "web\x00 1.0.0\x1b", "built", "image", None, revoked="\ud800")

    root = _parse(lineage_svg([node], title="web\x07"))

    assert "\ufffd" in "".join(_groups(root)["web@1.0.0"].itertext())


def test_long_text_is_cut_and_shown_whole_in_the_tooltip() -> None:
    detail = "verified · " + "x" * 400
    node = Node("web@1.0.0", "web 1.0.0", detail, "image", None)

    group = _groups(_parse(lineage_svg([node], title="web")))["web@1.0.0"]

    shown = next(t.text or "" for t in group.iter(f"{SVG}text") if t.get("class") == "detail")
    assert shown.endswith("…")
    assert len(shown) < len(detail)
    assert detail in (group.findtext(f"{SVG}title") or "")


def test_no_versions_says_so() -> None:
    root = _parse(lineage_svg([], title="web"))

    assert root.tag == f"{SVG}svg"
    assert root.get("viewBox") is not None
    assert _groups(root) == {}
    assert "no versions" in "".join(root.itertext())


def test_three_hundred_versions_get_boxes_that_do_not_overlap() -> None:
    nodes = []
    for b in range(10):
        nodes.append(Node(f"debian@1.{b}.0", f"debian 1.{b}.0", "verified", "base", None))
        for i in range(19):
            parent = f"debian@1.{b}.0" if i % 3 == 0 else f"web@{b}.{i - i % 3}.0"
            nodes.append(Node(f"web@{b}.{i}.0", f"web {b}.{i}.0", "built", "image", parent))
    nodes.extend(Node(f"app@{n}", f"app {n}", "built", "image", f"web@{n}.3.0") for n in range(10))
    assert len(nodes) == 210 and len({n.id for n in nodes}) == 210
    nodes.extend(Node(f"lone@{n}", f"lone {n}", "built", "image", "gone@1") for n in range(90))

    root = _parse(lineage_svg(nodes, title="everything"))

    boxes = [_box(g) for g in _groups(root).values()]
    width, height = _size(root)
    assert len(boxes) == 300
    assert len(_edges(root)) == 200
    for (ax, ay, aw, ah), (bx, by, bw, bh) in itertools.combinations(boxes, 2):
        apart = ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
        assert apart, f"boxes at {(ax, ay)} and {(bx, by)} overlap"
    assert max(x + w for x, _, w, _ in boxes) <= width
    assert max(y + h for _, y, _, h in boxes) <= height


def test_a_parent_not_among_the_versions_leaves_a_root() -> None:
    node = Node("web@1.0.0", "web 1.0.0", "built", "image", "debian@0.9.0")

    root = _parse(lineage_svg([node], title="web"))

    assert list(_groups(root)) == ["web@1.0.0"]
    assert _edges(root) == set()


def test_a_cycle_is_cut_at_its_first_version_and_drawn() -> None:
    nodes = [
        Node("d", "d", "", "image", "a"),
        Node("a", "a", "", "image", "c"),
        Node("b", "b", "", "image", "a"),
        Node("c", "c", "", "image", "b"),
        Node("self", "self", "", "image", "self"),
    ]

    root = _parse(lineage_svg(nodes, title="bad data"))

    assert set(_groups(root)) == {"a", "b", "c", "d", "self"}
    assert _edges(root) == {("a", "b"), ("b", "c"), ("a", "d")}


def test_a_long_chain_is_drawn_without_recursion() -> None:
    nodes = [Node(f"v{n}", f"v{n}", "", "image", f"v{n - 1}" if n else None) for n in range(2000)]

    root = _parse(lineage_svg(nodes, title="chain"))

    assert len(_edges(root)) == 1999


def test_a_repeated_id_is_drawn_once() -> None:
    first = Node("web@1.0.0", "first", "", "image", None)
    again = Node("web@1.0.0", "again", "", "image", None)

    groups = _groups(_parse(lineage_svg([first, again], title="web")))

    assert [g.findtext(f".//{SVG}text[@class='name']") for g in groups.values()] == ["first"]


@pytest.mark.parametrize("nodes", [SAMPLE, []], ids=["sample", "empty"])
def test_the_same_versions_give_the_same_bytes(nodes: list[Node]) -> None:
    copies = [Node(**vars(node)) for node in nodes]

    assert lineage_svg(nodes, title="web") == lineage_svg(copies, title="web")
