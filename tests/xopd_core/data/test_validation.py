from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.validate import find_manifests, validate
from xopd_core.config import Params
from xopd_core.data.manifest import ManifestError, manifest_path, read_manifest, read_rows
from xopd_core.data.speech import sha256_file
from xopd_core.data.validation import (
    DataValidationError,
    ValidationReport,
    read_validated_manifests,
)


def edit_rows(root: Path, split: str, edit: Callable[[list[dict]], None]) -> None:
    path = manifest_path(root, split)
    rows = read_manifest(path)
    edit(rows)
    path.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "_line"}) + "\n" for r in rows)
    )


def sox(src: Path, dst: Path, *effects: str, rate: int = 16000, channels: int = 1) -> None:
    subprocess.run(
        ["sox", str(src), "-D", "-r", str(rate), "-c", str(channels), str(dst), *effects],
        check=True,
        capture_output=True,
    )


def refresh_facts(root: Path, row: dict) -> None:
    """Make the manifest's sha256 and duration true again, so only the planted fault shows."""
    import soundfile as sf

    path = root / row["audio_path"]
    row["sha256"] = sha256_file(path)
    info = sf.info(str(path))
    row["duration_s"] = round(info.frames / info.samplerate, 4)


def run(root: Path, tmp_path: Path) -> ValidationReport:
    try:
        validate(Params(), [root], tmp_path / "report")
    except DataValidationError as err:
        return err.report
    pytest.fail("validation passed but a fault was planted")


def assert_names_row(report: ValidationReport, rule: str, split: str, line: int) -> None:
    failed = {r.rule: r for r in report.failed_rules}
    assert rule in failed, f"{rule} not among {sorted(failed)}"
    rows = [(Path(f["manifest"]).name, f["line"]) for f in failed[rule].failures]
    assert (f"{split}.jsonl", line) in rows, rows
    # The human-readable lines name manifest, line, id and rule together.
    text = "\n".join(report.failure_lines(per_rule=1000))
    assert f"{split}.jsonl:{line} (id " in text and f"[{rule}]" in text


def test_good_data_passes_and_reports_are_written(tiny_world: Path, tmp_path: Path) -> None:
    summary = validate(Params(), [tiny_world], tmp_path / "report")
    assert summary.success and summary.n_rows == len(
        [r for m in find_manifests([tiny_world]) for r in read_manifest(m)]
    )
    result = json.loads(summary.report_json.read_text())
    assert result["success"] is True
    assert len(result["rules"]) >= 20 and all(r["success"] for r in result["rules"])
    assert result["great_expectations"]["success"] is True
    page = summary.report_html.read_text()
    assert "PASSED" in page
    # Works offline: nothing is loaded from elsewhere.
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_corrupt_audio_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    def plant(rows: list[dict]) -> None:
        path = world_copy / rows[1]["audio_path"]
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)) * 4)
        rows[1]["sha256"] = sha256_file(path)

    edit_rows(world_copy, "train", plant)
    assert_names_row(run(world_copy, tmp_path), "audio_decodable", "train", 2)


def test_truncated_audio_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    def plant(rows: list[dict]) -> None:
        path = world_copy / rows[0]["audio_path"]
        path.write_bytes(path.read_bytes()[:30])  # header cut mid-way
        rows[0]["sha256"] = sha256_file(path)

    edit_rows(world_copy, "eval", plant)
    assert_names_row(run(world_copy, tmp_path), "audio_decodable", "eval", 1)


def test_missing_audio_file_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    row = read_manifest(manifest_path(world_copy, "para_eval"))[2]
    (world_copy / row["audio_path"]).unlink()
    report = run(world_copy, tmp_path)
    assert_names_row(report, "audio_exists", "para_eval", 3)
    # A missing file is one fault, reported once: no cascade of decode/rate failures.
    assert {r.rule for r in report.failed_rules} == {"audio_exists"}


def test_wrong_sample_rate_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    def plant(rows: list[dict]) -> None:
        path = world_copy / rows[3]["audio_path"]
        tmp = path.with_suffix(".tmp.wav")
        sox(path, tmp, rate=22050)
        tmp.replace(path)
        refresh_facts(world_copy, rows[3])

    edit_rows(world_copy, "train", plant)
    report = run(world_copy, tmp_path)
    assert_names_row(report, "audio_sample_rate", "train", 4)
    assert {r.rule for r in report.failed_rules} == {"audio_sample_rate"}


def test_stereo_audio_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    def plant(rows: list[dict]) -> None:
        path = world_copy / rows[0]["audio_path"]
        tmp = path.with_suffix(".tmp.wav")
        sox(path, tmp, channels=2)
        tmp.replace(path)
        refresh_facts(world_copy, rows[0])

    edit_rows(world_copy, "train", plant)
    report = run(world_copy, tmp_path)
    assert_names_row(report, "audio_channels", "train", 1)
    assert {r.rule for r in report.failed_rules} == {"audio_channels"}


@pytest.mark.parametrize(
    "effects", [["trim", "0", "0.1"], ["pad", "0", "31"]], ids=["too-short", "too-long"]
)
def test_duration_out_of_range_is_rejected(
    world_copy: Path, tmp_path: Path, effects: list[str]
) -> None:
    def plant(rows: list[dict]) -> None:
        path = world_copy / rows[1]["audio_path"]
        tmp = path.with_suffix(".tmp.wav")
        sox(path, tmp, *effects)
        tmp.replace(path)
        refresh_facts(world_copy, rows[1])

    edit_rows(world_copy, "eval", plant)
    report = run(world_copy, tmp_path)
    assert_names_row(report, "audio_duration", "eval", 2)
    assert {r.rule for r in report.failed_rules} == {"audio_duration"}


@pytest.mark.parametrize("blank", ["", "   \t "])
def test_empty_or_whitespace_transcript_is_rejected(
    world_copy: Path, tmp_path: Path, blank: str
) -> None:
    edit_rows(world_copy, "train", lambda rows: rows[4].update(transcript=blank))
    assert_names_row(run(world_copy, tmp_path), "transcript_not_blank", "train", 5)


def test_missing_answer_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    def plant(rows: list[dict]) -> None:
        del rows[0]["answer"]
        rows[1]["answer"] = None
        rows[2]["answer"] = " "

    edit_rows(world_copy, "eval", plant)
    report = run(world_copy, tmp_path)
    assert_names_row(report, "field_present:answer", "eval", 1)
    assert_names_row(report, "field_present:answer", "eval", 2)
    assert_names_row(report, "answer_not_blank", "eval", 3)


def test_duplicate_ids_are_rejected(world_copy: Path, tmp_path: Path) -> None:
    first = read_manifest(manifest_path(world_copy, "train"))[0]["id"]
    edit_rows(world_copy, "eval", lambda rows: rows[2].update(id=first))
    report = run(world_copy, tmp_path)
    assert_names_row(report, "id_unique", "eval", 3)
    assert_names_row(report, "id_unique", "train", 1)


def test_same_prompt_in_train_and_eval_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    leaked = read_manifest(manifest_path(world_copy, "eval"))[1]["transcript"]
    # Case and spacing differences do not hide a leak.
    edit_rows(
        world_copy,
        "train",
        lambda rows: rows[5].update(transcript="  " + leaked.upper().replace(" ", "  ")),
    )
    report = run(world_copy, tmp_path)
    assert_names_row(report, "no_train_eval_overlap", "train", 6)
    assert_names_row(report, "no_train_eval_overlap", "eval", 2)


@pytest.mark.parametrize("escape", ["../outside.wav", "audio/../../outside.wav", "ABSOLUTE"])
def test_audio_path_escaping_the_data_root_is_rejected(
    world_copy: Path, tmp_path: Path, escape: str
) -> None:
    outside = world_copy.parent / "outside.wav"
    first = read_manifest(manifest_path(world_copy, "train"))[0]
    shutil.copy(world_copy / first["audio_path"], outside)
    target = str(outside) if escape == "ABSOLUTE" else escape
    edit_rows(world_copy, "train", lambda rows: rows[2].update(audio_path=target))
    report = run(world_copy, tmp_path)
    assert_names_row(report, "audio_inside_root", "train", 3)
    assert {r.rule for r in report.failed_rules} == {"audio_inside_root"}


def test_symlink_pointing_outside_the_root_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.wav"
    row = read_manifest(manifest_path(world_copy, "eval"))[0]
    path = world_copy / row["audio_path"]
    shutil.copy(path, secret)
    path.unlink()
    path.symlink_to(secret)
    assert_names_row(run(world_copy, tmp_path), "audio_inside_root", "eval", 1)


def test_sha256_mismatch_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    edit_rows(world_copy, "para_eval", lambda rows: rows[0].update(sha256="0" * 64))
    report = run(world_copy, tmp_path)
    assert_names_row(report, "audio_sha256_matches", "para_eval", 1)
    assert {r.rule for r in report.failed_rules} == {"audio_sha256_matches"}


def test_failure_report_is_saved_as_json_and_html(world_copy: Path, tmp_path: Path) -> None:
    edit_rows(world_copy, "para_eval", lambda rows: rows[0].update(sha256="0" * 64))
    with pytest.raises(DataValidationError) as err:
        validate(Params(), [world_copy], tmp_path / "report")
    assert "para_eval.jsonl:1" in str(err.value) and "audio_sha256_matches" in str(err.value)
    result = json.loads((tmp_path / "report" / "validation.json").read_text())
    assert result["success"] is False
    (bad,) = [r for r in result["rules"] if not r["success"]]
    assert bad["failures"][0]["line"] == 1
    page = (tmp_path / "report" / "validation.html").read_text()
    assert "FAILED" in page and "audio_sha256_matches" in page and "para_eval-" in page


def test_unparsable_manifest_line_names_file_and_line(world_copy: Path, tmp_path: Path) -> None:
    path = manifest_path(world_copy, "eval")
    lines = path.read_text().splitlines()
    lines[3] = lines[3][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"eval\.jsonl:4: not valid JSON"):
        validate(Params(), [world_copy], tmp_path / "report")


def test_speech_row_without_audio_fields_is_rejected(world_copy: Path, tmp_path: Path) -> None:
    def plant(rows: list[dict]) -> None:
        for key in ("audio_path", "sha256"):
            del rows[1][key]

    edit_rows(world_copy, "train", plant)
    report = run(world_copy, tmp_path)
    assert_names_row(report, "audio_fields_present", "train", 2)
    bad = next(r for r in report.failed_rules if r.rule == "audio_fields_present")
    assert bad.failures[0]["value"] == "audio_path,sha256"


def test_text_corpus_is_checked_for_eval_leaks_too(world_copy: Path, tmp_path: Path) -> None:
    leaked = read_manifest(manifest_path(world_copy, "eval"))[0]["transcript"]
    edit_rows(world_copy, "text_train", lambda rows: rows[7].update(transcript=leaked))
    report = run(world_copy, tmp_path)
    assert_names_row(report, "no_train_eval_overlap", "text_train", 8)
    assert_names_row(report, "no_train_eval_overlap", "eval", 1)


@pytest.mark.parametrize(
    "split, field, value, rule",
    [
        ("train", "answer", "maybe", "answer_in_set:navigate"),
        ("text_train", "answer", "maybe", "answer_in_set:navigate"),
        ("train", "task", "chess", "task_known"),
        ("train", "kind", "poetry", "kind_known"),
        ("train", "task", "pitch", "task_of_kind:reasoning"),
    ],
)
def test_wrong_answer_unknown_task_or_kind_is_rejected(
    world_copy: Path, tmp_path: Path, split: str, field: str, value: str, rule: str
) -> None:
    hit: dict[str, int] = {}

    def plant(rows: list[dict]) -> None:
        row = next(r for r in rows if r["task"] == "navigate")
        row[field] = value
        hit["line"] = row["_line"]

    edit_rows(world_copy, split, plant)
    assert_names_row(run(world_copy, tmp_path), rule, split, hit["line"])


def test_paralinguistic_row_with_a_reasoning_task_is_rejected(
    world_copy: Path, tmp_path: Path
) -> None:
    hit: dict[str, int] = {}

    def plant(rows: list[dict]) -> None:
        row = next(r for r in rows if r["kind"] == "paralinguistic")
        row["task"], row["answer"] = "navigate", "yes"
        hit["line"] = row["_line"]

    edit_rows(world_copy, "train", plant)
    assert_names_row(run(world_copy, tmp_path), "task_of_kind:paralinguistic", "train", hit["line"])


def test_read_validated_manifests_returns_rows_or_stops_in_one_line(
    world_copy: Path,
) -> None:
    rows = read_validated_manifests(world_copy, ["train", "eval"], Params().validate_)
    assert rows["train"] == read_rows(manifest_path(world_copy, "train"))
    assert rows["train"][0].line == 1 and rows["train"][0].sample_rate == 16_000

    def plant(rows: list[dict]) -> None:
        rows[2]["answer"] = "maybe"

    edit_rows(world_copy, "eval", plant)
    with pytest.raises(DataValidationError) as err:
        read_validated_manifests(world_copy, ["train", "eval"], Params().validate_)
    message = str(err.value)
    assert "\n" not in message and "eval.jsonl:3 (id " in message and "answer_in_set" in message


@pytest.mark.usefixtures("in_tmp_path")
def test_xopd_validate_reports_a_wrong_answer_unknown_task_and_unknown_kind(
    world_copy: Path, tmp_path: Path, capsys
) -> None:
    from tasks.cli import main

    def plant(rows: list[dict]) -> None:
        rows[0]["answer"], rows[1]["task"], rows[2]["kind"] = "maybe", "chess", "poetry"

    edit_rows(world_copy, "train", plant)
    assert main(["validate", str(world_copy), "--out", str(tmp_path / "report")]) == 1
    err = capsys.readouterr().err
    assert "train.jsonl:1 (id " in err and "[answer_in_set:" in err
    assert "train.jsonl:2 (id " in err and "[task_known]" in err
    assert "train.jsonl:3 (id " in err and "[kind_known]" in err
