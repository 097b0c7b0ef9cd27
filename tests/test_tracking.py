"""Experiment tracking (--report-to wandb|tensorboard, runs.MetricsLogger): the tracker gets the
same numbers as metrics.jsonl, the run's name and its settings, read back from its own files; a
tracker that is not installed stops the stage at parse time with one line naming the pip install."""
import json
import struct
import sys
from pathlib import Path

import pytest

import dpo
import osp
import sft
import train_rm
from runs import MetricsLogger, read_jsonl, run_cli
from tests.helpers import write_sft_data

LINES = [dict(step=1, loss=0.75, lr=1e-3, tokens=120), dict(step=2, loss=0.5, lr=5e-4, tokens=96),
         dict(step=3, loss=0.25, lr=0.0, tokens=80)]
# a path and a tuple: stored as JSON would
CONFIG = dict(lr=1e-3, out=Path("runs/x/sft"), lora_targets=("q", "v"))
CONFIG_AS_JSON = dict(lr=1e-3, out="runs/x/sft", lora_targets=["q", "v"])


def tensorboard_run(folder):
    """(scalars {tag: [(step, value)]}, texts {tag: text}) of the TensorBoard run in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}

    def text(tag):
        return events.Tensors(tag)[0].tensor_proto.string_val[0].decode()
    texts = {tag.removesuffix("/text_summary"): text(tag) for tag in events.Tags()["tensors"]}
    return scalars, texts


def wandb_records(path):
    """The records (wandb's protobuf Record) of an offline run's .wandb file: a 7-byte header
    (":W&B", magic, version), then LevelDB's log format: 32 KiB blocks of chunks, each a 7-byte
    header (CRC (4 bytes), length (2, little-endian), type (1 full, 2 first, 3 middle, 4 last)) and
    its data."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, offset, chunks, records = Path(path).read_bytes(), 7, [], []
    while offset + 7 <= len(data):
        if 0 < -offset % 32768 < 7:  # a block's tail too short for a header is padding
            offset += -offset % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        chunks.append(data[offset + 7:offset + 7 + length])
        offset += 7 + length
        if kind in (1, 4):
            records.append(Record.FromString(b"".join(chunks)))
            chunks = []
    return records


def test_tensorboard_gets_the_jsonl_scalars_the_run_name_and_the_settings(tmp_path):
    pytest.importorskip("tensorboard")
    metrics = MetricsLogger(tmp_path / "metrics.jsonl", report_to="tensorboard",
                            run_name="sft runs/x/sft", config=CONFIG)
    for line in LINES:
        metrics.log(**line)
    metrics.close()
    scalars, texts = tensorboard_run(tmp_path / "tensorboard")
    logged = read_jsonl(tmp_path / "metrics.jsonl")
    assert logged == LINES and set(scalars) == {"loss", "lr", "tokens"}
    for name, points in scalars.items():  # TensorBoard keeps float32
        assert points == [(line["step"], pytest.approx(line[name], rel=1e-6)) for line in logged]
    assert texts["run_name"] == "sft runs/x/sft"
    assert json.loads(texts["config"].strip("`\n")) == CONFIG_AS_JSON


RESUMED = [dict(step=2, loss=0.55, lr=5e-4, tokens=96), dict(step=3, loss=0.3, lr=0.0, tokens=80),
           dict(step=4, loss=0.2, lr=0.0, tokens=70)]


def test_tensorboard_resume_shows_each_step_once(tmp_path):
    """A stage that resumes after step 1 logs steps 2, 3, ... again: the events the crashed run
    wrote for them are purged, so TensorBoard shows each step once, with the resumed run's value, as
    metrics.jsonl."""
    pytest.importorskip("tensorboard")
    first = MetricsLogger(tmp_path / "metrics.jsonl", report_to="tensorboard", run_name="x")
    for line in LINES:
        first.log(**line)
    first.close()
    resumed = MetricsLogger(tmp_path / "metrics.jsonl", report_to="tensorboard", run_name="x",
                            resume_step=1)
    for line in RESUMED:
        resumed.log(**line)
    resumed.close()
    scalars, _ = tensorboard_run(tmp_path / "tensorboard")
    assert read_jsonl(tmp_path / "metrics.jsonl") == LINES[:1] + RESUMED
    assert scalars["loss"] == [(line["step"], pytest.approx(line["loss"], rel=1e-6))
                               for line in LINES[:1] + RESUMED]


def wandb_offline(tmp_path, monkeypatch):
    # offline: no network and no login; the rest keeps wandb's own files in tmp_path and the
    # test quick
    for name, value in dict(WANDB_MODE="offline", WANDB_ERROR_REPORTING="false",
                            WANDB_SILENT="true", WANDB_CONSOLE="off",
                            WANDB_DISABLE_GIT="true", WANDB_DISABLE_CODE="true",
                            WANDB_X_DISABLE_STATS="true", WANDB_X_DISABLE_META="true",
                            WANDB_PROJECT="tracking-test",
                            WANDB_CONFIG_DIR=str(tmp_path / "config"),
                            WANDB_CACHE_DIR=str(tmp_path / "cache"),
                            WANDB_DATA_DIR=str(tmp_path / "data")).items():
        monkeypatch.setenv(name, value)


def test_wandb_offline_run_gets_the_jsonl_scalars_the_run_name_and_the_settings(tmp_path,
                                                                                monkeypatch):
    wandb = pytest.importorskip("wandb")
    wandb_offline(tmp_path, monkeypatch)
    metrics = MetricsLogger(tmp_path / "out" / "metrics.jsonl", report_to="wandb",
                            run_name="sft runs/x/sft", config=CONFIG)
    try:
        for line in LINES:
            metrics.log(**line)
    finally:
        metrics.close()  # wandb.finish()
        wandb.teardown()  # stops wandb's service process: nothing outlives the test
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    assert not any(p.is_symlink() for p in (tmp_path / "out" / "wandb").iterdir())
    records = wandb_records(runs[0])
    run = next(r.run for r in records if r.HasField("run"))
    assert (run.display_name, run.project) == ("sft runs/x/sft", "tracking-test")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert {name: config[name] for name in CONFIG_AS_JSON} == CONFIG_AS_JSON
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in r.history.item}
               for r in records if r.HasField("history")]
    logged = [{name: row[name] for name in ("_step", "loss", "lr", "tokens")} for row in history]
    assert logged == [dict(_step=line["step"], loss=line["loss"], lr=line["lr"],
                           tokens=line["tokens"]) for line in LINES]


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    """A resume logs into the run it continues (the same run id, resumed), not a second run; a fresh
    start makes a new one."""
    wandb = pytest.importorskip("wandb")
    wandb_offline(tmp_path, monkeypatch)
    ids = []
    for lines, resume_step in ((LINES, 0), (RESUMED, 1), (LINES, 0)):
        metrics = MetricsLogger(tmp_path / "out" / "metrics.jsonl", report_to="wandb", run_name="x",
                                resume_step=resume_step)
        try:
            for line in lines:
                metrics.log(**line)
            ids.append(metrics.wandb_run.id)
        finally:
            metrics.close()
    wandb.teardown()
    assert ids[0] == ids[1] != ids[2]
    assert (tmp_path / "out" / "wandb" / "run_id").read_text().strip() == ids[2]


def test_sft_reports_its_loss_name_and_settings_to_tensorboard(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    write_sft_data(tmp_path / "sft.jsonl", n=16)
    out = tmp_path / "sft"
    sft.main(["--model", str(tiny_model_dir), "--scratch", "--data", str(tmp_path / "sft.jsonl"),
              "--out", str(out), "--block-size", "64", "--batch-size", "4",
              "--micro-batch-size", "4", "--max-steps", "3", "--device", "cpu",
              "--report-to", "tensorboard"])
    lines = read_jsonl(out / "metrics.jsonl")
    # kept in --out through the checkpoint's save
    scalars, texts = tensorboard_run(out / "tensorboard")
    assert len(lines) == 3 and set(scalars) == set(lines[0]) - {"step"}
    assert scalars["loss"] == [(line["step"], pytest.approx(line["loss"], rel=1e-6))
                               for line in lines]
    assert texts["run_name"] == f"sft {out}"
    config = json.loads(texts["config"].strip("`\n"))
    assert (config["out"] == str(out) and config["max_steps"] == 3
            and config["report_to"] == "tensorboard")


TRAINING_PARSERS = {  # each training stage's parser, with its required flags
    "sft": (sft.parse_args, ["--model", "m", "--data", "d", "--out", "o"]),
    "rm train": (train_rm.build_parser().parse_args,
                 ["train", "--model", "m", "--pairs", "p", "--out", "o"]),
    "dpo": (dpo.build_parser().parse_args, []),
    "osp": (osp.parse_args, ["--model", "m", "--prompts", "p", "--out", "o"]),
}


@pytest.mark.parametrize("stage", TRAINING_PARSERS)
def test_every_training_stage_takes_report_to_and_none_is_the_default(stage):
    pytest.importorskip("tensorboard")
    parse, required = TRAINING_PARSERS[stage]
    assert parse(required).report_to == "none"
    assert parse(required + ["--report-to", "tensorboard"]).report_to == "tensorboard"


def test_report_to_is_not_a_setting_an_online_run_records():
    # neither in iter{t}/settings.json nor in config.json: a rerun or resume may report elsewhere
    assert "report_to" not in dpo.RUN_SETTINGS


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_missing_tracker_stops_the_stage_at_parse_time_with_the_pip_line(tracker, tmp_path,
                                                                           monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # as if not installed: find_spec is None, import fails
    monkeypatch.setitem(sys.modules, tracker, None)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: sft.main(["--model", "m", "--data", "d.jsonl", "--out", "out",
                                  "--report-to", tracker]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    expected = (f"error: argument --report-to: {tracker} is not installed; "
                f"run: pip install {tracker}")
    assert len(errors) == 1 and errors[0].endswith(expected), err
    assert list(tmp_path.iterdir()) == []  # before any work or any file
