"""The comparison report: Markdown tables, PNG plots and one HTML page.

Layout follows the immunization paper's Table 5.1: ASR (%) rows per attack
with the average, one column per defense, a block per threat model and
behavior; then utility (CDA, perplexity) per defense, prompt counts and
seeds per cell, and failed cells with their errors.
"""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path
from typing import Sequence

FIXED = ("clean model", "none")


def order_rows(rows: Sequence[dict], cells: Sequence[Sequence[str]], defenses: Sequence[str]) -> list[dict]:
    """Rows in table order: cells as configured, then references, then defenses as named."""
    cell_ix = {tuple(c): i for i, c in enumerate(cells)}
    col_ix = {d: i for i, d in enumerate([*FIXED, *defenses])}
    return sorted(rows, key=lambda r: (cell_ix.get((r["attack"], r["behavior"], r["mode"]), len(cell_ix)),
                                       col_ix.get(r["defense"], len(col_ix))))


def _columns(rows: Sequence[dict]) -> list[str]:
    seen = [r["defense"] for r in rows]
    return [c for c in FIXED if c in seen] + [d for d in dict.fromkeys(seen) if d not in FIXED]


def _ok(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def asr_blocks(rows: Sequence[dict]) -> list[tuple[str, list[str], list[list[float | None]]]]:
    """Per (mode, behavior): title, column names, and the ASR grid.

    Returns:
        ``(title, columns, grid)`` where ``grid[i][j]`` is the ASR of attack i
        (the last row: the mean over attacks where defined) under column j,
        ``None`` where the defense does not apply or failed.
    """
    ok, cols = _ok(rows), _columns(rows)
    blocks = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for behavior in dict.fromkeys(r["behavior"] for r in rows if r["mode"] == mode):
            attacks = list(dict.fromkeys(r["attack"] for r in rows if (r["mode"], r["behavior"]) == (mode, behavior)))
            get = {(r["attack"], r["defense"]): r["asr"] for r in ok if (r["mode"], r["behavior"]) == (mode, behavior)}
            grid = [[get.get((a, c)) for c in cols] for a in attacks]
            avg = []
            for j in range(len(cols)):
                vals = [row[j] for row in grid if row[j] is not None]
                avg.append(statistics.mean(vals) if len(vals) == len(attacks) else None)
            blocks.append((f"{mode} / {behavior}", attacks + ["Average"], cols, grid + [avg]))
    return blocks


def utility(rows: Sequence[dict]) -> list[dict]:
    """Mean CDA, perplexity and false activation per (mode, defense)."""
    out = []
    ok = _ok(rows)
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for d in _columns([r for r in rows if r["mode"] == mode]):
            rs = [r for r in ok if r["mode"] == mode and r["defense"] == d]
            if rs:
                out.append({"mode": mode, "defense": d, "n_cells": len(rs),
                            "asr": statistics.mean(r["asr"] for r in rs), "cda": statistics.mean(r["cda"] for r in rs),
                            "ppl": statistics.mean(r["ppl"] for r in rs),
                            "clean_asr": statistics.mean(r["clean_asr"] for r in rs)})
    return out


def markdown(result: dict) -> str:
    rows, meta = result["rows"], result["meta"]
    lines = [f"# Defense comparison on {meta['bench_model']}", "",
             f"Attack seed {meta['attack_seed']}, evaluation seed {meta['eval_seed']}, defender's clean pool "
             f"{meta['n_clean_pool']} samples; held-out prompts: {meta.get('heldout', 'the zoo heldout.json')}; "
             f"wall time {meta['wall_s']:.0f} s. ASR in %, lower is better; "
             "'none' is the suspicious model, 'clean model' the base it was attacked from.", ""]
    for title, attacks, cols, grid in asr_blocks(rows):
        lines += [f"## ASR (%) — {title}", "", "| attack | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(pct(v) for v in row) + " |" for a, row in zip(attacks, grid)]
        lines.append("")
    lines += ["## Utility (mean over cells)", "", "| mode | defense | cells | ASR (%) | CDA (%) | perplexity | false activation (%) |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {u['mode']} | {u['defense']} | {u['n_cells']} | {pct(u['asr'])} | {pct(u['cda'])} | {u['ppl']:.3f} | "
              f"{pct(u['clean_asr'])} |" for u in utility(rows)]
    lines += ["", "## Prompts per cell", "", "| mode | behavior | attack | triggered prompts | clean prompts |", "|---|---|---|---|---|"]
    for r in _ok(rows):
        if r["defense"] == "none":
            lines.append(f"| {r['mode']} | {r['behavior']} | {r['attack']} | {r['n_triggered']} | {r['n_clean']} |")
    failed = [r for r in rows if "error" in r]
    if failed:
        lines += ["", "## Failed cells", "", "| mode | behavior | attack | defense | error |", "|---|---|---|---|---|"]
        lines += [f"| {r['mode']} | {r['behavior']} | {r['attack']} | {r['defense']} | {r['error'].replace('|', '/')[:300]} |"
                  for r in failed]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list[Path]:
    """``asr_vs_cda.png`` (one point per defense and mode) and ``asr_by_attack.png`` (bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for u in utility(rows):
        marker = "o" if u["mode"] == "full" else "s"
        ax.scatter(100 * u["cda"], 100 * u["asr"], marker=marker, s=50)
        ax.annotate(f"{u['defense']} ({u['mode']})", (100 * u["cda"], 100 * u["asr"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("clean accuracy, CDA (%) →  better")
    ax.set_ylabel("attack success, ASR (%) ↓  better")
    ax.set_title("Defenses: mean ASR vs CDA over cells")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    scatter = out / "asr_vs_cda.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)

    blocks = asr_blocks(rows)
    fig, axes = plt.subplots(len(blocks), 1, figsize=(9, 2.8 * len(blocks)), squeeze=False)
    for ax, (title, attacks, cols, grid) in zip(axes[:, 0], blocks):
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            xs = [i + j * width for i in range(len(attacks))]
            ax.bar(xs, [100 * (row[j] or 0) for row in grid], width, label=c)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(attacks))], attacks)
        ax.set_ylabel("ASR (%)")
        ax.set_title(title)
        ax.set_ylim(0, 105)
    axes[0, 0].legend(fontsize=7, ncol=min(5, len(blocks[0][2])), loc="upper right")
    fig.tight_layout()
    bars = out / "asr_by_attack.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    return [scatter, bars]


def _md_table_html(lines: list[str]) -> str:
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    body = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    cell = lambda tag, v: f"<{tag}>{html.escape(v)}</{tag}>"  # noqa: E731
    return ("<table><tr>" + "".join(cell("th", h) for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell("td", v) for v in r) + "</tr>" for r in body) + "</table>")


def to_html(md: str, images: Sequence[Path]) -> str:
    """A self-contained page: the Markdown's headings, text and tables, images inlined."""
    parts, table = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            parts.append(_md_table_html(table))
            table = []
        if line.startswith("## "):
            parts.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            parts.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line:
            parts.append(f"<p>{html.escape(line)}</p>")
    imgs = "".join(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
                   f"<figcaption>{p.name}</figcaption></figure>" for p in images)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>raypurify comparison</title><style>{style}</style></head><body>{imgs}{''.join(parts)}</body></html>"


def write_report(out: Path, result: dict) -> None:
    """Writes ``report.md``, the two PNGs and ``report.html`` into ``out``."""
    md = markdown(result)
    (out / "report.md").write_text(md)
    images = plots(result, out) if _ok(result["rows"]) else []
    (out / "report.html").write_text(to_html(md, images))
