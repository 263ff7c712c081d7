"""What bench_ppo.py reports: each arrangement's best run, the ratios against `separate`, the
1base-1lora goal, and the table.

Nothing here imports torch (see _common.py).
"""

from __future__ import annotations

from _common import median
from _report import print_rows

ARRANGEMENTS = ("separate", "2base-2lora", "1base-2lora", "1base-1lora")
PHASES = ("time_generate", "time_score", "time_train")


def summarize(runs: list[dict]) -> dict:
    best = min(runs, key=lambda r: r["time_iteration"])
    return {
        **{k: best[k] for k in (*PHASES, "time_iteration", "iteration_s_by_lines", "cpu_utilisation")},
        "fastest_iteration": min(r["fastest_iteration"] for r in runs),
        "peak_rss_mib": max(r["measured"].peak_rss for r in runs) / 2**20,
        "sampled_peak_rss_mib": max(r["measured"].sampled_peak_rss for r in runs) / 2**20,
        "rss_after_warmup_mib": median([r["rss_after_warmup"] for r in runs]) / 2**20,
        "timed_iterations_peak_rss_mib": max(r["timed_peak_rss"] for r in runs) / 2**20,
        "process_wall_s": min(r["measured"].wall_s for r in runs),
        "process_cpu_s": min(r["measured"].cpu_s for r in runs),
        "mean_response_length": best["iterations"][-1]["response_length"],
        "runs": [{"time_iteration": r["time_iteration"], **{k: r[k] for k in PHASES},
                  "fastest_iteration": r["fastest_iteration"], "cpu_utilisation": r["cpu_utilisation"],
                  "peak_rss_mib": r["measured"].peak_rss / 2**20, "process_wall_s": r["measured"].wall_s,
                  "loadavg_before": r["loadavg_before"], "iterations": r["iterations"]} for r in runs],
    }


def ratios_vs_separate(per: dict, held: dict) -> dict:
    ratio = {}
    if "separate" in per:
        base = per["separate"]
        keys = ("time_iteration", "fastest_iteration", *PHASES, "peak_rss_mib")
        ratio = {name: {k: side[k] / base[k] for k in keys if base[k]} for name, side in per.items()}
        if held.get("separate"):
            # Without the libraries' own memory (the process once built, before any weight
            # is read: the same ~390 MB everywhere), what the weights and the work take.
            def above(name):
                return per[name]["peak_rss_mib"] - held[name]["rss_built_mib"]
            for name in per:
                if name in held:
                    ratio[name]["peak_rss_above_built"] = above(name) / above("separate")
    return ratio


def goal_of(ratio: dict) -> dict:
    one = ratio.get("1base-1lora", {})
    return {"memory_ratio_at_most": 0.5, "time_ratio_at_most": 1.0,
            "memory_ratio": one.get("peak_rss_mib"), "time_ratio": one.get("time_iteration"),
            "met": bool(one) and one["peak_rss_mib"] <= 0.5 and one["time_iteration"] <= 1.0}


def print_table(result: dict) -> None:
    from rich.console import Console

    s, per = result["setup"], result["arrangements"]
    names = [n for n in ARRANGEMENTS if n in per]
    ratio = result["ratio_vs_separate"]

    def row(label, key, fmt, source=per):
        return (label, *(fmt.format(source[n][key]) if source.get(n, {}).get(key) is not None else "n/a"
                         for n in names))

    rows = [
        row("s per iteration (mean of the timed ones)", "time_iteration", "{:.2f}"),
        row("  generate, s", "time_generate", "{:.2f}"),
        row("  score (reward model), s", "time_score", "{:.2f}"),
        row("  train (log-probs, values, PPO epochs), s", "time_train", "{:.2f}"),
        row("fastest single iteration, s", "fastest_iteration", "{:.2f}"),
        row("CPU utilisation, timed iterations (cores)", "cpu_utilisation", "{:.2f}"),
        row("peak RSS, MiB", "peak_rss_mib", "{:.0f}"),
        row("  peak RSS in the timed iterations, MiB", "timed_iterations_peak_rss_mib", "{:.0f}"),
        row("time per iteration vs separate", "time_iteration", "{:.2f}", ratio),
        row("fastest iteration vs separate", "fastest_iteration", "{:.2f}", ratio),
        row("peak RSS vs separate", "peak_rss_mib", "{:.2f}", ratio),
        row("peak RSS above the built process vs separate", "peak_rss_above_built", "{:.2f}", ratio),
    ]
    held = result.get("held") or {}
    if held:
        rows += [row("base models held", "base_models", "{}", held),
                 row("parameters held, MiB", "parameter_mib", "{:.0f}", held),
                 row("trainable parameters", "trainable_parameters", "{:,}", held),
                 row("RSS once built (no iteration), MiB", "rss_built_mib", "{:.0f}", held),
                 row("peak RSS while building, MiB", "peak_rss_building_mib", "{:.0f}", held)]
    print_rows(f"PPO per arrangement, builtin:{s['model']} ({s['params'] / 1e6:.0f}M params), rollout "
               f"{s['rollout_batch_size']}, minibatch {s['mini_batch_size']}, {s['ppo_epochs']} PPO epochs, "
               f"{s['max_new_tokens']} new tokens, {s['threads']} threads, {s['timed_iterations']} timed "
               f"iterations after {s['warmup_iterations']}, best of {s['repeats']} run(s)",
               ["metric", *names], rows)
    if s["contended"]:
        Console().print(f"[bold yellow]warning:[/] {s['contended']}")
    goal = result["goal"]
    Console().print(f"1base-1lora vs separate: memory {goal['memory_ratio']:.2f} (goal <= 0.5), time per "
                    f"iteration {goal['time_ratio']:.2f} (goal <= 1.0): "
                    f"{'met' if goal['met'] else 'NOT met'}" if goal["memory_ratio"] is not None else "")
