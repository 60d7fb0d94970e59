"""Tokens/s against accuracy for every decoder x cache row of benchmarks/engine_speed.py.

    python benchmarks/engine_speed.py --json speed.json
    python benchmarks/plot.py speed.json speed.png   # matplotlib: pip install -e '.[plot]'

One point per row: the colour is the decoder, the marker the cache policy; the reference sampler
and the Fast-dLLM re-implementation are drawn in black and labelled. Tokens/s is on a log axis,
since the reference is two orders of magnitude slower than the engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("benchmarks.plot")

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "h"]
BASELINES = {"reference": ("*", "reference sampler"), "Fast-dLLM": ("p", "Fast-dLLM")}


def load(path: str | Path) -> dict:
    """The --json file of engine_speed.py: {"settings", "rows": [{name, acc, tps, ...}], ...}."""
    data = json.loads(Path(path).read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not rows or not all(isinstance(r, dict) and {"name", "acc", "tps"} <= set(r) for r in rows):
        raise ValueError(
            f"{path}: expected engine_speed.py --json output with rows of name/acc/tps"
        )
    return data


def title(settings: dict) -> str:
    """What was measured, from the settings engine_speed.py records."""
    parts = []
    if "prompts" in settings:
        parts.append(f"{settings['prompts']} held-out prompts")
    if "gen_length" in settings:
        parts.append(f"gen_length {settings['gen_length']}, block {settings.get('block_length')}")
    if "device" in settings:
        parts.append(f"{settings['device']} {settings.get('dtype', '')}".strip())
    head = "tokens/s vs accuracy, batch 1" + (": " + ", ".join(parts) if parts else "")
    return head + (f"\n{settings['source']}" if settings.get("source") else "")


def plot(data: dict, out: str | Path) -> Path:
    """Draw the rows to a PNG at `out` (the Agg backend: no display needed). Left: every row on
    a log axis; right: the fast configurations on a linear axis, where they would overlap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    configs = [r for r in rows if " + " in r["name"]]
    decoders = list(dict.fromkeys(r["name"].split(" + ")[0] for r in configs))
    caches = list(dict.fromkeys(r["name"].split(" + ")[1] for r in configs))
    colors = plt.get_cmap("tab10")
    fig, (wide, zoom) = plt.subplots(
        1, 2, figsize=(12, 5.2), dpi=110, gridspec_kw={"width_ratios": [1, 1.25]}
    )
    fastest = max((r["tps"] for r in configs), default=0.0)
    near = [r for r in configs if r["tps"] >= 0.5 * fastest]

    def point(ax, r: dict) -> None:
        decoder, cache = r["name"].split(" + ")
        ax.scatter(
            r["tps"],
            r["acc"],
            color=colors(decoders.index(decoder) % 10),
            marker=MARKERS[caches.index(cache) % len(MARKERS)],
            s=70,
            alpha=0.9,
            edgecolors="white",
            linewidths=0.6,
        )

    for r in configs:
        point(wide, r)
    for r in near:
        point(zoom, r)
    for r in rows:
        kind = next((k for k in BASELINES if r["name"].startswith(k)), None)
        if kind is None:
            continue
        marker, label = BASELINES[kind]
        wide.scatter(r["tps"], r["acc"], color="black", marker=marker, s=150)
        wide.annotate(
            f"{label}\n{r['tps']:.1f} tok/s",
            (r["tps"], r["acc"]),
            textcoords="offset points",
            xytext=(8, -6),
            fontsize=9,
            va="top",
        )
        zoom.axhline(r["acc"], color="black", linewidth=0.8, linestyle=":")
        zoom.annotate(
            f"{label}: {r['acc']:.1f}%",
            (0.01, r["acc"]),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            va="bottom",
        )
    accs = [r["acc"] for r in rows]
    low, high = min(accs), max(accs)
    pad = max(1.0, 0.15 * (high - low))
    for ax in (wide, zoom):
        ax.set_ylim(low - pad, high + pad)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylabel("accuracy on held-out prompts (%)")
    wide.set_xscale("log")
    wide.set_xlabel("tokens/s (answer tokens before EOS; log scale)")
    zoom.set_xlabel("tokens/s (linear)")
    zoom.set_title(f"zoom: configurations at >= {0.5 * fastest:.0f} tokens/s", fontsize=9)
    # the keys: colour = decoder, marker = cache (drawn grey, so the two read separately)
    keys = [
        plt.Line2D([], [], color=colors(i % 10), marker="o", linestyle="", label=d)
        for i, d in enumerate(decoders)
    ] + [
        plt.Line2D([], [], color="grey", marker=MARKERS[i % len(MARKERS)], linestyle="", label=c)
        for i, c in enumerate(caches)
    ]
    zoom.legend(
        handles=keys,
        title="decoder (colour), cache (marker)",
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=8,
        title_fontsize=8,
    )
    fig.suptitle(title(data.get("settings", {})), fontsize=10)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    from dinfer_async.logs import setup_logging

    setup_logging()
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("json", help="the file engine_speed.py --json wrote")
    ap.add_argument("png", nargs="?", default=None, help="output (default: the JSON's name, .png)")
    args = ap.parse_args(argv)
    try:
        data = load(args.json)
    except (OSError, ValueError) as e:
        log.error("%s", e)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.error("matplotlib is not installed: pip install -e '.[plot]'")
        return 2
    out = plot(data, args.png or Path(args.json).with_suffix(".png"))
    log.info("wrote %s (%d rows)", out, len(data["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
