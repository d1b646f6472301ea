"""--env-file: keys from a file the user names; the environment wins; values never printed."""
from __future__ import annotations

from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.app.envfile import load_env_file, parse_env_file
from tests.conftest import write


def test_parses_dotenv_lines(tmp_path):
    path = write(tmp_path / ".env", """
        # keys
        OPENAI_API_KEY=sk-abc123
        export OTHER="quoted value"
        SINGLE='x y'
        TRAILING=v1 # comment
        """)
    assert parse_env_file(path) == {"OPENAI_API_KEY": "sk-abc123", "OTHER": "quoted value", "SINGLE": "x y",
                                    "TRAILING": "v1"}


def test_environment_wins(tmp_path):
    path = write(tmp_path / ".env", "A=from-file\nB=from-file\n")
    env = {"A": "from-env"}
    assert load_env_file(path, env) == ["B"] and env == {"A": "from-env", "B": "from-file"}


def test_bad_line_is_reported_without_its_value(tmp_path):
    path = write(tmp_path / ".env", "GOOD=1\nthis is sk-secret-value not a line\n")
    result = CliRunner().invoke(app, ["--env-file", str(path), "schema"])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {path}:2:") and "sk-secret-value" not in result.stderr


def test_key_from_env_file_reaches_the_model_config(tmp_path, monkeypatch):
    monkeypatch.setenv("MY_TEST_KEY", "x")
    monkeypatch.delenv("MY_TEST_KEY")  # unset now, and unset again after the test
    write(tmp_path / "script.yaml", "default: 'Answer: 1'\n")
    (tmp_path / "val.jsonl").write_text('{"id": "a", "question": "q", "answer": "1"}\n')
    spec = write(tmp_path / "spec.yaml", """
        name: t
        models:
          task: {model: fake/script.yaml, api_key_env: MY_TEST_KEY}
        data: {val: val.jsonl}
        nodes:
          count: {kind: llm, user: "{{ input.question }}"}
          parse: {kind: function, fn: last_integer, args: {text: count}}
        output: parse
        metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
        """)
    without = CliRunner().invoke(app, ["eval", str(spec)])
    assert without.exit_code == 2 and "MY_TEST_KEY" in without.stderr
    env = write(tmp_path / "keys.env", "MY_TEST_KEY=sk-test-0000\n")
    with_file = CliRunner().invoke(app, ["--env-file", str(env), "eval", str(spec), "--json"])
    assert with_file.exit_code == 0, with_file.output
    assert "sk-test-0000" not in with_file.stdout + with_file.stderr
