"""Run artifacts: the HTML transcript renders model text inert; the curves PNG is drawn from history."""

from __future__ import annotations

import html.parser
from pathlib import Path

from actors.trajectories import SeatTrajectory, to_batch
from reciprocity.report import plot_curves, transcripts_html

EVIL = '<script>alert(1)</script><img src=x onerror="alert(2)">"quoted" & more'


def seat(game_id: int, seat_: int, token_ids: list[int], token_round: list[int]) -> SeatTrajectory:
    t = SeatTrajectory(run="r", iteration=0, game_id=game_id, group_id=0, env="ipd", seed=0, seat=seat_,
                       policy_name="learner" if seat_ == 0 else "always_defect", policy_version=3 if seat_ == 0 else -1,
                       opponent_name="x", opponent_version=-1, trainable=seat_ == 0, temperature=1.0)
    t.token_ids, t.token_round = token_ids, token_round
    t.logprobs, t.token_version = [0.0] * len(token_ids), [3] * len(token_ids)
    t.rewards, t.actions = [0.0, 5.0], ["C", "<b>D</b>"]
    t.n_decisions = 2
    return t


class Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += [k for k, _ in attrs]


def test_transcript_escapes_model_text_and_marks_generated_tokens() -> None:
    decode = {1: "prompt ", 2: EVIL, 3: " more prompt"}
    table = to_batch([seat(7, 0, [1, 2, 3], [-1, 0, -1]), seat(7, 1, [], [])])
    page = transcripts_html(table, lambda ids: "".join(decode[i] for i in ids), title="t <script>")
    parser = Tags()
    parser.feed(page)
    assert "script" not in parser.tags and "img" not in parser.tags and "b" not in parser.tags
    assert "onerror" not in parser.attrs
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;b&gt;D&lt;/b&gt;" in page
    assert f'<span class="gen">{"&lt;script&gt;"}' in page  # the generated span is highlighted
    assert "learner@v3" in page and "always_defect" in page and "(invalid 0/2)" in page


def test_curves_png_from_history(tmp_path: Path) -> None:
    history = {"cooperation_rate": [(0, 0.5), (1, 0.4)], "p_coop_given_opp_defect": [(0, 0.2), (1, 0.1)],
               "return_per_round": [(0, 2.0), (1, 2.2)], "eval/always_defect/return_per_round": [],
               "learner_return_per_round": [(0, 1.0), (1, 1.5)]}
    out = plot_curves(history, "ipd", tmp_path / "c.png", title="t")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
