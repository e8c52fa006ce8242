"""Validation NRMSE against CPU-hours for the size ladder, as an SVG (no plotting library needed).

python3 weights/campaign/ladder/plot.py > weights/campaign/ladder/nrmse_vs_cpu_hours.svg
"""
import csv
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = [("lpcnn-8x2", "#1b9e77"), ("lpcnn-16x2", "#d95f02"), ("lpcnn-32x2", "#7570b3")]
W, H, L, R, T, B = 640, 400, 60, 150, 20, 50


def series(name):
    rows = csv.DictReader(open(os.path.join(HERE, name, "train_log.csv")))
    return [(float(r["cpu_seconds"]) / 3600, float(r["val_nrmse"])) for r in rows]


data = {n: series(n) for n, _ in RUNS}
xmax = max(x for s in data.values() for x, _ in s) * 1.05
ymin, ymax = 30.0, 70.0
sx = lambda x: L + x / xmax * (W - L - R)
sy = lambda y: T + (ymax - y) / (ymax - ymin) * (H - T - B)
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
       f'<rect width="{W}" height="{H}" fill="white"/>',
       f'<line x1="{L}" y1="{H-B}" x2="{W-R}" y2="{H-B}" stroke="black"/>',
       f'<line x1="{L}" y1="{T}" x2="{L}" y2="{H-B}" stroke="black"/>']
for y in range(30, 71, 10):
    out.append(f'<text x="{L-8}" y="{sy(y)+4}" text-anchor="end">{y}</text>')
    out.append(f'<line x1="{L}" y1="{sy(y)}" x2="{W-R}" y2="{sy(y)}" stroke="#ddd"/>')
step = 0.05
x = 0.0
while x <= xmax:
    out.append(f'<text x="{sx(x)}" y="{H-B+16}" text-anchor="middle">{x:.2f}</text>')
    x += step
out.append(f'<text x="{(L+W-R)/2}" y="{H-10}" text-anchor="middle">CPU-hours</text>')
out.append(f'<text x="15" y="{(T+H-B)/2}" transform="rotate(-90 15 {(T+H-B)/2})" text-anchor="middle">validation NRMSE %</text>')
for i, (name, colour) in enumerate(RUNS):
    pts = " ".join(f"{sx(x):.1f},{sy(min(max(y, ymin), ymax)):.1f}" for x, y in data[name])
    out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
    out.append(f'<text x="{W-R+10}" y="{T+20+18*i}" fill="{colour}">{name}</text>')
out.append("</svg>")
print("\n".join(out))
