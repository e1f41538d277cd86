"""Where and when the image prompt acts: per-layer weight types, free per-layer weights, per-step schedules.

Layers are addressed by ``transformer_index`` t (0..15 on SD1.5, execution order: input 0-5, middle 6, output 7-15);
L = 16. Every function returns plain numbers; nothing here touches tensors on the device.
"""
from .layers import SD15_LAYERS

L = len(SD15_LAYERS)
INPUT = {l.transformer_index for l in SD15_LAYERS if l.block == "input"}
MIDDLE = {l.transformer_index for l in SD15_LAYERS if l.block == "middle"}
OUTPUT = {l.transformer_index for l in SD15_LAYERS if l.block == "output"}
STYLE = {0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15}
COMPOSITION = {4: 0.25, 5: 1.0}


def _ramp(f):
    return {t: 0.05 + 0.95 * f(t) for t in range(L)}


WEIGHT_TYPES = {
    # name: (multiplier per t, layers where the cond half reads the uncond image instead ("precise" types))
    "linear": (lambda: {t: 1.0 for t in range(L)}, set()),
    "ease in": (lambda: _ramp(lambda t: 1 - t / L), set()),
    "ease out": (lambda: _ramp(lambda t: t / L), set()),
    "ease in-out": (lambda: _ramp(lambda t: 1 - abs(t - L / 2) / (L / 2)), set()),
    "reverse in-out": (lambda: _ramp(lambda t: abs(t - L / 2) / (L / 2)), set()),
    "weak input": (lambda: {t: 0.2 if t in INPUT else 1.0 for t in range(L)}, set()),
    "weak output": (lambda: {t: 0.2 if t in OUTPUT else 1.0 for t in range(L)}, set()),
    "weak middle": (lambda: {t: 0.2 if t in MIDDLE else 1.0 for t in range(L)}, set()),
    "strong middle": (lambda: {t: 0.2 if t in INPUT | OUTPUT else 1.0 for t in range(L)}, set()),
    "style transfer": (lambda: {t: 1.0 if t in STYLE else 0.0 for t in range(L)}, set()),
    "composition": (lambda: {t: COMPOSITION.get(t, 0.0) for t in range(L)}, set()),
    "strong style transfer": (lambda: {t: 0.0 if t in COMPOSITION else 1.0 for t in range(L)}, set()),
    "style and composition": (lambda: {t: 1.0 if t in STYLE else 0.0 for t in range(L)}, set()),
    "style transfer precise": (lambda: {t: 1.0 for t in range(L)}, set(range(L)) - STYLE),
    "composition precise": (lambda: {t: COMPOSITION.get(t, 1.0) for t in range(L)}, set(range(L)) - set(COMPOSITION)),
}


def layer_weights_for(weight_type: str, weight: float, weight_composition: float = 1.0):
    """({transformer_index: weight}, {transformer_index where the cond half reads the uncond image too}).

    Every type multiplies ``weight`` per layer, except 'style and composition', whose composition layers (4 and 5)
    take ``weight_composition`` (times 0.25 on layer 4, as in 'composition') while its style layers take ``weight``."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type '{weight_type}'; one of: {', '.join(WEIGHT_TYPES)}")
    multipliers, neutral = WEIGHT_TYPES[weight_type]
    weights = {t: weight * m for t, m in multipliers().items()}
    if weight_type == "style and composition":
        weights.update({t: weight_composition * m for t, m in COMPOSITION.items()})
    return weights, set(neutral)


def parse_layer_weights(text: str) -> dict:
    """'t:w, t:w' -> {transformer_index: weight}; empty text -> {}."""
    result = {}
    for item in filter(None, (part.strip() for part in text.replace("\n", ",").split(","))):
        index, sep, value = item.partition(":")
        try:
            t, w = int(index), float(value)
        except ValueError:
            raise ValueError(f"layer weight '{item}' is not 'index:weight' (e.g. '6:1.0, 9:0.5')") from None
        if not sep or not 0 <= t < L:
            raise ValueError(f"layer weight '{item}': the index must be a transformer index 0..{L - 1}")
        result[t] = w
    return result


def parse_step_schedule(text: str):
    """A per-step weight schedule, or None for a constant weight. Two forms:
    - weights per sampling step: '1, 1, 0.8, 0.5' (steps past the list keep the last value);
    - a curve over the run, 'percent:weight' points: '0:1, 0.5:1, 1:0' (linear in between, flat outside)."""
    items = [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
    if not items:
        return None
    try:
        if all(":" in item for item in items):
            points = sorted((float(p), float(w)) for p, w in (item.split(":", 1) for item in items))
            if not all(0.0 <= p <= 1.0 for p, _ in points):
                raise ValueError
            return ("curve", tuple(points))
        if any(":" in item for item in items):
            raise ValueError
        return ("steps", tuple(float(item) for item in items))
    except ValueError:
        raise ValueError(f"step schedule '{text}' is neither weights per step ('1, 0.8, 0.5') nor a curve of "
                         f"percent:weight points with percents in 0..1 ('0:1, 0.5:1, 1:0')") from None


def schedule_table(schedule, steps: int) -> list:
    """The weight of each of ``steps`` sampling steps under a parsed schedule."""
    kind, values = schedule
    if kind == "steps":
        return [values[min(i, len(values) - 1)] for i in range(steps)]
    table = []
    for i in range(steps):
        p = i / (steps - 1) if steps > 1 else 0.0
        if p <= values[0][0]:
            table.append(values[0][1])
        elif p >= values[-1][0]:
            table.append(values[-1][1])
        else:
            for (p0, w0), (p1, w1) in zip(values, values[1:]):
                if p0 <= p <= p1:
                    table.append(w0 if p1 == p0 else w0 + (w1 - w0) * (p - p0) / (p1 - p0))
                    break
    return table
