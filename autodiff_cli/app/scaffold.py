"""`autodiff init [DIR] --template classification|qa|rag|agent`: a commented starter config and a tiny dataset.

Writes `DIR/autodiff.yaml` and `DIR/data/{train,val,test}.jsonl` (plus `DIR/data/corpus.jsonl` for
rag and agent). Everything is written here as strings, so no package data is needed. Every template
passes `autodiff validate` as written; existing files are never overwritten without --force.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from autodiff_cli.errors import UsageError
from autodiff_cli.io.files import atomic_write_bytes

CONFIG_NAME = "autodiff.yaml"

_HOW_TO = """\
#
# Try it (from the folder that holds this file):
#   autodiff validate autodiff.yaml            # static checks; calls no model
#   autodiff eval autodiff.yaml                # score the prompts below on data/val.jsonl
#   autodiff train autodiff.yaml --dry-run     # projected calls and tokens per role
#   autodiff train autodiff.yaml               # optimize; the last line printed is the run directory
#   autodiff runs show runs/<run>   ·   autodiff diff runs/<run>   ·   autodiff export-prompts runs/<run>
#
# Models: local/smollm2-135m is tiny and runs offline with no API key (install the `[local]`
# extra). It shows the machinery but cannot really do the task, so expect flat scores. For
# scores that move, point the three roles at a stronger model, e.g.
#   --set models.task.model=local/qwen2.5-coder-1.5b
# or any litellm model string (openai/gpt-4o-mini, ollama/...) with `api_key_env: NAME_OF_ENV_VAR`
# (never the key itself).
#
# Editor completion: `autodiff schema > autodiff.schema.json` and point your YAML plugin at it.
"""

_MODELS = """\
models:
  # `task` runs the pipeline's llm nodes; `backward` writes the textual gradients and
  # `optimizer` proposes new prompts during `autodiff train` (both default to `task`).
  task:      {model: local/smollm2-135m, temperature: 0, max_tokens: %(max_tokens)d}
  backward:  {model: local/smollm2-135m, temperature: 0}
  optimizer: {model: local/smollm2-135m, temperature: 0}
"""

_DATA = """\
data:
  # JSONL files relative to this config; every row needs the fields the templates read
  # (`input.<field>`) and the metric's target. `id` names a row in traces and reports.
  train: data/train.jsonl
  val:   data/val.jsonl        # validation: decides which proposals are accepted
  test:  data/test.jsonl       # scored once at the end, for the initial and the best prompts
"""

_TRAIN = """\
train:
  mode: autodiff               # autodiff | textgrad | no_gradient | none (score the initial prompts only)
  max_steps: 4                 # minibatches; each one may propose up to max_proposals new prompts
  batch_size: 4
  max_proposals: 2
  seed: 0
  budget: {max_calls: %(max_calls)d}     # stop before the call that would pass it (exit 4)
"""

CLASSIFICATION = """\
# autodiff starter: text classification (`autodiff init --template classification`).
#
# The pipeline: one LLM call reads a short customer review and names its sentiment, then the
# builtin `label` parser maps the reply to one of three labels. `autodiff train` rewrites the
# two trainable prompts (`instruction` and its peer `answer_format`) to raise the validation
# score: failed examples get textual feedback ("gradients") and the optimizer proposes new text.
""" + _HOW_TO + """
name: sentiment

""" + _MODELS % {"max_tokens": 32} + """
""" + _DATA + """
params:
  # Trainable texts. `role` tells the backward engine and the optimizer what each one is for;
  # peers in one prompt (instruction vs output format) get separate feedback.
  instruction:
    value: "Read the customer review and decide its sentiment: positive, negative or neutral."
    role: task instruction
  answer_format:
    value: "Reply with one word: positive, negative or neutral."
    role: output format

nodes:
  classify:
    kind: llm                  # uses the `task` model unless it says `model: <name>`
    system: "{{ instruction }}\\n{{ answer_format }}"
    user: "Review: {{ input.text }}"
  parse:
    kind: function
    fn: label                  # a builtin; any `package.module:function` works too
    args: {text: classify}     # argument -> what it reads (a node, node.field or input.field)
    with:
      labels: [positive, negative, neutral]
      default: null            # no label named: the prediction is empty and scores 0

output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.label}}   # a fraction in [0, 1]

""" + _TRAIN % {"max_calls": 500} + """
constraints:                   # plain-text rules the optimizer must keep
  - "The labels positive, negative and neutral keep their exact spelling."
"""

QA = """\
# autodiff starter: reading-comprehension QA (`autodiff init --template qa`).
#
# The pipeline: one LLM call answers a question about a short passage given with it, then the
# builtin `answer_after` parser takes the text after "Answer:". Validation and test use exact
# match; training uses token F1 (`loss`), which gives partial credit ("the Nile" vs "Nile"),
# so the optimizer sees which answers were close. Trainable: the instruction and the answer
# format.
""" + _HOW_TO + """
name: reading_qa

""" + _MODELS % {"max_tokens": 64} + """
""" + _DATA + """
params:
  instruction:
    value: "Answer the question using only the passage. Copy the answer from the passage when you can."
    role: task instruction
  answer_format:
    value: "End your reply with a line `Answer: <short answer>` (a name, number, date or short phrase)."
    role: output format

nodes:
  answer:
    kind: llm
    system: "{{ instruction }}\\n{{ answer_format }}"
    user: |-
      Passage: {{ input.context }}

      Question: {{ input.question }}
  parse:
    kind: function
    fn: answer_after           # the first line after the last "Answer:" (None when missing)
    args: {text: answer}
    with: {marker: "Answer:"}

output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}   # validation and test
loss:   {fn: f1, args: {pred: parse, target: input.answer}}            # training score

""" + _TRAIN % {"max_calls": 500} + """
constraints:
  - "Keep asking for a final line that starts with `Answer:`; a program reads it."
"""

RAG = """\
# autodiff starter: retrieval-augmented QA (`autodiff init --template rag`).
#
# The pipeline: the builtin BM25 retriever finds the passages of data/corpus.jsonl closest to
# the question (rows {"id", "title", "text"}), then one LLM call answers from them. The corpus
# describes a made-up product, so the model cannot answer from memory: it has to read.
# Training rewrites the answer instruction and format; the retriever has no trainable text,
# so gradients stop there. To train the query too, add an llm node that writes it, with its
# own param, and pass it to bm25 (`args: {query: write_query}`).
""" + _HOW_TO + """
name: product_rag

""" + _MODELS % {"max_tokens": 48} + """
""" + _DATA + """
params:
  answer_instruction:
    value: "Answer the question using the passages about the Lumen desk lamp."
    role: task instruction for the answer generator
  answer_format:
    value: "Reply with only the short answer (a number, name or short phrase), no explanation."
    role: output format of the answer

nodes:
  retrieve:
    kind: function
    fn: bm25                   # top-k passages as "title: text" strings
    args: {query: input.question}
    with: {corpus: data/corpus.jsonl, k: 2}    # path relative to this file (or $AUTODIFF_DATA)
  answer:
    kind: llm
    system: "{{ answer_instruction }}\\n\\n{{ answer_format }}"
    # a list renders one item per line
    user: "Passages:\\n{{ retrieve }}\\n\\nQuestion: {{ input.question }}"

output: answer
metric: {fn: exact_match, args: {pred: answer, target: input.answer}}   # validation and test
loss:   {fn: f1, args: {pred: answer, target: input.answer}}            # training score (partial credit)

""" + _TRAIN % {"max_calls": 500}

AGENT = """\
# autodiff starter: a ReAct agent (`autodiff init --template agent`).
#
# The pipeline is a loop: a planner LLM thinks and picks an action (search, lookup, finish),
# the builtin `react_act` runs it over data/corpus.jsonl (a made-up company's wiki), the step
# joins the history, and the loop repeats until the planner finishes or `max_iters` is reached.
# Questions need two facts ("who manages the team that owns Atlas?"). Every planner call gets
# its own feedback during training, and a `skip` connection sends the final evaluation straight
# to the planner's instruction.
""" + _HOW_TO + """
name: wiki_agent

""" + _MODELS % {"max_tokens": 160} + """
""" + _DATA + """
params:
  planner_instruction:
    value: >-
      You answer a question by searching the company wiki, one step at a time. Questions
      usually need two facts: find the first, then search for the second using what you
      learned. Finish as soon as the observations contain the answer.
    role: task instruction of the ReAct planner
  planner_actions:
    value: >-
      Each step, reply with a thought and one action. Actions: "search" with a short query
      returns the best matching wiki pages; "lookup" with an exact page title returns that
      page; "finish" with the final answer ends the task. The answer given to finish is only
      the short answer (a name, number or short phrase).
    role: description of the agent's actions and answer format

nodes:
  react:
    kind: loop
    max_iters: 4                      # at most 4 planner calls per question
    state:
      steps: []                       # the history: one "Thought/Action/Observation" text per step
      last: {}                        # the latest action and its observation
    body:                             # nodes of one iteration; they read `state` and `iteration`
      plan:
        kind: llm
        system: "{{ planner_instruction }}\\n\\n{{ planner_actions }}"
        user: |-
          Question: {{ input.question }}

          Steps so far:
          {%- for step in state.steps %}

          Step {{ loop.index }}:
          {{ step }}
          {%- else %}
          (none yet)
          {%- endfor %}

          This is step {{ iteration + 1 }}.
        json_schema:                  # structured output: the node's output is a mapping
          type: object
          properties:
            thought:  {type: string, maxLength: 300}
            action:   {type: string, enum: [search, lookup, finish]}
            argument: {type: string, maxLength: 200}
          required: [thought, action, argument]
          additionalProperties: false
      act:
        kind: function
        fn: react_act                 # runs the action; never fails on a malformed plan
        args: {plan: plan}
        with: {corpus: data/corpus.jsonl, k: 2}
      record:
        kind: function
        fn: dedup_extend              # append this step to the history
        args: {items: state.steps, new: act.step}
    update: {steps: record, last: act}
    until: "act.action == 'finish'"   # a restricted expression, never Python eval
  combine:
    kind: function
    fn: react_answer                  # the finish argument, else the last observation
    args: {last: react.last, steps: react.steps}

output: combine
metric: {fn: exact_match, args: {pred: combine, target: input.answer}}   # validation and test
loss:   {fn: f1, args: {pred: combine, target: input.answer}}            # training score
skip:
  - {from: loss, to: planner_instruction}   # the evaluation, straight to the planner's instruction

""" + _TRAIN % {"max_calls": 2000}


def _rows(prefix: str, rows: list[dict]) -> list[dict]:
    return [{"id": f"{prefix}{i}", **row} for i, row in enumerate(rows, 1)]


_SENTIMENT = {
    "train": [
        ("The lamp arrived early and works perfectly. Very happy with it.", "positive"),
        ("Broke after two days and support never answered my emails.", "negative"),
        ("It does what the box says. Nothing more, nothing less.", "neutral"),
        ("Best headphones I have owned; the sound is crisp and clear.", "positive"),
        ("The strap feels cheap and the colour faded after one wash.", "negative"),
        ("Delivery took a week. The product is as described.", "neutral"),
        ("I love how light this backpack is, and it fits my laptop.", "positive"),
        ("Waste of money: the battery lasts barely an hour.", "negative"),
    ],
    "val": [
        ("Great value for the price, I would buy it again.", "positive"),
        ("The screen cracked the first time I dropped it on a carpet.", "negative"),
        ("Average kettle. It boils water.", "neutral"),
        ("Super comfortable chair, my back pain is gone.", "positive"),
        ("Instructions were missing and two screws did not fit.", "negative"),
        ("It is a phone case. It fits the phone.", "neutral"),
    ],
    "test": [
        ("Fantastic blender, smoothies in ten seconds.", "positive"),
        ("Stopped charging after a month. Very disappointed.", "negative"),
        ("The mug holds coffee. The handle is fine.", "neutral"),
        ("Gorgeous colours and the fabric is soft. Recommended!", "positive"),
        ("Loud, slow and it smells of burnt plastic.", "negative"),
        ("Arrived on Tuesday as planned; I have not used it much yet.", "neutral"),
    ],
}

_READING = {
    "train": [
        ("The Amazon River flows through Peru, Colombia and Brazil before reaching the Atlantic Ocean.",
         "Which ocean does the Amazon River reach?", "Atlantic Ocean"),
        ("Marie Curie won the Nobel Prize in Physics in 1903 and the Nobel Prize in Chemistry in 1911.",
         "In which year did Marie Curie win the Nobel Prize in Chemistry?", "1911"),
        ("The bakery on Elm Street opens at 7 am and closes at 3 pm; on Sundays it stays closed.",
         "On which day is the bakery closed?", "Sunday"),
        ("Mount Kilimanjaro, in Tanzania, rises 5,895 metres above sea level.",
         "In which country is Mount Kilimanjaro?", "Tanzania"),
        ("Our team meeting moved from Monday to Thursday because Anna is travelling to Oslo.",
         "Where is Anna travelling?", "Oslo"),
        ("The recipe needs three eggs, two cups of flour and a pinch of salt.",
         "How many eggs does the recipe need?", "three"),
        ("Jupiter is the largest planet of the Solar System; Saturn is the second largest.",
         "Which planet is the second largest?", "Saturn"),
        ("The library lends books for 21 days and charges 10 cents per day for late returns.",
         "For how many days does the library lend books?", "21"),
    ],
    "val": [
        ("The Danube flows through ten countries, more than any other river in the world.",
         "How many countries does the Danube flow through?", "ten"),
        ("Ada Lovelace wrote what is considered the first computer program, for Babbage's Analytical Engine.",
         "For whose machine did Ada Lovelace write a program?", "Babbage"),
        ("The museum is free on the first Sunday of each month; otherwise a ticket costs 12 euros.",
         "How much does a museum ticket cost?", "12 euros"),
        ("Honey bees communicate the direction of flowers with a waggle dance.",
         "How do honey bees communicate the direction of flowers?", "waggle dance"),
        ("The train to Lyon leaves from platform 4 at 9:15.",
         "From which platform does the train to Lyon leave?", "4"),
        ("Penguins live almost exclusively in the Southern Hemisphere.",
         "In which hemisphere do penguins live?", "Southern Hemisphere"),
    ],
    "test": [
        ("The Great Wall of China is more than 21,000 kilometres long.",
         "How long is the Great Wall of China?", "more than 21,000 kilometres"),
        ("Leonardo da Vinci painted the Mona Lisa in the early 16th century.",
         "Who painted the Mona Lisa?", "Leonardo da Vinci"),
        ("The concert was cancelled because of a storm and will take place on 14 June instead.",
         "Why was the concert cancelled?", "a storm"),
        ("Copper is an excellent conductor of electricity and is used in most electrical wiring.",
         "What is copper used in?", "electrical wiring"),
        ("Tomás planted tomatoes in April and picked the first ones in July.",
         "When did Tomás pick the first tomatoes?", "July"),
        ("The Pacific is the deepest ocean; its Mariana Trench reaches about 11 kilometres.",
         "Which ocean is the deepest?", "Pacific"),
    ],
}

_LAMP_CORPUS = [
    ("Lumen overview", "The Lumen desk lamp is made by Brightfield. It has an aluminium arm and a weighted base."),
    ("Lumen brightness", "The Lumen desk lamp has 5 brightness levels, changed with the touch ring on the base."),
    ("Lumen colour temperature", "The Lumen lamp offers 3 colour temperatures: warm, neutral and daylight."),
    ("Lumen battery", "The Lumen lamp's battery lasts 12 hours at medium brightness and charges in 3 hours."),
    ("Lumen charging", "The Lumen lamp charges through a USB-C port at the back of the base."),
    ("Lumen warranty", "Brightfield gives the Lumen lamp a 2 year warranty covering the LED and the battery."),
    ("Lumen weight", "The Lumen lamp weighs 1.2 kilograms, most of it in the base."),
    ("Lumen timer", "A double tap on the touch ring starts a 30 minute sleep timer that dims the light."),
    ("Lumen colours", "The Lumen lamp is sold in black, white and sage green."),
    ("Lumen cleaning", "Clean the Lumen lamp with a dry cloth; water can damage the touch ring."),
    ("Lumen price", "The Lumen lamp costs 89 euros in Brightfield's online shop."),
    ("Lumen app", "The Lumen lamp has no app; every setting is on the touch ring."),
]

_LAMP_QA = {
    "train": [
        ("How many brightness levels does the Lumen lamp have?", "5"),
        ("Which company makes the Lumen desk lamp?", "Brightfield"),
        ("How long does the Lumen battery last at medium brightness?", "12 hours"),
        ("Through which port does the Lumen lamp charge?", "USB-C"),
        ("How much does the Lumen lamp weigh?", "1.2 kilograms"),
        ("How long is the Lumen sleep timer?", "30 minutes"),
        ("What is the Lumen arm made of?", "aluminium"),
        ("How do you clean the Lumen lamp?", "with a dry cloth"),
    ],
    "val": [
        ("How many colour temperatures does the Lumen lamp offer?", "3"),
        ("How long is the warranty of the Lumen lamp?", "2 years"),
        ("How long does the Lumen battery take to charge?", "3 hours"),
        ("How much does the Lumen lamp cost?", "89 euros"),
        ("How do you start the Lumen sleep timer?", "double tap on the touch ring"),
    ],
    "test": [
        ("In which colours is the Lumen lamp sold?", "black, white and sage green"),
        ("Does the Lumen lamp have an app?", "no"),
        ("What does the Lumen warranty cover?", "the LED and the battery"),
        ("Where is the USB-C port of the Lumen lamp?", "at the back of the base"),
        ("What can damage the Lumen touch ring?", "water"),
    ],
}

_WIKI_CORPUS = [
    ("Atlas", "Atlas is the company's search engine project. It is owned by the Data team."),
    ("Beacon", "Beacon is the mobile app project. It is owned by the Mobile team."),
    ("Comet", "Comet is the billing system project. It is owned by the Payments team."),
    ("Delta", "Delta is the internal chat bot project. It is owned by the Platform team."),
    ("Data team", "The Data team is managed by Priya Raman and works from the Lisbon office."),
    ("Mobile team", "The Mobile team is managed by Tom Becker and works from the Berlin office."),
    ("Payments team", "The Payments team is managed by Aiko Tanaka and works from the Osaka office."),
    ("Platform team", "The Platform team is managed by Omar Haddad and works from the Toronto office."),
    ("Lisbon office", "The Lisbon office opened in 2019 and has 40 desks."),
    ("Berlin office", "The Berlin office opened in 2016 and has 75 desks."),
    ("Osaka office", "The Osaka office opened in 2021 and has 25 desks."),
    ("Toronto office", "The Toronto office opened in 2018 and has 60 desks."),
]

_WIKI_QA = {
    "train": [
        ("Who manages the team that owns Atlas?", "Priya Raman"),
        ("In which city does the team that owns Beacon work?", "Berlin"),
        ("Who manages the team that owns Comet?", "Aiko Tanaka"),
        ("Which team owns Delta?", "Platform team"),
        ("In which year did the office of the Mobile team open?", "2016"),
        ("How many desks does the office of the Data team have?", "40"),
    ],
    "val": [
        ("Who manages the team that owns Beacon?", "Tom Becker"),
        ("In which city does the team that owns Comet work?", "Osaka"),
        ("Who manages the team that owns Delta?", "Omar Haddad"),
        ("In which year did the office of the Payments team open?", "2021"),
    ],
    "test": [
        ("In which city does the team that owns Atlas work?", "Lisbon"),
        ("In which city does the team that owns Delta work?", "Toronto"),
        ("How many desks does the office of the Platform team have?", "60"),
        ("Which team owns Comet?", "Payments team"),
    ],
}


@dataclass(frozen=True)
class Template:
    name: str
    description: str
    config: str
    files: dict[str, list[dict]]  # relative path -> JSONL rows


def _split_files(make) -> dict[str, list[dict]]:
    return {f"data/{split}.jsonl": make(split) for split in ("train", "val", "test")}


def _corpus(rows: list[tuple[str, str]], prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "title": title, "text": text} for i, (title, text) in enumerate(rows, 1)]


TEMPLATES: dict[str, Template] = {
    "classification": Template(
        "classification", "sentiment of short reviews: one LLM call + a label parser", CLASSIFICATION,
        _split_files(lambda s: _rows(f"{s}-", [{"text": t, "label": l} for t, l in _SENTIMENT[s]]))),
    "qa": Template(
        "qa", "reading-comprehension QA: a passage and a question per row", QA,
        _split_files(lambda s: _rows(f"{s}-", [{"context": c, "question": q, "answer": a} for c, q, a in _READING[s]]))),
    "rag": Template(
        "rag", "retrieval-augmented QA: BM25 over a small corpus, then an answer", RAG,
        {**_split_files(lambda s: _rows(f"{s}-", [{"question": q, "answer": a} for q, a in _LAMP_QA[s]])),
         "data/corpus.jsonl": _corpus(_LAMP_CORPUS, "doc-")}),
    "agent": Template(
        "agent", "a ReAct agent loop: search/lookup/finish over a small wiki", AGENT,
        {**_split_files(lambda s: _rows(f"{s}-", [{"question": q, "answer": a} for q, a in _WIKI_QA[s]])),
         "data/corpus.jsonl": _corpus(_WIKI_CORPUS, "page-")}),
}


def template_files(name: str) -> dict[str, str]:
    """Relative path -> file text of one template."""
    if name not in TEMPLATES:
        raise UsageError(key="--template", expected="one of " + ", ".join(TEMPLATES), got=repr(name))
    t = TEMPLATES[name]
    files = {CONFIG_NAME: t.config}
    for path, rows in t.files.items():
        files[path] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return files


def scaffold(directory: Path, template: str, *, force: bool = False) -> list[Path]:
    """Write one template into `directory`; returns the files written. Refuses (UsageError, exit 2) to
    overwrite an existing file unless `force`."""
    directory = Path(directory)
    files = template_files(template)
    if directory.exists() and not directory.is_dir():
        raise UsageError(file=directory, key="DIR", expected="a folder (new or existing)", got="a file")
    existing = [directory / rel for rel in files if (directory / rel).exists()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise UsageError(f"{names} already exist{'s' if len(existing) == 1 else ''}; not overwriting",
                         hint="Use --force to replace these files, or choose another folder: autodiff init DIR.")
    for p in existing:
        if p.is_dir():
            raise UsageError(file=p, expected="a file path", got="a folder")
    written = []
    for rel, text in files.items():
        path = directory / rel
        atomic_write_bytes(path, text.encode("utf-8"))
        written.append(path)
    return written


def init_command(directory: Path, template: str, force: bool) -> None:
    written = scaffold(directory, template, force=force)
    config = directory / CONFIG_NAME
    print(f"created a {template} starter ({TEMPLATES[template].description}):")
    for path in written:
        print(f"  {path}")
    print("next:")
    print(f"  autodiff validate {config}")
    print(f"  autodiff eval {config}")
    print(f"  autodiff train {config}")
