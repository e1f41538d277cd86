"""The pack as a user meets it: the example workflows dropped onto the ComfyUI web page in a real headless Chromium,
checked for the frontend's load warnings, queued with the Run button, and followed until the output image shows in
the Save Image node. Random-weight models; the browser shrinks the workflow to 64x64 and 2 steps after loading it
(the shipped 512x512, 20 steps is minutes per image on a CPU)."""
import io
import json
import math
import re
import shutil
import time
from pathlib import Path

import pytest

from ipx_tools.server import PACK_NAME, execution_error, output_images, status_messages

PACK_DIR = Path(__file__).resolve().parents[2]
UI_WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))  # what users drag into ComfyUI

DOCUMENTED_WORKFLOWS = ("ipadapter_sd15", "ipadapter_sd15_plus", "ipadapter_sd15_stacked")
# Widget values the browser changes after loading a workflow, for the CPU's sake (by node type, then widget name).
# IPX Save IP-Adapter writes into the HOST's models/ipadapter whatever the server's model paths say: its prefix is
# pointed at a folder of its own there, which the test removes afterwards.
SAVED_ADAPTERS_SUBFOLDER = "ipx-browser-test"
SHRINK = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 2},
          "IPXTrainAdapter": {"steps": 2, "resolution": 64},
          "IPXSaveAdapter": {"filename_prefix": f"{SAVED_ADAPTERS_SUBFOLDER}/ipx_trained"}}
OUTPUT_SIZE = (64, 64)
OURS = r"IPX|ipadapter|ip-adapter|" + re.escape(PACK_NAME)  # console / page errors that concern this pack
RUN_TIMEOUT_S = 900
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --- what runs in the page ------------------------------------------------------------------------------------------

# A DataTransfer holding the workflow as the File a desktop drag would carry.
DATA_TRANSFER_JS = """([text, name]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([text], name, {type: "application/json"}));
    return transfer;
}"""

# What the frontend shows when a workflow loads badly: its dialogs ("Some Nodes Are Missing" is the dialog keyed
# global-load-workflow-warning, holding the list .comfy-missing-nodes; missing models: global-missing-models-warning,
# .comfy-missing-models) and its toasts ("Workflow Validation" warns about links it had to fix).
WARNINGS_JS = """() => ({
    dialogs: [...document.querySelectorAll('.p-dialog')].map(e => ({
        key: e.getAttribute('aria-labelledby'), text: e.innerText.slice(0, 3000)})),
    toasts: [...document.querySelectorAll('.p-toast-message')].map(e => ({
        severity: (e.className.match(/p-toast-message-(\\w+)/) || [])[1] || '', text: e.innerText.slice(0, 3000)})),
    missing_node_lists: document.querySelectorAll('.comfy-missing-nodes').length,
    missing_model_lists: document.querySelectorAll('.comfy-missing-models').length,
    unknown_types: app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type),
    nodes_with_errors: app.graph.nodes.filter(n => n.has_errors).map(n => [n.id, n.type]),
})"""

# The graph as the frontend holds it, serialised (links as [id, origin, slot, target, slot, type] or objects).
GRAPH_JS = """() => {
    const g = app.graph.serialize();
    return {
        nodes: g.nodes.map(n => ({id: n.id, type: n.type, mode: n.mode, widgets_values: n.widgets_values ?? null,
                                  inputs: (n.inputs || []).map(i => i.name)})),
        links: (g.links || []).map(l => Array.isArray(l) ? l.slice(0, 6)
                                   : [l.id, l.origin_id, l.origin_slot, l.target_id, l.target_slot, l.type]),
    };
}"""

SHRINK_JS = """(shrink) => {
    const changed = [];
    for (const node of app.graph.nodes) {
        for (const widget of node.widgets || []) {
            const value = (shrink[node.type] || {})[widget.name];
            if (value !== undefined) {
                changed.push([node.id, node.type, widget.name, widget.value, value]);
                widget.value = value;
                widget.callback?.(value);
            }
        }
    }
    app.graph.setDirtyCanvas(true, true);
    return changed;
}"""

# The image the Save Image node shows once the prompt has run (the frontend sets node.imgs from the executed event).
OUTPUT_IMAGE_JS = """() => {
    const node = app.graph.nodes.find(n => n.type === 'SaveImage');
    const img = node && node.imgs && node.imgs[0];
    return img && img.complete && img.naturalWidth > 0
        ? {node: node.id, src: img.src, width: img.naturalWidth, height: img.naturalHeight} : null;
}"""

# Fit every node into the window (as the "fit view" button does), so that the screenshot shows the whole graph.
FIT_VIEW_JS = """() => {
    const title = LiteGraph.NODE_TITLE_HEIGHT;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of app.graph.nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    app.canvas.ds.fitToBounds([x0 - 30, y0 - 30, x1 - x0 + 60, y1 - y0 + 60], {zoom: 0.9});
    app.canvas.setDirty(true, true);
}"""

# Pairs of nodes whose boxes (title included, at the size the frontend gives them) overlap.
OVERLAPS_JS = """() => {
    const title = LiteGraph.NODE_TITLE_HEIGHT, nodes = app.graph.nodes, out = [];
    const box = n => [n.pos[0], n.pos[1] - title, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
    for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
        const a = box(nodes[i]), b = box(nodes[j]);
        const w = Math.min(a[2], b[2]) - Math.max(a[0], b[0]), h = Math.min(a[3], b[3]) - Math.max(a[1], b[1]);
        if (w > 0 && h > 0) out.push([nodes[i].id, nodes[i].title, nodes[j].id, nodes[j].title, Math.round(w), Math.round(h)]);
    }
    return out;
}"""

# A node's rectangle on the screen (title included), for a close-up screenshot.
NODE_RECT_JS = """(id) => {
    const node = app.graph.getNodeById(id), ds = app.canvas.ds, title = LiteGraph.NODE_TITLE_HEIGHT;
    const box = app.canvas.canvas.getBoundingClientRect();
    return {x: box.left + (node.pos[0] + ds.offset[0]) * ds.scale,
            y: box.top + (node.pos[1] - title + ds.offset[1]) * ds.scale,
            width: node.size[0] * ds.scale, height: (node.size[1] + title) * ds.scale};
}"""

# This pack's node definitions as the frontend registered them.
OUR_NODE_DEFS_JS = """(module) => Object.entries(LiteGraph.registered_node_types)
    .filter(([type, cls]) => cls.nodeData && String(cls.nodeData.python_module || '').endsWith(module))
    .map(([type, cls]) => {
        const d = cls.nodeData, inputs = Object.assign({}, (d.input || {}).required, (d.input || {}).optional);
        return {type, display_name: d.display_name, category: d.category, description: d.description || '',
                inputs_without_tooltip: Object.entries(inputs).filter(([k, s]) => !(s && s[1] && s[1].tooltip))
                                              .map(([k]) => k),
                outputs: (d.output || []).length, output_tooltips: (d.output_tooltips || []).filter(Boolean).length};
    })"""


# --- helpers --------------------------------------------------------------------------------------------------------

def drop_workflow(comfy, path):
    """Drop the workflow file onto the canvas, as dragging it from the desktop does, and wait until it is loaded."""
    workflow = json.loads(path.read_text())
    transfer = comfy.page.evaluate_handle(DATA_TRANSFER_JS, [path.read_text(), path.name])
    comfy.page.dispatch_event("#graph-canvas", "drop", {"dataTransfer": transfer})
    types = sorted(node["type"] for node in workflow["nodes"])
    comfy.page.wait_for_function("(types) => JSON.stringify(app.graph.nodes.map(n => n.type).sort())"
                                 " === JSON.stringify(types)", arg=types, timeout=60_000)
    comfy.page.wait_for_timeout(1500)  # the warnings (dialogs, toasts) open asynchronously after the graph loads
    return workflow


def load_problems(comfy) -> list:
    """Everything the frontend showed that says the load went wrong; empty when it went right."""
    seen = comfy.page.evaluate(WARNINGS_JS)
    problems = [f"dialog {d['key']!r}: {d['text']}" for d in seen["dialogs"]]
    problems += [f"{t['severity']} toast: {t['text']}" for t in seen["toasts"] if t["severity"] in ("warn", "error")]
    if seen["missing_node_lists"] or seen["missing_model_lists"]:
        problems.append(f"missing-node lists: {seen['missing_node_lists']}, "
                        f"missing-model lists: {seen['missing_model_lists']}")
    if seen["unknown_types"]:
        problems.append(f"node types the frontend does not know: {seen['unknown_types']}")
    if seen["nodes_with_errors"]:
        problems.append(f"nodes marked with errors: {seen['nodes_with_errors']}")
    return problems


def named_links(graph_nodes, links) -> set:
    """Links as (origin node, origin slot, target node, target input NAME, type): robust to inputs the frontend
    appends (optional inputs missing from an older file, widget inputs)."""
    inputs = {node["id"]: [i if isinstance(i, str) else i["name"] for i in node.get("inputs", [])] for node in graph_nodes}
    return {(origin, origin_slot, target, inputs[target][target_slot], kind)
            for _, origin, origin_slot, target, target_slot, kind in links}


def same_value(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def widget_mismatches(file_nodes, browser_nodes) -> list:
    """Nodes whose widget values the frontend changed while loading (a widget added, removed or reordered by the
    node definitions shifts the file's values)."""
    loaded = {node["id"]: node for node in browser_nodes}
    out = []
    for node in file_nodes:
        want, got = node.get("widgets_values") or [], loaded[node["id"]]["widgets_values"] or []
        if len(want) != len(got) or not all(same_value(a, b) for a, b in zip(want, got)):
            out.append(f"node {node['id']} {node['type']}: file {want} -> loaded {got}")
    return out


# --- the host's list of example workflows ---------------------------------------------------------------------------

def test_workflow_templates_list_our_examples(browser_server):
    """GET /workflow_templates keys each pack by its folder name under custom_nodes (the server links this pack as
    PACK_NAME) and lists the stems of its workflows/*.json: all the UI workflows, the API copies not."""
    templates = browser_server.get_json("/workflow_templates")
    assert PACK_NAME in templates, f"{PACK_NAME} missing from GET /workflow_templates: {sorted(templates)}"
    listed = set(templates[PACK_NAME])
    assert set(DOCUMENTED_WORKFLOWS) <= listed, listed
    assert listed == {path.stem for path in UI_WORKFLOWS}, listed


@pytest.mark.parametrize("name", [p.stem for p in UI_WORKFLOWS])
def test_listed_templates_are_served_where_the_frontend_fetches_them(browser_server, name):
    """The frontend's template browser fetches a custom node pack's template from
    /api/workflow_templates/<pack folder>/<name>.json (a static route the host adds for the FIRST of the folders
    example_workflows, example, examples, workflow, workflows that the pack has)."""
    status, body = browser_server.request("GET", f"/api/workflow_templates/{PACK_NAME}/{name}.json")
    assert status == 200, (
        f"GET /api/workflow_templates/{PACK_NAME}/{name}.json answered {status}: the template browser lists {name} "
        f"but cannot open it. The host serves that route from the pack's first folder among example_workflows, "
        f"example, examples, workflow, workflows; present here: "
        f"{[d for d in ('example_workflows', 'example', 'examples', 'workflow', 'workflows') if (PACK_DIR / d).is_dir()]}")
    assert json.loads(body) == json.loads((PACK_DIR / "workflows" / f"{name}.json").read_text())


# --- the web page ---------------------------------------------------------------------------------------------------

def test_our_nodes_reach_the_frontend_with_descriptions_and_tooltips(comfy_page, browser_server):
    defs = comfy_page.page.evaluate(OUR_NODE_DEFS_JS, PACK_NAME)
    ours = {name for name, info in browser_server.object_info().items()
            if str(info.get("python_module", "")).endswith(PACK_NAME)}
    assert ours and {d["type"] for d in defs} == ours
    problems = [f"{d['type']}: no description" for d in defs if not d["description"].strip()]
    problems += [f"{d['type']}: inputs without tooltip {d['inputs_without_tooltip']}"
                 for d in defs if d["inputs_without_tooltip"]]
    problems += [f"{d['type']}: {d['outputs'] - d['output_tooltips']} output(s) without tooltip"
                 for d in defs if d["output_tooltips"] < d["outputs"]]
    assert not problems, "\n".join(problems)
    assert all(d["category"].startswith("conditioning/ip-adapter") for d in defs), [d["category"] for d in defs]


def test_missing_node_and_bad_link_warnings_are_detected(comfy_page, tmp_path):
    """The control for the tests below: a workflow with an unknown node type and a link to a node that does not exist
    must raise the frontend's missing-node dialog and its link-validation toast, and load_problems must see both."""
    workflow = json.loads((PACK_DIR / "workflows" / "ipadapter_sd15.json").read_text())
    workflow["nodes"][0]["type"] = "IPXNoSuchNode"
    workflow["links"][-1][3] = 999
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(workflow))
    transfer = comfy_page.page.evaluate_handle(DATA_TRANSFER_JS, [broken.read_text(), broken.name])
    comfy_page.page.dispatch_event("#graph-canvas", "drop", {"dataTransfer": transfer})
    comfy_page.page.wait_for_selector(".comfy-missing-nodes", timeout=30_000)
    comfy_page.page.wait_for_selector(".p-toast-message-warn", timeout=30_000)
    problems = "\n".join(load_problems(comfy_page))
    assert "global-load-workflow-warning" in problems and "Some Nodes Are Missing" in problems, problems
    assert "IPXNoSuchNode" in problems, problems
    assert "Workflow Validation" in problems, problems


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda p: p.stem)
def test_ui_workflow_loads_without_missing_nodes_queues_and_shows_the_output(comfy_page, browser_server, output_dir,
                                                                              browser_timings, path):
    started = time.perf_counter()
    try:
        run_ui_workflow(comfy_page, browser_server, output_dir, path)
    except BaseException:
        save_evidence(comfy_page, output_dir, f"{path.stem}_FAILED")
        raise
    finally:
        shutil.rmtree(browser_server.host_path / "models" / "ipadapter" / SAVED_ADAPTERS_SUBFOLDER, ignore_errors=True)
    browser_timings[f"{path.stem} (load, run, screenshot)"] = time.perf_counter() - started


def save_evidence(comfy, output_dir, stem):
    """A screenshot of the page as it is and everything the browser said, for a failed test."""
    try:
        comfy.page.screenshot(path=str(output_dir / f"{stem}.png"))
    except Exception as e:  # the page may be gone
        (output_dir / f"{stem}_screenshot_error.txt").write_text(repr(e))
    (output_dir / f"{stem}_browser_log.json").write_text(json.dumps(comfy.log(), indent=1))


def run_ui_workflow(comfy_page, browser_server, output_dir, path):
    """Drop, check, shrink, run, follow to the output image and screenshot one UI workflow."""
    import numpy as np
    from PIL import Image
    page = comfy_page.page

    # 1. Load it as a user does: the file dropped onto the canvas.
    workflow = drop_workflow(comfy_page, path)
    problems = load_problems(comfy_page)
    assert not problems, f"the frontend complained while loading {path.name}:\n" + "\n".join(problems)

    # 2. The graph is the file's: same nodes, same links, the same widget values (none shifted by the node defs).
    graph = page.evaluate(GRAPH_JS)
    assert sorted((n["id"], n["type"]) for n in graph["nodes"]) == sorted((n["id"], n["type"]) for n in workflow["nodes"])
    assert len(graph["links"]) == len(workflow["links"])
    assert named_links(graph["nodes"], graph["links"]) == named_links(workflow["nodes"], workflow["links"])
    overlaps = page.evaluate(OVERLAPS_JS)
    (output_dir / f"{path.stem}_layout.json").write_text(json.dumps(
        {"overlaps": overlaps, "sizes": page.evaluate(
            "() => app.graph.nodes.map(n => [n.id, n.type, n.pos, n.size])")}, indent=1))
    assert not overlaps, f"nodes overlap as the frontend lays them out (id, title, id, title, width, height): {overlaps}"
    mismatches = widget_mismatches(workflow["nodes"], graph["nodes"])
    assert not mismatches, "widget values changed on load:\n" + "\n".join(mismatches)

    # 3. Shrink it for the CPU in the page (the widgets a user would edit), fit the graph into the window (the frontend
    #    loads a node's output image only when it draws the node, and wide graphs start with Save Image off screen),
    #    then press Run.
    changed = page.evaluate(SHRINK_JS, SHRINK)
    page.evaluate(FIT_VIEW_JS)
    assert {(c[1], c[2]) for c in changed} >= {("EmptyLatentImage", "width"), ("KSampler", "steps")}, changed
    with page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as answer:
        page.get_by_role("button", name="Run", exact=True).click()
    assert answer.value.status == 200, f"POST /prompt answered {answer.value.status}: {answer.value.text()}"
    prompt_id = answer.value.json()["prompt_id"]

    # 4. The server ran it (its /history) and the page shows the output image in the Save Image node.
    entry = browser_server.wait(prompt_id, timeout=RUN_TIMEOUT_S)
    error = execution_error(entry)
    assert error is None, f"{error['node_type']} failed: {error['exception_type']}: {error['exception_message']}"
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert [event for event, _ in status_messages(entry)][-1] == "execution_success"
    images = output_images(entry)
    assert len(images) == 1 and images[0]["type"] == "output", images
    saved = browser_server.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert saved.is_file(), saved
    data = browser_server.fetch_image(**images[0])
    assert data[:8] == PNG_SIGNATURE
    assert Image.open(io.BytesIO(data)).size == OUTPUT_SIZE
    shown = page.wait_for_function(OUTPUT_IMAGE_JS, timeout=60_000).json_value()
    assert f"filename={images[0]['filename']}" in shown["src"], shown
    assert (shown["width"], shown["height"]) == OUTPUT_SIZE, shown

    # 5. Screenshots: the whole graph with the output, and a close-up of the Save Image node.
    page.wait_for_timeout(500)
    screenshot = output_dir / f"{path.stem}.png"
    page.screenshot(path=str(screenshot))
    rect = page.evaluate(NODE_RECT_JS, shown["node"])
    page.screenshot(path=str(output_dir / f"{path.stem}_output_node.png"), clip=rect)
    pixels = np.asarray(Image.open(screenshot).convert("RGB"))
    viewport = page.viewport_size
    assert pixels.shape[:2] == (viewport["height"], viewport["width"]) and pixels.std() > 10, "blank screenshot"

    # 6. Nothing the browser said concerns this pack, and no dialog or warning opened along the way.
    (output_dir / f"{path.stem}_browser_log.json").write_text(json.dumps(comfy_page.log(), indent=1))
    ours = comfy_page.messages_about(OURS)
    assert not ours, "the browser reported errors about this pack:\n" + "\n".join(ours)
    problems = load_problems(comfy_page)
    assert not problems, "the frontend showed warnings after running:\n" + "\n".join(problems)
