"""Draws the fleet's measurements (benches/fleet.rs) as PNG plots.

Usage: fleet-plot.py RESULTS_JSON OUT_DIR
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"leaf": ("#1f77b4", "o"), "direct": ("#d62728", "s")}


def by_layout(runs):
    layouts = {}
    for run in runs:
        layouts.setdefault(run["layout"], []).append(run)
    for runs_of in layouts.values():
        runs_of.sort(key=lambda r: r["nodes"])
    return layouts


def line(ax, runs, value, label, dashed=False):
    layout = runs[0]["layout"]
    color, marker = STYLE.get(layout, ("#333333", "x"))
    xs = [r["nodes"] for r in runs]
    ys = [value(r) for r in runs]
    ax.plot(xs, ys, color=color, marker=marker, linestyle="--" if dashed else "-",
            label=label)


def save(fig, out, name):
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(path)


def main():
    results = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    os.makedirs(out, exist_ok=True)
    layouts = by_layout(results["runs"])
    note = "%s, %d cores, %s" % (results["machine"]["cpu"], results["machine"]["cores"],
                                 results["date"][:10])

    # Latency from the POST to the hub's stream and to the deletion.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for layout, runs in layouts.items():
        for q, dashed in (("p50_ms", False), ("p99_ms", True)):
            line(axes[0], runs, lambda r: r["base"]["post_to_stored"][q],
                 "%s %s" % (layout, q[:3]), dashed)
            line(axes[1], runs, lambda r: r["deletions"]["post_to_delete"][q],
                 "%s %s" % (layout, q[:3]), dashed)
    axes[0].set_title("POST to the alert in the hub's stream (base load)")
    axes[1].set_title("POST to the pod deleted (200 at once)")
    for ax in axes:
        ax.set_xlabel("nodes")
        ax.set_ylabel("ms")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(note, fontsize=8, y=0.02)
    save(fig, out, "latency.png")

    # What the hub costs.
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for layout, runs in layouts.items():
        line(axes[0], runs, lambda r: r["idle"]["hub_cpu_pct"], layout)
        line(axes[1], runs, lambda r: r["idle"]["hub_rss_mib"], layout)
        line(axes[2], runs, lambda r: r["base"]["hub_cpu_s_per_1000"], layout)
    axes[0].set_title("hub CPU at idle (% of a core, 3 servers)")
    axes[1].set_title("hub memory (MiB RSS, 3 servers)")
    axes[2].set_title("hub CPU seconds per 1,000 alerts")
    for ax in axes:
        ax.set_xlabel("nodes")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(note, fontsize=8, y=0.02)
    save(fig, out, "hub-cost.png")

    # Sourcing lag through the one-node storm (leaf layout).
    if "leaf" in layouts:
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in layouts["leaf"]:
            storm = run["storms"][0]
            series = storm["lag_series"]
            ax.plot([s[0] for s in series], [s[1] for s in series],
                    label="%d nodes" % run["nodes"])
        ax.set_title("FALCO_ALL's largest source lag, one node posting 2,000/s for 5 s")
        ax.set_xlabel("seconds from the storm's start")
        ax.set_ylabel("alerts not yet sourced")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.suptitle(note, fontsize=8, y=0.02)
        save(fig, out, "storm-lag.png")


def fmt(value, digits=1):
    if value is None or value != value:
        return "-"
    return ("{:,.%df}" % digits).format(value)


def tables(results):
    """The figures as Markdown tables, for docs/SCALING.md."""
    out = []
    out.append("| layout | nodes | hub CPU idle (% of a core) | hub RSS (MiB) | hub CPU s / 1,000 alerts, base | "
               "POST to hub p50 / p99 (ms) | POST to delete p50 / p99 (ms), base | storm: 2,000/s from one node, "
               "p99 (ms) / CPU s per 1,000 | storm: 20/s from every node, p99 (ms) | 200 deletions at once: "
               "actions/s, p99 (ms) | a node joins: first alert in the hub (ms) |")
    out.append("|" + " --- |" * 11)
    for run in sorted(results["runs"], key=lambda r: (r["layout"], r["nodes"])):
        base, storms, dele = run["base"], run["storms"], run["deletions"]
        out.append("| %s | %d | %s | %s | %s | %s / %s | %s / %s | %s / %s | %s | %s, %s | %s |" % (
            run["layout"], run["nodes"],
            fmt(run["idle"]["hub_cpu_pct"]), fmt(run["idle"]["hub_rss_mib"], 0),
            fmt(base["hub_cpu_s_per_1000"], 2),
            fmt(base["post_to_stored"]["p50_ms"]), fmt(base["post_to_stored"]["p99_ms"]),
            fmt(base["post_to_delete"]["p50_ms"], 0), fmt(base["post_to_delete"]["p99_ms"], 0),
            fmt(storms[0]["post_to_stored"]["p99_ms"]), fmt(storms[0]["hub_cpu_s_per_1000"], 2),
            fmt(storms[1]["post_to_stored"]["p99_ms"]),
            fmt(dele["actions_per_s"], 0), fmt(dele["post_to_delete"]["p99_ms"], 0),
            fmt(run["join"]["first_alert_in_hub_ms"], 0),
        ))
    out.append("")
    out.append("| sources (nodes not there) | stream config (bytes) | made in (ms) | hub CPU idle (% of a core) | hub RSS (MiB) |")
    out.append("| --- | --- | --- | --- | --- |")
    for p in results["phantom_sources"]:
        out.append("| %d | %s | %s | %s | %s |" % (p["sources"], fmt(p["config_bytes"], 0), fmt(p["create_ms"]),
                                                  fmt(p["hub_cpu_pct"]), fmt(p["hub_rss_mib"], 0)))
    return "\n".join(out)


if __name__ == "__main__":
    main()
    print(tables(json.load(open(sys.argv[1]))))
