"""NODES.md documents every node and every input of the pack; every input has a tooltip and every node a
description."""
import re
from pathlib import Path

NODES_MD = (Path(__file__).resolve().parents[2] / "NODES.md").read_text()


def sections():
    found = {}
    for match in re.finditer(r"^## [^\n]*\(`(IPX\w+)`\)\n(.*?)(?=^## |\Z)", NODES_MD, re.S | re.M):
        found[match.group(1)] = match.group(2)
    return found


def pack_nodes(host):
    return {name: cls for name, cls in host.NODE_CLASS_MAPPINGS.items() if name.startswith("IPX")}


def test_every_node_has_a_section_that_names_every_input(host):
    documented = sections()
    for name, cls in pack_nodes(host).items():
        assert name in documented, f"NODES.md has no section for {name}"
        schema = cls.GET_SCHEMA()
        for spec in schema.inputs:
            assert f"`{spec.id}`" in documented[name], f"NODES.md: {name} does not document input '{spec.id}'"


def test_every_input_has_a_tooltip_and_every_node_a_description(host):
    for name, cls in pack_nodes(host).items():
        schema = cls.GET_SCHEMA()
        assert len(schema.description) > 30, name
        for spec in schema.inputs:
            assert spec.tooltip and len(spec.tooltip) > 15, f"{name}.{spec.id} has no real tooltip"
