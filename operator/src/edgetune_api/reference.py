"""A reference page per CRD (``docs/reference/<kind>.md``), generated from the same schema as the CRD:
every field with its type, default, validation and description, and the CEL rules with the messages
the API server returns. ``python -m edgetune_api write`` renders them; ``check`` fails when stale."""

from __future__ import annotations

from typing import Any

from edgetune_api.crd import RESOURCES, CrdInfo, crd

HEADER = "<!-- Generated from edgetune_api by `python -m edgetune_api write`; do not edit by hand. -->\n"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = str(node.get("type", "object"))
    if kind == "array":
        return f"[]{_type(node.get('items') or {})}"
    if kind == "object" and "additionalProperties" in node and "properties" not in node:
        return f"map[string]{_type(node['additionalProperties'])}"
    return kind


def _rules(node: dict[str, Any]) -> str:
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    for key, label in (("minimum", "≥"), ("maximum", "≤")):
        if key in node:
            exclusive = node.get(f"exclusive{key.capitalize()}") is True
            parts.append(f"{'>' if key == 'minimum' else '<'} {node[key]}" if exclusive else f"{label} {node[key]}")
    for key, label in (("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥"),
                       ("maxItems", "items ≤")):  # fmt: skip
        if key in node:
            parts.append(f"{label} {node[key]}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    parts += [f"rule: {rule.get('message') or rule['rule']}" for rule in node.get("x-kubernetes-validations") or []]
    return "; ".join(parts).replace("|", "\\|")


def _rows(node: dict[str, Any], path: str, required: set[str], out: list[str]) -> None:
    for name, sub in (node.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        default = f"`{sub['default']}`" if "default" in sub else ""
        description = " ".join(str(sub.get("description", "")).split()).replace("|", "\\|")
        flag = " (required)" if name in required else ""
        out.append(f"| `{here}`{flag} | {_type(sub)} | {default} | {_rules(sub)} | {description} |")
        items = sub.get("items") or {}
        if sub.get("properties"):
            _rows(sub, here, set(sub.get("required") or []), out)
        elif items.get("properties"):
            _rows(items, f"{here}[]", set(items.get("required") or []), out)


def page(info: CrdInfo) -> str:
    definition = crd(info)
    version = definition["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    names = definition["spec"]["names"]
    lines = [
        HEADER,
        f"# {names['kind']} (`{definition['spec']['group']}/{version['name']}`)",
        "",
        " ".join(str(schema.get("description", "")).split()),
        "",
        f"Scope: {definition['spec']['scope']}. Short names: "
        f"{', '.join(f'`{n}`' for n in names.get('shortNames', [])) or '—'}. "
        f"`kubectl get` columns: {', '.join(c['name'] for c in version.get('additionalPrinterColumns', []))}.",
        "",
    ]
    for part in ("spec", "status"):
        node = (schema.get("properties") or {}).get(part)
        if not node:
            continue
        lines += [f"## {part}", ""]
        whole = _rules(node)
        if whole:
            lines += [f"Rules on the whole {part}: {whole}", ""]
        lines += ["| field | type | default | validation | description |", "|---|---|---|---|---|"]
        _rows(node, part, set(node.get("required") or []), lines)
        lines.append("")
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """File name -> Markdown, one per resource."""
    return {f"{crd(info)['spec']['names']['singular']}.md": page(info) for info in RESOURCES}
