"""No secret given in a spec or a --set ever reaches an error message, a hint or a run directory.

- a key pasted as `api_key_env` that happens to be a valid variable name (hf_..., ghp_..., AKIA...,
  a long mixed-case or hex token) is refused without being echoed;
- credentials in `api_base` (user:password@, :secret@, token@), whether a single URL or a list, and
  secret carriers in `extra` (api_key in any spelling, Authorization / x-api-key headers, keys or
  credential URLs in values) are spec errors naming the key, never the value;
- a --set argument that may hold a secret is shown as `KEY=***` in every message.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from autodiff_cli.app.cli import app
from autodiff_cli.llm.cache import redact_url, scrub_url_secret
from tests.specs import MINI_TRAIN

BASE = MINI_TRAIN.replace("name: mini", "name: leaks") + "train: {max_steps: 1}\n"
MODEL = "task: {model: fake/script.yaml, temperature: 0}"
ROWS = [{"id": "a", "question": "How many? 2 apples.", "answer": "2"}]

# keys that match the variable-name pattern [A-Za-z_][A-Za-z0-9_]* (made up, of the real shapes)
NAME_SHAPED_KEYS = [
    "hf_AbCdEf0123456789GhIjKlMnOpQrStUvWx",
    "ghp_R4nd0mT0k3nV4lu3Abcdefghijklmnopqrst",
    "gho_16C7e42F292c6912E7710c838347Ae178B4a",
    "github_pat_11ABCDEFG0abcdefghijkl_mnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUV",
    "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
    "AKIAIOSFODNN7EXAMPLE",
    "AIzaSyD4x9Qm2Lk7pWv3Hn8RtY6bC1eF0gJ5sU",
    "a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",  # 40 hex digits
]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "script.yaml").write_text('default: "Answer: 2"\n', encoding="utf-8")
    for split in ("train", "val"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return tmp_path


def cli(*args) -> tuple[int, str]:
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout + r.stderr


def spec_with(project: Path, model: str) -> Path:
    spec = project / "spec.yaml"
    spec.write_text(BASE.replace(MODEL, model), encoding="utf-8")
    return spec


def assert_refused_without(code: int, output: str, secret: str, head: str, *fragments: str) -> None:
    assert code == 2, output
    assert secret not in output, output
    first = output.splitlines()[0]
    assert first.startswith(head), f"\n{first}\ndoes not start with\n{head}"
    assert "Traceback" not in output
    for fragment in fragments:
        assert fragment in output, (fragment, output)


# ---------------------------------------------------------------- api_key_env


@pytest.mark.parametrize("key", NAME_SHAPED_KEYS)
@pytest.mark.parametrize("command", ["validate", "eval", "train"])
def test_a_key_shaped_like_a_variable_name_is_refused_and_never_echoed(project, key, command):
    spec = spec_with(project, f"task: {{model: fake/script.yaml, api_key_env: {key}}}")
    args = [command, spec] + (["--runs-dir", project / "runs"] if command == "train" else [])
    assert_refused_without(*cli(*args), key, f"error: {spec}:3: models.task.api_key_env: expected the NAME",
                           "not shown: it may be the key itself")
    assert not (project / "runs").exists()


@pytest.mark.parametrize("key", NAME_SHAPED_KEYS[:3])
def test_a_key_given_as_api_key_env_with_set_is_never_echoed(project, key):
    spec = spec_with(project, MODEL)
    # the second --set fails too: the message about it must not show the first one's argument either
    code, out = cli("validate", spec, "--set", f"models.task.api_key_env={key}", "--set", "name=1x")
    assert_refused_without(code, out, key, "error: --set name=1x: name: ", "--set models.task.api_key_env=***")


@pytest.mark.parametrize("value", [f"[{NAME_SHAPED_KEYS[0]}]", f"{{k: {NAME_SHAPED_KEYS[0]}}}", "12345678901234567890"])
def test_an_api_key_env_of_another_type_is_never_echoed(project, value):
    spec = spec_with(project, f"task: {{model: fake/script.yaml, api_key_env: {value}}}")
    code, out = cli("validate", spec)
    assert_refused_without(code, out, value.strip("[]{}k: "), f"error: {spec}:3: models.task.api_key_env: ",
                           "not shown")


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "HF_TOKEN", "GITHUB_TOKEN", "my_key_2", "ASIA_PACIFIC_ENDPOINT",
                                  "sk_learning_rate_schedule", "AzureOpenAIKeyForProduction"])
def test_real_variable_names_are_still_names(project, name):
    spec = spec_with(project, f"task: {{model: fake/script.yaml, api_key_env: {name}}}")
    code, out = cli("validate", spec)
    assert code == 2 and f"the environment variable {name} (holding the API key) is not set" in out, out


# ---------------------------------------------------------------- api_base credentials


SECRET = "pa55W0rd-xyz"
CREDENTIAL_URLS = [f"https://user:{SECRET}@host.example/v1", f"https://:{SECRET}@host.example",
                   f"https://{SECRET}@host.example:8443/v1", f"http://user:{SECRET}@10.0.0.1:8000"]


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
@pytest.mark.parametrize("command", ["validate", "train"])
def test_credentials_in_a_single_api_base_are_refused_and_never_echoed(project, url, command):
    spec = spec_with(project, f"task: {{model: openai/served, api_key_env: OPENAI_API_KEY, api_base: '{url}'}}")
    args = [command, spec] + (["--runs-dir", project / "runs"] if command == "train" else [])
    assert_refused_without(*cli(*args), SECRET, f"error: {spec}:3: models.task.api_base: expected an http:// or "
                           "https:// URL, got a URL with credentials", "api_key_env")
    assert not (project / "runs").exists()  # config.yaml / resolved.yaml never hold it


@pytest.mark.parametrize("url", CREDENTIAL_URLS[:3])
def test_credentials_in_an_api_base_given_with_set_are_refused_and_never_echoed(project, url):
    spec = spec_with(project, MODEL)
    code, out = cli("validate", spec, "--set", "models.task.model=openai/served", "--set", f"models.task.api_base={url}")
    assert_refused_without(code, out, SECRET, "error: --set models.task.api_base=***: models.task.api_base: "
                           "expected an http:// or https:// URL, got a URL with credentials")


def test_a_list_item_and_a_single_url_get_the_same_words(project):
    url = CREDENTIAL_URLS[0]
    single = spec_with(project, f"task: {{model: openai/served, api_base: '{url}'}}")
    code, one = cli("validate", single)
    listed = spec_with(project, f"task: {{model: openai/served, api_base: ['{url}']}}")
    code2, many = cli("validate", listed)
    assert code == code2 == 2
    assert one.split("models.task.api_base: ")[1] == many.split("models.task.api_base.0: ")[1]


def test_a_key_in_the_query_of_api_base_is_refused(project):
    spec = spec_with(project, "task: {model: openai/served, api_base: 'https://host/v1?api-key=abc123xyz'}")
    assert_refused_without(*cli("validate", spec), "abc123xyz", f"error: {spec}:3: models.task.api_base: ",
                           "a key in it (not shown")


# ---------------------------------------------------------------- extra and the model config's own keys


@pytest.mark.parametrize("extra, key", [
    ("{extra_headers: {Authorization: 'Bearer SECRETVALUE'}}", "extra.extra_headers.Authorization"),
    ("{headers: {api-key: SECRETVALUE}}", "extra.headers.api-key"),
    ("{extra_headers: {X-Api-Key: SECRETVALUE}}", "extra.extra_headers.X-Api-Key"),
    ("{API_KEY: SECRETVALUE}", "extra.API_KEY"),
    ("{apiKey: SECRETVALUE}", "extra.apiKey"),
    ("{extra_body: {api_key: SECRETVALUE}}", "extra.extra_body.api_key"),
    ("{aws_secret_access_key: SECRETVALUE}", "extra.aws_secret_access_key"),
    ("{azure_ad_token: SECRETVALUE}", "extra.azure_ad_token"),
    ("{base_url: 'https://me:SECRETVALUE@proxy'}", "extra.base_url"),
    ("{metadata: {note: 'Bearer sk-SECRETVALUE0123456789'}}", "extra.metadata.note"),
])
def test_secret_carriers_in_extra_are_refused_and_never_echoed(project, extra, key):
    spec = spec_with(project, f"task: {{model: fake/script.yaml, extra: {extra}}}")
    assert_refused_without(*cli("validate", spec), "SECRETVALUE", f"error: {spec}:3: models.task.{key}: expected "
                           "`api_key_env: NAME`", "literal API key")


@pytest.mark.parametrize("key", ["API_KEY", "apiKey", "access_token", "password"])
def test_secret_keys_of_the_model_config_itself_are_named_as_such(project, key):
    spec = spec_with(project, f"task: {{model: fake/script.yaml, {key}: SECRETVALUE}}")
    assert_refused_without(*cli("validate", spec), "SECRETVALUE", f"error: {spec}:3: models.task.{key}: ",
                           "literal API key")


def test_generation_params_and_plain_headers_in_extra_still_pass(project):
    extra = ("{max_tokens: 5, budget_tokens: 64, top_k: 3, max_completion_tokens: 9, prompt_cache_key: run-1, "
             "extra_headers: {X-Title: my-app, HTTP-Referer: 'https://example.org'}}")
    spec = spec_with(project, f"task: {{model: fake/script.yaml, extra: {extra}}}")
    code, out = cli("validate", spec)
    assert code == 0, out


def test_a_set_with_a_secret_in_extra_is_shown_as_stars(project):
    spec = spec_with(project, MODEL)
    code, out = cli("validate", spec, "--set", "models.task.extra={headers: {Authorization: Bearer SECRETVALUE}}")
    assert_refused_without(code, out, "SECRETVALUE", "error: --set models.task.extra=***: models.task.extra.headers."
                           "Authorization: ")


def test_no_error_about_another_key_echoes_a_secret_value(project):
    # a literal key in a place no model check looks at (a wrong type, a bad name) is still not shown
    spec = spec_with(project, f"task: {{model: fake/script.yaml, stop: sk-live-{SECRET}0123456789}}")
    assert_refused_without(*cli("validate", spec), SECRET, f"error: {spec}:3: models.task.stop: ", "not shown")
    spec.write_text(BASE.replace("name: leaks", f"name: hf_{SECRET}0123456789abcdef"))
    assert_refused_without(*cli("validate", spec), SECRET, f"error: {spec}:1: name: ", "not shown")


# ---------------------------------------------------------------- one helper redacts URLs


def test_url_redaction_hides_passwords_and_token_user_names():
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("https://tok3nValue@host/v1") == "https://***@host/v1"  # a user name alone is a token
    assert redact_url("https://[::1]:8000/v1") == "https://[::1]:8000/v1"
    assert scrub_url_secret("cannot reach tok3nValue@host", "https://tok3nValue@host") == "cannot reach ***@host"


def test_one_helper_redacts_urls_for_the_cache_and_the_spec():
    from autodiff_cli import errors

    assert errors.redact_url is redact_url and errors.scrub_url_secret is scrub_url_secret
