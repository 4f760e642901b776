"""The configuration kernel (merging/config.py; DESIGN.md, Configuration): every refusal of the
readers, the name types, and one bad file per schema through its real loader and CLI, all in
the same one-line format ``<file>: key '<field.path>': <problem>``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import pytest
import yaml
from pydantic import AfterValidator, ValidationError
from typer.testing import CliRunner

from emomerge.cli import app
from emomerge.merging.config import (
    ConfigError,
    SafeName,
    Strict,
    dump_yaml,
    format_validation,
    known_name,
    load_json,
    load_yaml,
    validate,
)
from emomerge.merging.errors import InputError

from .helpers import lm_modules, write_adapter

#: the one line every schema error is: file, field path, problem
LINE = re.compile(r"^(?P<file>.+?): key '(?P<key>[^']+)': (?P<problem>[^\n]+)$")


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _refused(load, path: Path, *needles: str) -> str:
    with pytest.raises(ConfigError) as exc:
        load(path)
    msg = str(exc.value)
    assert isinstance(exc.value, InputError)  # the CLI's exit-2 error type
    assert msg.startswith(f"{path}: ") and "\n" not in msg, msg
    assert exc.value.path == str(path) and msg == f"{path}: {exc.value.problem}"
    for needle in needles:
        assert needle in msg, msg
    return msg


# ---------------------------------------------------------------- the readers' refusals


def test_a_good_yaml_and_json_load(tmp_path):
    assert load_yaml(_write(tmp_path / "a.yaml", "a: 1\nb: [x, y]\nc: {d: 2.5}\n")) == {
        "a": 1,
        "b": ["x", "y"],
        "c": {"d": 2.5},
    }
    assert load_json(_write(tmp_path / "a.json", '{"a": 1, "b": {"c": [1, 2]}}')) == {
        "a": 1,
        "b": {"c": [1, 2]},
    }


def test_too_big_is_refused_before_reading(tmp_path):
    path = _write(tmp_path / "big.yaml", "a: " + "x" * 200 + "\n")
    assert load_yaml(path, max_bytes=1000)["a"] == "x" * 200
    _refused(
        lambda p: load_yaml(p, max_bytes=100), path, "204 bytes", "larger than the 100-byte limit"
    )
    _refused(
        lambda p: load_json(p, max_bytes=100),
        _write(tmp_path / "big.json", json.dumps({"a": "x" * 200})),
        "larger than",
    )


def test_undecodable_bytes_name_the_byte_and_offset(tmp_path):
    data = b"a: 1\nb: caf\xe9\n"
    _refused(
        load_yaml,
        _write(tmp_path / "latin1.yaml", data),
        "not a UTF-8 text file (undecodable byte 0xe9 at offset 11)",
    )
    _refused(
        load_json,
        _write(tmp_path / "latin1.json", b'{"a": "\xff"}'),
        "not a UTF-8 text file (undecodable byte 0xff at offset 7)",
    )


def test_duplicate_keys_are_refused(tmp_path):
    # yaml.safe_load keeps the last value silently; the kernel names the key and its line
    text = "merge_method: ties\nmodels: []\nmerge_method: linear\n"
    assert yaml.safe_load(text)["merge_method"] == "linear"
    _refused(
        load_yaml, _write(tmp_path / "dup.yaml", text), "duplicate key 'merge_method' (line 3)"
    )
    _refused(
        load_yaml,
        _write(tmp_path / "nested.yaml", "a:\n  b: 1\n  b: 2\n"),
        "duplicate key 'b' (line 3)",
    )
    _refused(
        load_json,
        _write(tmp_path / "dup.json", '{"kind": "a", "x": {"k": 1, "k": 2}}'),
        "duplicate key 'k'",
    )


def test_anchors_and_aliases_are_refused(tmp_path):
    text = "base: &b {r: 4}\nlora: *b\n"
    assert yaml.safe_load(text)["lora"] == {"r": 4}  # what the plain loader would accept
    _refused(
        load_yaml,
        _write(tmp_path / "alias.yaml", text),
        "YAML anchors and aliases are not allowed (line 1)",
    )
    # a billion-laughs document never expands
    laughs = "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    _refused(load_yaml, _write(tmp_path / "laughs.yaml", laughs), "anchors and aliases")


def test_top_level_must_be_a_mapping(tmp_path):
    _refused(
        load_yaml,
        _write(tmp_path / "list.yaml", "- a\n- b\n"),
        "expected a mapping at the top level, got a list",
    )
    _refused(
        load_yaml,
        _write(tmp_path / "empty.yaml", ""),
        "expected a mapping at the top level, got an empty file",
    )
    _refused(
        load_json,
        _write(tmp_path / "list.json", "[1, 2]"),
        "expected a JSON object at the top level, got list",
    )


def test_syntax_errors_and_missing_files(tmp_path):
    _refused(
        load_yaml,
        _write(tmp_path / "bad.yaml", "a: [unclosed\n"),
        "not valid YAML (line 2, column 1:",
    )
    _refused(
        load_json, _write(tmp_path / "bad.json", '{"a": 1,}'), "not valid JSON (line 1, column 9:"
    )
    _refused(
        lambda p: load_yaml(p, what="recipe file"), tmp_path / "none.yaml", "recipe file not found"
    )
    _refused(load_yaml, tmp_path, "not a file")


def test_dump_yaml_writes_no_aliases_for_shared_objects(tmp_path):
    shared = {"r": 4}
    data = {"a": shared, "b": shared}
    assert "&id001" in yaml.safe_dump(data)  # what the kernel would refuse on reading back
    path = _write(tmp_path / "d.yaml", dump_yaml(data))
    assert load_yaml(path) == {"a": {"r": 4}, "b": {"r": 4}}


# ---------------------------------------------------------------- names and validation errors


class _Named(Strict):
    name: SafeName
    dataset: Annotated[str, AfterValidator(known_name("dataset", ["emoart", "emid"]))] = "emoart"
    steps: int = 1


@pytest.mark.parametrize("name", ["emoart", "stage_2", "a.b-c", "X9", "a" * 128])
def test_safe_names_accepted(name):
    assert _Named(name=name).name == name


@pytest.mark.parametrize(
    "name",
    ["a/b", "a\\b", ".hidden", "..", "a..b", "-x", "_x", "", "a b", "stage\n", "ü", "a" * 129],
)
def test_bad_safe_names_refused(tmp_path, name):
    with pytest.raises(ConfigError) as exc:
        validate(_Named, {"name": name}, tmp_path / "f.yaml")
    m = LINE.match(str(exc.value))
    assert m and m["file"] == str(tmp_path / "f.yaml") and m["key"] == "name"
    assert m["problem"].startswith("must be a folder-safe name") and repr(name)[:20] in m[0]


def test_unknown_field_and_unknown_name(tmp_path):
    path = tmp_path / "f.yaml"
    with pytest.raises(ValidationError) as exc:
        _Named.model_validate({"name": "a", "stpes": 3})
    assert format_validation(path, exc.value) == f"{path}: key 'stpes': unknown key"
    with pytest.raises(ConfigError) as err:
        validate(_Named, {"name": "a", "dataset": "coco"}, path)
    assert str(err.value) == (
        f"{path}: key 'dataset': unknown dataset 'coco' (expected one of ['emid', 'emoart'])"
    )
    assert err.value.key == "dataset"
    with pytest.raises(ConfigError) as err:
        validate(_Named, {"name": "a", "steps": "many"}, path, prefix=("stages", 0))
    assert str(err.value) == (
        f"{path}: key 'stages.0.steps': must be a valid integer, unable "
        "to parse string as an integer, got 'many'"
    )


def test_known_name_reads_a_callable_when_checking():
    registry: list[str] = []
    check = known_name("method", lambda: registry)
    with pytest.raises(ValueError, match=r"unknown method 'ties' \(expected one of \[\]\)"):
        check("ties")
    registry.append("ties")
    assert check("ties") == "ties"


# ---------------------------------------------------------------- one bad file per schema


def _cli_line(args) -> str:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0].removeprefix("error: ")


def _same_format(line: str, path: Path, key: str, problem: str) -> None:
    m = LINE.match(line)
    assert m, line
    assert (m["file"], m["key"], m["problem"]) == (str(path), key, problem)


def test_every_schema_refuses_an_unknown_key_in_the_same_line(tmp_path):
    # recipe (emomerge merge)
    recipe = _write(
        tmp_path / "r.yaml",
        yaml.safe_dump(
            {"merge_method": "ties", "models": [{"model": "a"}], "emomerge": {"outptu": "full"}}
        ),
    )
    _same_format(
        _cli_line(["merge", recipe, "--out", tmp_path / "o1"]),
        recipe,
        "emomerge.outptu",
        "unknown key",
    )
    # curriculum (emomerge train)
    cur = _write(
        tmp_path / "c.yaml",
        yaml.safe_dump(
            {
                "base_model": "m",
                "stages": [{"name": "a", "dataset": "emoart", "path": "x", "steps": 1}],
                "lora": {"rank": 4},
            }
        ),
    )
    _same_format(
        _cli_line(["train", cur, "--out", tmp_path / "o2"]), cur, "lora.rank", "unknown key"
    )
    # experiment (emomerge run)
    exp = _write(
        tmp_path / "e.yaml",
        yaml.safe_dump(
            {
                "name": "t",
                "architectures": [{"model": "m", "train": {"lrr": 1e-4}}],
                "curriculum": {
                    "stages": [{"name": "a", "dataset": "emoart", "path": "x", "steps": 1}]
                },
                "evaluation": {"sets": [{"dataset": "emoart", "path": "x"}]},
            }
        ),
    )
    _same_format(
        _cli_line(["run", exp, "--out", tmp_path / "o3"]),
        exp.resolve(),
        "architectures.0.train.lrr",
        "unknown key",
    )
    # lineage (emomerge lineage show)
    adapter = tmp_path / "s1"
    write_adapter(adapter, lm_modules(layers=1), lineage={"mdoe": "stacked"})
    _same_format(
        _cli_line(["lineage", "show", adapter]),
        adapter / "emomerge.json",
        "lineage.mdoe",
        "unknown key",
    )
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_every_schema_refuses_a_mistyped_value_in_the_same_line(tmp_path):
    from emomerge.experiment.config import load_experiment
    from emomerge.merging.lineage import read_stage_metadata
    from emomerge.merging.recipe import load_recipe
    from emomerge.training.curriculum import load_curriculum

    recipe = _write(
        tmp_path / "r.yaml",
        yaml.safe_dump(
            {"merge_method": "ties", "models": [{"model": "a"}], "emomerge": {"seed": "zero"}}
        ),
    )
    cur = _write(
        tmp_path / "c.yaml",
        yaml.safe_dump(
            {
                "base_model": "m",
                "seed": "zero",
                "stages": [{"name": "a", "dataset": "emoart", "path": "x", "steps": 1}],
            }
        ),
    )
    exp = _write(
        tmp_path / "e.yaml",
        yaml.safe_dump(
            {
                "name": "t",
                "architectures": ["m"],
                "seeds": ["zero"],
                "curriculum": {
                    "stages": [{"name": "a", "dataset": "emoart", "path": "x", "steps": 1}]
                },
                "evaluation": {"sets": [{"dataset": "emoart", "path": "x"}]},
            }
        ),
    )
    adapter = tmp_path / "s1"
    write_adapter(adapter, lm_modules(layers=1))
    _write(adapter / "emomerge.json", json.dumps({"kind": "stage_adapter", "seed": "zero"}))
    problem = "must be a valid integer, unable to parse string as an integer, got 'zero'"
    for load, path, key in (
        (load_recipe, recipe, "emomerge.seed"),
        (load_curriculum, cur, "seed"),
        (load_experiment, exp, "seeds.0"),
        (lambda p: read_stage_metadata(p.parent), adapter / "emomerge.json", "seed"),
    ):
        with pytest.raises(ConfigError) as exc:
            load(path)
        _same_format(str(exc.value), path, key, problem)


@pytest.mark.parametrize("schema", ["recipe", "curriculum", "experiment", "lineage"])
def test_every_schema_reads_through_the_kernel(tmp_path, schema):
    """Each real loader refuses what the kernel refuses (here: a duplicate key, an undecodable
    byte) with the kernel's line."""
    from emomerge.experiment.config import load_experiment
    from emomerge.merging.lineage import read_stage_metadata
    from emomerge.merging.recipe import load_recipe
    from emomerge.training.curriculum import load_curriculum

    if schema == "lineage":
        write_adapter(tmp_path / "s1", lm_modules(layers=1))
        path = tmp_path / "s1" / "emomerge.json"
        dup, bad = '{"kind": "stage_adapter", "seed": 1, "seed": 2}', b'{"stage": "\xff"}'
        load = lambda p: read_stage_metadata(p.parent)  # noqa: E731
    else:
        path = tmp_path / f"{schema}.yaml"
        dup, bad = "name: a\nname: b\n", b"name: \xff\n"
        load = {
            "recipe": load_recipe,
            "curriculum": load_curriculum,
            "experiment": load_experiment,
        }[schema]
    _write(path, dup)
    _refused(load, path, "duplicate key")
    _write(path, bad)
    _refused(load, path, "not a UTF-8 text file (undecodable byte 0xff")


def test_overrides_keep_types_and_constraints_and_refuse_validator_methods():
    from pydantic import Field, field_validator

    from emomerge.merging.config import overrides

    class Settings(Strict):
        r: int = Field(8, ge=1)
        lr: float | None = 1e-3

    over = overrides(Settings)
    assert over.model_validate({}).set_values() == {}
    assert over.model_validate({"lr": None}).set_values() == {"lr": None}  # allowed in Settings
    assert over.model_validate({"r": "4"}).set_values() == {"r": 4}
    for bad, problem in (
        ({"r": 0}, "must be greater than or equal to 1, got 0"),
        ({"r": None}, "must be a valid integer, got None"),
        ({"rank": 2}, "unknown key"),
    ):
        with pytest.raises(ConfigError, match=re.escape(problem)):
            validate(over, bad, "f.yaml")

    class Checked(Strict):
        name: str = "a"

        @field_validator("name")
        @classmethod
        def _upper(cls, v: str) -> str:
            return v.upper()

    with pytest.raises(TypeError, match="validator methods are not copied"):
        overrides(Checked)


@pytest.mark.parametrize(
    "text, key",
    [
        (
            "merge_method: ties\nmodels:\n  - model: a\nemomerge:\n  out-dtype: float16\n",
            "emomerge.out-dtype",
        ),
        ("merge-method: ties\nmodels:\n  - model: a\n", "merge-method"),
        ("merge_method: ties\nmodels:\n  - model: a\nemomerge:\n  int: 3\n", "emomerge.int"),
        ("merge_method: ties\nmodels:\n  - model: a\n    list[x]: 1\n", "models.0.list[x]"),
        ('merge_method: ties\nmodels:\n  - model: a\n"bad\\nkey": 1\n', "bad\\nkey"),
    ],
)
def test_the_key_a_user_wrote_is_named_whatever_it_is_spelled(tmp_path, text, key):
    """Keys are told from pydantic's union tags by the document, not by their spelling: a
    hyphenated typo, a key called "int" or holding brackets is named; a newline stays escaped."""
    from emomerge.merging.recipe import load_recipe

    path = _write(tmp_path / "r.yaml", text)
    with pytest.raises(InputError) as exc:
        load_recipe(path)
    m = LINE.match(str(exc.value))
    assert m and m["file"] == str(path) and m["key"] == key, str(exc.value)


def test_the_first_error_in_document_order_is_shown(tmp_path):
    """Two errors: the one written first in the file is reported, whatever pydantic's order."""
    from emomerge.merging.recipe import load_recipe

    path = _write(
        tmp_path / "r.yaml", "emomerge:\n  outptu: x\nmerge_method: 3\nmodels:\n  - model: a\n"
    )
    with pytest.raises(InputError) as exc:
        load_recipe(path)
    assert LINE.match(str(exc.value))["key"] == "emomerge.outptu"
    path = _write(
        tmp_path / "s.yaml", "merge_method: 3\nemomerge:\n  outptu: x\nmodels:\n  - model: a\n"
    )
    with pytest.raises(InputError) as exc:
        load_recipe(path)
    assert LINE.match(str(exc.value))["key"] == "merge_method"
