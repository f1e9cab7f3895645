"""What an explainer returns: per-token and per-word scores, which save, load and draw themselves."""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.results import dump_json, reading_saved
from .tokens import readable

TRUNCATED_MARK = "[truncated: the model reads no further]"
PLOT_ROOMY_TOKENS = 20  # up to this many tokens, the bar chart gives each label room at 45 degrees
PLOT_MAX_WIDTH = 18.0  # inches
PLOT_TITLE_CHARS = 120  # the prompt in the title: the bars below show every word the model reads
# A top word that leads the second by less than this share of its score is a near tie. On MemLab
# (bench explain, first step) attribution and ablation agree on all 43 trigger prompts where both
# top words lead by this much; on verbatim captions, where one method or the other calls its top
# word such a tie in 29 of 40, they agree on a quarter.
DECISIVE_LEAD = 0.2


def lead_margin(scores) -> float:
    """How far the top score leads the second, as a share of the top score (NaN for one word, or a
    top score of 0): a small margin means the top word is a near tie and its rank says little."""
    top2 = np.sort(np.asarray(scores, float))[::-1][:2]
    return float((top2[0] - top2[1]) / abs(top2[0])) if len(top2) == 2 and top2[0] != 0 else float("nan")


def _as_the_tokenizer_reads(prompt: str) -> tuple[str, list[int], list[int]]:
    """The prompt composed (NFC) and lower-cased as CLIP's tokenizer reads it, with the span of the
    prompt each of its characters comes from. Positions found in that text, used in the prompt as
    they were, shifted every later word where the two differ in length: Turkish "İ" lower-cases to
    "i" and a combining dot, and an accent typed apart ("e" and U+0301, as macOS writes file names)
    composes into one letter. Lower-cased letter by letter, as the tokenizer does: a final "Σ" is "σ"."""
    import unicodedata

    low, starts, ends = [], [], []
    i = 0
    while i < len(prompt):
        j = i + 1  # a letter and the marks (or Korean vowel and final jamo) that compose with it
        while j < len(prompt) and (unicodedata.combining(prompt[j]) or 0x1160 <= ord(prompt[j]) <= 0x11FF):
            j += 1
        for c in unicodedata.normalize("NFC", prompt[i:j]):
            for lc in c.lower():
                low.append(lc)
                starts.append(i)
                ends.append(j)
        i = j
    return "".join(low), starts, ends


@functools.cache
def _fragment_template():
    """``to_html``'s template, compiled once: compiling it took nearly all of the 1.5 ms a prompt's
    fragment cost, in a page of a thousand prompts."""
    from ..core.prompts import html_environment

    return html_environment().from_string(
        '<span class="diffmem-attribution" data-method="{{ method }}">'
        "{% for before, w, a, s in items %}{{ before }}"
        '<span class="tok" data-word-index="{{ loop.index0 }}" title="{{ \'%.4g\'|format(s) }}"'
        ' style="background: rgba(220, 40, 40, {{ \'%.3f\'|format(a) }}); border-radius: 3px">{{ w }}</span>'
        "{% endfor %}{% if truncated %} <span class=\"truncated\" title=\"longer than the model reads: it sees no further\">"
        "{{ mark }}</span>{% endif %}</span>"
    )


_LINE_BREAK_PICTURES = str.maketrans({"\n": "\u23ce", "\u2028": "\u23ce", "\u2029": "\u23ce"})  # as ⏎


@dataclass
class AttributionResult:
    prompt: str
    tokens: list[str]  # the prompt's BPE tokens, BOS / EOS / padding left out
    token_scores: np.ndarray
    words: list[str]
    word_scores: np.ndarray
    word_of_token: list[int]
    method: str
    settings: dict
    seeds: list[int]
    detection_score: float | None = None
    extra: dict = field(default_factory=dict)  # e.g. the EOS / padding positions' share
    # longer than the model reads: the tokens and words are the ones it reads, the rest is not explained
    # (None: saved before diffmem recorded it)
    truncated: bool | None = None

    @property
    def top_word(self) -> str:
        return self.words[self.top_index]

    @property
    def top_index(self) -> int:
        """The top word's position among ``words``: a word can stand twice in a prompt ("in the ... in a room")."""
        return int(np.argmax(self.word_scores))

    @property
    def top_lead(self) -> float:
        """How far the top word leads the second, as a share of its score (NaN for a one-word prompt)."""
        return lead_margin(self.word_scores)

    @property
    def runner_up(self) -> str | None:
        """The second-ranked word (None for a one-word prompt)."""
        return self.ranking()[1][0] if len(self.words) > 1 else None

    @property
    def near_tie(self) -> bool:
        """The top word leads the second by less than ``DECISIVE_LEAD``: their order says little."""
        return bool(self.top_lead < DECISIVE_LEAD)  # NaN (one word) compares False

    def runner_up_text(self) -> str:
        """The second-ranked word quoted, as 'the other "w"' when it is the top word standing again."""
        return f'the other "{self.runner_up}"' if self.runner_up == self.top_word else f'"{self.runner_up}"'

    def lead_text(self) -> str:
        """The top word's lead in words: 'ahead of "in" by 34%', or for a near tie 'a near tie with
        "in" (ahead by 3%): their order says little'; '' for a one-word prompt."""
        if self.runner_up is None or not np.isfinite(self.top_lead):
            return ""
        lead = f"{self.top_lead:.0%}"
        if self.near_tie:
            return f"a near tie with {self.runner_up_text()} (ahead by {lead}): their order says little"
        return f"ahead of {self.runner_up_text()} by {lead}"

    def ranking(self) -> list[tuple[str, float]]:
        order = np.argsort(-self.word_scores, kind="stable")
        return [(self.words[i], float(self.word_scores[i])) for i in order]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"token": self.tokens, "score": self.token_scores,
                             "word": [self.words[w] for w in self.word_of_token]})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_scores"] = self.token_scores.tolist()
        d["word_scores"] = self.word_scores.tolist()
        return d

    def save(self, path: str | Path) -> Path:
        dump_json(self.to_dict(), path)
        return Path(path)

    @classmethod
    def from_dict(cls, d: dict) -> "AttributionResult":
        d = dict(d)
        d["token_scores"] = np.asarray(d["token_scores"], float)
        d["word_scores"] = np.asarray(d["word_scores"], float)
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "AttributionResult":
        with reading_saved(path, "attribution (.json)"):
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    # -- showing itself -----------------------------------------------------------------------
    def segments(self) -> list[tuple[str, str]]:
        """(text before the word, the word as written in the prompt) for each word, so displays show
        the user's own spelling; CLIP lower-cases and splits punctuation off."""
        low, starts, ends = _as_the_tokenizer_reads(self.prompt)
        out, cursor, low_cursor = [], 0, 0
        for w in self.words:
            at, size = low.find(w, low_cursor), len(w)
            if at < 0 and w.endswith("\ufffd"):  # the model's cut fell inside a character: the word is its first bytes
                head = w.rstrip("\ufffd")
                rest = low[low_cursor:]
                at = low.find(head, low_cursor) if head else low_cursor + len(rest) - len(rest.lstrip())
                size = len(head) + 1  # and the character they begin
                at = at if 0 <= at and at + size <= len(low) else -1
            if at < 0:  # a tokenizer that changes text otherwise (another model's): fall back to spaces
                return [("" if i == 0 else " ", w) for i, w in enumerate(self.words)]
            # a word that starts inside a character an earlier word took ("İ" as "i" and its dot) is empty
            start = max(starts[at], cursor)
            end = max(ends[at + size - 1], start) if size else start
            out.append((self.prompt[cursor:start], self.prompt[start:end]))
            cursor, low_cursor = end, at + size
        return out

    def _shares(self) -> np.ndarray:
        s = np.clip(self.word_scores, 0, None)
        return s / s.max() if s.max() > 0 else s

    def to_rich(self):
        """The prompt as rich Text on one line, each word on a background as strong as its score."""
        from rich.text import Text

        from ..core.prompts import terminal_text

        def shown(text):  # control characters drawn: rich would drop some (BEL, CR) and pass others (ESC) on;
            # line breaks too, which would split one prompt of a listing in two
            return terminal_text(text).translate(_LINE_BREAK_PICTURES)

        t = Text()
        for (before, w), a in zip(self.segments(), self._shares()):
            level = int(255 - 200 * a)
            t.append(shown(before))
            t.append(shown(w), style=f"black on rgb(255,{level},{level})")
        if self.truncated:
            t.append(f" {TRUNCATED_MARK}", style="dim")
        return t

    def to_html(self) -> str:
        """An HTML fragment (escaped): words shaded by score, the score in a tooltip."""
        items = [(b, w, a, sc) for (b, w), a, sc in zip(self.segments(), self._shares() * 0.85, self.word_scores)]
        return _fragment_template().render(method=self.method, items=items, truncated=self.truncated,
                                           mark=TRUNCATED_MARK)

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        from ..core.figures import subplots

        n = len(self.tokens)
        crowded = n > PLOT_ROOMY_TOKENS  # a long prompt: narrower bars and upright labels, not a page-wide image
        fig, ax = subplots(figsize=(min(PLOT_MAX_WIDTH, max(3.0, (0.22 if crowded else 0.55) * n + 1)), 2.6))
        x = np.arange(n)
        ax.bar(x, self.token_scores, color="#c33")
        ax.set_xticks(x, [readable([t]) for t in self.tokens], rotation=90 if crowded else 45,
                      ha="center" if crowded else "right", fontsize=6 if crowded else 8)
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_ylabel("gradient norm" if self.method == "token_attribution" else "score drop")
        s = self.settings
        cut = f" {TRUNCATED_MARK}" if self.truncated else ""
        shown = self.prompt if len(self.prompt) <= PLOT_TITLE_CHARS else self.prompt[: PLOT_TITLE_CHARS - 3] + "..."
        ax.set_title(title or f"{shown}{cut}\n{self.method}, steps {s.get('steps')}, seeds {self.seeds}", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return Path(path)
