"""What a mitigation returns, whichever method made it: losses, rewrites, images before and after,
the measures; it saves, loads and draws itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.results import dump_json, reading_saved


def _wrapped(prompt: str, width: int = 26, lines: int = 3) -> str:
    """A prompt as a row label: wrapped, and cut with an ellipsis past ``lines`` lines."""
    import textwrap

    return "\n".join(textwrap.wrap(prompt, width, max_lines=lines, placeholder=" …"))


@dataclass
class MitigationResult:
    method: str
    prompts: list[str]
    settings: dict
    seeds: list[int]
    initial_loss: np.ndarray  # (P,) first-step loss before mitigation (nan for prompt-rewriting baselines)
    final_loss: np.ndarray
    trajectories: list[list[float]]
    iterations: np.ndarray  # optimization steps taken per prompt
    reached_target: np.ndarray  # bool per prompt (True for baselines: no target)
    mitigated_prompts: list[str]  # the rewritten prompt (baselines) or the original
    images_before: np.ndarray | None = None  # (P, S, H, W, 3)
    images_after: np.ndarray | None = None
    measures: dict = field(default_factory=dict)
    # per prompt: longer than the model reads (CLIP: 77 tokens), the prompt and the text mitigated from it;
    # a rewrite's words past the cut, added or the prompt's own, are not read. None: saved before
    # diffmem recorded it
    truncated: np.ndarray | None = None
    mitigated_truncated: np.ndarray | None = None

    TRUNCATION_FIELDS = ("truncated", "mitigated_truncated")

    @property
    def unreached(self) -> list[str]:
        return [p for p, r in zip(self.prompts, self.reached_target) if not r]

    def to_frame(self):
        import pandas as pd

        df = pd.DataFrame({"prompt": self.prompts, "mitigated_prompt": self.mitigated_prompts,
                           "initial_loss": self.initial_loss, "final_loss": self.final_loss,
                           "iterations": self.iterations, "reached_target": self.reached_target})
        for k, v in self.measures.items():
            if isinstance(v, (list, np.ndarray)) and len(v) == len(self.prompts):
                df[k] = v
        for name in self.TRUNCATION_FIELDS:
            if getattr(self, name) is not None:
                df[name] = np.asarray(getattr(self, name), bool)
        return df

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {k: getattr(self, k) for k in ("method", "prompts", "settings", "seeds", "trajectories", "mitigated_prompts")}
        meta.update(initial_loss=self.initial_loss, final_loss=self.final_loss, iterations=self.iterations,
                    reached_target=self.reached_target, measures=self.measures)
        meta.update({name: np.asarray(getattr(self, name), bool) for name in self.TRUNCATION_FIELDS
                     if getattr(self, name) is not None})
        dump_json(meta, folder / "mitigation.json")
        if self.images_before is not None:
            np.savez_compressed(folder / "images.npz", before=self.images_before, after=self.images_after)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "MitigationResult":
        folder = Path(folder)
        with reading_saved(folder, "mitigation result (a folder with mitigation.json)"):
            d = json.loads((folder / "mitigation.json").read_text())
            imgs = {}
            if (folder / "images.npz").exists():
                with np.load(folder / "images.npz", allow_pickle=False) as z:
                    imgs = {"images_before": z["before"], "images_after": z["after"]}
            return cls(d["method"], d["prompts"], d["settings"], d["seeds"], np.asarray(d["initial_loss"], float),
                       np.asarray(d["final_loss"], float), d["trajectories"], np.asarray(d["iterations"]),
                       np.asarray(d["reached_target"], bool), d["mitigated_prompts"], measures=d["measures"], **imgs,
                       **{name: np.asarray(d[name], bool) for name in cls.TRUNCATION_FIELDS if name in d})

    @classmethod
    def concat(cls, parts: "list[MitigationResult]") -> "MitigationResult":
        """One result from results of the same method and settings on successive prompt lists."""
        if not parts:
            raise InputError("no mitigation results to join")
        first = parts[0]
        for r in parts[1:]:
            if (r.method, r.settings, r.seeds) != (first.method, first.settings, first.seeds):
                raise InputError(f"cannot join mitigation results of other methods or settings ({r.method} vs {first.method})")
        cat = lambda name: np.concatenate([getattr(r, name) for r in parts])  # noqa: E731
        optional = {}
        if all(r.images_before is not None for r in parts):
            optional = {"images_before": cat("images_before"), "images_after": cat("images_after")}
        measures = {k: [v for r in parts for v in r.measures.get(k, [])] for k in first.measures}
        for name in cls.TRUNCATION_FIELDS:  # parts saved before diffmem recorded it leave it unknown
            if all(getattr(r, name) is not None for r in parts):
                optional[name] = cat(name)
        return cls(first.method, [p for r in parts for p in r.prompts], first.settings, first.seeds, cat("initial_loss"),
                   cat("final_loss"), [t for r in parts for t in r.trajectories], cat("iterations"), cat("reached_target"),
                   [p for r in parts for p in r.mitigated_prompts], measures=measures, **optional)

    def plot_grid(self, path: str | Path, max_prompts: int = 8) -> Path:
        """Before / after images side by side, one row per prompt (the first ``max_prompts``; the
        title says when there are more, all of them are in images.npz)."""
        fig = self._grid_figure(max_prompts)
        fig.savefig(path, dpi=120)
        return Path(path)

    def _grid_figure(self, max_prompts: int = 8):
        import textwrap

        from ..core.figures import subplots

        if self.images_before is None:
            raise InputError("this result holds no images")
        p = min(max_prompts, len(self.prompts))
        s = self.images_before.shape[1]
        fig, axes = subplots(p, 2 * s, figsize=(1.1 * 2 * s + 1.4, 1.35 * p + 0.7), squeeze=False)
        m = self.measures
        for i in range(p):
            for j in range(s):
                for k, (imgs, label) in enumerate(((self.images_before, "before"), (self.images_after, "after"))):
                    ax = axes[i, k * s + j]
                    ax.imshow(imgs[i, j], interpolation="nearest")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if i == 0:
                        ax.set_title(f"{label} s{self.seeds[j]}", fontsize=6)
            axes[i, 0].set_ylabel(_wrapped(self.prompts[i]), fontsize=5)
            rewrite = self.mitigated_prompts[i]
            if rewrite != self.prompts[i]:  # what the after images were made from
                added = rewrite[len(self.prompts[i]):].strip() if rewrite.startswith(self.prompts[i]) else None
                text = f"+ {added}" if added else f"as: {rewrite}"
                if "target" in self.settings:  # an optimized embedding, started from the rewrite
                    text = f"optimized from the prompt + {added}" if added else f"optimized from: {rewrite}"
                axes[i, s].set_xlabel(textwrap.shorten(text, 70, placeholder=" …"), fontsize=5, loc="left")
            said = [f"{what} {m[f'{what}_before'][i]:.2f} → {m[f'{what}_after'][i]:.2f}"
                    for what in ("replication", "alignment") if len(m.get(f"{what}_before", [])) == len(self.prompts)]
            if said:
                right = axes[i, -1]
                right.yaxis.set_label_position("right")
                right.set_ylabel("\n".join(said), fontsize=5, rotation=0, ha="left", va="center")
        shown = f"; first {p} of {len(self.prompts)} prompts (all in images.npz)" if p < len(self.prompts) else ""
        settings = json.dumps({k: v for k, v in self.settings.items() if k != "target_source"})
        fig.suptitle(textwrap.fill(f"{self.method}{shown}: {settings}", 150), fontsize=5)
        fig.tight_layout()
        return fig

    def plot_trajectories(self, path: str | Path) -> Path:
        from ..core.figures import subplots

        fig, ax = subplots(figsize=(4.5, 3.2))
        for tr in self.trajectories:
            ax.plot(range(len(tr)), tr, lw=1, alpha=0.7)
        if "target" in self.settings:
            ax.axhline(self.settings["target"], color="k", ls="--", lw=1, label="target")
            ax.legend(fontsize=7)
        ax.set_xlabel("iteration")
        k = self.settings.get("loss_steps", 1)
        ax.set_ylabel("first-step loss" if k == 1 else f"loss (mean over steps 0-{k - 1})")
        ax.set_title(f"{self.method}, seeds {self.seeds}", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return Path(path)
