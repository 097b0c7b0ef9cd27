"""Run management every stage shares, none of it RLHF math: which process speaks (rank 0 under
torchrun), user errors and flag checks, JSONL files written atomically, the metrics log, settings
records, and crash-safe chunked processing. A stage calls each in one line, so that its own file
can show the algorithm.

The bottom layer of the shared modules: it imports none of them (tokens.py, parallel.py and
training.py import it).
"""
import argparse
import atexit
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
import torch.distributed as dist
from tqdm import tqdm

# ----------------------------------------------------------------------------------------------
# Which process is this? torchrun sets RANK and WORLD_SIZE in each process's environment before it
# starts, so they can be read anywhere, also where no parallel.Dist is at hand (run_cli before a
# stage's main() has made one, print0 in any helper). One process without torchrun: rank 0 of 1.


def rank_and_world_size():
    """(this process's rank, the number of processes), as torchrun set them; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def is_main():
    """True on rank 0, the process that prints, writes the shared files and merges the outputs."""
    return rank_and_world_size()[0] == 0


def print0(*args, **kwargs):
    """print on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


# ----------------------------------------------------------------------------------------------
# User errors: a bad flag, file or record is reported as one line naming what to fix, and the stage
# exits with status 2; anything else is a bug and keeps its traceback.


class InputError(ValueError):
    """Bad input from the user (a missing file, a malformed record, settings that do not match a
    run's earlier ones). `run_cli` prints it as one line without a traceback."""


def run_cli(main):
    """Run a stage's main(): InputError and FileNotFoundError become `error: ...` on stderr, exit 2;
    Ctrl-C (KeyboardInterrupt) becomes one line saying how to resume, exit 130 (128 + SIGINT).
    Under torchrun a rank leaves without the interpreter's teardown (os._exit), see below."""
    rank, world_size = rank_and_world_size()
    status = 0
    try:
        main()
    except (InputError, FileNotFoundError) as error:
        prefix = f"[rank {rank}] " if world_size > 1 else ""
        print(f"{prefix}error: {error}", file=sys.stderr, flush=True)
        status = 2
    except KeyboardInterrupt:
        # Under torchrun every rank gets the SIGINT: one line, from rank 0. Every output is written
        # atomically (a temp file, then a rename) and each stage skips the work already written, so
        # nothing finished is lost and nothing half-written is left behind.
        if rank == 0:
            print("\ninterrupted: the outputs finished so far are kept; rerun the same command to "
                  "resume (finished work is skipped; an unfinished training run starts over)",
                  file=sys.stderr, flush=True)
        status = 130
    if world_size > 1:
        # Leave without the interpreter's teardown, once the atexit handlers (wandb's finish, a
        # verifier's own) have run. PyTorch keeps the gloo process group alive past
        # destroy_process_group (FSDP's DTensor caches hold its device mesh), so its threads still
        # run while the interpreter tears down, and now and then a rank aborts there after its
        # work is done ("terminate called without an active exception", SIGABRT; torchrun then
        # fails the run). After an error or Ctrl-C the group is not destroyed at all (that could
        # wait on a rank that is gone); the OS closes the connections.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


# ----------------------------------------------------------------------------------------------
# Flag values are checked by argparse itself (`type=` below), so a bad one stops the stage at once
# with `error: argument --lr: must be > 0, got -1` (exit status 2), before any work or any file.


def checked_number(kind, must, ok):
    """An argparse `type=`: the flag's text converted by `kind` (int or float), accepted when finite
    and ok(value); otherwise an ArgumentTypeError saying what the value `must` be. Also takes a
    number (settings read back from a file, which argparse does not convert:
    dpo.resolve_settings)."""

    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            value = None
        # a number read back from a file must be an integer already: 2.5 is no int
        if value is None or kind is int and not isinstance(text, str) and value != text:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {must}, got {text}")
        return value

    return parse


positive_int = checked_number(int, "≥ 1", lambda n: n >= 1)                   # counts, sizes, steps
non_negative_int = checked_number(int, "≥ 0", lambda n: n >= 0)               # 0: off or automatic
positive_float = checked_number(float, "> 0", lambda x: x > 0)                # rates, β, epochs
non_negative_float = checked_number(float, "≥ 0", lambda x: x >= 0)           # 0: off
fraction = checked_number(float, "in [0, 1]", lambda x: 0 <= x <= 1)          # warmup ratio, min-p
positive_fraction = checked_number(float, "in (0, 1]", lambda x: 0 < x <= 1)  # top-p (1: off)
dropout_probability = checked_number(float, "in [0, 1)", lambda x: 0 <= x < 1)
step_limit = checked_number(int, "≥ 1, or -1 for no limit", lambda n: n >= 1 or n == -1)


def add_tracking_flags(parser):
    """--report-to, shared by sft, train_rm, dpo and osp: where MetricsLogger also sends the
    metrics."""
    parser.add_argument("--report-to", type=installed_tracker, default="none",
                        choices=("none", "wandb", "tensorboard"),
                        help="also send every step's metrics (as in metrics.jsonl) and the run's "
                             "settings to Weights & Biases (files in OUT/wandb; project "
                             "$WANDB_PROJECT, default online-rlhf) or TensorBoard "
                             "(OUT/tensorboard)")


def installed_tracker(name):
    """argparse `type=` of --report-to: the name, once the tracker's package is installed (checked
    at parse time, before any work; MetricsLogger imports it later, on rank 0 only)."""
    from importlib.util import find_spec

    if name in ("wandb", "tensorboard") and find_spec(name) is None:
        raise argparse.ArgumentTypeError(f"{name} is not installed; run: pip install {name}")
    return name


# ----------------------------------------------------------------------------------------------
# JSONL: one JSON object per line. Reads name the file and line of a bad record; writes are atomic
# (temp file in the same folder + os.replace) so a crash never leaves a half-written file behind.


def read_jsonl_numbered(path):
    """[(1-based line number, record)] of a JSONL file, blank lines skipped. The file is decoded
    line by line, so a byte that is not UTF-8 or a line that is not a JSON object raises InputError
    naming the file and the line (not a bare UnicodeDecodeError); a missing file raises
    FileNotFoundError."""
    numbered = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path}:{line_number}: not valid UTF-8 "
                                 f"(byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise InputError(f"{path}:{line_number}: expected a JSON object, "
                                 f"got {type(record).__name__}")
            numbered.append((line_number, record))
    return numbered


def read_jsonl(path):
    """The list of records (dicts) in a JSONL file; errors as in read_jsonl_numbered."""
    return [record for _, record in read_jsonl_numbered(path)]


def atomic_write_text(path, text):
    """Write text to path atomically: a temp file beside it, fsync, then rename over the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_jsonl(path, records):
    """Write records (dicts) as JSONL, atomically. Non-ASCII text is kept as UTF-8."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ----------------------------------------------------------------------------------------------
# The metrics log: metrics.jsonl, and optionally a tracker (Weights & Biases or TensorBoard).


class MetricsLogger:
    """Per-step metrics as JSONL (rank 0 only). A log, so lines are appended and flushed as they
    come; a rerun of a stage starts the file afresh, and one that resumes after step `resume_step`
    (training.load_training_state) keeps the lines up to that step.

    report_to "wandb" or "tensorboard" (--report-to, add_tracking_flags) also sends each line's
    numbers, with `step` as the x-axis, to one tracker run named `run_name` whose config is the
    stage's settings (`config`). Its files sit beside the JSONL: OUT/wandb/ (the project is
    $WANDB_PROJECT, default "online-rlhf"; WANDB_MODE=offline keeps it on disk) or
    OUT/tensorboard/. A resume continues the tracker's run as the JSONL: wandb the same run (its id
    is kept in OUT/wandb/run_id), TensorBoard with the events after `resume_step` purged, so no step
    shows twice. The package is imported only here, when asked; add_tracking_flags checked it is
    installed."""

    def __init__(self, path, enabled=True, report_to="none", run_name=None, config=None,
                 resume_step=0):
        self.file = self.wandb_run = self.tensorboard = None
        if not enabled or path is None:
            return
        folder = Path(path).parent
        folder.mkdir(parents=True, exist_ok=True)
        resumed = resume_step and Path(path).exists()
        kept = [line for line in read_jsonl(path) if line["step"] <= resume_step] if resumed else []
        self.file = open(path, "w", encoding="utf-8")
        self.file.writelines(json.dumps(line) + "\n" for line in kept)
        # JSON-safe: paths (and anything else) as text
        config = json.loads(json.dumps(config or {}, default=str))
        if report_to == "wandb":
            import wandb
            # No symlinks (wandb/latest-run, debug.log): saving the checkpoint copies OUT's files
            # into the new folder, and a copy would follow them and store the run twice.
            id_file = folder / "wandb" / "run_id"
            run_id = id_file.read_text().strip() if resume_step and id_file.exists() else None
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "online-rlhf"),
                                        name=run_name, config=config, dir=folder,
                                        settings=wandb.Settings(symlink=False),
                                        id=run_id, resume="allow" if run_id else None)
            atomic_write_text(id_file, self.wandb_run.id + "\n")
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            # TensorBoard names a run by its folder (`tensorboard --logdir runs/NAME` lists
            # sft/tensorboard, online/iter2/policy/tensorboard, ...); the name and the settings are
            # also kept as text. purge_step: the events of the steps after resume_step (all of them
            # on a fresh start) are hidden.
            self.tensorboard = SummaryWriter(folder / "tensorboard", purge_step=resume_step + 1)
            self.tensorboard.add_text("run_name", run_name or str(folder))
            # markdown: keep the layout
            self.tensorboard.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, **metrics):
        if self.file is not None:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
        scalars = {name: value for name, value in metrics.items()
                   if name != "step" and isinstance(value, (int, float))}
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=metrics["step"])
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, metrics["step"])
            self.tensorboard.flush()  # like the JSONL: a crashed run keeps every step logged so far

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


# ----------------------------------------------------------------------------------------------
# Settings records and finished outputs: a rerun does no finished work twice, and never mixes two
# sets of settings in one output.


def check_settings(path, settings, start_over):
    """Record at `path` (JSON) the settings an output is made with; when that record exists (a
    rerun, or a resume after a crash), stop unless the settings are the same, so one output never
    mixes two sets of settings and a finished step's record is never rewritten. `start_over` tells
    the user what to delete to redo the step with the new settings."""
    path = Path(path)
    settings = json.loads(json.dumps(settings))  # compare as JSON would store them (tuples → lists)
    if not path.exists():
        if is_main():
            atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")
        return
    changed = changed_settings(json.loads(path.read_text()), settings)
    if changed:
        raise InputError(f"{path.parent} was made with other settings ({'; '.join(changed)}, "
                         f"recorded in {path}): rerun with the recorded values to continue, "
                         f"or delete {start_over} to start it over with the new ones")


def changed_settings(saved, settings):
    """What differs between a saved settings record and this run's settings, as texts
    "name saved → new", sorted by name (a name the record lacks reads as None). The settings are
    compared as JSON stores them: tuples as lists, anything else JSON lacks (a path) as text. Both
    checks use it: check_settings (an output's record) and training.load_training_state (a resume's
    state.json)."""
    settings = json.loads(json.dumps(settings, default=str))
    return [f"{k} {saved.get(k)!r} → {v!r}" for k, v in sorted(settings.items())
            if saved.get(k) != v]


def has_model(path):
    """A checkpoint folder Transformer.from_pretrained can load (single-file or sharded weights)."""
    path = Path(path)
    weights = ("model.safetensors", "model.safetensors.index.json")
    return (path / "config.json").exists() and any((path / f).exists() for f in weights)


def require_model(path, what, source="command line"):
    """Stop with one line naming `path` (given by the flag `what`) unless it holds a model; one read
    back from a run's record names that file too (`source`: runs.read_back_settings)."""
    what += "" if source == "command line" else f" (from {source})"
    if path is None:
        raise InputError(f"{what} is required")
    if not Path(path).is_dir():
        raise InputError(f"{what} {path}: no such model folder")
    if not has_model(path):
        raise InputError(f"{what} {path}: holds no model "
                         "(expected config.json and model.safetensors)")


def already_trained(out_dir, overwrite):
    """True (and says so) when out_dir already holds a saved model and --overwrite was not given: a
    rerun of a finished stage does nothing."""
    if has_model(out_dir) and not overwrite:
        print0(f"{out_dir} already holds a model; skipping (pass --overwrite to train it again)")
        return True
    return False


# ----------------------------------------------------------------------------------------------
# The settings of a run that goes on over several commands (dpo.py's online iterations): each comes
# from the command line, else from the run's records (JSON files), else from its default. Why and
# how: docs/dpo.md, "Where each setting comes from".


def recording_flags(group, flags):
    """An argument group whose add_argument also records each flag's argparse.Action in the dict
    `flags` by its dest (add_argument returns it), for checked_read_back."""

    def add_argument(*names, **options):
        action = group.add_argument(*names, **options)
        flags[action.dest] = action
        return action
    return argparse.Namespace(add_argument=add_argument)


def given_on_command_line(parser, argv):
    """The settings argv spells out, in any spelling argparse accepts (--lr=0.5, --lr 0.5, an
    alias). argparse fills in a default only where the namespace lacks the name, so parsed into a
    namespace that holds a marker for every setting, the markers left are the settings not given."""
    unset = object()
    names = vars(parser.parse_args([]))
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name for name, value in vars(parsed).items() if value is not unset}


def read_back_settings(args, sources, flags, names, records, root):
    """Set each of `names` that the command line did not give (sources[name] != "command line")
    to its value in the run's `records`, JSON files under `root` of which the later wins, each
    value checked as its flag's text would be (checked_read_back); sources[name] becomes the file,
    relative to root."""
    saved = {}
    for path in records:
        if path.exists():
            try:
                values = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise InputError(f"{path}: not valid JSON ({error.msg}); "
                                 "fix or delete it") from None
            saved.update({name: (values[name], str(path.relative_to(root)))
                          for name in names if name in values})
    for name in list(vars(args)):
        if name in saved and sources[name] != "command line":
            value, record = saved[name]
            setattr(args, name, checked_read_back(flags[name], value, root / record))
            sources[name] = record


def checked_read_back(action, value, path):
    """A value read back from the run's file `path`, given the checks argparse gives a flag's text:
    its type (which, as argparse does with a default, converts a text) and its choices. A bad
    value stops with one line naming the file."""
    if value is None:
        return value
    try:
        if action.type is not None:
            checked = action.type(value)
            value = checked if isinstance(value, str) else value
        if action.choices is not None and value not in action.choices:
            choices = ", ".join(map(str, action.choices))
            raise argparse.ArgumentTypeError(f"must be one of {choices}, got {value!r}")
    except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
        if not isinstance(error, argparse.ArgumentTypeError):  # a plain type=int: argparse's words
            error = f"invalid {getattr(action.type, '__name__', action.type)} value: {value!r}"
        raise InputError(f"{path}: {action.dest} {error}; fix it there or give "
                         f"{action.option_strings[0]} on the command line") from None
    return value


def print_settings(args, sources, names, title):
    """One line per setting: name, value, where it came from."""
    values = {name: str(getattr(args, name)) for name in names}
    name_width = max(map(len, names))
    value_width = min(40, max(map(len, values.values())))
    rows = [f"  {name:<{name_width}}  {values[name]:<{value_width}}  {sources[name]}"
            for name in names]
    print0("\n".join([title] + rows))


def record_iteration_settings(run, t, result_settings, run_settings):
    """Record iteration t's settings in run/iter{t}/settings.json (a rerun or resume that differs
    stops: check_settings) and, when t is the run's latest iteration started, make `run_settings`
    the next iteration's defaults (run/config.json)."""
    here = run / f"iter{t}"
    check_settings(here / "settings.json", result_settings, start_over=here)
    started = [int(m.group(1)) for p in run.glob("iter*/settings.json")
               if (m := re.fullmatch(r"iter(\d+)", p.parent.name))]
    if is_main() and t >= max(started, default=t):
        atomic_write_text(run / "config.json", json.dumps(run_settings, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# Chunked processing (sampling, scoring): every rank works on its share, chunk by chunk, and a crash
# loses at most the chunks in flight.


def process_in_chunks(records, out_path, process, dist_info, chunk_size=64, desc="processing",
                      settings=None, reports_progress=False):
    """Apply `process(list of records) -> list of records` to `records` chunk by chunk and write the
    concatenated results, in input order, to out_path (JSONL). Crash-safe and rank-count-free:
      - every rank gets an equal share, so none idles into the collective timeout while another
        works: the records are cut into n_chunks = world_size × ceil(N / (world_size × chunk_size))
        contiguous chunks whose sizes differ by at most one (none is larger than chunk_size), and
        chunk c runs on rank c % world_size. 7 records with chunk_size 64 on 2 ranks: chunks of 4
        and 3, one per rank. A chunk with no records (1 record on 2 ranks) is written as an empty
        part without calling `process`;
      - each finished chunk is written atomically to OUT.parts-n{N}-chunks{n_chunks}/{c}.jsonl, and
        a rerun skips chunks already there (so no record is lost or done twice). N and n_chunks
        alone decide the split, so a rerun whose split differs (another chunk size or rank count)
        starts a fresh folder instead of mixing two splits, and one with the same split resumes on
        any number of ranks;
      - rank 0 finally merges the chunks into out_path (atomically) and removes the parts folder;
      - `settings` (a dict: model, sampling parameters, ...) are recorded in the parts folder, and a
        resume with different settings stops (check_settings) instead of mixing the two.
    Progress (rank 0): one bar over this rank's remaining records, one per prompt in every caller.
    It advances a chunk at a time, or with reports_progress as `process(chunk, bar)` advances it
    itself (generation: as each prompt's samples end, with tokens/s beside it).
    Collective under torchrun: every rank must call it. Returns nothing; read out_path."""
    out_path = Path(out_path)
    world_size = dist_info.world_size
    n_chunks = world_size * math.ceil(len(records) / (world_size * chunk_size))

    def start(c):
        # ceil(c·N / n_chunks): chunk sizes differ by at most one, larger first (a lone record goes
        # to rank 0)
        return -(-c * len(records) // n_chunks)

    parts = out_path.with_name(f"{out_path.name}.parts-n{len(records)}-chunks{n_chunks}")
    mine = [c for c in range(n_chunks) if c % world_size == dist_info.rank]
    if settings is not None:
        check_settings(parts / "settings.json", settings, start_over=parts)
    todo = [c for c in mine if not (parts / f"{c:06d}.jsonl").exists()]
    if len(todo) < len(mine):
        print0(f"{desc}: resuming, {len(mine) - len(todo)} of {len(mine)} chunks already done")
    remaining = sum(start(c + 1) - start(c) for c in todo)
    with tqdm(total=remaining, desc=desc, unit="prompt", disable=not dist_info.is_main) as bar:
        for c in todo:
            chunk = records[start(c):start(c + 1)]
            counted = bar.n
            if not chunk:
                results = []
            else:
                results = process(chunk, bar) if reports_progress else process(chunk)
            write_jsonl(parts / f"{c:06d}.jsonl", results)
            bar.update(len(chunk) - (bar.n - counted))  # what `process` did not count itself
    if dist.is_initialized():
        dist.barrier()
    if dist_info.is_main:
        merged = [r for c in range(n_chunks) for r in read_jsonl(parts / f"{c:06d}.jsonl")]
        write_jsonl(out_path, merged)
        shutil.rmtree(parts, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
