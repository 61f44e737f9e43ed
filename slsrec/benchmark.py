"""The model benchmark (every model, several seeds, resumable) and the training-speed levers.

``slsrec benchmark`` trains each (model, seed) of :data:`PLAN` with :func:`slsrec.train.train` and
saves each result as soon as it is done (``<out>/results/<model>-s<seed>.json``), so a run cut off
continues where it stopped. It then writes the table and the validation curves into
``docs/benchmarks.md`` and ``docs/img/``.

``slsrec bench-train`` times single training steps under each speed lever (sequence length, sampled
softmax, threads, ``torch.compile``, bf16 autocast) and reports median seconds per step and epoch.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from slsrec.checkpoint import write_json
from slsrec.errors import UserError
from slsrec.registry import MODEL_NAMES, build_model
from slsrec.sessions import leave_one_out, train_batches
from slsrec.tune import SPACE, apply, tuned_options
from slsrec.train import VALID_METRIC, NegativeSampler, TrainConfig, batch_rule, resolve_device, train, train_step

# (model, seeds): 3 seeds for SLSRec and the baselines, 1 for popularity and the ablations.
PLAN: dict[str, int] = {"pop": 1, "gru4rec": 3, "sasrec": 3, "clsr": 3, "slsrec": 3, "slsrec-long": 1,
                        "slsrec-short": 1, "slsrec-nocl": 1, "slsrec-fixed": 1}
HEADLINE = ("NDCG@10", "HR@10", "NDCG@20", "HR@20", "MRR")
STRICT_HEADLINE = ("NDCG@10", "HR@10")


@dataclass(frozen=True)
class Published:
    """A figure from a paper, compared only under its own protocol."""

    model: str
    dataset: str
    protocol: str  # "masked" or "strict" (slsrec.train.PROTOCOLS)
    ndcg10: float
    hr10: float
    source: str


PUBLISHED = (
    Published("SASRec+ (CE)", "ml-1m", "masked", 0.1821, 0.3152,
              "Klenitskiy & Vasilev, RecSys 2023, Table 2; their code filters seen items "
              "(github.com/antklen/sasrec-bert4rec-recsys23, `filter_seen: True`)"),
    Published("BERT4Rec", "ml-1m", "masked", 0.1537, 0.2843, "Klenitskiy & Vasilev, RecSys 2023, Table 2"),
    Published("HSTU-large", "ml-1m", "masked", 0.1893, 0.3294,
              "Zhai et al., ICML 2024, Table 4; their eval filters the input history "
              "(generative-recommenders, `eval_metrics_v2_from_tensors(filter_invalid_ids=True)`)"),
)


def under(metrics: dict, protocol: str) -> dict | None:
    """Test or validation metrics under ``protocol``; results saved before the strict protocol existed
    hold the masked metrics only."""
    if "masked" in metrics:
        return metrics[protocol]
    return metrics if protocol == "masked" else None
DOCS = Path("docs/benchmarks.md")


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__, "gpu": gpu,
            "python": platform.python_version()}


# ---- the model benchmark --------------------------------------------------------------------------


def result_path(out: Path, model: str, seed: int) -> Path:
    return out / "results" / f"{model}-s{seed}.json"


def planned_runs(models: list[str], seeds: int) -> list[tuple[str, int]]:
    """The (model, seed) runs of a benchmark, seed-major: a run cut off early has every model once.

    >>> planned_runs(["pop", "slsrec"], seeds=3)
    [('pop', 0), ('slsrec', 0), ('slsrec', 1), ('slsrec', 2)]
    """
    return [(m, s) for s in range(seeds) for m in models if s < min(seeds, PLAN.get(m, 1))]


def variant(cfg: TrainConfig) -> tuple[str, str]:
    """The label and directory suffix of a benchmark whose training recipe differs from the defaults
    (each variant keeps its own results and its own section of the docs).

    >>> variant(TrainConfig(max_len=50, window="last", epochs=20))
    ('T=50, last windows, <= 20 epochs', '-t50-last-e20')
    >>> variant(TrainConfig())  # the defaults: the main table
    ('', '')
    """
    default = TrainConfig()
    parts = [(f"T={cfg.max_len}", f"-t{cfg.max_len}") if cfg.max_len != default.max_len else None,
             (f"{cfg.window} windows", f"-{cfg.window}") if cfg.window != default.window else None,
             (f"lr decay {cfg.lr_decay:g}", f"-decay{cfg.lr_decay:g}") if cfg.lr_decay != default.lr_decay else None,
             (f"<= {cfg.epochs} epochs", f"-e{cfg.epochs}") if cfg.epochs != default.epochs else None,
             (f"precision {cfg.precision}", f"-{cfg.precision}") if cfg.precision != default.precision else None]
    parts = [p for p in parts if p]
    return ", ".join(label for label, _ in parts), "".join(slug for _, slug in parts)


def run_benchmark(dataset: str, *, seeds: int, models: list[str], out: Path, base: TrainConfig,
                  tuned: Path | None = None, progress: bool = True, log=print) -> list[dict]:
    """Train every (model, seed) not finished yet under ``out``; return all results (old and new).

    With ``tuned`` (a ``slsrec tune`` output), each model with a search space trains with its winning
    options."""
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown:
        raise UserError(f"unknown model {unknown[0]!r}; valid: {', '.join(MODEL_NAMES)}")
    results = []
    for model, seed in planned_runs(models, seeds):
        path = result_path(out, model, seed)
        if path.exists():
            results.append(json.loads(path.read_text()))
            log(f"{model} seed {seed}: done earlier ({path})")
            continue
        log(f"{model} seed {seed}: training")
        cfg = replace(base, dataset=dataset, model=model, seed=seed)
        if tuned is not None and model in SPACE:
            cfg = apply(cfg, tuned_options(tuned, model))
        res = train(cfg, out / "runs" / f"{model}-s{seed}", progress=progress)
        result = {**res.metrics, "history": res.history, "train": asdict(cfg)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, result)  # a result file is complete or absent
        results.append(result)
        log(f"{model} seed {seed}: test {VALID_METRIC} masked {result['test']['masked'][VALID_METRIC]:.4f} "
            f"strict {result['test']['strict'][VALID_METRIC]:.4f}, "
            f"{result['seconds_per_epoch']:.1f} s/epoch, best epoch {result['best_epoch']}")
    return results


def load_results(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]


def results_table(results: list[dict], planned: dict[str, int] | None = None) -> str:
    """Markdown table: mean ± std over seeds of the test metrics under both protocols, and the training
    cost. ``planned`` (model -> seeds) marks the rows that still miss seeds."""
    by_model: dict[str, list[dict]] = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    head = ("| model | seeds | " + " | ".join(f"{k} masked" for k in HEADLINE) + " | "
            + " | ".join(f"{k} strict" for k in STRICT_HEADLINE)
            + " | s/epoch (median) | epochs (best) | time to best (s) | precision, device |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for model in [m for m in MODEL_NAMES if m in by_model]:
        rs = by_model[model]
        strict = [under(r["test"], "strict") for r in rs]
        cells = [_mean_std([under(r["test"], "masked")[k] for r in rs]) for k in HEADLINE]
        cells += [_mean_std([s[k] for s in strict]) if all(strict) else "–" for k in STRICT_HEADLINE]
        seeds = f"{len(rs)}" + (f" of {planned[model]}" if planned and planned.get(model, 0) > len(rs) else "")
        how = ", ".join(sorted({f"{r.get('precision', 'bf16' if r.get('bf16') else 'fp32')}, {r['device']}" for r in rs}))
        # Median epoch from the history: a run paused for a while (another benchmark) keeps its figure.
        spe = statistics.median([h["train_s"] for r in rs for h in r["history"] if h["train_s"]] or [0.0])
        epochs = f"{statistics.mean(r['epochs_run'] for r in rs):.0f} ({statistics.mean(r['best_epoch'] for r in rs):.0f})"
        ttc = statistics.mean(r["time_to_convergence_s"] for r in rs)
        lines.append(f"| {model} | {seeds} | " + " | ".join(cells)
                     + f" | {f'{spe:.1f}' if spe else '–'} | {epochs} | {ttc:.0f} | {how} |")
    return "\n".join(lines)


def published_table(dataset: str) -> str:
    """The published reference rows for ``dataset``, each with its protocol and source."""
    rows = [p for p in PUBLISHED if p.dataset == Path(dataset).stem]
    if not rows:
        return ""
    lines = ["| published | protocol | NDCG@10 | HR@10 | source |", "|---|---|---|---|---|"]
    lines += [f"| {p.model} | {p.protocol} | {p.ndcg10:.4f} | {p.hr10:.4f} | {p.source} |" for p in rows]
    return "\n".join(lines)


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def plot_curves(results: list[dict], path: Path) -> Path:
    """PNG of validation NDCG@10 per epoch, one line per model (seed 0)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in sorted(results, key=lambda r: MODEL_NAMES.index(r["model"])):
        if r["seed"] != 0:
            continue
        epochs = [h["epoch"] for h in r["history"]]
        values = [under(h["valid"], "masked")[VALID_METRIC] for h in r["history"]]
        ax.plot(epochs, values, marker="o" if len(epochs) == 1 else None, label=r["model"])
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"validation {VALID_METRIC} (full ranking, history masked)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def replace_section(doc: Path, title: str, body: str) -> None:
    """Replace (or append) the ``## title`` section of a markdown file, leaving other sections alone."""
    text = doc.read_text(encoding="utf-8") if doc.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    text = pattern.sub(lambda _: section + "\n", text, count=1) if pattern.search(text) else \
        text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


# ---- training-speed levers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Lever:
    """One training set-up; every lever is measured against :data:`BASELINE`, one change at a time."""

    name: str
    max_len: int = 200
    loss: str = "full"
    threads: int = 1
    compile: bool = False
    bf16: bool = False
    batch_size: int = 128


BASELINE = Lever("baseline: T=200, full softmax, 1 thread, fp32, eager, batch 128")
LEVERS = (
    BASELINE,
    replace(BASELINE, name="T=100", max_len=100),
    replace(BASELINE, name="T=50", max_len=50),
    replace(BASELINE, name="sampled softmax (shared negatives)", loss="sampled"),
    replace(BASELINE, name="2 threads", threads=2),
    replace(BASELINE, name="torch.compile", compile=True),
    replace(BASELINE, name="bf16 autocast", bf16=True),
    replace(BASELINE, name="batch 32", batch_size=32),
    replace(BASELINE, name=f"training defaults: T={TrainConfig.max_len}, bf16, batch {TrainConfig.batch_size}",
            max_len=TrainConfig.max_len, bf16=True, batch_size=TrainConfig.batch_size),
)


class _Timed:
    """One lever's model, optimiser and batches, ready to time steps on."""

    def __init__(self, model_name: str, split, lever: Lever, *, negatives: int, seed: int, device: torch.device):
        torch.manual_seed(seed)
        inter = split.inter
        self.lever, self.negatives, self.device, self.times = lever, negatives, device, []
        self.model = build_model(model_name, n_users=inter.n_users, n_items=inter.n_items, max_len=lever.max_len)
        self.model.to(device)
        self.batches = list(train_batches(split, batch_size=lever.batch_size, rng=np.random.default_rng(seed),
                                          **batch_rule(self.model)))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=TrainConfig.lr)
        self.sampler = NegativeSampler(split.train.item, inter.n_items, seed=seed, power=TrainConfig.negative_power,
                                       device=device) if lever.loss == "sampled" else None
        self.step_model = torch.compile(self.model) if lever.compile else self.model
        self._next = 0

    def step(self) -> float:
        batch = self.batches[self._next % len(self.batches)].to(self.device)
        self._next += 1
        threads = torch.get_num_threads()
        torch.set_num_threads(self.lever.threads)
        try:
            t0 = time.perf_counter()
            train_step(self.step_model, batch, self.opt, self.sampler, self.negatives, self.lever.bf16)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)


def bench_train(dataset: str, *, models: tuple[str, ...] = ("sasrec", "slsrec"), levers=LEVERS,
                steps: int = 6, warmup: int = 2, rounds: int = 3, device: str = "auto", log=print) -> list[dict]:
    """Median seconds per training step under every lever, for every model on ``dataset``.

    The levers take turns (``rounds`` rounds of ``steps // rounds`` steps each, after ``warmup`` untimed
    steps per lever), so a change in the machine's load hits all of them alike. Rows carry the epoch
    time (steps per epoch x median step) and its speed-up over the first lever.
    """
    from slsrec.data import load_dataset  # noqa: PLC0415

    split = leave_one_out(load_dataset(dataset))
    dev = resolve_device(device)
    rows = []
    for model in models:
        setups = [_Timed(model, split, lever, negatives=TrainConfig.negatives, seed=0, device=dev) for lever in levers]
        first = [[t.step() for _ in range(warmup)] for t in setups]  # torch.compile compiles here
        for _ in range(rounds):
            for t in setups:
                t.times += [t.step() for _ in range(max(1, steps // rounds))]
        base = None
        for t, warm in zip(setups, first):
            step_s = statistics.median(t.times)
            epoch_s = step_s * len(t.batches)
            base = base or epoch_s
            row = {"model": model, "lever": t.lever.name, "step_s": round(step_s, 4), "epoch_s": round(epoch_s, 1),
                   "steps_per_epoch": len(t.batches), "speedup": round(base / epoch_s, 2),
                   "first_step_s": round(warm[0], 2) if warm else None}
            log(f"{model:<8} {t.lever.name:<60} {row['step_s']:8.3f} s/step {row['epoch_s']:8.1f} s/epoch "
                f"x{row['speedup']:.2f} (first step {row['first_step_s']} s)")
            rows.append(row)
        del setups
    return rows


def levers_table(rows: list[dict]) -> str:
    head = "| model | lever | s/step (median) | s/epoch | speed-up |"
    lines = [head, "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['lever']} | {r['step_s']:.3f} | {r['epoch_s']:.0f} | x{r['speedup']:.2f} |"
              for r in rows]
    return "\n".join(lines)


# ---- reports --------------------------------------------------------------------------------------


def _machine_line(device: str, threads: str | None) -> str:
    m = machine()
    return (f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, Python {m['python']}, device {device}"
            f"{'' if device != 'cuda' else ' (' + m['gpu'] + ')'}" + (f", torch threads {threads}" if threads else ""))


def write_benchmark_report(results: list[dict], *, dataset: str, command: str, out: Path, wall_s: float | None,
                           planned: list[tuple[str, int]], label: str = "", slug: str = "", doc: Path = DOCS,
                           img: Path | None = None) -> str:
    """Write the ``Model quality: <dataset>`` section of ``doc`` and the validation-curve PNG.

    A benchmark with other training options (``label`` "T=200", ``slug`` "-t200") gets its own
    section ``Model quality: <dataset>, <label>`` and plot.
    """
    img = img or doc.parent / "img" / f"valid-ndcg10-{Path(dataset).stem}{slug}.png"
    planned_seeds = {m: sum(1 for pm, _ in planned if pm == m) for m, _ in planned}
    plot_curves(results, img)
    train_s = sum(r["total_s"] for r in results)
    devices = sorted({r["device"] for r in results})
    threads = sorted({r["threads"] for r in results})
    body = [
        f"Command: `{command}`",
        "",
        *([f"**Partial**: {len(results)} of {len(planned)} planned (model, seed) runs have finished; re-run the "
           "command to continue where it stopped (a run cut off resumes at its last finished epoch).", ""]
          if len(results) < len(planned) else []),
        f"Machine: {_machine_line(', '.join(devices), ', '.join(map(str, threads)))}.",
        f"Wall time: {train_s / 3600:.2f} h of training and evaluation summed over the {len(results)} finished "
        f"(model, seed) runs" + (f"; the last invocation took {wall_s / 60:.1f} min" if wall_s else "")
        + f" (results are saved under `{out}/results/` as each run finishes; a re-run skips finished ones).",
        "",
        "Test metrics, leave-one-out, full ranking over all items, under two protocols: **masked** removes the "
        "user's history from the candidates (the protocol of the published SASRec+CE and HSTU figures), "
        "**strict** leaves it in (as RecBole and most libraries evaluate sequential models). Mean ± std over "
        "seeds; a row marked \"n of m\" still misses seeds. s/epoch is training only; time to best is wall "
        "time from the start to the end of the best epoch (validation NDCG@10, masked).",
        "",
        results_table(results, planned_seeds),
        "",
        *(["Published figures, each comparable only under its own protocol:", "", published_table(dataset)]
          if published_table(dataset) else []),
        "",
        f"![validation NDCG@10 per epoch]({img.relative_to(doc.parent) if img.is_relative_to(doc.parent) else img})",
    ]
    alpha = [r for r in results if r["model"] == "slsrec" and r.get("alpha")]
    if alpha:
        a = alpha[0]["alpha"]
        buckets = ", ".join(f"{k}: {v['mean']:.3f} (n={v['n']})" for k, v in a["by_segment_length"].items()
                            if v["mean"] is not None)
        body += ["", f"SLSRec fusion gate on the test inputs (seed 0): alpha mean {a['mean']:.3f}, std {a['std']:.3f} "
                     f"over users with a long-term input ({a['cold_fraction']:.1%} have none, alpha = 0); "
                     f"mean alpha by current segment length: {buckets}."]
    section = "\n".join(body)
    replace_section(doc, f"Model quality: {dataset}" + (f", {label}" if label else ""), section)
    return section


def write_levers_report(rows: list[dict], *, command: str, device: str, doc: Path = DOCS) -> str:
    section = "\n".join([f"Command: `{command}`", "", f"Machine: {_machine_line(device, None)}.", "",
                         "Median seconds per training step after warm-up steps, and the epoch time it implies "
                         "(steps per epoch x median step); each lever changes one thing from the baseline, the "
                         "speed-up is in epoch time.", "", levers_table(rows)])
    replace_section(doc, "Training speed: levers", section)
    return section
