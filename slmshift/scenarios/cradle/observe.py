"""A MiniWoB++ observation as compact text: the utterance and the elements a model can act on, with refs.

    Task: Select DKkQH and click Submit.
    [6] checkbox "USa" unchecked
    [8] checkbox "DKkQH" unchecked
    [9] button "Submit"

Layout containers are left out; an input inside a label borrows the label's text; plain text on the page is
listed without a ref (it cannot be clicked). Refs are miniwob's own and stay stable within an episode.
"""

from __future__ import annotations

from typing import Any

ACTIONABLE = {"button", "a", "select", "textarea", "h3", "li", "span", "label", "option"}
_INPUT_NAMES = {"input_checkbox": "checkbox", "input_radio": "radio", "input_text": "textbox",
                "input_password": "password", "input_number": "number", "input_email": "email"}


def _descendant_text(elements: list[dict], index: int, limit: int = 40) -> str:
    root_depth, parts = elements[index]["depth"], []
    for el in elements[index + 1:]:
        if el["depth"] <= root_depth:
            break
        if el["text"] and el["tag"] != "input_checkbox":
            parts.append(el["text"])
    return " ".join(parts)[:limit]


def clickable_refs(obs: dict[str, Any]) -> set[int]:
    """Refs a click or type may name: every real element on the page (text pieces have negative refs)."""
    return {el["ref"] for el in obs["elements"] if el["ref"] > 0}


def describe(el: dict[str, Any], elements: list[dict], index: int, text_len: int = 40) -> str | None:
    """One line for an element, or None when it is a layout container with nothing to show."""
    tag, ref = el["tag"], el["ref"]
    if tag == "t":
        return f'- "{el["text"][:text_len]}"'
    if tag in ("body", "html"):
        return None
    name = _INPUT_NAMES.get(tag, tag.replace("input_", "") if tag.startswith("input_") else tag)
    text = el["text"]
    if tag.startswith("input_") and not text:
        parent = next((i for i in range(index - 1, -1, -1) if elements[i]["ref"] == el["parent"]), None)
        if parent is not None and elements[parent]["tag"] == "label":
            text = _descendant_text(elements, parent, text_len)
    if not text and not el["leaf"] and tag in ACTIONABLE:
        text = _descendant_text(elements, index, text_len)
    if not (tag.startswith("input_") or tag in ACTIONABLE or (el["leaf"] and text)):
        return None
    parts = [f"[{ref}] {name}"]
    if text:
        parts.append(f'"{text[:text_len]}"')
    if tag in ("input_checkbox", "input_radio"):
        parts.append("checked" if el["value"] else "unchecked")
    elif tag.startswith("input_") or tag == "textarea":
        parts.append(f'value="{str(el["value"] or "")[:text_len]}"')
    if not text and not tag.startswith("input_"):
        classes = [c for c in str(el["classes"]).split() if not c.startswith(("ui-corner", "ui-widget"))]
        hint = el["id"] or " ".join(classes)
        if hint:
            parts.append(f"({hint[:text_len]})")
        elif el["leaf"]:
            return None
    if el["focused"]:
        parts.append("focused")
    return " ".join(parts)


def render(obs: dict[str, Any], max_elements: int = 40, text_len: int = 40) -> str:
    """The observation as prompt text: task utterance, then one line per element (at most `max_elements`)."""
    lines = [f"Task: {obs['utterance']}"]
    elements = obs["elements"]
    shown = 0
    for i, el in enumerate(elements):
        line = describe(el, elements, i, text_len)
        if line is None:
            continue
        if el["tag"] == "t" and i > 0 and elements[i - 1]["tag"].startswith("input_"):
            continue  # already shown as the input's label
        if shown == max_elements:
            lines.append("... (more elements not shown)")
            break
        lines.append(line)
        shown += 1
    return "\n".join(lines)


def element_line(obs: dict[str, Any], ref: int) -> str:
    """The rendered line of one element (for references and skills), or '[ref]' when it is not shown."""
    elements = obs["elements"]
    for i, el in enumerate(elements):
        if el["ref"] == ref:
            return describe(el, elements, i) or f"[{ref}] {el['tag']}"
    return f"[{ref}]"
