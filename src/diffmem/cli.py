"""The ``diffmem`` command line. Each command calls one Python API entry point."""

from __future__ import annotations

import atexit
import math
import os
import sys
import warnings
from collections import Counter, deque
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text

from .core.errors import DiffmemError, InputError
from .core.prompts import PROMPT_FILES, TABLE_SUFFIXES, terminal_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Audit text-to-image diffusion models for memorization of their training data.")
memlab_app = typer.Typer(no_args_is_help=True, help="MemLab: the planted-memorization testbed and its model.")
app.add_typer(memlab_app, name="memlab")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks on labelled prompt sets.")
app.add_typer(bench_app, name="bench")


def _steps(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DiffmemError(f"--steps takes step indices separated by commas (0 = first step), got {text!r}") from None


class _ShowingConsole(Console):
    """What is printed holds the user's prompts, words and captions (scraped ones among them), and rich
    passes an escape sequence in them to the terminal, where it could move the cursor, recolour or
    clear the screen: every string it renders (printed, or in a table's cell) and every rich Text it
    prints shows its control characters."""

    def render_str(self, text: str, **kwargs):
        return super().render_str(terminal_text(text), **kwargs)

    def print(self, *objects, **kwargs):
        super().print(*(_shown_text(o) if isinstance(o, Text) else o for o in objects), **kwargs)


def _shown_text(text: Text) -> Text:
    text = text.copy()  # rich has dropped BEL, CR and a few more from it, but kept ESC
    text.plain = terminal_text(text.plain)  # the same length: its styles stay on their characters
    return text


# no markup: what is printed holds the user's prompts, words and paths, and rich would read "[bold]"
# in them as a style (and "[/x]" as a tag error)
console = _ShowingConsole(stderr=True, soft_wrap=True, markup=False)
out_console = _ShowingConsole(soft_wrap=True, markup=False)


WARNINGS_SHOWN = 5  # of one kind, then counted
COLUMN_HELP = f"the prompt column of a table file ({TABLE_SUFFIXES}; default: prompt, caption or text)"
RANKED_SHOWN = 12  # words of an explanation listed in the terminal (the files hold every word)


def quiet_library_environment() -> None:
    """Sets what diffusers / transformers read from the environment when first imported (anyone who
    imports them before ``main`` runs, as the tests' forked command line does, calls this first)."""
    # through the environment: importing them here would cost every command, and every bad-input
    # error, about 6 s before anything is checked
    for var, value in (("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DIFFUSERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(var, value)  # diffmem shows its own progress; load_pipeline hides diffusers' bar


def _quiet_libraries() -> None:
    # transformers warns once per process that torchvision is absent: by design here
    warnings.filterwarnings("ignore", message=".*requires torchvision.*")
    quiet_library_environment()

    recent, shown, held = deque(maxlen=256), Counter(), Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        # the same warning from several call sites (a prompt tokenized by each stage, moments apart) is
        # said once, and a kind said WARNINGS_SHOWN times (thousands of long captions) is then only counted
        if str(message) in recent:
            return
        recent.append(str(message))
        kind = category.__name__
        if shown[kind] >= WARNINGS_SHOWN:
            held[kind] += 1
            return
        shown[kind] += 1
        from tqdm import tqdm

        with tqdm.external_write_mode(file=sys.stderr):  # on a line of its own, not after a progress bar's
            console.print(f"warning: {message}", highlight=False, markup=False, style="yellow")

    def count_held():
        for kind, n in held.items():
            console.print(f"warning: {n} more warnings of this kind ({kind}) not shown", highlight=False,
                          markup=False, style="yellow")

    atexit.register(count_held)

    warnings.showwarning = show


def _remove_parts(folder: Path) -> None:
    from .core.parts import remove_parts  # here, not at the top: numpy is not needed to parse arguments

    remove_parts(folder)


_HELD: list[Path] = []  # this command's holds (see core.results.hold_folder), let go when it ends
_RESUMES_FROM: list[Path] = []  # where the running command saves work that the same command goes on from


def _hold(folder: Path, resumes: bool = True, **refusal) -> None:
    """Refuse a second run into ``folder`` while this one lasts; called once a command's input is
    checked, before the model loads. Let go when the command ends (``_let_go``). ``resumes``: the
    command saves its work there as it goes, and run again goes on from it (said on Ctrl-C).
    ``refusal``: hold_folder's ``instead``."""
    from .core.results import hold_folder

    _HELD.append(hold_folder(folder, **refusal))
    if resumes:
        _RESUMES_FROM.append(folder)


def _let_go() -> None:
    """End the command's holds; a folder it made that is still empty (the model failed to load, say)
    is removed, so a failed command leaves no new folder behind."""
    _RESUMES_FROM.clear()
    if not _HELD:
        return
    from .core.results import let_go_folder  # here: numpy is not needed to parse arguments

    while _HELD:
        let_go_folder(_HELD.pop())


def _check_writable(folder: Path) -> None:
    from .core.prompts import ensure_writable_dir

    ensure_writable_dir(folder)


def _mode_options(modes: dict[str, dict[str, tuple[str, object]]], chosen) -> tuple[list[str], dict]:
    """Options given on the command line, per mode (a method, a scan check) as {flag: (keyword, value)}:
    those given for modes not chosen, as "--flag (mode)" (they would go unused without a word), and by
    keyword those given for the chosen ones (the rest keep the Python API's defaults)."""
    elsewhere: dict[str, list[str]] = {}  # a flag given for modes not chosen -> those modes (a flag may serve several)
    for mode, opts in modes.items():
        for flag, (_, value) in opts.items():
            if mode not in chosen and value is not None and not any(flag in modes.get(c, {}) for c in chosen):
                elsewhere.setdefault(flag, []).append(mode)
    unused = [f"{flag} ({', '.join(ms)})" for flag, ms in elsewhere.items()]
    given = {name: value for mode, opts in modes.items() if mode in chosen for name, value in opts.values()
             if value is not None}
    return unused, given


# checked as the command line is parsed, before anything loads
def _finite(value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def _rate(value: float | None) -> float | None:
    if value is not None and not 0 < value < 1:
        raise typer.BadParameter(f"must lie in (0, 1), got {value}")
    return value


# the options of every command that loads a pipeline (one OptionInfo each, shared)
MAX_SEED = 2**32 - 1  # as Stable Diffusion front ends take; seed + generation, and the scan's seed x row, stay in torch's range
SEED = typer.Option(0, min=0, max=MAX_SEED)
DEVICE = typer.Option("cpu", help="torch device: cpu, cuda, cuda:1, mps")
DTYPE = typer.Option("float32", help="weights' dtype: float32, float16 (wants a GPU) or bfloat16")
LORA = typer.Option(None, help="a LoRA fused into the model: a .safetensors file (diffusers', PEFT's or kohya's "
                    "keys) or the folder save_lora_weights wrote; repeat for several, fused in the order given")
LORA_SCALE = typer.Option(None, help="the LoRA's scale, as fuse_lora's lora_scale (default 1); one for every --lora, "
                          "or one per --lora in their order")
TEXTUAL_INVERSION = typer.Option(None, help="a textual-inversion embedding added to the model: a .safetensors file "
                                 "(its token: the one it names, or for A1111's emb_params its file name) or TOKEN=FILE; "
                                 "repeat for several")
NUM_INFERENCE_STEPS = typer.Option(None, min=1, help="sampler steps (default: the model's; SD: 50)")
GUIDANCE_SCALE = typer.Option(None, callback=_finite, help="guidance scale (default: the model's; SD: 7.5)")
# one help for scan, train and the audit's --train-data, which pick columns by the same rules (scan.sources)
CAPTION_COLUMN_HELP = "caption column (default: caption, text or prompt; in WebDataset shards txt, else the json's caption)"
IMAGE_COLUMN_HELP = ("image column (default: image, file_name, image_path or path; in WebDataset shards jpg, "
                     "else jpeg / png / ...)")
CAPTION_COLUMN = typer.Option(None, help=CAPTION_COLUMN_HELP)
IMAGE_COLUMN = typer.Option(None, help=IMAGE_COLUMN_HELP)


def _adapters(lora: list[Path] | None, lora_scale: list[float] | None, textual_inversion: list[str] | None) -> dict:
    """load_pipeline's LoRA and textual-inversion arguments (those given), their files checked now, before the
    model loads. One LoRA is given as a path and a scale, as before there could be several: settings
    saved by audits and scans of one LoRA keep their form."""
    loras, scales = [str(p) for p in lora or []], list(lora_scale or [])
    if scales and not loras:
        raise InputError("--lora-scale scales a --lora: give that too")
    if len(scales) > 1 and len(scales) != len(loras):
        raise InputError(f"{len(scales)} --lora-scale for {len(loras)} --lora: give one scale for them all, or one per --lora")
    from .core.loading import lora_settings

    path, scale = lora_settings(loras, scales if len(scales) > 1 else scales[0] if scales else 1.0)
    given = {**({"lora": path, "lora_scale": scale} if loras else {}),
             **({"textual_inversion": tuple(textual_inversion)} if textual_inversion else {})}
    if given:
        from .core.loading import check_adapters

        check_adapters(**given)
    return given


def _sampler(pipe, num_inference_steps: int | None, guidance_scale: float | None) -> dict:
    """The model's sampler settings, with what the user gave in their place."""
    from .core.loading import sampler_defaults

    d = sampler_defaults(pipe)
    if num_inference_steps is not None:
        d["num_inference_steps"] = num_inference_steps
    if guidance_scale is not None:
        d["guidance_scale"] = guidance_scale
    return d


@app.command()
def detect(
    prompts: Path = typer.Option(..., help="prompts: .txt (one per line), .jsonl, .json, .csv / .tsv or .parquet"),
    column: Optional[str] = typer.Option(None, help=COLUMN_HELP),
    model: str = typer.Option("memlab", help="a local pipeline folder, a hub id, or memlab"),
    out: Path = typer.Option(Path("detect-results.parquet"), help="results file (.parquet or .json)"),
    method: str = typer.Option("noise-norm", help="noise-norm (Wen et al.) or seed-consistency (how alike the "
                               "generations of different seeds are)"),
    steps: Optional[str] = typer.Option(None, help="noise-norm: sampling steps to score, comma-separated (0 = the first "
                                        "step, the default)"),
    mode: Optional[str] = typer.Option(None, help="seed-consistency: x0 (the clean latent predicted at the first step, "
                                       "the default) or images (full generations)"),
    num_inference_steps: Optional[int] = NUM_INFERENCE_STEPS,
    guidance_scale: Optional[float] = GUIDANCE_SCALE,
    generations: Optional[int] = typer.Option(None, min=1, help="seeded generations per prompt (default: 1 for noise-norm, "
                                              "averaged; 4 for seed-consistency, at least 2)"),
    seed: int = typer.Option(0, min=0, max=MAX_SEED, help="generation g uses seed + g"),
    batch_size: int = typer.Option(32, min=1),
    calibration: Optional[Path] = typer.Option(None, help="a calibration file to apply (verdict column)"),
    calibrate_with: Optional[Path] = typer.Option(None, help="non-memorized reference prompts: fit a calibration first"),
    fpr: Optional[float] = typer.Option(None, callback=_rate, help="false-positive rate for --calibrate-with (default 0.01)"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: Optional[List[Path]] = LORA,
    lora_scale: Optional[List[float]] = LORA_SCALE,
    textual_inversion: Optional[List[str]] = TEXTUAL_INVERSION,
):
    """Score prompts with Wen et al.'s text-conditional noise norm (first step, one generation by default),
    or with seed consistency; saved every 256 prompts in OUT.parts, so a killed run resumes."""
    from .core.prompts import ensure_not_an_input, read_prompts, warn_if_in_reference

    items = read_prompts(prompts, column)  # bad input fails before torch and the model load (seconds)
    detector_options = _detector_options(method, steps, mode, generations)
    if calibration is not None and calibrate_with is not None:  # the fitted one replaced the file without a word
        raise InputError("give --calibration FILE (apply a saved calibration) or --calibrate-with REFERENCE (fit one), "
                         "not both")
    if fpr is not None and calibrate_with is None:
        raise InputError("--fpr is the false-positive rate of a calibration fitted with --calibrate-with"
                         + ("; a --calibration file brings its own" if calibration is not None else ": give that too"))
    reference = read_prompts(calibrate_with) if calibrate_with is not None else None
    if reference is not None:
        warn_if_in_reference(items, reference, str(calibrate_with))
    ensure_not_an_input(out, prompts=prompts, reference=calibrate_with)
    _check_writable(out.parent)
    # the chunks' folder stands for the run: a second detect into OUT would write the same chunks,
    # and the first to finish would remove them under the other
    _hold(out.with_name(out.name + ".parts"), instead="write to another output file")
    from .core.loading import load_pipeline

    pipe = load_pipeline(model, device=device, dtype=dtype, **_adapters(lora, lora_scale, textual_inversion))
    from .detect import Calibration, NoiseNormDetector, SeedConsistencyDetector
    from .detect.run import detect_file

    d = _sampler(pipe, num_inference_steps, guidance_scale)
    if method == "noise-norm":
        det = NoiseNormDetector(pipe, d["num_inference_steps"], d["guidance_scale"], seed=seed, batch_size=batch_size,
                                **detector_options)
    else:
        det = SeedConsistencyDetector(pipe, num_inference_steps=d["num_inference_steps"], guidance_scale=d["guidance_scale"],
                                      seed=seed, batch_size=batch_size, **detector_options)
    cal = Calibration.load(calibration) if calibration else None
    reference_scores = None
    if reference is not None:
        given = {} if fpr is None else {"fpr": fpr}  # else Calibration.fit's own default
        fitted_on = det.score(reference, progress=True)
        reference_scores = fitted_on.scores
        cal = Calibration.fit(fitted_on, **given)
        cal_path = out.with_name(out.stem + ".calibration.json")
        cal.save(cal_path)
        console.print(f"calibration: threshold {cal.threshold:.4g} at FPR {cal.fpr} from {cal.n_reference} prompts -> {cal_path}")
    summary = detect_file(det, prompts, out, column=column, calibration=cal)
    out_console.print(summary.line())
    from .detect.plot import settings_caption

    settings, seeds = (det.settings.to_dict(), det.settings.seeds()) if method == "noise-norm" else (det.settings, det.seeds())
    picture = summary.plot(out.with_suffix(".png"), reference_scores, settings_caption(det.method, settings, seeds))
    out_console.print(f"histogram of the scores -> {picture}")


def _detector_options(method: str, steps: str | None, mode: str | None, generations: int | None) -> dict:
    """The chosen detector's keyword arguments, checked before the model loads; an option of the other
    detector is refused (it would go unused without a word)."""
    if method not in ("noise-norm", "seed-consistency"):
        raise InputError(f"--method must be noise-norm or seed-consistency, got {method!r}")
    if method == "noise-norm":
        if mode is not None:
            raise InputError("--mode applies to --method seed-consistency; noise-norm scores --steps")
        return {"steps": _steps(steps if steps is not None else "0"), "generations": 1 if generations is None else generations}
    if steps is not None:
        raise InputError("--steps applies to --method noise-norm; seed-consistency compares the seeds' outputs (--mode)")
    if mode is not None and mode not in ("x0", "images"):
        raise InputError(f"--mode must be x0 or images, got {mode!r}")
    if generations is not None and generations < 2:
        raise InputError(f"seed-consistency compares generations of different seeds: --generations must be at least 2, "
                         f"got {generations}")
    return {"mode": mode or "x0", "generations": 4 if generations is None else generations}


@app.command()
def explain(
    prompt: Optional[str] = typer.Option(None, help="the prompt to explain"),
    prompts: Optional[Path] = typer.Option(None, help=f"or a file of prompts ({PROMPT_FILES}, e.g. detect's results "
                                           "with --flagged); needs --out, where it checkpoints and resumes"),
    column: Optional[str] = typer.Option(None, help=COLUMN_HELP),
    flagged: bool = typer.Option(False, "--flagged", help="only the prompts detect flagged (its results file, with a calibration)"),
    model: str = typer.Option("memlab"),
    method: str = typer.Option("attribution", help="attribution (gradients, Wen et al.) or ablation (score drop per word)"),
    ablation_mode: Optional[str] = typer.Option(None, help="ablation: mask (the default: zero the word's token embeddings) "
                                                "or remove (leave it out)"),
    steps: str = typer.Option("0", help="sampling steps, comma-separated (0 = first step)"),
    generations: int = typer.Option(1, min=1),
    seed: int = SEED,
    num_inference_steps: Optional[int] = NUM_INFERENCE_STEPS,
    guidance_scale: Optional[float] = GUIDANCE_SCALE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: Optional[List[Path]] = LORA,
    lora_scale: Optional[List[float]] = LORA_SCALE,
    textual_inversion: Optional[List[str]] = TEXTUAL_INVERSION,
    out: Optional[Path] = typer.Option(None, help="folder for attribution.json, .png and .html (one prompt) or "
                                       "attributions.json, words.parquet and attributions.html (a file)"),
):
    """Which words of a prompt carry its memorization: coloured in the terminal, as a bar chart and as HTML."""
    if method not in ("attribution", "ablation"):
        raise DiffmemError(f"--method must be attribution or ablation, got {method!r}")
    if ablation_mode is not None and method != "ablation":  # it was ignored without a word
        raise DiffmemError("--ablation-mode applies to --method ablation")
    if ablation_mode is not None and ablation_mode not in ("mask", "remove"):
        raise DiffmemError(f"--ablation-mode must be mask or remove, got {ablation_mode!r}")
    if (prompt is None) == (prompts is None):
        raise DiffmemError("give exactly one of --prompt and --prompts")
    if prompt is not None and not prompt.strip():
        raise DiffmemError("the prompt to explain is empty")
    if prompt is not None:  # before the model loads, as the API's own check (explain.tokens.check_prompt) is not
        from .core.prompts import lone_surrogate

        if problem := lone_surrogate(prompt):
            raise DiffmemError(f"the prompt to explain {problem}")
    if prompts is not None and out is None:
        raise DiffmemError("--prompts needs --out DIR: a file of prompts is checkpointed there and resumes")
    if prompts is not None:
        from .core.prompts import read_prompts

        texts = read_prompts(prompts, column, flagged)  # bad input fails before torch and the model load
    elif column is not None or flagged:
        raise DiffmemError("--column and --flagged apply to --prompts")
    if out is not None:
        _check_writable(out)
        # one prompt too: two runs into OUT would leave one's JSON beside the other's picture
        _hold(out, resumes=prompts is not None)
    from .core.loading import load_pipeline  # after the checks: torch takes seconds to import
    from .explain import TokenAblation, TokenAttribution, explain_prompts
    from .explain.batch import write_outputs
    from .explain.result import DECISIVE_LEAD

    pipe = load_pipeline(model, device=device, dtype=dtype, **_adapters(lora, lora_scale, textual_inversion))
    d = _sampler(pipe, num_inference_steps, guidance_scale)
    kw = dict(steps=_steps(steps), generations=generations, seed=seed)
    explainer = (TokenAttribution(pipe, d["num_inference_steps"], d["guidance_scale"], **kw) if method == "attribution"
                 else TokenAblation(pipe, d["num_inference_steps"], d["guidance_scale"],
                                 **({} if ablation_mode is None else {"mode": ablation_mode}), **kw))
    if prompts is not None:
        res = explain_prompts(explainer, texts, checkpoint=out / "attributions.json", progress=True)
        for r in res.results:
            out_console.print(r.to_rich(), f" -> {r.top_word}" + (f" (near tie with {r.runner_up_text()})" if r.near_tie else ""))
        write_outputs(res, out)
        notes = [f"{res.n_truncated} longer than the model reads, explained on their first tokens: column truncated"
                 ] if res.n_truncated else []
        if res.n_near_ties:
            notes.append(f"{res.n_near_ties} whose top word leads the second by under {DECISIVE_LEAD:.0%}, a near tie: column top_lead")
        cut = f" ({'; '.join(notes)})" if notes else ""
        out_console.print(f"explained {len(res)} prompt{'s' if len(res) != 1 else ''}{cut}; wrote {out}/attributions.json, words.parquet and attributions.html")
        return
    res = explainer.attribute(prompt)
    out_console.print(res.to_rich())
    ranked = res.ranking()
    more = f" ... and {len(ranked) - RANKED_SHOWN} more words" if len(ranked) > RANKED_SHOWN else ""
    out_console.print(" ".join(f"{w}={v:.3g}" for w, v in ranked[:RANKED_SHOWN]) + more)
    lead = res.lead_text()
    if lead:
        out_console.print(f'top word "{res.top_word}": {lead}', highlight=False)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        res.save(out / "attribution.json")
        res.plot(out / "attribution.png")
        (out / "attribution.html").write_text(res.to_html(), encoding="utf-8")
        out_console.print(f"wrote {out}/attribution.json, .png and .html")


@app.command()
def mitigate(
    prompts: Path = typer.Option(..., help=f"prompts to mitigate ({PROMPT_FILES})"),
    column: Optional[str] = typer.Option(None, help=COLUMN_HELP),
    flagged: bool = typer.Option(False, "--flagged", help="only the prompts detect flagged (its results file, with a calibration)"),
    model: str = typer.Option("memlab"),
    method: str = typer.Option("embedding", help="embedding (Wen et al.), rta, rna, gni or word_repetition"),
    target: Optional[float] = typer.Option(None, help="target loss (embedding): the norm at steps 0..loss-steps-1"),
    loss_steps: Optional[int] = typer.Option(None, min=1, help="embedding: sampling steps in the loss (default 1 = first "
                                             "step, Wen et al.)"),
    positions: Optional[str] = typer.Option(None, help="embedding: positions optimized: all (the default: after BOS, Wen "
                                            "et al.) or eos (EOS and padding: every word's output kept)"),
    rewrite: Optional[str] = typer.Option(None, help="embedding: a prompt above the target starts from its rna or rta "
                                          "rewrite (prompts below it stay untouched)"),
    calibration: Optional[Path] = typer.Option(None, help="embedding: take the target from a calibration file's threshold"),
    lr: Optional[float] = typer.Option(None, help="embedding: AdamW's learning rate (default 0.05)"),
    max_iters: Optional[int] = typer.Option(None, min=0, help="embedding: optimization steps at most (default 10)"),
    generations: int = typer.Option(4, min=1),
    seed: int = SEED,
    n_tokens: Optional[int] = typer.Option(None, help="rta: random words added (default 4)"),
    n_numbers: Optional[int] = typer.Option(None, help="rna: random numbers added (default 4)"),
    n_repeats: Optional[int] = typer.Option(None, help="word_repetition: prompt words added again (default 2)"),
    placement: Optional[str] = typer.Option(None, help="rta, rna: where the added words go: random (each at a random "
                                            "place among the prompt's words, as in Somepalli et al.; the default) or end "
                                            "(appended; just before the model's 77-token cut for a prompt that fills it)"),
    sigma: Optional[float] = typer.Option(None, help="gni: noise standard deviation (default 0.1)"),
    num_inference_steps: Optional[int] = NUM_INFERENCE_STEPS,
    guidance_scale: Optional[float] = GUIDANCE_SCALE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: Optional[List[Path]] = LORA,
    lora_scale: Optional[List[float]] = LORA_SCALE,
    textual_inversion: Optional[List[str]] = TEXTUAL_INVERSION,
    train_images: Optional[str] = typer.Option(None, help="measure replication against these training images (an image "
                                               "folder, .parquet / .jsonl / .json / .csv / .tsv table, WebDataset .tar shards or saved datasets folder), on any "
                                               "model (MemLab models are measured by their manifest without it)"),
    image_column: Optional[str] = typer.Option(None, help="image column of a --train-images table"),
    sscd: Optional[Path] = typer.Option(None, help="SSCD TorchScript file for --train-images (cosine >= 0.5 is a copy); "
                                        "without it, pixel correlation of thumbnails (no weights)"),
    clip: Optional[Path] = typer.Option(None, help="local CLIP folder (transformers, safetensors): alignment as CLIP score "
                                        "against the original prompt"),
    out: Path = typer.Option(Path("mitigate-out"), help="folder for results, image grid and loss trajectories"),
):
    """Mitigate memorized prompts at inference; writes before/after images, loss trajectories and measures
    (resumes a killed run from OUT/parts)."""
    from .core.prompts import read_prompts

    texts = read_prompts(prompts, column, flagged)  # bad input fails before torch and the model load
    if (sscd is not None or image_column is not None) and train_images is None:
        raise InputError("--sscd and --image-column measure replication against --train-images: give it too")
    _check_writable(out)
    from .core.loading import load_pipeline
    from .detect import Calibration
    from .mitigate import BASELINES, EmbeddingOptimization
    from .mitigate.baselines import check_placement
    from .mitigate.measures import chosen_measures
    from .mitigate.parts import mitigate_in_parts
    from .mitigate.report import apply_measures, save_nearest_images, save_outputs

    if method == "embedding":
        if (target is None) == (calibration is None):
            raise DiffmemError("give exactly one of --target and --calibration for the embedding method")
        source = "given"
    elif method not in BASELINES:
        raise DiffmemError(f"unknown method {method!r}: use embedding, {', '.join(sorted(BASELINES))}")
    misplaced, given = _mode_options({
        "embedding": {"--target": ("target", target), "--calibration": ("calibration", calibration),
                      "--loss-steps": ("loss_steps", loss_steps), "--positions": ("positions", positions),
                      "--rewrite": ("rewrite", rewrite), "--lr": ("lr", lr), "--max-iters": ("max_iters", max_iters)},
        "rta": {"--n-tokens": ("n_tokens", n_tokens), "--placement": ("placement", placement)},
        "rna": {"--n-numbers": ("n_numbers", n_numbers), "--placement": ("placement", placement)},
        "word_repetition": {"--n-repeats": ("n_repeats", n_repeats)}, "gni": {"--sigma": ("sigma", sigma)}}, {method})
    if misplaced:
        one = len(misplaced) == 1
        raise InputError(f"{', '.join(misplaced)} {'is an option' if one else 'are options'} of another method than "
                         f"--method {method}; leave {'it' if one else 'them'} out")
    check_placement(placement, "--placement")  # before the model loads
    optimization = {k: v for k, v in given.items() if k not in ("target", "calibration")}  # the target is passed apart
    # the chosen measures load (and read the training images) before the model, so a bad path costs nothing
    replication, alignment = chosen_measures(train_images, sscd, clip, image_column, progress=True)
    _hold(out)
    pipe = load_pipeline(model, device=device, dtype=dtype, **_adapters(lora, lora_scale, textual_inversion))
    d = _sampler(pipe, num_inference_steps, guidance_scale)
    kw = dict(generations=generations, seed=seed, num_inference_steps=d["num_inference_steps"], guidance_scale=d["guidance_scale"])
    if method == "embedding" and calibration is not None:
        # refused unless it calibrates this loss (same scored steps, seeds and sampler steps)
        m = EmbeddingOptimization.from_calibration(pipe, Calibration.load(calibration), source=f"calibration {calibration}",
                                                   **optimization, **kw)
    elif method == "embedding":
        m = EmbeddingOptimization(pipe, target, target_source=source, **optimization, **kw)
    else:
        m = BASELINES[method](pipe, **given, **kw)
    # saved in parts of 8 prompts under OUT/parts: a killed run redoes at most one part
    res = mitigate_in_parts(m, texts, out / "parts", progress=True)
    apply_measures(pipe, res, replication, alignment)
    summary = save_outputs(res, out)
    if save_nearest_images(res, replication, out):
        summary += f"\nthe training image nearest to each prompt's generations before mitigation: {out / 'nearest_*.png'}"
    _remove_parts(out / "parts")  # the joined result holds everything they did
    out_console.print(summary)


@bench_app.command("detect")
def bench_detect_cmd(
    data: Optional[str] = typer.Option(None, help="memlab (default), or a .csv with a label column"),
    positives: Optional[Path] = typer.Option(None, help="memorized prompts, one file (.txt / .jsonl, e.g. sdv1_500_memorized.jsonl)"),
    negatives: Optional[Path] = typer.Option(None, help="non-memorized prompts, one file"),
    label_column: str = typer.Option("label"),
    column: Optional[str] = typer.Option(None, help=COLUMN_HELP),
    model: str = typer.Option("memlab"),
    out: Path = typer.Option(Path("bench-detect"), help="folder for bench_detect.json and bench_detect_roc.png"),
    generations: str = typer.Option("1,4", help="generation counts for the grid"),
    seed: int = SEED,
    batch_size: int = typer.Option(64, min=1),
    black_box: bool = typer.Option(True, help="also run the seed-consistency (black-box) detector"),
    black_box_modes: str = typer.Option("x0,images", help="x0 (one step, cheap) and / or images (full generations)"),
    feature_word_negatives: bool = typer.Option(False, help="MemLab: count captions naming a planted implicit / unintended "
                                                "feature word as negatives in the main split (they are reported in a second split either way)"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: Optional[List[Path]] = LORA,
    lora_scale: Optional[List[float]] = LORA_SCALE,
    textual_inversion: Optional[List[str]] = TEXTUAL_INVERSION,
):
    """AUC and TPR@1%FPR over a grid of steps x generations, a ROC plot and a JSON file. With --lora, for
    example on the captions a LoRA was fine-tuned on (--positives) and others (--negatives): which
    detector sees what the fine-tune memorized."""
    from .bench.detect import bench_detect, labelled_from_files, memlab_labelled
    from .core.loading import load_pipeline, runs_on

    # options of the other source would be ignored without a word
    files = [name for name, v in (("--positives", positives), ("--negatives", negatives)) if v is not None]
    if data not in (None, "memlab") and files:
        raise InputError(f"give --data FILE.csv or --positives and --negatives, not both ({', '.join(files)} given)")
    if data == "memlab" and files:
        raise InputError(f"--data memlab is MemLab's own labelled set: {', '.join(files)} cannot be added to it")
    if data in (None, "memlab") and not files and column is not None:
        raise InputError("--column names the prompt column of --data / --positives / --negatives files, not of MemLab's set")
    if (data not in (None, "memlab") or files) and feature_word_negatives:
        raise InputError("--feature-word-negatives sorts MemLab's own prompts: it does not apply to --data / --positives "
                         "/ --negatives")
    if data in (None, "memlab") and not files:
        from .memlab.verify import load_manifest

        labelled = memlab_labelled(load_manifest(model), feature_word_negatives=feature_word_negatives)
    else:
        labelled = labelled_from_files(data, str(positives) if positives else None, str(negatives) if negatives else None,
                                       label_column, column)
    modes = tuple(m.strip() for m in black_box_modes.split(",") if m.strip())
    if not set(modes) <= {"x0", "images"}:  # before the model loads
        raise InputError(f"--black-box-modes takes x0 and / or images, got {black_box_modes!r}")
    adapters = _adapters(lora, lora_scale, textual_inversion)
    _check_writable(out)
    _hold(out)
    pipe = load_pipeline(model, device=device, dtype=dtype, **adapters)
    res = bench_detect(pipe, labelled, generations=tuple(_steps(generations)), seed=seed, batch_size=batch_size,
                       black_box=black_box, black_box_modes=modes, checkpoint=out / "parts")
    res.settings["runs_on"] = runs_on(pipe)
    files = res.save(out)
    _remove_parts(out / "parts")  # the saved figures are what the scores were for
    out_console.print(res.table())
    out_console.print(f"wrote {files['json']} and {files['png']}")


@bench_app.command("mitigate")
def bench_mitigate_cmd(
    model: str = typer.Option("memlab", help="a MemLab model (the benchmark needs its manifest)"),
    out: Path = typer.Option(Path("bench-mitigate"), help="folder for bench_mitigate.json and bench_mitigate.png"),
    generations: int = typer.Option(4, min=1),
    max_prompts: Optional[int] = typer.Option(None, min=1, help="limit the planted prompts (for a quick run)"),
    only: Optional[str] = typer.Option(None, help='run only the rows whose "method, setting" contains this text'),
    max_reference: Optional[int] = typer.Option(None, min=2, help="calibrate the targets on at most this many "
                                                "non-memorized prompts (for a quick run)"),
    redo: bool = typer.Option(False, "--redo", help="recompute the selected rows even where OUT/rows holds them"),
    device: str = DEVICE,
    dtype: str = DTYPE,
):
    """Replication against alignment for each mitigation method and setting, on MemLab's planted prompts.

    Each finished row is saved in OUT/rows: a killed run resumes at the first unfinished row, and a
    run with --only also lists the rows saved there before under the same settings."""
    from .bench.mitigate import bench_mitigate, check_only
    from .core.loading import load_pipeline, runs_on
    from .memlab.verify import load_manifest

    check_only(only)
    manifest = load_manifest(model)
    _check_writable(out)
    _hold(out)
    pipe = load_pipeline(model, device=device, dtype=dtype)
    res = bench_mitigate(pipe, manifest, generations=generations, max_prompts=max_prompts, only=only,
                         max_reference=max_reference, rows_dir=out / "rows", redo=redo)
    res.settings["runs_on"] = runs_on(pipe)
    files = res.save(out)
    out_console.print(res.table())
    out_console.print(f"wrote {files['json']} and {files['png']}")


@bench_app.command("explain")
def bench_explain_cmd(
    model: str = typer.Option("memlab", help="a MemLab model (the benchmark needs its manifest)"),
    out: Path = typer.Option(Path("bench-explain"), help="folder for bench_explain.json and bench_explain.png"),
    generations: int = typer.Option(1, min=1),
    max_prompts: Optional[int] = typer.Option(None, min=1, help="limit the trigger and verbatim prompts (for a quick run)"),
    outcome_seeds: int = typer.Option(4, min=0, help="seeds per masked generation of each flagged verbatim prompt "
                                      "(which word's masking breaks the replication); 0 skips it"),
    steps: str = typer.Option("0", help="sampling steps the explainers and the flagging detector score, comma-separated "
                              "(0 = first step, Wen et al.)"),
    device: str = DEVICE,
    dtype: str = DTYPE,
):
    """Do attributions point at the trigger phrase, do gradient attribution and ablation agree, and which
    one names the word whose masking breaks a verbatim replication?"""
    from .bench.explain import bench_explain
    from .core.loading import load_pipeline, runs_on
    from .memlab.verify import load_manifest

    scored_steps = _steps(steps)  # a malformed list fails before the model loads
    manifest = load_manifest(model)
    _check_writable(out)
    _hold(out)
    pipe = load_pipeline(model, device=device, dtype=dtype)
    res = bench_explain(pipe, manifest, generations=generations, max_prompts=max_prompts, outcome_seeds=outcome_seeds,
                        checkpoint=out / "parts", scored_steps=scored_steps)
    res.settings["runs_on"] = runs_on(pipe)
    path = res.save(out)
    png = res.plot(out / "bench_explain.png")
    _remove_parts(out / "parts")  # none when nothing was flagged or --outcome-seeds 0
    out_console.print(res.table())
    for bar, ok in res.bars().items():
        out_console.print(f"{'PASS' if ok else 'FAIL'}  {bar}")
    out_console.print(f"wrote {path} and {png}")
    raise typer.Exit(0 if all(res.bars().values()) else 1)


@bench_app.command("categorize")
def bench_categorize_cmd(
    model: str = typer.Option("memlab", help="a MemLab model (the benchmark needs its manifest)"),
    out: Path = typer.Option(Path("bench-categorize"), help="folder for bench_categorize.json (and the profile with --keep-profile)"),
    n: int = typer.Option(16, min=2, help="generations per prompt"),
    max_prompts: Optional[int] = typer.Option(None, min=1, help="limit the novel prompts (for a quick run)"),
    keep_profile: bool = typer.Option(False, help="also save the profile with its images under OUT/profile"),
    device: str = DEVICE,
    dtype: str = DTYPE,
):
    """The three kinds of memorization against MemLab's manifest, per expectation route
    (a killed run resumes from OUT/parts)."""
    from .bench.categorize import bench_categorize
    from .core.loading import load_pipeline, runs_on
    from .memlab.verify import load_manifest

    manifest = load_manifest(model)
    _check_writable(out)
    _hold(out)
    pipe = load_pipeline(model, device=device, dtype=dtype)
    res = bench_categorize(pipe, manifest, n=n, max_prompts=max_prompts,
                           profile_out=out / "profile" if keep_profile else None, checkpoint=out / "parts")
    res.settings["runs_on"] = runs_on(pipe)
    path = res.save(out)
    _remove_parts(out / "parts")  # the saved figures are what the parts were for (--keep-profile keeps images)
    out_console.print(res.table())
    for bar, ok in res.bars().items():
        out_console.print(f"{'PASS' if ok else 'FAIL'}  {bar}")
    out_console.print(f"wrote {path}")
    raise typer.Exit(0 if all(res.bars().values()) else 1)


@app.command()
def categorize(
    prompts: Path = typer.Option(..., help="prompts: .txt (one per line), .jsonl, .json, .csv / .tsv or .parquet"),
    model: str = typer.Option("memlab", help="a local pipeline folder, a hub id, or memlab"),
    out: Path = typer.Option(Path("categorize-out"), help="folder for profile.json / profile.parquet and one PNG per prompt"),
    column: Optional[str] = typer.Option(None, help=COLUMN_HELP),
    flagged: bool = typer.Option(False, "--flagged", help="only the prompts detect flagged (its results file, with a calibration)"),
    n: int = typer.Option(16, min=2, help="generations per prompt"),
    tau: float = typer.Option(0.8, help="a feature is consistent when it appears in at least this share of generations"),
    controls: Optional[Path] = typer.Option(None, help="unrelated prompts for the lift test (MemLab: its novel prompts)"),
    extractor: str = typer.Option("memlab", help="memlab (MemLab's attribute reader), clip:PATH (a local CLIP) or vlm:PATH (a local vision-language model such as LLaVA) with --vocabulary"),
    vocabulary: Optional[Path] = typer.Option(None, help="YAML {feature: description} for clip:PATH / vlm:PATH"),
    expectations: Optional[Path] = typer.Option(None, help="YAML {concept: \\[features]}: what a prompt word implies; "
                                                "the features as the extractor names them (others are refused)"),
    embedding: bool = typer.Option(False, help="also decide 'implied' with the bundled sentence-embedding model"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: Optional[List[Path]] = LORA,
    lora_scale: Optional[List[float]] = LORA_SCALE,
    textual_inversion: Optional[List[str]] = TEXTUAL_INVERSION,
):
    """Features that appear across seeds, each called explicit, implicit or unintended, with its evidence
    (resumes a killed run from OUT/parts)."""
    from .core.prompts import read_prompts

    items = read_prompts(prompts, column, flagged)  # bad input fails before torch and the model load
    ctrl = read_prompts(controls, column) if controls else None
    _check_writable(out)  # as is an unwritable --out: not after minutes of loading the extractor and the model
    from .categorize import (CLIPZeroShotExtractor, ExpectationMap, MemLabExtractor, MemorizationProfiler, VLMExtractor,
                             SentenceEmbeddingExpectation)
    from .categorize.profiler import check_expectations, speed_text
    from .core.loading import load_pipeline
    if extractor == "memlab":
        if vocabulary is not None:  # MemLab's reader has its own features: a vocabulary here would go unread
            raise InputError("--vocabulary names the features of a clip:PATH or vlm:PATH extractor; "
                             "the memlab extractor reads MemLab's own")
        ext = MemLabExtractor()
    elif extractor.startswith(("clip:", "vlm:")):
        kind, _, path = extractor.partition(":")
        if vocabulary is None:
            raise InputError(f"{kind}:PATH needs --vocabulary, a YAML file {{feature: description}}")
        ext = {"clip": CLIPZeroShotExtractor, "vlm": VLMExtractor}[kind](path, _read_yaml_mapping(vocabulary))
    else:
        raise InputError(f"unknown extractor {extractor!r}: use memlab, clip:PATH or vlm:PATH")
    sources = []
    if expectations is not None:
        sources.append(ExpectationMap.from_yaml(expectations))
    check_expectations(ext, sources)  # before the model loads
    if embedding:
        sources.append(SentenceEmbeddingExpectation.minilm())
    tracer = None
    _hold(out)
    pipe = load_pipeline(model, device=device, dtype=dtype, **_adapters(lora, lora_scale, textual_inversion))
    if extractor == "memlab":
        from .categorize import TrainingTracer
        from .memlab import dataset as ds
        from .memlab.verify import load_manifest

        try:
            manifest = load_manifest(model)
            tracer = TrainingTracer.from_memlab(ds.build(ds.MemLabConfig(**manifest["config"])))
        except DiffmemError:
            tracer = None
    prof = MemorizationProfiler(pipe, ext, n=n, tau=tau, control_prompts=ctrl, expectations=sources, tracer=tracer)
    # generations saved in parts of 8 prompts under OUT/parts: a killed run resumes
    res = prof.profile(items, progress=True, checkpoint=out / "parts")
    res.save(out)
    for i in range(len(res.prompts)):
        res.plot(out / f"prompt_{i:04d}.png", prompt_index=i)
    _remove_parts(out / "parts")  # the saved profile holds everything they did
    from rich.table import Table

    table = Table("prompt", "feature", "kind", "frequency", "lift", "evidence")
    shown = None
    for r in res.memorized():  # a prompt's features together, the prompt written once over them
        if shown is not None and r["prompt"] != shown:
            table.add_section()
        table.add_row(r["prompt"] if r["prompt"] != shown else "", r["description"], r["kind"], f"{r['frequency']:.2f}",
                      f"{r['lift']:.1f}", r["evidence"])
        shown = r["prompt"]
    out_console.print(table)
    n_features, n_prompts = len(res.memorized()), len(res.prompts)
    out_console.print(f"{n_features} memorized feature{'' if n_features == 1 else 's'} over {n_prompts} "
                      f"prompt{'' if n_prompts == 1 else 's'}; "
                      f"{speed_text(res.seconds_per_prompt)}; results in {out}")


def _read_yaml_mapping(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or not data:
        raise InputError(f"{path} must hold a non-empty mapping")
    return data  # its entries are checked by the extractor


@app.command()
def train(
    data: str = typer.Option(..., help="memlab, an image folder with metadata.jsonl/csv, a .parquet/.jsonl/.json/.csv/.tsv file, WebDataset .tar shards "
                                    "(columns by extension: txt, jpg / png), a saved datasets folder, or a hub dataset id owner/name (cached)"),
    out: Path = typer.Option(..., help="output folder: checkpoints, and the trained pipeline in OUT/model"),
    model: str = typer.Option(..., help="pipeline to fine-tune: a local folder, a hub id, or memlab"),
    steps: int = typer.Option(1000, min=1),
    batch_size: int = typer.Option(32, min=1),
    lr: float = typer.Option(1e-4),
    prediction_type: Optional[str] = typer.Option(None, help="epsilon or v_prediction (default: the model's own)"),
    train_text_encoder: bool = typer.Option(False, "--train-text-encoder/--freeze-text-encoder"),
    ema: bool = typer.Option(False, help="keep an exponential moving average of the weights"),
    caption_column: Optional[str] = CAPTION_COLUMN,
    image_column: Optional[str] = IMAGE_COLUMN,
    checkpoint_every: int = typer.Option(500, min=0),
    mem_filter_threshold: Optional[float] = typer.Option(None, help="drop samples whose text-conditional noise norm is >= this (Wen et al.)"),
    seed: int = SEED,
    allow_pickle: bool = typer.Option(False, help="allow loading pickle (.bin) weights: only for sources you trust"),
    device: str = DEVICE,
    mixed_precision: str = typer.Option("no", help="no, bf16 or fp16: autocast the forward passes (weights stay float32)"),
    lora_rank: Optional[int] = typer.Option(None, min=1, help="train a LoRA of this rank on the attention (the text "
                                            "encoder's too with --train-text-encoder) instead of every weight; OUT/model "
                                            "then holds the LoRA, to audit with --model M --lora OUT/model"),
):
    """Train or fine-tune a Stable Diffusion pipeline on image-caption pairs (resumes from OUT/checkpoint)."""
    from .train.api import TRAIN_LOG, TRAINING_PLOT, train_pipeline

    _check_writable(out)
    _hold(out)
    model_dir = train_pipeline(model, data, out, steps=steps, batch_size=batch_size, lr=lr, prediction_type=prediction_type,
                               train_text_encoder=train_text_encoder, ema=ema, caption_column=caption_column,
                               image_column=image_column, checkpoint_every=checkpoint_every,
                               mem_filter_threshold=mem_filter_threshold, seed=seed, allow_pickle=allow_pickle,
                               device=device, mixed_precision=mixed_precision, lora_rank=lora_rank)
    import json

    log = json.loads((model_dir / TRAIN_LOG).read_text())
    n = log["skipped_rows"]
    skipped = f"; {n} row{'s' if n > 1 else ''} skipped, listed in {Path(out) / 'data_problems.json'}" if n else ""
    what = (f"trained LoRA (rank {lora_rank}) saved to {model_dir} (audit it with --model {model} --lora {model_dir})"
            if lora_rank is not None else f"trained pipeline saved to {model_dir}")
    out_console.print(f"{what} ({log['rows']} image-caption pairs{skipped}); loss curve in {model_dir / TRAINING_PLOT}",
                      highlight=False, markup=False)
    mf = log["mem_filter"]
    if mf is not None:
        out_console.print(f"memorization filter (norm >= {mf['threshold']:g}): dropped {mf['dropped']} of {mf['samples']} "
                          f"samples ({mf['dropped'] / max(mf['samples'], 1):.1%}) over {len(mf['epochs'])} epoch(s); "
                          f"per epoch in {model_dir / TRAIN_LOG} (mem_filter.epochs)")


@app.command()
def scan(
    dataset: str = typer.Argument(..., help="memlab, an image folder (metadata.jsonl/csv or .txt captions), a .parquet/.jsonl/.json/.csv/.tsv file, "
                                 "WebDataset .tar shards (a shard or a folder of them), a saved datasets folder, or a hub dataset id "
                                 "owner/name (from datasets' cache when offline)"),
    out: Path = typer.Option(..., help="output folder: results, report, and the resumable shard files"),
    checks: str = typer.Option(",".join(("image_duplicates", "caption_duplicates", "triggers")),
                               help="comma-separated: image_duplicates, caption_duplicates, triggers, memorization"),
    caption_column: Optional[str] = CAPTION_COLUMN,
    image_column: Optional[str] = IMAGE_COLUMN,
    shard_size: int = typer.Option(1024, min=1, help="rows per checkpointed shard (bounds memory)"),
    limit: Optional[int] = typer.Option(None, min=1, help="scan only the first LIMIT rows"),
    min_support: Optional[int] = typer.Option(None, min=2, help="triggers: a trigger ties at least this many distinct "
                                              "captions to one image cluster (default 5)"),
    min_purity: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="triggers: share of a trigger's captions "
                                               "inside its cluster (default 0.9)"),
    caption_jaccard: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="caption_duplicates: near-duplicate "
                                                    "captions' estimated Jaccard of word 1-2 grams (default 0.8)"),
    image_index: Optional[str] = typer.Option(None, help="image_duplicates: the thumbnails' neighbour search: exact, "
                                              "approximate (faiss IVF: a fraction of the time, most of the neighbours) "
                                              "or auto (the default: approximate past 100,000 images)"),
    model: Optional[str] = typer.Option(None, help="pipeline for the memorization check (memlab, a folder or a hub id)"),
    timestep: Optional[int] = typer.Option(None, min=0, help="memorization check: the timestep every row is noised to (default: half the training schedule)"),
    memorization_threshold: Optional[float] = typer.Option(None, help="memorization check: flag rows above this noise norm (default: median + 3 MAD)"),
    seed: int = SEED,
    device: str = typer.Option("cpu", help="memorization check: torch device (cpu, cuda, cuda:1, mps)"),
    dtype: str = typer.Option("float32", help="memorization check: the model's dtype (float32, float16, bfloat16)"),
    lora: Optional[List[Path]] = typer.Option(None, help="memorization check: a LoRA fused into the model (.safetensors "
                                              "file or the folder save_lora_weights wrote); repeat for several"),
    lora_scale: Optional[List[float]] = typer.Option(None, help="memorization check: the LoRA's scale (default 1); one "
                                                     "for every --lora, or one per --lora"),
    textual_inversion: Optional[List[str]] = typer.Option(None, help="memorization check: a textual-inversion embedding "
                                                          "added to the model (FILE or TOKEN=FILE; repeat for several)"),
):
    """Scan a captioned training set for duplicated images and captions and word-level trigger phrases (resumes from OUT)."""
    from .scan import CHECKS, DatasetScanner
    from .scan.report import write_report
    from .scan.scanner import check_scan_folder

    _check_writable(out)
    check_scan_folder(out)
    names = tuple(c.strip() for c in checks.split(",") if c.strip())
    unused, given = _mode_options({
        "triggers": {"--min-support": ("min_support", min_support), "--min-purity": ("min_purity", min_purity)},
        "caption_duplicates": {"--caption-jaccard": ("caption_jaccard", caption_jaccard)},
        "image_duplicates": {"--image-index": ("image_index", image_index)}}, set(names))
    if unused and set(names) <= set(CHECKS):  # a misspelt check is named as such by the scanner
        raise InputError(f"{', '.join(unused)} {'sets a check' if len(unused) == 1 else 'set checks'} not among "
                         f"--checks {','.join(names)}")
    _hold(out)
    scanner = DatasetScanner(dataset, out / "work", caption_column=caption_column, image_column=image_column,
                             checks=names, shard_size=shard_size, limit=limit, model=model, timestep=timestep,
                             memorization_threshold=memorization_threshold, seed=seed, device=device, dtype=dtype,
                             **given, **_adapters(lora, lora_scale, textual_inversion))
    result = scanner.scan()
    result.save(out)
    report = write_report(result, out, result.thumbs)
    for rec in result.summary.to_dict("records"):
        out_console.print(f"{rec['check']:>20}: {rec['issues']} rows flagged  {rec['detail']}", highlight=False)
    for t in result.info.get("triggers", [])[:10]:
        out_console.print(f"  trigger {t['phrase']!r}: cluster {t['cluster']}, support {t['support']}, purity {t['purity']:.2f}",
                          highlight=False, markup=False)
    out_console.print(f"results in {out} (scan_rows.parquet, scan_summary.json); report {report}")


@app.command("verify-triggers")
def verify_triggers_cmd(
    scan_dir: Path = typer.Argument(..., help="the output folder of a diffmem scan"),
    model: str = typer.Option("memlab", help="the model trained on the scanned data (memlab, a folder or a hub id)"),
    contexts: int = typer.Option(8, min=1, help="new captions per trigger phrase"),
    seeds: int = typer.Option(2, min=1, help="generations per caption"),
    threshold: float = typer.Option(0.4, help="correlation with the cluster's median image that counts as replication"),
    phrase: Optional[list[str]] = typer.Option(None, help="verify only these phrases (repeatable)"),
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: Optional[List[Path]] = LORA,
    lora_scale: Optional[List[float]] = LORA_SCALE,
    textual_inversion: Optional[List[str]] = TEXTUAL_INVERSION,
):
    """Generate from each trigger phrase in new captions (and random phrases in the same captions) and
    measure how often the cluster's image comes back; writes trigger_verification.json to SCAN_DIR
    (resumes a killed run from SCAN_DIR/verify_parts)."""
    from .core.loading import load_pipeline
    from .scan import ScanResult
    from .scan.verify import VerifySettings, verify_triggers

    settings = VerifySettings(contexts=contexts, seeds=tuple(range(seeds)), threshold=threshold, seed=seed)
    result = ScanResult.load(scan_dir)
    if not result.images:
        raise InputError(f"{scan_dir} holds no cluster images (scan_images.npz): verification needs a scan with images")
    _check_writable(scan_dir)
    _hold(scan_dir)
    pipe = load_pipeline(model, device=device, dtype=dtype, **_adapters(lora, lora_scale, textual_inversion))
    parts = scan_dir / "verify_parts"
    res = verify_triggers(pipe, result, result.cluster_images(), result.images["mean"], settings, phrases=phrase,
                          checkpoint=parts)
    res.save(scan_dir)
    _remove_parts(parts)  # the saved generations table is what the parts were for
    res.plot(scan_dir / "trigger_verification.png")
    for rec in res.table.sort_values("replication_rate").to_dict("records"):
        out_console.print(f"{rec['phrase']!r:>24}: replicates {rec['replication_rate']:.2f}, random phrase "
                          f"{rec['baseline_rate']:.2f} ({rec['contexts']} new captions)", highlight=False, markup=False)
    sm = res.summary
    out_console.print(f"all triggers: {sm['replication_rate']:.3f} of {sm['generations'] // 2} generations replicate; "
                      f"random phrases {sm['baseline_rate']:.3f}. Written to {scan_dir}/trigger_verification.json")


@memlab_app.command("build")
def memlab_build(
    out: Path = typer.Option(..., help="folder for the image folder (PNG + metadata.jsonl) and memlab_manifest.json: "
                                        "new, empty or an earlier MemLab build (anything else is refused)"),
    control: bool = typer.Option(False, help="the duplication-free control set: each planted pair once"),
    seed: int = SEED,
):
    """Recreate the MemLab dataset as an image folder with captions and its ground-truth manifest."""
    from .memlab.export import export_imagefolder

    _check_writable(out)
    _hold(out, resumes=False)  # it starts over
    n = export_imagefolder(out, seed=seed, control=control)
    out_console.print(f"wrote {n} rows to {out} (metadata.jsonl, images/, memlab_manifest.json)")


@memlab_app.command("train")
def memlab_train(
    out: Path = typer.Option(..., help="working folder (new, empty or an earlier run's: checkpoints); the model lands in OUT/model"),
    control: bool = typer.Option(False, help="train the duplication-free control model"),
    steps: Optional[int] = typer.Option(None, help="override the recipe's step count (for quick trials)"),
    threads: Optional[int] = typer.Option(None, min=1, help="torch threads (2 runs side by side: 1 each)"),
    vae_from: Optional[str] = typer.Option(
        None, help="reuse a VAE stage of this recipe instead of training it (about 20 minutes): OUT/vae of the main "
                   "run, or a finished MemLab model folder ('memlab': the shipped one). The main and control runs "
                   "train the same VAE on the same distinct images with the same seed"),
    device: str = DEVICE,
):
    """Reproduce the shipped MemLab model with the recorded seed and settings (about 75 minutes on 2 cores)."""
    from dataclasses import replace

    from .memlab import recipe

    _check_writable(out)
    rc = recipe.MemLabRecipe()
    if control:
        rc = recipe.control_recipe(rc)
    if steps is not None:
        rc = replace(rc, train=replace(rc.train, steps=steps))
    if threads is not None:
        rc = replace(rc, train=replace(rc.train, threads=threads))
    _hold(out)
    if vae_from is not None:
        recipe.reuse_vae(vae_from, out, rc)
    model_dir = recipe.run(rc, out, device=device)
    out_console.print(f"MemLab model saved to {model_dir}")


@memlab_app.command("verify")
def memlab_verify(
    model: str = typer.Option("memlab", help="MemLab model folder (default: the shipped one)"),
    control_model: Optional[str] = typer.Option(None, help="the duplication-free control model, to report its AUC too"),
    seeds: int = typer.Option(8, min=1),
    out: Optional[Path] = typer.Option(None, help="write memlab_verify.json and per-prompt details here (a killed run "
                                       "resumes from the prompt groups it finished)"),
    json_output: bool = typer.Option(False, "--json", help="print the figures as JSON"),
    device: str = DEVICE,
):
    """Measure the MemLab bars (replication, separability, templates, features, generalization)."""
    import json

    from .core.results import to_jsonable
    from .memlab.verify import VerifySettings, print_table, verify

    if out is not None:
        _check_writable(out)  # before minutes of generation, not after
        _hold(out)
    res = verify(model, VerifySettings(seeds=seeds), control_model=control_model, out=out, device=device)
    print_table(res, out_console)
    if json_output:
        out_console.print_json(json.dumps(to_jsonable({k: v for k, v in res.items() if k != "label_disagreements"})))
    raise typer.Exit(0 if res["all_bars_pass"] else 1)


@memlab_app.command("sample")
def memlab_sample(
    out: Path = typer.Option(Path("memlab-sample"), help="folder for the grid PNG and the check JSON"),
    model: str = typer.Option("memlab"),
    seeds: int = typer.Option(4, min=1),
    device: str = DEVICE,
):
    """A sample grid of planted and novel prompts, each image checked against the manifest."""
    from .memlab.sample import sample_grid

    _check_writable(out)
    _hold(out, resumes=False)  # it starts over
    res = sample_grid(model, out, seeds=seeds, device=device)
    out_console.print(res["summary"])


@app.command()
def audit(
    model: str = typer.Option("memlab", help="a local pipeline folder, a hub id, or memlab"),
    prompts: Optional[Path] = typer.Option(None, help=f"prompts to audit ({PROMPT_FILES}); default: MemLab's audit set"),
    column: Optional[str] = typer.Option(None, help=COLUMN_HELP),
    reference: Optional[Path] = typer.Option(None, help="non-memorized prompts to calibrate on; default: MemLab's reference set"),
    train_data: Optional[str] = typer.Option(None, help="training data to scan (as for diffmem scan: memlab, a folder, a table file); "
                                             "a model without MemLab's manifest has its mitigation measured against it"),
    train_caption_column: Optional[str] = typer.Option(None, help=f"--train-data's {CAPTION_COLUMN_HELP}"),
    train_image_column: Optional[str] = typer.Option(None, help=f"--train-data's {IMAGE_COLUMN_HELP}"),
    sscd: Optional[Path] = typer.Option(None, help="SSCD TorchScript file: mitigation's replication against --train-data "
                                        "by SSCD (cosine >= 0.5) instead of pixel correlation"),
    clip: Optional[Path] = typer.Option(None, help="local CLIP folder (transformers, safetensors): mitigation's alignment "
                                        "as CLIP score against the prompt as written"),
    out: Path = typer.Option(Path("audit"), help="folder for each stage's results and report.html"),
    fpr: float = typer.Option(0.01, callback=_rate, help="calibrated false-positive rate"),
    seed: int = SEED,
    detect_method: str = typer.Option("noise-norm", help="detection: noise-norm (Wen et al.) or seed-consistency (the first "
                                      "step's x0 alike across seeds; better on a LoRA fine-tune of MemLab)"),
    generations: Optional[int] = typer.Option(None, min=1, help="detection: seeded generations per prompt (default: 1 for "
                                              "noise-norm, averaged; 4 for seed-consistency, at least 2)"),
    skip: str = typer.Option("", help="stages to skip, comma-separated: explain, categorize, mitigate, scan"),
    grid: bool = typer.Option(True, help="with labelled prompts: also the steps x generations grid"),
    max_explain: Optional[int] = typer.Option(None, min=0, help="explain at most this many flagged prompts (highest scores first)"),
    explain_method: str = typer.Option("attribution", help="explain: attribution (gradients, Wen et al.) or ablation (score drop "
                                       "with each word masked)"),
    max_categorize: int = typer.Option(12, min=0, help="categorize at most this many flagged prompts"),
    categorize_n: int = typer.Option(8, min=2, help="generations per categorized prompt"),
    steps: str = typer.Option("0,1,2,3,4", help="detection: sampling steps scored, comma-separated (0 = first step)"),
    categorize_controls: int = typer.Option(4, min=0, help="unflagged prompts categorized beside the flagged ones"),
    max_mitigate: Optional[int] = typer.Option(16, min=0, help="mitigate at most this many flagged prompts (highest scores first)"),
    mitigate_generations: int = typer.Option(4, min=1, help="mitigation: seeded generations per prompt"),
    mitigate_iters: int = typer.Option(20, min=0, help="mitigation: embedding optimization iterations at most"),
    mitigate_loss_steps: int = typer.Option(5, min=1, help="mitigation: the loss is the norm over the first k sampling steps (1 = Wen et al.)"),
    mitigate_positions: str = typer.Option("eos", help="mitigation: positions optimized: eos (EOS and padding, every word's "
                                           "output kept) or all (after BOS, Wen et al.)"),
    mitigate_rewrite: str = typer.Option("rna", help="mitigation: a prompt above the target starts from its rna or rta "
                                         "rewrite, or from the prompt itself (none)"),
    batch_size: int = typer.Option(32, min=1),
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: Optional[List[Path]] = LORA,
    lora_scale: Optional[List[float]] = LORA_SCALE,
    textual_inversion: Optional[List[str]] = TEXTUAL_INVERSION,
):
    """Detect, explain, categorize, mitigate and (with --train-data) scan, then write OUT/report.html.

    Re-running with the same settings reuses every finished stage."""
    from .report.audit import Audit, AuditSettings

    settings = AuditSettings(model=model, **_adapters(lora, lora_scale, textual_inversion), prompts=str(prompts) if prompts else None, column=column,
                             reference=str(reference) if reference else None, train_data=train_data,
                             train_caption_column=train_caption_column, train_image_column=train_image_column, fpr=fpr, seed=seed,
                             sscd=str(sscd) if sscd else None, clip=str(clip) if clip else None,
                             detect_method=detect_method.replace("-", "_"), generations=generations, batch_size=batch_size,
                             grid=grid, max_explain=max_explain,
                             explain_method=explain_method,
                             categorize_n=categorize_n, max_categorize=max_categorize, categorize_controls=categorize_controls,
                             max_mitigate=max_mitigate, mitigate_generations=mitigate_generations, mitigate_iters=mitigate_iters,
                             mitigate_loss_steps=mitigate_loss_steps, mitigate_positions=mitigate_positions,
                             mitigate_rewrite=None if mitigate_rewrite == "none" else mitigate_rewrite, steps=tuple(_steps(steps)), skip=tuple(x.strip() for x in skip.split(",") if x.strip()))
    checked = Audit(settings, out, console=console, device=device, dtype=dtype)  # every input checked here
    _hold(out)
    res = checked.run()
    d = res.stages["detect"]["summary"]
    line = f"{d['n_flagged']} of {d['n_prompts']} prompts flagged (threshold {d['threshold']:.4g} at FPR {d['fpr']})"
    if "recall" in d:
        line += f"; planted recall {d['recall']:.3f}, non-memorized flagged {d['false_positive_rate']:.3f}, AUC {d['auc']:.3f}"
    m = res.stages.get("mitigate", {}).get("summary") or {}
    if "replication_before" in m:
        line += f"; mitigation: replication {m['replication_before']:.3f} -> {m['replication_after']:.3f}"
    out_console.print(line, highlight=False, markup=False)
    out_console.print(f"report: {out / 'report.html'}", highlight=False, markup=False)


@app.command("app")
def app_cmd(
    model: str = typer.Option("memlab", help="a local pipeline folder, a hub id, or memlab"),
    calibration: Optional[Path] = typer.Option(None, help="a calibration file (default on MemLab: fit on its reference set)"),
    audit_dir: Optional[Path] = typer.Option(None, "--audit", help="use the calibration of this audit folder"),
    host: str = typer.Option("127.0.0.1", help="address to bind (default: this machine only)"),
    port: int = typer.Option(7860, min=1, max=65535),
    allow_origin: Optional[List[str]] = typer.Option(None, help="a page the app is opened through besides its own "
                                                     "address, e.g. a proxy's https://hub.example.org (repeatable): "
                                                     "its requests are served; other sites' pages are refused"),
    seed: int = SEED,
    generations: int = typer.Option(4, min=1, help="seeds a mitigation optimizes over and shows before / after "
                                    "(an audit's target calibration brings its own)"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    lora: Optional[List[Path]] = LORA,
    lora_scale: Optional[List[float]] = LORA_SCALE,
    textual_inversion: Optional[List[str]] = TEXTUAL_INVERSION,
):
    """A local page: edit a prompt, see its score against the threshold and its words coloured by attribution."""
    from .report.app import AppState, bind, check_origins, page_url, serve

    allowed_origins = check_origins(allow_origin or ())
    sock = bind(host, port)
    state = AppState(model, calibration=calibration, audit=audit_dir, seed=seed, generations=generations, progress=True,
                     device=device, dtype=dtype, **_adapters(lora, lora_scale, textual_inversion))
    out_console.print(f"diffmem app on {page_url(host, port)}  (threshold {state.calibration.threshold:.4g}; Ctrl-C stops)",
                      highlight=False, markup=False)
    serve(state, sock, host, allowed_origins)


@app.command("convert")
def convert_cmd(
    source: Path = typer.Argument(..., help="a pickled LoRA or textual-inversion embedding (.bin / .pt / .ckpt / .pth), "
                                  "a pipeline folder whose weights are pickles, or with --config a single-file "
                                  "checkpoint (.safetensors / .ckpt)"),
    out: Optional[Path] = typer.Option(None, help="the .safetensors file to write (default: beside SOURCE, its name "
                                       "with .safetensors; an A1111 embedding is called by this file's name), or for a "
                                       "pipeline the new folder (default: SOURCE-safetensors beside it; for a "
                                       "single-file checkpoint, STEM-diffusers)"),
    config: Optional[str] = typer.Option(None, help="for a single-file checkpoint: a pipeline of the same architecture "
                                         "(a folder, memlab, or a hub id in the hub cache) whose configurations, "
                                         "tokenizer and sampler it is read with; its weights are not read"),
    ema: bool = typer.Option(True, "--ema/--no-ema", help="for a single-file checkpoint holding EMA weights beside its "
                             "trained ones: take the EMA weights (the releases generate with them), or the trained ones"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace OUT if it exists"),
):
    """Convert pickled weights you trust to safetensors: a LoRA or embedding, for --lora / --textual-inversion,
    or a pipeline folder, for --model; and a single-file checkpoint to a pipeline folder, for --model.

    Read with torch's weights-only unpickler, which rebuilds tensors and plain containers and refuses
    any other object: a pickle that would run code is refused, not run."""
    from .core.convert import convert

    done = convert(source, out, overwrite=overwrite, config=config, ema=ema, progress=True)
    out_console.print(done.describe(), highlight=False, markup=False)
    if done.left_out:
        out_console.print(f"left out (not tensors): {', '.join(done.left_out)}", highlight=False, markup=False)


def _exit(code: int):
    if code == 130:  # Ctrl-C, however it reached us: say so, and that the saved work is not lost
        saved = [f for f in _RESUMES_FROM if f.is_dir() and any(f.iterdir())]
        console.print("interrupted" + (f"; the work saved in {saved[-1]} is kept: run the same command again to go on "
                                       "from it" if saved else ""), highlight=False)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    try:
        _run(argv)
    finally:
        _let_go()


def _run(argv: list[str] | None) -> None:
    try:
        # without standalone mode, click returns (not raises) the code of a typer.Exit; typer >= 0.2x
        # hands Ctrl-C back this way, as 130
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int) and rc:
            _exit(rc)
    except DiffmemError as e:
        console.print(Text.assemble(("error:", "red"), f" {terminal_text(str(e))}"), highlight=False)
        sys.exit(2)
    except typer.Exit as e:
        _exit(e.exit_code)
    except KeyboardInterrupt:
        _exit(130)
    except Exception as e:
        # usage errors (unknown option, value out of range), from click or from the copy of click that
        # typer >= 0.2x vendors as typer._click: matched by class name, which both share
        kinds = {c.__name__ for c in type(e).__mro__}
        if "ClickException" in kinds:
            e.show()
            sys.exit(e.exit_code)
        if "Abort" in kinds:  # click (typer < 0.2x) turns Ctrl-C into Abort: report it as the interrupt it was
            _exit(130)
        raise


if __name__ == "__main__":
    main()
