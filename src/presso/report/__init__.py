"""The run report: one self-contained HTML file (inline CSS, plots embedded as PNG data) a person can read offline.

Sections: the headline (what was delivered and why, speed-ups and size ratios against the original FP32 and the
baseline INT8, the accuracy drop, the budget), the candidates measured side by side, the stage table, accuracy vs
latency, channels kept per layer, the slowest operators before and after, INT8 fallbacks, and the commands that
reproduce each stage.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#1c2127;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}
h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d3d8de;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d3d8de;padding:.3rem .6rem;text-align:right}
th{background:#f6f7f9}
td:first-child,th:first-child,#stages td:last-child{text-align:left}
.ok{color:#0f9960;font-weight:600}
.bad{color:#c23030;font-weight:600}
.muted{color:#5f6b7c}
img{max-width:100%;border:1px solid #e5e8eb}
pre{background:#f6f7f9;padding:.8rem;overflow-x:auto}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1rem}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _num(v: Any, fmt: str = "{:,}") -> str:
    if v is None:
        return "&ndash;"
    try:
        return _e(fmt.format(v))
    except (ValueError, TypeError):
        return _e(v)


def _table(headers: list[str], rows: list[list[Any]], id_: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{id_}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _points(s: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    """(label, latency ms, accuracy, delivered) of every candidate measured side by side."""
    chosen = (s.get("delivered") or {}).get("candidate")
    return [
        (c["label"], float(c["latency_ms"]), float(c["accuracy"]), c["id"] == chosen)
        for c in s.get("candidates") or []
        if c.get("latency_ms") is not None and c.get("accuracy") is not None
    ]


def _trained_pareto(search: dict[str, Any] | None) -> list[tuple[float, float]]:
    """The search's Pareto front: trained candidates only (one skipped by the predictor has no accuracy to plot)."""
    rows = (search or {}).get("pareto") or []
    return [(r["predicted_ms"], r["proxy_top1"]) for r in rows
            if r.get("proxy_top1") is not None and r.get("predicted_ms") is not None and not r.get("skipped")
            and r.get("trained", True) and r.get("state", "COMPLETE") == "COMPLETE"]  # fmt: skip


def _accuracy_plot(s: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = _points(s)
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    pareto = _trained_pareto((s["stages"].get("original") or {}).get("search"))
    if pareto:
        ax.scatter(*zip(*pareto, strict=True), c="#9aa5b1", s=25, label="searched: Pareto front (proxy, predicted)")
    colors = {"original": "#2d72d2", "baseline": "#2d72d2", "compressed": "#0f9960", "compressed-qat": "#d9822b"}
    for label, ms, acc, chosen in pts:
        marker = "o" if "FP32" in label else "s"
        ax.scatter([ms], [acc], c=colors[label.split()[0]], marker=marker, s=70, label=label, zorder=3,
                   edgecolors="#1c2127" if chosen else "none", linewidths=2)  # fmt: skip
        if chosen:
            ax.annotate("delivered", (ms, acc), textcoords="offset points", xytext=(8, 8), fontsize=8)
    if s["config"].get("latency_ms"):
        ax.axvline(s["config"]["latency_ms"], ls="--", c="k", lw=1, label=f"budget {s['config']['latency_ms']:g} ms")
    ax.set_xlabel(f"measured latency on {s['config']['device']} (ms, median of interleaved rounds)")
    ax.set_ylabel("held-out top-1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.margins(x=0.15, y=0.15)
    fig.tight_layout()
    return _png(fig)


def _channels_plot(per_layer: dict[str, Any]) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = [(n, v) for n, v in per_layer.items() if "before" in v][:40]
    if not items:
        return None
    fig, ax = plt.subplots(figsize=(6.4, max(2.5, 0.22 * len(items) + 1)))
    names = [n for n, _ in items]
    ax.barh(names, [v["before"] for _, v in items], color="#d3d8de", label="before")
    ax.barh(names, [v["after"] for _, v in items], color="#2d72d2", label="kept")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("output channels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _headline(s: dict[str, Any]) -> list[str]:
    lines = s.get("headline") or []
    parts = ['<div id="headline">']
    for i, line in enumerate(lines):
        bad = "BREACHED" in line or "MISSED" in line
        tag = "h2" if i == 0 else "p"
        parts.append(f'<{tag} class="{"bad" if bad else "ok" if i == 0 else ""}">{_e(line)}</{tag}>')
    parts.append("</div>")
    return parts


def _candidates(s: dict[str, Any]) -> list[str]:
    cands = s.get("candidates") or []
    if not cands:
        return []
    chosen = (s.get("delivered") or {}).get("candidate")
    ref = next((c for c in cands if c["id"] == "original-fp32"), {})
    rows = []
    for c in sorted(cands, key=lambda c: c["latency_ms"]):
        speed = ref.get("latency_ms") / c["latency_ms"] if ref.get("latency_ms") and c["latency_ms"] else None
        yes = '<span class="ok">yes</span>'
        no = '<span class="bad">no</span>'
        rows.append([("<b>" + _e(c["label"]) + " (delivered)</b>") if c["id"] == chosen else _e(c["label"]),
                     _num(c["latency_ms"], "{:.3f}"), _num(c.get("noise_pct"), "{:.1f}%"), _num(speed, "{:.2f}x"),
                     _num(c.get("size_bytes")), _num(c.get("accuracy"), "{:.4f}"),
                     _num(c.get("accuracy_drop_points"), "{:+.2f}"), yes if c.get("accuracy_ok") else no,
                     yes if c.get("budget_ok") else no, _e(c.get("path"))])  # fmt: skip
    t = s["candidates"][0]
    note = (f'<p class="muted">Measured side by side: {t.get("rounds")} interleaved rounds on '
            f'{_e(s["budget"]["device"])} ({t.get("threads")} thread(s)), medians of the round medians; noise '
            "is their interquartile range.</p>")  # fmt: skip
    headers = ["candidate", "latency (ms)", "noise", "speed-up vs original FP32", "size (bytes)", "top-1",
               "drop (points)", "within bound", "meets budget", "file"]  # fmt: skip
    return ["<h2>Candidates</h2>", note, _table(headers, rows, "candidates")]


def _stage_seconds(stages: dict[str, Any]) -> float:
    return sum(float(r.get("seconds") or 0) for r in stages.values())


def render(s: dict[str, Any], root: Path | None = None) -> str:
    st, cfg = s["stages"], s["config"]
    prec = cfg["precision"]
    parts = [f"<h1>Presso run: {_e(s['data'])}</h1>"]
    target = (f"{cfg['latency_ms']:g} ms on {cfg['device']}" if cfg.get("latency_ms") is not None
              else f"{cfg['target_macs']:.0%} of MACs")  # fmt: skip
    parts.append(f'<p class="muted">budget {_e(target)}; model {_e(cfg.get("model") or "searched")}; '
                 f"deployed as {_e(prec.upper())}; {_stage_seconds(st):.0f} s of stage work, {s['seconds']:.0f} s "
                 "this invocation (reused stages take none)</p>")  # fmt: skip
    if s.get("error"):
        parts.append(f'<p class="bad">Stopped: {_e(s["error"])}</p>')
    parts += _headline(s)
    for note in s.get("notes") or []:
        parts.append(f'<p class="bad">Note: {_e(note)}</p>')
    parts += _candidates(s)

    # ---- stage table
    rows = []
    for name in ("original", "baseline", "compress", "recover", "deploy"):
        r = st.get(name)
        if not r:
            continue
        if r.get("skipped"):
            rows.append([_e(name), *(["&ndash;"] * 4), _num(r.get("seconds"), "{:.1f}"), _e(r["skipped"])])
            continue
        if name in ("baseline", "deploy"):
            for p in ("fp32", prec) if prec != "fp32" else ("fp32",):
                if p in r:
                    scored = r[p].get("accuracy") or {}
                    a = scored.get("converted_top1", scored.get("converted_map50_95"))
                    rows.append([_e(f"{name} {p.upper()}"), "&ndash;", "&ndash;", _num(r[p].get("size_bytes")),
                                 _num(a, "{:.4f}"), _num(r.get("seconds"), "{:.1f}"),
                                 _e(", ".join(r[p].get("fallback_layers") or []))])  # fmt: skip
            continue
        rows.append([_e(name), _num(r.get("params")), _num(r.get("macs")), _num(r.get("size_bytes")),
                     _num(_first(r, "val_top1", "map50_95", "agreement"), "{:.4f}"), _num(r.get("seconds"), "{:.1f}"),
                     _e(r.get("how") or r.get("why") or "")])  # fmt: skip
    parts.append("<h2>Stages</h2>")
    metric = {"map50_95": "mAP50-95", "agreement": "agreement"}.get((s.get("accuracy") or {}).get("metric"), "top-1")
    parts.append(_table(["stage", "params", "MACs", "size (bytes)", metric, "time (s)", "note"], rows, "stages"))

    # ---- plots
    parts.append('<h2>Accuracy vs latency</h2><div class="grid">')
    img = _accuracy_plot(s)
    parts.append(f'<img id="accuracy-plot" alt="accuracy vs latency" src="{img}">' if img else "<p>no measurements</p>")
    per_layer = (st.get("compress") or {}).get("per_layer") or {}
    chan = _channels_plot(per_layer)
    parts.append(f'<img id="channels-plot" alt="channels kept per layer" src="{chan}">' if chan else
                 '<p class="muted">No layer was compressed.</p>')  # fmt: skip
    parts.append("</div>")
    if per_layer:
        parts.append("<h2>Per-layer channels kept (or ranks)</h2>")
        lrows = [[_e(n), _num(v.get("before")), _num(v.get("after")),
                  _e(v.get("ranks")) if "ranks" in v else _num(v.get("ratio"), "{:.0%}")]
                 for n, v in per_layer.items()]  # fmt: skip
        parts.append(_table(["layer", "before", "after", "removed / ranks"], lrows, "layers"))

    # ---- slowest operators
    deploy = st.get("deploy") or {}
    delivered = deploy.get("delivered") or {}
    before = ((st.get("baseline") or {}).get("fp32") or {}).get("top_ops") or {}
    after = delivered.get("top_ops") or {}
    if before or after:
        parts.append('<h2>Slowest operators (ONNX Runtime profile)</h2><div class="grid">')
        for title, ops in (("original FP32", before), (f"delivered: {delivered.get('label', '')}", after)):
            orows = [[_e(o["op"]), _num(o.get("nodes")), _num(o.get("ms"), "{:.4f}"), _num(o.get("share"), "{:.1%}")]
                     for o in ops.get("ops", [])]  # fmt: skip
            parts.append(f"<div><h3>{_e(title)}</h3>{_table(['operator', 'nodes', 'ms', 'share'], orows)}</div>")
        parts.append("</div>")

    # ---- quantization of the delivered model (or, when FP32 was delivered, of the model it was chosen over)
    conv_stage, _, conv_prec = (delivered.get("dir") or "").partition("/")
    q = ((st.get(conv_stage) or {}).get(conv_prec) or {}).get("int8") or ((deploy.get(prec) or {}).get("int8"))
    if q:
        parts.append("<h2>INT8 quantization</h2>")
        fb = ", ".join(q.get("fallback_layers") or []) or "none"
        parts.append(f"<p>Output SNR against FP32: {_num(q.get('output_snr_db'))} dB (all INT8: "
                     f"{_num(q.get('output_snr_db_all_int8'))} dB; threshold {_num(q.get('snr_threshold_db'))} dB). "
                     f"Layers kept in FP32: {_e(fb)}.</p>")  # fmt: skip
        if q.get("max_accuracy_drop") is not None:  # accuracy-aware: every file tried, scored on labelled images
            tried = "; ".join(f"{st['fallback']} in FP32: {st['value']}" + (" (met)" if st["met"] else "")
                              for st in q.get("steps") or [])  # fmt: skip
            bound = f"a drop of {100 * q['max_accuracy_drop']:g} points"
            parts.append(f"<p>Precision chosen by {_e(q.get('criterion'))} on labelled images: FP32 "
                         f"{_num(q.get('accuracy_fp32'), '{:.4f}')}, INT8 {_num(q.get('accuracy_int8'), '{:.4f}')} "
                         f"(bound: {bound}). Tried: {_e(tried)}.</p>")  # fmt: skip
        qrows = [[_e(r.get("layer") or r.get("node")), _e(r.get("op")), _num(r.get("activation_snr_db")),
                  _num(r.get("snr_db")), "FP32" if r.get("fallback") else ""] for r in q.get("layers", [])]  # fmt: skip
        parts.append(_table(["layer", "op", "output SNR (dB)", "sensitivity (dB)", "fallback"], qrows, "quant"))

    parts += _examples(s, root)
    parts += _architectures((st.get("original") or {}).get("architecture"))
    # ---- reproduce
    parts.append("<h2>Reproduce</h2><pre>" + _e("\n".join(s.get("commands") or [])) + "</pre>")
    if s.get("bundle"):
        b = s["bundle"]
        parts.append(f"<p>Bundle: <code>{_e(b['path'])}</code> ({_num(b['size_bytes'])} bytes, from "
                     f"<code>{_e(b.get('from', ''))}</code>); predictions match ONNX Runtime: "
                     f"{'yes' if b.get('predicts') else 'NO'}.</p>")  # fmt: skip
    body = "\n".join(parts)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Presso report</title>'
            f"<style>{CSS}</style></head><body>{body}</body></html>")  # fmt: skip


def write_report(path: str | Path, summary: dict[str, Any]) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(render(summary, path.parent), encoding="utf-8")
    tmp.replace(path)
    return path


def _first(row: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` that ``row`` has a value for (the stage's accuracy, whatever the task)."""
    return next((row[k] for k in keys if row.get(k) is not None), None)


def _examples(s: dict[str, Any], root: Path | None) -> list[str]:
    """A detector's held-out images with the true boxes, the original's and the compressed model's (embedded)."""
    rows = ((s.get("stages") or {}).get("deploy") or {}).get("examples") or []
    if not rows or root is None:
        return []
    parts = ["<h2>Detections on held-out images</h2><p class=\"muted\">left to right: the true boxes, the original "
             "model's, the compressed model's (score &ge; 0.25)</p><div class=\"grid\">"]  # fmt: skip
    for r in rows:
        file = root / r["image"]
        if file.is_file():
            data = "data:image/png;base64," + base64.b64encode(file.read_bytes()).decode()
            parts.append(f'<img class="example" alt="{_e(r["image"])}" src="{data}">')
    parts.append("</div>")
    return parts


def _architectures(a: dict[str, Any] | None) -> list[str]:
    """For an Ultralytics model: where its architecture stands in Presso's tested list, and the whole list (what
    prunes, reloads and exports; what is refused, and why)."""
    if not a:
        return []
    cls = {"tested": "", "refused": "bad", "untested": "muted"}.get(a.get("status"), "")
    parts = ["<h2>Ultralytics architectures</h2>",
             f'<p class="{cls}">This model: <code>{_e(a.get("model"))}</code>, {_e(a.get("status"))}: '
             f"{_e(a.get('note'))}.</p>"]  # fmt: skip
    for key, title, rows, head in (
        ("tested", "prune, reload bit-identically and export", a.get("supported") or {}, "pruned 50% of channels"),
        ("refused", "refused", a.get("unsupported") or {}, "why"),
    ):  # fmt: skip
        table = _table(["YAML", head], [[_e(k), _e(v)] for k, v in rows.items()], f"architectures-{key}")
        parts.append(f"<details><summary>{len(rows)} {title}</summary>{table}</details>")
    return parts
