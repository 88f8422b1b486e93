from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from xopd_core.config import ConfigError, Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[2]


def test_params_yaml_validates_and_matches_the_model_defaults() -> None:
    params = load_params(REPO / "params.yaml")
    # params.yaml spells out every default, so the file and the model cannot drift apart.
    assert params == Params()
    assert params.synth.sample_rate == params.validate_.sample_rate == 16_000


def test_params_path_comes_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    p = tmp_path / "alt.yaml"
    p.write_text("synth:\n  workers: 1\n")
    monkeypatch.setenv("XOPD_PARAMS", str(p))
    assert load_params().synth.workers == 1


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"sinth": {}}, "sinth"),
        ({"synth": {"seeed": 1}}, "synth.seeed"),
        (
            {"synth": {"difficulty": {"navigate_moves": {"min": 3, "max": 5, "mid": 4}}}},
            "synth.difficulty.navigate_moves.mid",
        ),
        ({"validate": {"sample_rte": 16000}}, "validate.sample_rte"),
    ],
)
def test_unknown_key_is_rejected_by_name(data: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(data, source="params.yaml")
    assert f"{key}: unknown key" in str(err.value)
    assert str(err.value).startswith("params.yaml:")


@pytest.mark.parametrize(
    ("data", "key", "shown"),
    [
        ({"synth": {"workers": 0}}, "synth.workers", "got 0"),
        ({"synth": {"sample_rate": 1000}}, "synth.sample_rate", "got 1000"),
        ({"synth": {"train_per_task": -5}}, "synth.train_per_task", "got -5"),
        ({"synth": {"train_per_task": "many"}}, "synth.train_per_task", "got 'many'"),
        ({"validate": {"max_duration_s": 0}}, "validate.max_duration_s", "got 0"),
        ({"train": {"engine": "tgi"}}, "train.engine", "got 'tgi'"),
    ],
)
def test_out_of_range_value_is_rejected_by_name(data: dict, key: str, shown: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    msg = str(err.value)
    assert f"  {key}: " in msg and shown in msg


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (
            {"synth": {"difficulty": {"lies_people": {"min": 5, "max": 3}}}},
            "min (5) is greater than max (3)",
        ),
        (
            {"synth": {"voices": {"slow_rate_wpm": {"min": 100, "max": 150}}}},
            "slow_rate_wpm must lie entirely below normal_rate_wpm",
        ),
        (
            {"synth": {"difficulty": {"navigate_moves": {"min": 3, "max": 8}}}},
            "navigate_moves.max × navigate_max_step must stay ≤ 20",
        ),
        ({"validate": {"min_duration_s": 5, "max_duration_s": 2}}, "min/max_duration_s"),
        (
            {"synth": {"voices": {"high_pitch": {"min": 85, "max": 120}}}},
            "synth.voices: Value error, high_pitch.max must be ≤ 99",
        ),
        (
            {
                "student": {
                    "pretrain_utterances": 10,
                    "instruct": {"steps": 1, "lr": 1e-3, "corpus_items": 11},
                }
            },
            "student.instruct.corpus_items (11) is more than student.pretrain_utterances (10)",
        ),
        (
            {"nightly": {"timezone": "CET+1"}},
            "timezone must be an IANA time zone name such as UTC or Europe/Berlin (got 'CET+1')",
        ),
        (
            {"validate": {"tasks": {"parity": {"kind": "reasoning", "answers": ["Odd", "a b"]}}}},
            "validate.tasks.parity: Value error, answers ['Odd', 'a b']: each must be one "
            "lower-case word of [a-z0-9]",
        ),
        (
            {"validate": {"tasks": {"parity": {"kind": "arithmetic", "answers": ["odd"]}}}},
            "validate.tasks.parity.kind: Input should be 'reasoning' or 'paralinguistic'",
        ),
    ],
)
def test_inconsistent_settings_are_rejected_with_the_reason(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match="invalid setting") as err:
        parse_params(data)
    assert needle in str(err.value)


def test_unreadable_or_malformed_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("synth: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_params(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_params(listy)


@pytest.mark.parametrize("text", ["", "\n  \n", "# only a comment\n"])
def test_empty_params_file_is_refused_naming_it(tmp_path: Path, text: str) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml: params file is empty") as err:
        load_params(empty)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text, key, shown",
    [
        ("train:\n  steps: true\n", "train.steps", "True"),
        ("train:\n  steps: '40'\n", "train.steps", "'40'"),
        ("train:\n  lr: '1e-4'\n", "train.lr", "'1e-4'"),
        ("train:\n  train_audio_encoder: 'yes'\n", "train.train_audio_encoder", "'yes'"),
        ("campaign:\n  rounds: 2.0\n", "campaign.rounds", "2.0"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_coerced(
    tmp_path: Path, text: str, key: str, shown: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(key)) as err:
        load_params(path)
    assert f"(got {shown})" in str(err.value) and "params.yaml" in str(err.value)


def test_strict_types_still_accept_what_yaml_spells_natively(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 1\n  steps: 7\n  train_audio_encoder: true\n")
    p = load_params(path)
    assert (p.train.lr, p.train.steps, p.train.train_audio_encoder) == (1.0, 7, True)


def test_a_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  steps: 40\n  lr: 0.001\n  steps: 400\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: key 'steps' is given twice") as err:
        load_params(path)
    assert "lines 2 and 4" in str(err.value)
    top = tmp_path / "top.yaml"
    top.write_text("train: {}\ncampaign: {rounds: 1}\ntrain: {steps: 3}\n")
    with pytest.raises(ConfigError, match="key 'train' is given twice"):
        load_params(top)


def test_params_are_immutable() -> None:
    p = Params()
    with pytest.raises(ValueError):
        p.synth.seed = 3  # type: ignore[misc]


def test_no_params_file_anywhere_means_defaults(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XOPD_PARAMS", raising=False)
    assert load_params() == Params()
    # …but a file that was asked for by name must exist.
    monkeypatch.setenv("XOPD_PARAMS", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_params()


def test_the_nightly_cron_reads_in_utc_unless_a_zone_is_named() -> None:
    assert Params().nightly.timezone == "UTC"
    assert parse_params({"nightly": {"timezone": "America/New_York"}}).nightly.timezone == (
        "America/New_York"
    )


@pytest.mark.parametrize(
    "name", ["qwen2-audio-7b.yaml", "qwen2.5-omni-7b.yaml", "qwen3-omni-30b-a3b.yaml"]
)
def test_the_example_configs_carry_the_papers_settings(name: str) -> None:
    """configs/ (README: Real models): each real pair's file parses, with the paper's X-OPD
    hyperparameters and the memory settings a 7B–30B pair needs."""
    t = load_params(Path(__file__).parents[2] / "configs" / name).train
    assert (t.method, t.lr, t.prompts_per_step, t.rollouts_per_prompt, t.lmbda, t.loss) == (
        "xopd",
        2e-6,
        256,
        4,
        0.5,
        "sampled",
    )
    assert (t.device, t.precision, t.teacher_dtype, t.gradient_checkpointing) == (
        "cuda",
        "bf16",
        "bfloat16",
        True,
    )
    assert t.engine == ("vllm" if name.startswith("qwen2-audio") else "hf")


def test_several_ranks_on_vllm_engines_need_a_process_a_rank(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Forks of the trainer cannot each own a vLLM engine: with engine vllm, processes > 1
    takes torchrun (the stage launches it, or xopd train runs under it); the teacher's tensor
    parallelism is for one rank's engine."""
    from xopd_core.config import TrainParams

    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    two = {"processes": 2, "engine": "vllm"}
    with pytest.raises(ValueError, match=r"set train\.launcher: torchrun, or start xopd train"):
        TrainParams(**two)
    assert TrainParams(**two, launcher="torchrun").processes == 2
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert TrainParams(**two).launcher == "inline"  # a rank torchrun started by hand
    with pytest.raises(ValueError, match=r"teacher_tensor_parallel 2 .* train\.processes: 1"):
        TrainParams(**two, teacher_tensor_parallel=2)
    with pytest.raises(ValueError, match=r"teacher_tensor_parallel 4 .* train\.engine: vllm"):
        TrainParams(teacher_tensor_parallel=4)
    assert TrainParams(engine="vllm", teacher_tensor_parallel=4).teacher_tensor_parallel == 4
