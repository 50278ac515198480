#!/usr/bin/env python3
"""qat.sh's table and curve: qat_plot.py ROWS.jsonl CURVE.csv OUT.svg prints a markdown table
of the rows and draws perplexity against training tokens, one line per QAT row, with the PTQ
rows of the same bits as dashed references. Plain SVG, no plotting package needed."""
import csv
import json
import math
import sys


def table(rows):
    print("| row | start | bits | training tokens | perplexity | wall s | CPU s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['start']} | {r['bits']} | {r['train_tokens']:,} | "
              f"{r['ppl']:.4f} ± {r['ppl_se']:.4f} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['rss_mib']:.0f} |")


def svg(rows, points, path):
    lines = {}
    for p in points:
        lines.setdefault(p["key"], []).append((int(p["tokens"]), float(p["perplexity"])))
    if not lines:
        return
    refs = [r for r in rows if r["kind"] == "ptq"]
    ys = [y for v in lines.values() for _, y in v] + [r["ppl"] for r in refs]
    xmax = max(x for v in lines.values() for x, _ in v) or 1
    lo, hi = math.log(min(ys)) - 0.05, math.log(max(ys)) + 0.05
    W, H, L, R, T, B = 760, 440, 70, 250, 30, 50
    X = lambda x: L + (W - L - R) * x / xmax
    Y = lambda y: T + (H - T - B) * (hi - math.log(y)) / (hi - lo)
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
           f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>',
           f'<text x="{(L+W-R)/2}" y="{H-12}" text-anchor="middle">training tokens</text>',
           f'<text x="16" y="{(T+H-B)/2}" transform="rotate(-90 16 {(T+H-B)/2})" text-anchor="middle">perplexity (log scale)</text>']
    for i in range(5):
        x = xmax * i / 4
        out.append(f'<text x="{X(x):.1f}" y="{H-B+15}" text-anchor="middle">{int(x):,}</text>')
    for k in range(6):
        y = math.exp(lo + (hi - lo) * k / 5)
        out.append(f'<text x="{L-6}" y="{Y(y)+4:.1f}" text-anchor="end">{y:.1f}</text>')
        out.append(f'<line x1="{L}" y1="{Y(y):.1f}" x2="{W-R}" y2="{Y(y):.1f}" stroke="#eee"/>')
    ly = T
    for r in refs:
        out.append(f'<line x1="{L}" y1="{Y(r["ppl"]):.1f}" x2="{W-R}" y2="{Y(r["ppl"]):.1f}" stroke="gray" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{W-R+6}" y="{Y(r["ppl"])+4:.1f}" fill="gray">{r["label"]} {r["ppl"]:.2f}</text>')
    for i, (key, v) in enumerate(sorted(lines.items())):
        v.sort()
        c = colors[i % len(colors)]
        pts = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in v)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        for x, y in v:
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="3" fill="{c}"/>')
        out.append(f'<text x="{W-R-6}" y="{Y(v[-1][1])-6:.1f}" text-anchor="end" fill="{c}">{key} {v[-1][1]:.2f}</text>')
    out.append("</svg>")
    open(path, "w").write("\n".join(out) + "\n")


def main():
    rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    points = list(csv.DictReader(open(sys.argv[2])))
    table(rows)
    svg(rows, points, sys.argv[3])


if __name__ == "__main__":
    main()
