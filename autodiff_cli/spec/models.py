"""The whole YAML format as pydantic models.

Every key of CONTRACT.md is here, including keys whose behaviour later work builds; those
are accepted by the schema and refused by `unbuilt_keys()` with a clear "not implemented
yet" error, so adding the behaviour never changes the format.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from autodiff_cli.errors import describe as describe_value

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


def spec_value_error(expected: str, got: str, key: str | tuple | None = None) -> PydanticCustomError:
    """A validation error with both halves of "expected ..., got ..." (the loader reports them as given);
    `key` names the offending key (or key path) below the validated mapping."""
    return PydanticCustomError("spec_value", "expected {expected}, got {got}",
                               {"expected": expected, "got": got, "key": key})


# Key names that hold secrets, compared lower-cased without `_`, `-` and spaces (so API_KEY, apiKey and the
# x-api-key header are one name): exact names, and endings (openai_api_key, aws_secret_access_key,
# azure_ad_token). Generation params such as max_tokens or budget_tokens match neither.
_SECRET_NAMES = frozenset({"key", "token", "secret", "password", "passwd", "authorization", "proxyauthorization",
                           "cookie"})
_SECRET_ENDINGS = ("apikey", "apitoken", "accesstoken", "authtoken", "bearertoken", "sessiontoken", "refreshtoken",
                   "adtoken", "secret", "secretkey", "privatekey", "accesskey", "accesskeyid", "subscriptionkey",
                   "password", "passwd", "credentials")


def is_secret_key(name: Any) -> bool:
    """Whether a mapping key (a param or header name) is one that carries a secret: api_key, API_KEY, apiKey,
    token, Authorization, x-api-key, aws_secret_access_key, ..."""
    if not isinstance(name, str):
        return False
    norm = re.sub(r"[\s_-]", "", name).lower()
    return norm in _SECRET_NAMES or norm.endswith(_SECRET_ENDINGS)


# API keys and tokens as providers issue them: a known prefix (OpenAI/Anthropic/Stripe sk-, sk_; Hugging Face
# hf_; GitHub ghp_, gho_, ghu_, ghs_, ghr_, github_pat_; Slack xoxb-, xoxa-, xoxp-; GitLab glpat-) and 16 or
# more token characters, one at least a digit (random tokens nearly always have one, names such as
# sk_learning_rate_schedule none); AWS access key ids (AKIA/ASIA + 16 upper-case letters or digits); Google
# keys (AIza + 35).
_PREFIXED_KEY = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"(?:sk-|sk_|hf_|gh[pousr]_|github_pat_|xox[bap]-|glpat-)(?=[A-Za-z0-9_-]*[0-9])[A-Za-z0-9_-]{16,}"
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Za-z0-9])"
    r"|AIza[A-Za-z0-9_-]{35}"
    r")")
# userinfo (`user:password@`, `:secret@`, `token@`) in the authority of a URL, with or without a scheme
_URL_CREDENTIALS = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:)?(?://)?[^/?#\s@]*@")
_URL_IN_TEXT_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s@]*@")


def _looks_like_a_key(name: str) -> bool:
    """A key pasted where its variable's name goes: a known key prefix (hf_AbC...9, sk_live_...), a long run of
    mixed-case letters and digits, or a long hex string; variable names are words (OPENAI_API_KEY, my_key_2)."""
    if _PREFIXED_KEY.match(name):
        return True
    if len(name) >= 32 and re.fullmatch(r"[0-9A-Fa-f]+", name) and any(c.isdigit() for c in name):
        return True
    return (len(name) >= 20 and "_" not in name and any(c.isdigit() for c in name)
            and any(c.islower() for c in name) and any(c.isupper() for c in name))


def is_env_var_name(value: Any) -> bool:
    """Whether `value` can be what `api_key_env` holds: a variable's NAME, and nothing that looks like a key."""
    return isinstance(value, str) and bool(re.fullmatch(NAME_PATTERN, value)) and not _looks_like_a_key(value)


def has_url_credentials(url: str) -> bool:
    """Whether `url` carries credentials in its authority: user:password@, :secret@ or token@."""
    return bool(_URL_CREDENTIALS.match(url.strip()))


def looks_secret(text: str) -> bool:
    """Whether a free text holds a key (a known key prefix) or a URL with credentials: such text is never
    echoed, and never accepted where a spec keeps it."""
    return bool(_PREFIXED_KEY.search(text) or _URL_IN_TEXT_CREDENTIALS.search(text))


def secret_in(value: Any) -> tuple | None:
    """The key path (below `value`) of the first secret carrier in a free-form value: a mapping key such as
    api_key, apiKey or an Authorization / x-api-key header, or a string holding a key or a URL with
    credentials; None when there is none. Iterative, each container once (YAML aliases may share them)."""
    stack: list[tuple[tuple, Any]] = [((), value)]
    seen: set[int] = set()
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if looks_secret(v):
                return path
        elif isinstance(v, (dict, list)) and id(v) not in seen:
            seen.add(id(v))
            items = list(v.items()) if isinstance(v, dict) else list(enumerate(v))
            for k, item in items:
                if isinstance(v, dict) and is_secret_key(k):
                    return path + (k,)
            stack.extend((path + (k,), item) for k, item in reversed(items))
    return None


LITERAL_KEY_EXPECTED = "`api_key_env: NAME` on the model config, the environment variable holding the key"


def literal_key_got(where: str) -> str:
    return f"a literal API key in `{where}` (not shown; secrets never go in a spec)"


URL_EXPECTED = "an http:// or https:// URL"
URL_CREDENTIALS_GOT = "a URL with credentials (not shown; keys go in api_key_env)"


def url_problem(url: Any) -> tuple[str, str] | None:
    """(expected, got) when `url` is not an http(s) URL free of secrets; the one rule for `api_base`, whether
    a single URL, an item of a list or a deployment's `url`. Never echoes a secret."""
    if not isinstance(url, str):
        return URL_EXPECTED, describe_value(url)
    if has_url_credentials(url):
        return URL_EXPECTED, URL_CREDENTIALS_GOT
    if looks_secret(url) or any(is_secret_key(k) for k in _query_keys(url)):
        return URL_EXPECTED, "a URL with a key in it (not shown; keys go in api_key_env)"
    if not URL_PATTERN.fullmatch(url):
        return URL_EXPECTED, describe_value(url)
    return None


def _query_keys(url: str) -> list[str]:
    query = url.partition("?")[2].partition("#")[0]
    return [pair.partition("=")[0] for pair in query.split("&") if pair]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Deployment(Strict):
    """One deployment of a model served at several URLs (an item of a `models.<m>.api_base` list).
    A limit left out is the model config's own (`concurrency`, `rpm`, `tpm`)."""

    url: str = Field(description="http(s) endpoint of this deployment, e.g. http://gpu1:8000/v1")
    concurrency: int | None = Field(None, ge=1, le=1024, description="calls in flight on this deployment")
    rpm: int | None = Field(None, ge=1, description="requests per minute on this deployment")
    tpm: int | None = Field(None, ge=1, description="tokens per minute on this deployment")

    @field_validator("url", mode="before")
    @classmethod
    def _http_url(cls, value: Any) -> Any:
        problem = url_problem(value)  # the rule of every api_base form (a spec's lists are checked before, by item)
        if problem is not None:
            raise spec_value_error(*problem)
        return value


DEPLOYMENT_KEYS = tuple(Deployment.model_fields)
URL_PATTERN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[^\s/:?#\[\]@]+)(:\d{1,5})?(/\S*)?", re.IGNORECASE)
DEPLOYMENT_LIMITS = {"concurrency": 1024, "rpm": None, "tpm": None}  # limit key -> largest value allowed


def _deployment_problem(items: list) -> tuple[str, str, tuple] | None:
    """(expected, got, key below `api_base`) of the first mistake in a list of deployments, or None.
    Shapes and values are checked here so that every error names the item (and key) at fault."""
    if not items:
        return "at least one deployment (a URL, or a mapping with `url`)", "an empty list", ()
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        key: tuple = (i,)
        if isinstance(item, dict):
            unknown = [k for k in item if k not in DEPLOYMENT_KEYS]
            secret = [k for k in unknown if is_secret_key(k)]
            if secret:  # never echo the value
                return LITERAL_KEY_EXPECTED, literal_key_got(secret[0]), (i, secret[0])
            if unknown:
                return f"a known key ({', '.join(DEPLOYMENT_KEYS)})", f"unknown key `{unknown[0]}`", (i, unknown[0])
            for limit, top in DEPLOYMENT_LIMITS.items():
                value = item.get(limit)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1
                                          or (top is not None and value > top)):
                    bound = f"between 1 and {top}" if top else "of at least 1"
                    return f"a whole number {bound}", repr(value), (i, limit)
            if "url" not in item:
                return "a `url` for this deployment", "none", (i,)
            url, key = item["url"], (i, "url")
        elif isinstance(item, str):
            url = item
        else:
            return "a URL or a mapping {url, concurrency, rpm, tpm}", describe_value(item), key
        problem = url_problem(url)
        if problem is not None:
            return (*problem, key)
        norm = url.rstrip("/").lower()
        if norm in seen:
            return "each deployment URL once", f"a duplicate of item {seen[norm]} ({url})", key
        seen[norm] = i
    return None


class ModelConfig(Strict):
    """One named model configuration (`models.<name>`)."""

    model: str = Field(description="litellm model string, e.g. openai/gpt-4o-mini, local/smollm2-135m, fake/script.yaml")
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: list[str] | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="further generation parameters passed to litellm as given")
    api_base: str | list[str | Deployment] | None = Field(
        None, description="endpoint URL; a list means several deployments of this model behind litellm's Router, "
                          "each a URL or {url, concurrency, rpm, tpm}")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="NAME of the environment variable holding the API key")
    concurrency: int = Field(8, ge=1, le=1024)
    rpm: int | None = Field(None, ge=1, description="requests per minute limit")
    tpm: int | None = Field(None, ge=1, description="tokens per minute limit")
    timeout: float = Field(600.0, gt=0, description="seconds per call attempt")
    max_retries: int = Field(3, ge=0, le=20, description="retries after a failed attempt (our own loop; litellm's are off)")

    @model_validator(mode="before")
    @classmethod
    def _refuse_literal_keys(cls, data: Any) -> Any:
        """No secret in a model config: not as a key of its own (api_key, API_KEY, token), nor anywhere in
        `extra` (api_key-like params, Authorization / x-api-key headers, keys or URLs with credentials in
        values, which litellm would send and a run directory would keep). Values are never echoed."""
        if isinstance(data, dict):
            for key in data:
                if is_secret_key(key):
                    raise spec_value_error(LITERAL_KEY_EXPECTED, literal_key_got(key), key)
            found = secret_in(data.get("extra"))
            if found is not None:
                where = next((k for k in reversed(found) if isinstance(k, str)), "extra")
                raise spec_value_error(LITERAL_KEY_EXPECTED, literal_key_got(where), ("extra", *found))
        return data

    @field_validator("api_base", mode="before")
    @classmethod
    def _deployments_are_sound(cls, value: Any) -> Any:
        if isinstance(value, list):
            problem = _deployment_problem(value)
            if problem is not None:
                expected, got, key = problem
                raise spec_value_error(expected, got, key)
        elif value is not None:  # a single URL: the same rule as each item of a list
            problem = url_problem(value)
            if problem is not None:
                raise spec_value_error(*problem)
        return value

    @model_validator(mode="after")
    def _deployments_need_http(self) -> ModelConfig:
        if isinstance(self.api_base, list):
            from autodiff_cli.llm.providers.registry import (
                provider_for,  # only for a list: keeps imports light
            )

            provider = provider_for(self.model)
            if provider.in_process:
                raise spec_value_error(f"a single api_base (or none) for a `{provider.name}/` model, which is not "
                                       "served over HTTP", "a list of deployments", "api_base")
        return self

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _env_name_not_a_key(cls, value: Any) -> Any:
        if value is not None and not is_env_var_name(value):
            # never echo it, whatever its type: it may be the key (some keys are letters, digits and _ only)
            raise spec_value_error("the NAME of an environment variable (letters, digits and _), e.g. OPENAI_API_KEY",
                                   "something else (not shown: it may be the key itself)")
        return value

    def deployments(self) -> list[Deployment] | None:
        """The deployments of a listed `api_base`, each with its limits filled in from this config; None for a
        single URL (or none)."""
        if not isinstance(self.api_base, list):
            return None
        out = []
        for item in self.api_base:
            d = Deployment(url=item) if isinstance(item, str) else item
            out.append(Deployment(url=d.url, concurrency=d.concurrency or self.concurrency,
                                  rpm=d.rpm if d.rpm is not None else self.rpm,
                                  tpm=d.tpm if d.tpm is not None else self.tpm))
        return out

    def capacity(self) -> int:
        """Calls this config can have in flight: `concurrency`, or the deployments' together."""
        deployments = self.deployments()
        return self.concurrency if deployments is None else sum(d.concurrency for d in deployments)

    def generation_params(self) -> dict[str, Any]:
        """Parameters that change the reply (and so belong in the cache key)."""
        params = {k: getattr(self, k) for k in ("temperature", "max_tokens", "top_p", "seed", "stop")}
        params.update(self.extra)
        return {k: v for k, v in params.items() if v is not None}


class SplitSpec(Strict):
    """A data split: a file plus an optional slice, seeded sample and stratification."""

    path: str
    start: int | None = None
    stop: int | None = None
    sample: int | None = Field(None, ge=1)
    stratify: str | None = None
    seed: int = 0


class GeneratorSpec(Strict):
    name: str
    seed: int = 0
    train: int = Field(20, ge=0)
    val: int = Field(20, ge=0)
    test: int = Field(20, ge=0)


class DataSpec(Strict):
    train: str | SplitSpec | None = None
    val: str | SplitSpec | None = None
    test: str | SplitSpec | None = None
    generator: GeneratorSpec | None = None
    id_field: str = "id"

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if self.generator is None and self.val is None and self.train is None:
            raise spec_value_error("split files (`train`, `val`, optional `test`) or a `generator`", "neither")
        if self.generator is not None and any(s is not None for s in (self.train, self.val, self.test)):
            raise spec_value_error("either split files or a `generator`", "both")
        return self


class ParamSpec(Strict):
    kind: Literal["prompt", "demos"] = "prompt"
    value: str = ""
    role: str | None = Field(None, description="what this text is for, shown to the backward engine and optimizer")
    trainable: bool = True
    max: int | None = Field(None, ge=0, description="demos: how many shots at most (default 3)")
    fields: list[str] | None = Field(None, description="demos: which example fields each demo shows "
                                                      "(default: the `input.X` fields its node reads)")


WHEN_HELP = ("restricted expression over the node's inputs (the language of `until`); "
             "false: the node does not run, costs nothing and its output is None")


def check_node_entries(nodes: Any) -> Any:
    """Each node is a mapping with a `kind`; the kind's own model (nodes/<kind>.py, `Spec`) checks the rest
    when the spec is compiled, so a new kind needs no change here."""
    if isinstance(nodes, dict):
        for name, node in nodes.items():
            if isinstance(node, dict) and "kind" not in node:
                raise spec_value_error("a `kind:` naming the node kind (llm, function, loop, ...)", "none", key=(name,))
            if isinstance(node, dict) and not isinstance(node["kind"], str):
                raise spec_value_error("a node kind name (llm, function, loop, ...)", describe_value(node["kind"]),
                                       key=(name, "kind"))
    return nodes


# A node as written: `kind` plus the keys of that kind, checked by the kind's own model when the spec is compiled.
# In `autodiff schema` it is the union of the registered kinds' models (app/commands.spec_schema defines `Node`).
NODE_SCHEMA_MARK = {"x-autodiff": "node"}  # replaced by a reference to `Node`
NodeEntry = Annotated[dict[str, Any], WithJsonSchema(NODE_SCHEMA_MARK)]


class MetricSpec(Strict):
    fn: str = Field(description="exact_match, f1, contains, accuracy, or `module:function`")
    args: dict[str, str] = Field(description="argument -> reference, e.g. pred: parse, target: input.answer")


class LossSpec(MetricSpec):
    feedback: Literal["template", "llm"] = "template"


class SkipSpec(Strict):
    from_: str = Field(alias="from", description="`loss` or a node name")
    to: str = Field(description="a param name")


class BudgetSpec(Strict):
    max_calls: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_cost_usd: float | None = Field(None, gt=0)


class TrainSpec(Strict):
    mode: Literal["autodiff", "textgrad", "no_gradient", "none"] = "autodiff"
    optimizer: str = Field("gdpo", description="the optimizer of text steps, a name of autodiff_cli/optim/registry.py "
                                              "(the demos optimizer runs the steps `demos` gives to demos)")
    optimizer_options: dict[str, Any] = Field(default_factory=dict,
                                              description="settings of the chosen optimizer (each checks its own)")
    validation: Literal["sequential", "racing"] = Field(
        "sequential", description="two-stage validation of a step's candidates: one at a time (the first that beats "
                                  "the best is accepted) or racing (the step's contenders validated together, each "
                                  "dropped once it cannot win)")
    max_steps: int = Field(12, ge=0)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(4, ge=1)
    max_proposals: int = Field(5, ge=1)
    max_error_samples: int = Field(4, ge=1)
    max_correct_samples: int = Field(2, ge=0)
    fail_threshold: float = Field(0.5, ge=0, le=1)
    patience: int | None = Field(None, ge=1)
    history_k: int = Field(5, ge=0)
    propose: Literal["joint", "one_at_a_time"] = "joint"
    demos: Literal["off", "text_then_demos", "demos_then_text", "interleaved", "demos_only"] = Field(
        "off", description="which steps propose text and which propose demos")
    teacher: str | None = Field(None, description="a key of `models` that bootstraps demos "
                                                  "(default: each node's model at temperature 0.7)")
    seed: int = 0
    max_error_rate: float = Field(0.1, ge=0, le=1, description="share of model calls allowed to fail after retries "
                                  "(examples of a split, or a training step's backward or optimizer calls); above it, exit 3")
    budget: BudgetSpec = Field(default_factory=BudgetSpec)

    @field_validator("demos", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML 1.1 reads a bare `off` as false


class Spec(Strict):
    name: Name
    description: str | None = None
    models: dict[Name, ModelConfig]
    data: DataSpec
    params: dict[Name, ParamSpec] = Field(default_factory=dict)
    nodes: dict[Name, NodeEntry] = Field(description="node name -> {kind: llm | function | loop | ..., and the "
                                                     "keys of that kind (`autodiff schema` lists them)}")
    output: str
    metric: MetricSpec
    loss: LossSpec | None = None
    skip: list[SkipSpec] = Field(default_factory=list)
    train: TrainSpec = Field(default_factory=TrainSpec)
    constraints: list[str] = Field(default_factory=list)

    @field_validator("nodes")
    @classmethod
    def _some_nodes(cls, nodes: dict) -> dict:
        if not nodes:
            raise spec_value_error("at least one node", "none")
        return check_node_entries(nodes)


def unbuilt_keys(spec: Spec) -> list[tuple[tuple, str]]:
    """Keys of the format whose behaviour is not built yet: (key path, what arrives later)."""
    return []  # every key of the format is built
