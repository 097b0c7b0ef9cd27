"""Are two runs' outputs the same? Every file under two run folders compared byte for byte, JSON and
JSONL files again as data with their timing fields left out (ms, tokens_per_s, seconds, ...); logs
and plots are skipped. A rearrangement of the code must leave a seeded run's outputs unchanged:

    SIZE=tiny bash run.sh                       # before the change, then move the folder aside
    SIZE=tiny bash run.sh                       # after it
    python tools/compare_runs.py runs/builtin-tiny-seed0.before runs/builtin-tiny-seed0

Exit status 0 when every file is the same, 1 otherwise (each differing file is named)."""
import json
import re
import sys
from pathlib import Path

TIMING = re.compile(r"(^|_)(ms|seconds|s|time|elapsed)$|per_s$")
SKIPPED = re.compile(r"(^|/)logs/|\.(log|png)$|(^|/)(wandb|tensorboard)/")


def without_timing(value):
    if isinstance(value, dict):
        return {k: None if TIMING.search(k) else without_timing(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def same_data(path, a, b):
    """JSON / JSONL content equal once timing fields are left out."""
    try:
        if path.suffix == ".jsonl":
            a, b = ([json.loads(line) for line in x.decode().splitlines() if line.strip()]
                    for x in (a, b))
        else:
            a, b = json.loads(a), json.loads(b)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False
    return without_timing(a) == without_timing(b)


def compare(first, second):
    """(files compared, names of the files that differ or exist in one folder only)."""
    files = [{p.relative_to(root) for p in root.rglob("*")
              if p.is_file() and not SKIPPED.search(p.relative_to(root).as_posix())}
             for root in (first, second)]
    differ = [f"only in {first}: {p}" for p in sorted(files[0] - files[1])]
    differ += [f"only in {second}: {p}" for p in sorted(files[1] - files[0])]
    for path in sorted(files[0] & files[1]):
        a, b = (first / path).read_bytes(), (second / path).read_bytes()
        if a != b and not (path.suffix in (".json", ".jsonl") and same_data(path, a, b)):
            differ.append(f"differs: {path}")
    return len(files[0] & files[1]), differ


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not all(Path(p).is_dir() for p in argv):
        sys.exit("usage: python tools/compare_runs.py RUN_FOLDER_A RUN_FOLDER_B")
    compared, differ = compare(Path(argv[0]), Path(argv[1]))
    print("\n".join(differ + [f"{compared} files compared, {len(differ)} differ "
                              "(timing fields aside; logs and plots skipped)"]))
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
