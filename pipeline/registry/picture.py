"""The image lineage as an SVG picture: versions as boxes, each drawn right of its parent.

Standard library only. The same nodes give the same bytes, so a test can compare pictures.
Text widths are estimated, not measured: long lines are cut with "…" and shown whole in the
tooltip of each box.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

# Geometry, in pixels.
MARGIN = 24
TITLE_BASELINE = 34
LEGEND_TOP = 52
CONTENT_TOP = 104
BOX_H = 68
ROW = BOX_H + 28  # room for the badges that sit on a box's top edge
COLUMN_GAP = 64
MIN_BOX_W = 220
MAX_BOX_W = 420
PAD = 12
BADGE_H = 16
BADGE_GAP = 6

# Estimated width of one character as a fraction of the font size; east Asian wide ones count 2.
EM_REGULAR = 0.58
EM_BOLD = 0.64

FONT = "system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif"
INK = "#1f2328"
MUTED = "#57606a"
FILL = {"base": "#dbe6f4", "image": "#ffffff"}
STROKE = {"base": "#4a6785", "image": "#5b6b7a"}
REVOKED = "#c62828"
EDGE = "#8c959f"
CHANNEL_FILL = "#1f6feb"
OUTDATED_FILL = "#f5c451"

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class Node:
    """One version in the lineage: a base version or an image version."""

    id: str
    title: str
    detail: str
    kind: str
    parent: str | None
    channels: tuple[str, ...] = ()
    revoked: str | None = None
    outdated: bool = False


@dataclass(frozen=True)
class _Box:
    node: Node
    x: int
    y: int
    width: int


def lineage_svg(nodes: Sequence[Node], *, title: str) -> str:
    """Draw the nodes as a left-to-right tree and return the SVG document as text.

    A node whose parent is not among the nodes, or whose parent chain leads back to itself,
    is drawn as a root. Of nodes sharing an id only the first is drawn. The text carries no
    XML declaration; write it as UTF-8.
    """
    unique = _first_of_each_id(nodes)
    if not unique:
        return _empty_svg(title)

    parents = _parents(unique)
    width = _box_width(unique)
    boxes = _place(unique, parents, width)
    by_id = {box.node.id: box for box in boxes}

    right = max(box.x for box in boxes) + width + MARGIN
    bottom = max(box.y for box in boxes) + BOX_H + MARGIN
    legend, legend_width = _legend(MARGIN, LEGEND_TOP)
    canvas_w = max(right, MARGIN + legend_width + MARGIN, MARGIN + _title_width(title) + MARGIN)

    parts = [*_header(title, canvas_w, bottom), *legend, '<g class="edges">']
    for box in boxes:
        parent = parents[box.node.id]
        if parent is not None:
            parts.append(_edge(by_id[parent], box))
    parts.append("</g>")
    parts.append('<g class="nodes">')
    for box in boxes:
        parts.extend(_node(box))
    parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _first_of_each_id(nodes: Sequence[Node]) -> list[Node]:
    seen: set[str] = set()
    unique = []
    for node in nodes:
        if node.id not in seen:
            seen.add(node.id)
            unique.append(node)
    return unique


def _parents(nodes: Sequence[Node]) -> dict[str, str | None]:
    """Each node's parent as drawn: unknown parents dropped, every cycle cut once."""
    known = {node.id for node in nodes}
    parents = {n.id: n.parent if n.parent in known and n.parent != n.id else None for n in nodes}

    # A node whose chain comes back to it is the first of its cycle in input order: it becomes
    # a root. Chains already known to end at a root are not walked again.
    settled: set[str] = set()
    for node in nodes:
        path = {node.id}
        at = parents[node.id]
        while at is not None and at not in settled and at not in path:
            path.add(at)
            at = parents[at]
        if at == node.id:
            parents[node.id] = None
        if at is None or at in settled or at == node.id:
            settled.update(path)
    return parents


def _place(nodes: Sequence[Node], parents: dict[str, str | None], width: int) -> list[_Box]:
    """Leaves take the next row; a parent sits midway between its first and last child."""
    children: dict[str, list[Node]] = {node.id: [] for node in nodes}
    roots = []
    for node in nodes:
        parent = parents[node.id]
        if parent is None:
            roots.append(node)
        else:
            children[parent].append(node)

    # Walked with a stack, not recursion: a chain of thousands of versions is still drawn.
    depth: dict[str, int] = {}
    top: dict[str, int] = {}
    order: list[Node] = []
    next_row = 0
    stack: list[tuple[Node, int, bool]] = [(root, 0, False) for root in reversed(roots)]
    while stack:
        node, level, children_done = stack.pop()
        kids = children[node.id]
        if children_done:
            top[node.id] = (top[kids[0].id] + top[kids[-1].id]) // 2
            continue
        depth[node.id] = level
        order.append(node)
        if kids:
            stack.append((node, level, True))
            stack.extend((kid, level + 1, False) for kid in reversed(kids))
        else:
            top[node.id] = next_row * ROW
            next_row += 1

    column = width + COLUMN_GAP
    return [
        _Box(node, MARGIN + depth[node.id] * column, CONTENT_TOP + top[node.id], width)
        for node in order
    ]


def _box_width(nodes: Sequence[Node]) -> int:
    widest = max(
        max(_text_width(n.title, 13, EM_BOLD), _text_width(n.detail, 11, EM_REGULAR)) for n in nodes
    )
    return min(MAX_BOX_W, max(MIN_BOX_W, int(widest) + 2 * PAD + 2))


def _header(title: str, width: int, height: int) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="{_attr(FONT)}" class="lineage">',
        f'<rect class="background" x="0" y="0" width="{width}" height="{height}" fill="#f6f8fa"/>',
        f'<text class="title" x="{MARGIN}" y="{TITLE_BASELINE}" font-size="18" '
        f'font-weight="bold" fill="{INK}">{_text(_fit(title, 1200, 18, EM_BOLD))}</text>',
    ]


def _empty_svg(title: str) -> str:
    width = max(360, MARGIN + _title_width(title) + MARGIN)
    height = 110
    parts = [
        *_header(title, width, height),
        f'<text class="empty" x="{MARGIN}" y="76" font-size="14" fill="{MUTED}">no versions</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def _title_width(title: str) -> int:
    return int(_text_width(_fit(title, 1200, 18, EM_BOLD), 18, EM_BOLD))


def _edge(parent: _Box, child: _Box) -> str:
    x1, y1 = parent.x + parent.width, parent.y + BOX_H // 2
    x2, y2 = child.x, child.y + BOX_H // 2
    bend = (x1 + x2) // 2
    return (
        f'<path class="edge" data-from="{_attr(parent.node.id)}" data-to="{_attr(child.node.id)}" '
        f'd="M {x1} {y1} C {bend} {y1}, {bend} {y2}, {x2} {y2}" '
        f'fill="none" stroke="{EDGE}" stroke-width="1.5"/>'
    )


def _node(box: _Box) -> list[str]:
    node, x, y, w = box.node, box.x, box.y, box.width
    kind = node.kind if node.kind in FILL else "image"
    marks = [kind] + ["revoked"] * (node.revoked is not None) + ["outdated"] * node.outdated
    stroke = REVOKED if node.revoked is not None else STROKE[kind]
    stroke_width = "2.5" if node.revoked is not None else "1.5"
    dash = ' stroke-dasharray="6 4"' if node.outdated else ""
    room = w - 2 * PAD

    title = _fit(node.title, room, 13, EM_BOLD)
    parts = [
        f'<g class="node {" ".join(marks)}" data-id="{_attr(node.id)}">',
        f"<title>{_text(_tooltip(node))}</title>",
        f'<rect class="box" x="{x}" y="{y}" width="{w}" height="{BOX_H}" rx="8" ry="8" '
        f'fill="{FILL[kind]}" stroke="{stroke}" stroke-width="{stroke_width}"{dash}/>',
        f'<text class="name" x="{x + PAD}" y="{y + 24}" font-size="13" font-weight="bold" '
        f'fill="{INK}">{_text(title)}</text>',
        f'<text class="detail" x="{x + PAD}" y="{y + 41}" font-size="11" fill="{MUTED}">'
        f"{_text(_fit(node.detail, room, 11, EM_REGULAR))}</text>",
    ]
    if node.revoked is not None:
        strike = int(_text_width(title, 13, EM_BOLD))
        parts.append(
            f'<line class="strike" x1="{x + PAD}" y1="{y + 19}" x2="{x + PAD + strike}" '
            f'y2="{y + 19}" stroke="{REVOKED}" stroke-width="1.5"/>'
        )
        parts.append(
            f'<text class="revoked-reason" x="{x + PAD}" y="{y + 58}" font-size="11" '
            f'fill="{REVOKED}">{_text(_fit("revoked: " + node.revoked, room, 11, EM_REGULAR))}'
            "</text>"
        )
    parts.extend(_badges(box))
    parts.append("</g>")
    return parts


def _badges(box: _Box) -> list[str]:
    """The outdated tag on the left of the top edge, channel badges on the right."""
    top = box.y - BADGE_H // 2
    parts = []
    left = box.x + PAD
    if box.node.outdated:
        parts.append(_badge("tag outdated", "outdated", left, top, OUTDATED_FILL, INK))
        left += _badge_width("outdated") + BADGE_GAP

    # Badges that would not fit are counted in a last "+N" badge; the tooltip names them all.
    room = box.x + box.width - PAD - left
    shown: list[tuple[str, str]] = []
    for index, channel in enumerate(box.node.channels):
        label = _fit(channel, 120, 10, EM_BOLD)
        rest = len(box.node.channels) - index - 1
        needed = _badge_width(label) + (BADGE_GAP + _badge_width(f"+{rest}") if rest else 0)
        if needed > room:
            shown.append(("more", f"+{rest + 1}"))
            break
        shown.append(("channel", label))
        room -= _badge_width(label) + BADGE_GAP

    # Right-aligned, in the order given.
    at = box.x + box.width - PAD - sum(_badge_width(label) + BADGE_GAP for _, label in shown)
    for css, label in shown:
        at += BADGE_GAP
        parts.append(_badge(css, label, at, top, CHANNEL_FILL, "#ffffff"))
        at += _badge_width(label)
    return parts


def _badge(css: str, label: str, x: int, y: int, fill: str, ink: str) -> str:
    width = _badge_width(label)
    return (
        f'<g class="{css}"><rect x="{x}" y="{y}" width="{width}" height="{BADGE_H}" rx="8" '
        f'ry="8" fill="{fill}"/><text x="{x + width // 2}" y="{y + 12}" font-size="10" '
        f'font-weight="bold" text-anchor="middle" fill="{ink}">{_text(label)}</text></g>'
    )


def _badge_width(label: str) -> int:
    return int(_text_width(label, 10, EM_BOLD)) + 14


def _legend(x: int, y: int) -> tuple[list[str], int]:
    """The key to the marks, in one row; returns its parts and its width."""
    swatches = [
        ("base version", f'fill="{FILL["base"]}" stroke="{STROKE["base"]}" stroke-width="1.5"'),
        ("image version", f'fill="{FILL["image"]}" stroke="{STROKE["image"]}" stroke-width="1.5"'),
        ("revoked", f'fill="{FILL["image"]}" stroke="{REVOKED}" stroke-width="2.5"'),
        (
            "outdated: its parent has a newer version",
            f'fill="{FILL["image"]}" stroke="{STROKE["image"]}" stroke-width="1.5" '
            'stroke-dasharray="6 4"',
        ),
    ]
    parts = ['<g class="legend">']
    at = x
    for label, style in swatches:
        parts.append(f'<rect x="{at}" y="{y}" width="28" height="18" rx="5" ry="5" {style}/>')
        parts.append(_legend_text(label, at + 36, y))
        at += 36 + int(_text_width(label, 12, EM_REGULAR)) + 24
    parts.append(_badge("channel", "name", at, y + 1, CHANNEL_FILL, "#ffffff"))
    at += _badge_width("name") + 8
    parts.append(_legend_text("channel", at, y))
    at += int(_text_width("channel", 12, EM_REGULAR))
    parts.append("</g>")
    return parts, at - x


def _legend_text(label: str, x: int, y: int) -> str:
    return f'<text x="{x}" y="{y + 13}" font-size="12" fill="{MUTED}">{_text(label)}</text>'


def _tooltip(node: Node) -> str:
    lines = [node.title, node.detail]
    if node.revoked is not None:
        lines.append(f"revoked: {node.revoked}")
    if node.outdated:
        lines.append("outdated: its parent has a newer version")
    if node.channels:
        lines.append("channels: " + ", ".join(node.channels))
    return "\n".join(lines)


def _text_width(text: str, size: int, em: float) -> float:
    units = sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)
    return units * size * em


def _fit(text: str, room: float, size: int, em: float) -> str:
    """One line of text, cut with "…" where it would be wider than room."""
    line = " ".join(text.split())
    if _text_width(line, size, em) <= room:
        return line
    room -= _text_width("…", size, em)
    used = 0.0
    for index, ch in enumerate(line):
        used += _text_width(ch, size, em)
        if used > room:
            return line[:index].rstrip() + "…"
    return line


def _text(text: str) -> str:
    return html.escape(_NOT_XML.sub("\ufffd", text), quote=False)


def _attr(text: str) -> str:
    # Newlines and tabs as references, so an attribute reads back exactly as it was given.
    escaped = html.escape(_NOT_XML.sub("\ufffd", text), quote=True)
    return escaped.replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;")
