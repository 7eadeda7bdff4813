"""``igulora finetune``: IGU-LoRA on a local Hugging Face model and local data, resumable.

The loop is plain PyTorch so that a checkpoint holds everything that decides the rest of the
run: adapters, masks and scores (igulora's own save), optimizer, LR schedule, RNG states, the
step and the run's arguments. The data order is a function of (seed, epoch), so the step alone
says where to continue.

``--resume`` continues the same run to the same end, and nothing else: every argument but
RESUME_FREE must equal the one the checkpoint (and ``args.json``) recorded, or it refuses, naming
each one that differs. ``--max-steps`` is not free: it sets the learning-rate and rank-budget
schedules, so a run cannot be extended or cut short exactly; a longer run starts anew in another
folder. A folder whose run is finished is never rewritten by ``--resume`` (it says so and writes
nothing), and a run without ``--resume`` refuses a folder that holds a run already: an older
adapter never replaces a newer one, and ``metrics.csv`` only loses rows that the resumed run
recomputes.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from igulora.config import IGULoraConfig
from igulora.data import FORMATS, Example, class_count, load_examples
from igulora.ig import causal_lm_row_loss, sequence_classification_row_loss
from igulora.io import atomic_write
from igulora.metrics import COLUMNS, MetricsLogger, allocation_metrics
from igulora.model import IGUModel, get_igu_model
from igulora.plots import rank_heatmap, training_curves
from igulora.pretrained import load_pretrained, split_gguf

TASKS = ("classification", "causal-lm")
STATE_FILE = "training_state.pt"
ARGS_FILE = "args.json"  # in the output folder and in each checkpoint
FINAL_FILE = "final_metrics.json"  # written last: its presence marks a finished run
# The arguments that --resume may change: they decide what is saved, evaluated or shown, never a
# trained value (tests/test_finetune.py resumes with other ones, bitwise). Every other one decides
# the run, max_steps included (the schedules), and must equal the recorded one.
RESUME_FREE = ("output_dir", "resume", "progress", "save_every", "eval_every")
PATHS = ("model", "data", "eval_data", "output_dir")  # recorded and compared as absolute paths
# IGULoraConfig fields set from another FinetuneArgs field (the rest share their name)
CONFIG_SOURCES = {
    "ig_rule": "rule",
    **{name: "max_steps" for name in ("total_step", "tinit", "tfinal", "delta_t")},
}
EVAL_COLUMNS = ("eval_accuracy", "eval_loss", "eval_perplexity")


class FinetuneError(RuntimeError):
    """A run that cannot produce a usable adapter."""


@dataclass
class FinetuneArgs:
    model: str
    data: str
    task: str
    output_dir: str
    max_steps: int
    seed: int = 0
    save_every: int = 0
    resume: bool = False
    eval_data: str | None = None
    eval_every: int = 0
    data_format: str = "auto"
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    encoding: str = "utf-8"  # of the data files
    batch_size: int = 32
    max_length: int = 64
    group_by_length: bool = False  # batches of similar length (less padding), as HF's Trainer
    lr: float = 5e-3  # selected on SST-2 validation for the E = 0 init (docs/results-details.md)
    warmup: float = 0.06
    target_modules: str = "all-linear"
    exclude_modules: str | None = None
    init: str = IGULoraConfig.init
    init_r: int = 6
    target_r: float = 2  # average final rank per adapted layer
    lora_alpha: float = 48.0
    rule: str = IGULoraConfig.ig_rule  # the scoring knobs default to the library's
    ig_steps: int | str = IGULoraConfig.ig_steps  # or "auto"
    ig_tolerance: float = IGULoraConfig.ig_tolerance
    ig_residual: bool = IGULoraConfig.ig_residual
    ig_fraction: float = IGULoraConfig.ig_fraction
    ig_every: int = IGULoraConfig.ig_every
    ig_window: int = IGULoraConfig.ig_window  # 0: None (every ig_every-th step scores)
    score: str = IGULoraConfig.score
    orth_reg_weight: float = IGULoraConfig.orth_reg_weight
    orth_reg_start: int | str = IGULoraConfig.orth_reg_start
    orth_reg_ranks: str = IGULoraConfig.orth_reg_ranks
    progress: bool = True

    def __post_init__(self) -> None:
        """Every field checked, type and range, by its flag: a ValueError before anything runs."""

        def fail(name: str, why: str) -> None:
            raise ValueError(f"{flag(name)} {getattr(self, name)!r} {why}")

        def integer(name: str, low: int | None) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                fail(name, "must be an integer")
            if low is not None and value < low:
                fail(name, f"must be >= {low}")

        def number(name: str, ok, why: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                fail(name, "must be a finite number")
            if not ok(value):
                fail(name, why)

        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        optional = ("eval_data", "text_pair_column", "exclude_modules")
        texts = ("text_column", "text_pair_column", "label_column", "target_modules", "exclude_modules")
        for name in PATHS + texts:
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not isinstance(value, (str, os.PathLike) if name in PATHS else str) or not str(value):
                fail(name, "must be a non-empty " + ("path" if name in PATHS else "string"))
        for name in ("init", "rule", "score"):
            if not isinstance(getattr(self, name), str):
                fail(name, "must be a string")
        for name in ("resume", "group_by_length", "ig_residual", "progress"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "must be True or False")
        for name, low in (
            ("max_steps", 1),
            ("seed", None),
            ("save_every", 0),
            ("eval_every", 0),
            ("batch_size", 1),
            ("max_length", 2),
            ("init_r", 1),
            ("ig_every", 1),
            ("ig_window", 0),
        ):
            integer(name, low)
        number("lr", lambda v: v > 0, "must be > 0")
        number("warmup", lambda v: 0 <= v < 1, "must be in [0, 1) (a fraction of --max-steps)")
        number("target_r", lambda v: v > 0, "must be > 0 (an average final rank per layer; 0 prunes all)")
        number("target_r", lambda v: v <= self.init_r, f"must be <= --init-r {self.init_r}")
        number("lora_alpha", lambda v: v > 0, "must be > 0")
        number("ig_tolerance", lambda v: v > 0, "must be > 0")
        number("ig_fraction", lambda v: 0 < v <= 1, "must be in (0, 1]")
        number("orth_reg_weight", lambda v: v >= 0, "must be >= 0")
        if self.data_format not in FORMATS:
            fail("data_format", f"is not one of {', '.join(FORMATS)}")
        try:
            codecs.lookup(self.encoding)
        except (LookupError, TypeError):
            fail("encoding", "is not a known text encoding (utf-8, latin-1, ...)")
        try:  # the adapter settings: the config's own checks, reported by flag
            igu_config(self, None)
        except ValueError as error:
            raise flag_error(error, self) from None
        try:
            split_gguf(self.model)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"--model: {error}") from None


def flag(name: str) -> str:
    """The command-line flag of a FinetuneArgs field."""
    return "--no-progress" if name == "progress" else "--" + name.replace("_", "-")


def flag_error(error: ValueError, args: FinetuneArgs) -> ValueError:
    """An IGULoraConfig error ("IGULoraConfig.field=value: why") restated by the flag that set
    the field; any other error as it is."""
    match = re.match(r"IGULoraConfig\.(\w+)=.*?: (.*)$", str(error), re.DOTALL)
    name = match and CONFIG_SOURCES.get(match[1], match[1])
    if not match or name not in {f.name for f in fields(FinetuneArgs)}:
        return error
    return ValueError(f"{flag(name)} {getattr(args, name)!r}: {match[2]}")


def _target_spec(value: str) -> str | list[str]:
    """``all-linear``; a regex if it holds regex syntax; else comma-separated names or suffixes."""
    if value == "all-linear" or any(c in value for c in "*+?[](){}|^$\\"):
        return value
    return [name for name in value.split(",") if name]


def load_model(args: FinetuneArgs, num_labels: int | None):
    """(tokenizer, model) from ``--model``: a Hugging Face folder or a ``.gguf`` file."""
    from transformers import AutoModelForSequenceClassification

    if args.task == "classification":
        model, tokenizer = load_pretrained(
            args.model, AutoModelForSequenceClassification, num_labels=num_labels
        )
    else:
        model, tokenizer = load_pretrained(args.model)
    return tokenizer, model


def igu_config(args: FinetuneArgs, model) -> IGULoraConfig:
    """The run's IGULoraConfig; ``model`` (or None) says which classification head is trained."""
    heads = [h for h in ("classifier", "score") if args.task == "classification" and hasattr(model, h)]
    return IGULoraConfig(
        target_modules=_target_spec(args.target_modules),
        exclude_modules=_target_spec(args.exclude_modules) if args.exclude_modules else None,
        modules_to_save=heads or None,
        init=args.init,
        init_r=args.init_r,
        target_r=args.target_r,
        lora_alpha=args.lora_alpha,
        total_step=args.max_steps,
        tinit=max(0, args.max_steps // 10),
        tfinal=max(0, args.max_steps // 5),
        delta_t=max(1, min(10, args.max_steps // 20)),
        ig_rule=args.rule,
        ig_steps=args.ig_steps,
        ig_tolerance=args.ig_tolerance,
        ig_residual=args.ig_residual,
        ig_fraction=args.ig_fraction,
        ig_every=args.ig_every,
        ig_window=args.ig_window or None,
        score=args.score,
        orth_reg_weight=args.orth_reg_weight,
        orth_reg_start=args.orth_reg_start,
        orth_reg_ranks=args.orth_reg_ranks,
        seed=args.seed,
        base_model_name_or_path=str(args.model),
    )


class Batches:
    """Batch ``step`` of the run: epoch e visits a permutation seeded by (seed, e); no state.

    With ``group_by_length`` each run of ``MEGABATCH`` batches of that permutation is sorted by
    token length before it is cut into batches (HF's length-grouped sampling): far less padding.
    """

    MEGABATCH = 50

    def __init__(self, examples: list[Example], tokenizer, args: FinetuneArgs) -> None:
        self.examples, self.tokenizer, self.args = examples, tokenizer, args
        self.per_epoch = max(1, len(examples) // args.batch_size)
        self.lengths = (
            torch.tensor([len(ids) for ids in self.encode(examples, pad=False)["input_ids"]])
            if args.group_by_length
            else None
        )

    def encode(self, chunk: list[Example], pad: bool = True) -> dict[str, torch.Tensor]:
        texts = [e.text for e in chunk]
        if self.args.task == "causal-lm":
            texts = [e.text if e.text_pair is None else f"{e.text}\n{e.text_pair}" for e in chunk]
            pairs = None
        else:
            pairs = [e.text_pair for e in chunk] if chunk[0].text_pair is not None else None
        batch = dict(
            self.tokenizer(
                texts,
                pairs,
                padding=pad,
                truncation=True,
                max_length=self.args.max_length,
                return_tensors="pt" if pad else None,
            )
        )
        if pad and self.args.task == "classification":
            batch["labels"] = torch.tensor([e.label for e in chunk])
        return batch

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        epoch, position = divmod(step, self.per_epoch)
        order = torch.randperm(
            len(self.examples), generator=torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
        )
        size = self.args.batch_size
        if self.lengths is not None:
            start = position // self.MEGABATCH * self.MEGABATCH * size
            end = min(start + self.MEGABATCH * size, self.per_epoch * size)  # the epoch's leftover stays out
            group = order[start:end]
            order[start:end] = group[self.lengths[group].argsort(descending=True, stable=True)]
        index = order[position * size : (position + 1) * size]
        return self.encode([self.examples[i] for i in index.tolist()])


@torch.no_grad()
def evaluate(igu: IGUModel, examples: list[Example], batches: Batches) -> dict[str, float]:
    """Accuracy (classification) or mean token loss and perplexity (causal LM)."""
    was_training = igu.training
    igu.eval()
    correct = loss_sum = count = 0.0
    for start in range(0, len(examples), batches.args.batch_size):
        batch = batches.encode(examples[start : start + batches.args.batch_size])
        if batches.args.task == "classification":
            logits = igu(**{k: v for k, v in batch.items() if k != "labels"}).logits
            correct += float((logits.argmax(-1) == batch["labels"]).sum())
            count += len(batch["labels"])
        else:
            row_loss, row_count = causal_lm_row_loss(igu, batch)
            loss_sum, count = loss_sum + float(row_loss.sum()), count + float(row_count.sum())
    igu.train(was_training)
    if batches.args.task == "classification":
        return {"eval_accuracy": correct / max(count, 1)}
    loss = loss_sum / max(count, 1)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50))}


def warmup_linear_schedule(optimizer, args: FinetuneArgs):
    warmup = max(1, int(args.warmup * args.max_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (args.max_steps - step) / max(1, args.max_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(
    output_dir: Path, step: int, igu: IGUModel, optimizer, scheduler, args: FinetuneArgs | None = None
) -> Path:
    """Write ``checkpoint-{step}`` atomically: built in a temporary folder, then renamed. With
    ``args`` it records them (``args.json``), for ``--resume`` to compare."""
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", dir=output_dir))
    try:
        igu.save_pretrained(tmp)
        if args is not None:
            (tmp / ARGS_FILE).write_text(json.dumps(args_record(args), indent=2) + "\n")
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": _rng_state(),
        }
        torch.save(state, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = [
        p for p in output_dir.glob("checkpoint-*") if (p / STATE_FILE).is_file() and p.name[11:].isdigit()
    ]
    return max(done, key=lambda p: int(p.name[11:]), default=None)


def args_record(args: FinetuneArgs) -> dict:
    """The arguments as ``args.json`` records them: the paths absolute."""
    record = asdict(args)
    for name in PATHS:
        if record[name] is not None:
            record[name] = os.path.abspath(record[name])
    return record


def _show(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise FinetuneError(f"{path}: cannot read it ({error})") from None
    if not isinstance(data, dict):
        raise FinetuneError(f"{path}: not a JSON object")
    return data


def _differences(recorded: dict, args: FinetuneArgs, source: str) -> list[str]:
    """``--flag: <source> old, now new`` for each argument that decides the run and differs."""
    now = args_record(args)
    differ = []
    for f in fields(FinetuneArgs):
        if f.name in RESUME_FREE or f.name not in recorded:  # a field newer than the record: unknown
            continue
        old = recorded[f.name]
        if f.name in PATHS and isinstance(old, str):
            old = os.path.abspath(old)
        if old != now[f.name]:
            differ.append(f"{flag(f.name)}: {source} {_show(old)}, now {_show(now[f.name])}")
    return differ


def _run_files(output_dir: Path) -> list[str]:
    """The files and checkpoints of a run in ``output_dir``."""
    if not output_dir.is_dir():
        return []
    names = (ARGS_FILE, FINAL_FILE, "metrics.csv", "adapter_model.safetensors", "igulora_state.safetensors")
    found = [name for name in names if (output_dir / name).exists()]
    return found + sorted(p.name for p in output_dir.glob("checkpoint-*") if p.is_dir())


def resume_point(args: FinetuneArgs, output_dir: Path) -> tuple[Path | None, dict | None]:
    """(the checkpoint to continue from, the final metrics of a run that is finished already):
    what this run does in ``output_dir``, before anything is loaded or written. Refuses (a
    FinetuneError, nothing changed) a run without ``--resume`` where a run is, and a ``--resume``
    whose arguments differ from the recorded ones or that would end elsewhere than a finished run."""
    folder = f"--output-dir {output_dir}"
    if not args.resume:
        files = _run_files(output_dir)
        if files:
            shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
            raise FinetuneError(
                f"{folder} holds a run already ({shown}): pass --resume to continue it with the same "
                "arguments, or choose another --output-dir; nothing was changed"
            )
        return None, None
    checkpoint = latest_checkpoint(output_dir) if output_dir.is_dir() else None
    records = [(checkpoint / ARGS_FILE, "checkpoint")] if checkpoint is not None else []
    records.append((output_dir / ARGS_FILE, "recorded"))
    for path, source in records:
        differ = _differences(_read_json(path), args, source) if path.is_file() else []
        if differ:
            why = (
                "; --max-steps sets the learning-rate and rank-budget schedules, so a run cannot be "
                "extended or cut short exactly: train a longer one in another --output-dir"
                if any(d.startswith("--max-steps:") for d in differ)
                else ""
            )
            raise FinetuneError(
                f"--resume: the run in {output_dir} has other arguments ({'; '.join(differ)}); resume with "
                f"the same ones (only {', '.join(flag(n) for n in RESUME_FREE[2:])} may change){why}; "
                "nothing was changed"
            )
    final_path = output_dir / FINAL_FILE
    if final_path.is_file():
        final = _read_json(final_path)
        if final.get("step") == args.max_steps:
            return None, final
        raise FinetuneError(
            f"--resume: the run in {output_dir} finished at step {final.get('step')} and --max-steps is "
            f"{args.max_steps}: it would not continue that run; nothing was changed"
        )
    return checkpoint, None


def prepare_output_dir(output_dir: Path) -> None:
    """Create ``output_dir`` and prove it writable, before the model is loaded."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=output_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise FinetuneError(
            f"--output-dir {output_dir}: cannot write there ({error.strerror or error})"
        ) from None


def run_finetune(args: FinetuneArgs) -> dict[str, float]:
    """Train (or continue, ``--resume``) the run; its final metrics. A run that is finished
    already is not trained again: its recorded final metrics come back and nothing is written."""
    output_dir = Path(args.output_dir)
    checkpoint, finished = resume_point(args, output_dir)
    if finished is not None:
        print(
            f"igulora finetune: the run in {output_dir} is finished already (step {finished.get('step')}); "
            "nothing to do",
            file=sys.stderr,
        )
        return finished
    load = dict(
        task=args.task,
        data_format=args.data_format,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        label_column=args.label_column,
        encoding=args.encoding,
    )
    train = load_examples(args.data, **load)
    evals = load_examples(args.eval_data, **load) if args.eval_data else []
    num_labels = None
    if args.task == "classification":
        num_labels = class_count(
            train, evals, label_column=args.label_column, data=args.data, eval_data=args.eval_data
        )
    prepare_output_dir(output_dir)
    torch.manual_seed(args.seed)
    tokenizer, model = load_model(args, num_labels)
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and args.max_length > positions:
        raise ValueError(
            f"--max-length {args.max_length} exceeds the {positions} positions of --model {args.model}"
        )
    if checkpoint is not None:
        igu = IGUModel.from_pretrained(model, checkpoint)
    else:
        try:
            igu = get_igu_model(model, igu_config(args, model))
        except ValueError as error:
            raise flag_error(error, args) from None
    igu.train()
    optimizer = torch.optim.AdamW([p for p in igu.parameters() if p.requires_grad], lr=args.lr)
    scheduler = warmup_linear_schedule(optimizer, args)
    start = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        start = state["step"]
    record = json.dumps(args_record(args), indent=2) + "\n"
    atomic_write(output_dir / ARGS_FILE, lambda tmp: tmp.write_text(record))
    metrics = MetricsLogger(
        output_dir / "metrics.csv",
        columns=COLUMNS + EVAL_COLUMNS,
        tensorboard_dir=output_dir / "tensorboard",
        resume_below=start,
    )
    row_loss = sequence_classification_row_loss if args.task == "classification" else causal_lm_row_loss
    batches = Batches(train, tokenizer, args)
    bar = tqdm(
        range(start, args.max_steps),
        initial=start,
        total=args.max_steps,
        desc="igulora finetune",
        disable=not args.progress,
    )
    skipped = 0
    for step in bar:
        loss = igu.training_loss(batches(step), row_loss)
        loss.backward()
        if igu.finite_step(loss):
            optimizer.step()
        else:
            skipped += 1
            message = f"step {step}: non-finite loss or gradient, optimizer step skipped ({skipped} so far)"
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        scheduler.step()
        igu.update_and_allocate(step, optimizer=optimizer)
        optimizer.zero_grad()
        row = allocation_metrics(igu, step, float(igu.last_loss))
        if evals and args.eval_every and (step + 1) % args.eval_every == 0:
            row.update(evaluate(igu, evals, batches))
        metrics.log(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", ranks=row["active_rank"])
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.max_steps:
            save_checkpoint(output_dir, step + 1, igu, optimizer, scheduler, args)
    if skipped and skipped == args.max_steps - start:
        raise FinetuneError(
            f"every one of the {skipped} steps had a non-finite loss or gradient: no adapter was trained "
            "(check the data and lower --lr)"
        )
    final = {"step": args.max_steps, "loss": metrics.rows[-1]["loss"] if metrics.rows else float("nan")}
    final["skipped_steps"] = skipped
    final.update(evaluate(igu, evals, batches) if evals else {})
    metrics.close()
    igu.save_pretrained(output_dir)
    rank_heatmap(igu.active_ranks, output_dir / "rank_heatmap.png")
    if metrics.rows:
        training_curves(metrics.rows, output_dir / "training_curves.png")
    text = json.dumps(final, indent=2) + "\n"
    atomic_write(output_dir / FINAL_FILE, lambda tmp: tmp.write_text(text))  # last: the run is finished
    return final
