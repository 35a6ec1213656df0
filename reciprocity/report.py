"""Run artifacts for MLflow: PNG curves of the per-iteration figures and HTML transcripts.

Transcripts hold model text, which is untrusted: every piece of it goes through `html.escape`
(quotes included), and the page carries no script. An LLM seat's chat is decoded from its token
ids (prompt and generated tokens alike); generated spans are highlighted. A scripted or API seat
has no tokens: its parsed actions are shown instead.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

CURVES: dict[str, tuple[str, ...]] = {
    "ipd": ("cooperation_rate", "p_coop_given_opp_coop", "p_coop_given_opp_defect"),
    "split_nocomm": ("efficiency", "fairness"),
    "trust_and_split": ("efficiency", "fairness", "honest_claim_rate"),
}
RETURN = "return_per_round"
UNBOUNDED = ("per_round", "per_game", "_chars")  # figures that are not shares
SIDES = (f"learner_{RETURN}", f"opponent_{RETURN}")


def plot_curves(history: Mapping[str, Sequence[tuple[int, float]]], game: str, out: Path, title: str = "") -> Path:
    """One PNG: the game's cooperation/efficiency figures (left) and return per round (right)
    against the iteration. `history[key]` is a list of (iteration, value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in CURVES.get(game, ()):
        if history.get(key):
            xs, ys = zip(*sorted(history[key]), strict=True)
            left.plot(xs, ys, marker="o", ms=3, label=key)
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("iteration")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    for key in sorted(k for k, v in history.items() if v and k.startswith("eval/") and k.endswith(f"/{RETURN}")):
        xs, ys = zip(*sorted(history[key]), strict=True)
        right.plot(xs, ys, marker="s", ms=3, ls="--", label=key.removeprefix("eval/").removesuffix(f"/{RETURN}"))
    if history.get(RETURN):
        xs, ys = zip(*sorted(history[RETURN]), strict=True)
        right.plot(xs, ys, marker="o", ms=3, color="black", label="self-play")
    for key in SIDES:  # exploiter runs: the trained side and the frozen side
        if history.get(key):
            xs, ys = zip(*sorted(history[key]), strict=True)
            right.plot(xs, ys, marker="^", ms=3, label=key.removesuffix(f"_{RETURN}"))
    right.set_xlabel("iteration")
    right.set_ylabel("return per round")
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator

    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title or game)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_comparison(histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], figures: Sequence[str],
                    out: Path, title: str = "") -> Path:
    """One PNG, a panel per figure, a line per run: `histories[run][figure]` is a list of
    (iteration, value). Probability figures share the 0-1 axis; returns keep their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = min(4, max(1, len(figures)))
    rows = -(-len(figures) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax, figure in zip(axes.flat, figures, strict=False):
        for run, history in histories.items():
            if history.get(figure):
                xs, ys = zip(*sorted(history[figure]), strict=True)
                ax.plot(xs, ys, marker="o", ms=3, label=run)
        if not figure.endswith(UNBOUNDED):  # rates, efficiency, fairness: on [0, 1]
            ax.set_ylim(-0.02, 1.02)
        ax.set_title(figure, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        lo, hi = ax.get_xlim()
        if hi - lo < 1:  # one point (an evaluation figure): whole iterations around it, not 0.945..1.05
            mid = round((lo + hi) / 2)
            ax.set_xlim(mid - 1, mid + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(figures):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _chat_html(token_ids: Sequence[int], token_round: Sequence[int], decode: Callable[[Sequence[int]], str]) -> str:
    """The chat as spans of prompt / generated tokens (generated: token_round >= 0)."""
    parts, start = [], 0
    gen = [r >= 0 for r in token_round]
    for i in range(1, len(token_ids) + 1):
        if i == len(token_ids) or gen[i] != gen[start]:
            text = _e(decode(token_ids[start:i]))
            parts.append(f'<span class="gen">{text}</span>' if gen[start] else text)
            start = i
    return "".join(parts)


PAGE = """<!doctype html>
<html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} pre{{white-space:pre-wrap;background:#f6f6f6;padding:.6em}}
.gen{{background:#ffe9a8;font-weight:bold}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px}}
</style></head><body><h1>{title}</h1>
{body}
</body></html>
"""


def transcripts_html(table: pa.Table, decode: Callable[[Sequence[int]], str], title: str, max_games: int = 4) -> str:
    """An HTML page of the first `max_games` games of a trajectory table (both seats each)."""
    rows = table.select(["game_id", "seat", "policy_name", "policy_version", "opponent_name", "token_ids",
                         "token_round", "rewards", "actions", "n_invalid", "n_decisions"]).to_pylist()
    games: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        games.setdefault(r["game_id"], []).append(r)
    body = []
    for gid in sorted(games)[:max_games]:
        seats = sorted(games[gid], key=lambda r: r["seat"])
        body.append(f"<h2>game {_e(gid)}</h2>")
        n_rounds = max(len(s["actions"]) for s in seats)
        head = "".join(f"<th>{_e(('alice', 'bob')[s['seat']])}: {_e(s['policy_name'])}"
                       f"{'@v' + _e(s['policy_version']) if s['policy_version'] >= 0 else ''}</th>" for s in seats)
        lines = [f"<table><tr><th>round</th>{head}</tr>"]
        for t in range(n_rounds):
            cells = "".join(
                f"<td>{_e(s['actions'][t]) if t < len(s['actions']) else ''} "
                f"({_e(round(s['rewards'][t], 3)) if t < len(s['rewards']) else ''})</td>" for s in seats)
            lines.append(f"<tr><td>{t}</td>{cells}</tr>")
        totals = "".join(f"<td>{_e(round(float(np.sum(s['rewards'])), 3))} "
                         f"(invalid {_e(s['n_invalid'])}/{_e(s['n_decisions'])})</td>" for s in seats)
        lines.append(f"<tr><th>total</th>{totals}</tr></table>")
        body.append("".join(lines))
        for s in seats:
            if s["token_ids"]:
                who = ("alice", "bob")[s["seat"]]
                chat = _chat_html(s["token_ids"], s["token_round"], decode)
                body.append(f"<h3>{_e(who)}'s chat</h3><pre>{chat}</pre>")
    return PAGE.format(title=_e(title), body="\n".join(body))
