"""The example workflows: each UI-format file (what users drag into ComfyUI) and its API-format twin (what is posted
to /prompt) describe the same graph, and every node type, input and link type exists in the host plus this pack."""
import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"
EXAMPLES = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def input_specs(node_class):
    types = node_class.INPUT_TYPES()
    specs = {}
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            specs[name] = (spec[0], spec[1] if len(spec) > 1 else {})
    return specs


def is_widget(type_):
    return isinstance(type_, list) or type_ in WIDGET_TYPES


def ui_to_api(ui, mappings):
    """What the frontend posts for a UI graph: widget values matched to widget inputs in order (an INT with
    control_after_generate and an upload-enabled combo each carry one more value), links as [node id, slot]."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node["type"] in FRONTEND_ONLY:
            continue
        linked = {entry["name"] for entry in node["inputs"] if entry.get("link") is not None}
        values = iter(node["widgets_values"])
        inputs = {}
        for name, (type_, options) in input_specs(mappings[node["type"]]).items():
            if not is_widget(type_) or name in linked:
                continue
            inputs[name] = next(values)
            if options.get("control_after_generate") or options.get("image_upload"):
                next(values)
        assert next(values, None) is None, f"node {node['id']} ({node['type']}) has unused widget values"
        for entry in node["inputs"]:
            if entry.get("link") is not None:
                link = links[entry["link"]]
                inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load(name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    return ui, api


def test_there_are_base_plus_and_stacked_examples():
    assert {"ipadapter_sd15", "ipadapter_sd15_plus", "ipadapter_sd15_stacked"} <= set(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_ui_and_api_files_describe_the_same_graph(host, name):
    ui, api = load(name)
    converted = ui_to_api(ui, host.NODE_CLASS_MAPPINGS)
    assert converted == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_node_type_exists_in_the_host_plus_this_pack(host, name):
    ui, _ = load(name)
    missing = {n["type"] for n in ui["nodes"]} - set(host.NODE_CLASS_MAPPINGS) - FRONTEND_ONLY
    assert not missing
    assert any(n["type"].startswith("IPX") for n in ui["nodes"])


@pytest.mark.parametrize("name", EXAMPLES)
def test_every_link_joins_matching_types_and_every_required_input_is_set(host, name):
    ui, api = load(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, source, slot, target, target_slot, type_ in ui["links"]:
        source_class = host.NODE_CLASS_MAPPINGS[nodes[source]["type"]]
        assert source_class.RETURN_TYPES[slot] == type_, f"link {link_id}"
        target_input = nodes[target]["inputs"][target_slot]
        assert target_input["link"] == link_id and target_input["type"] == type_
        assert input_specs(host.NODE_CLASS_MAPPINGS[nodes[target]["type"]])[target_input["name"]][0] == type_
    for node_id, node in api.items():
        required = host.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES().get("required", {})
        assert set(required) <= set(node["inputs"]), f"node {node_id} misses {set(required) - set(node['inputs'])}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_ui_file_has_titles_and_a_note_saying_where_models_go(name):
    ui, api = load(name)
    notes = [n for n in ui["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1 and "clip_vision/" in notes[0]["widgets_values"][0] and \
        "ipadapter/" in notes[0]["widgets_values"][0]
    assert all(n.get("title") for n in ui["nodes"])
    assert all(v["_meta"]["title"] for v in api.values())
