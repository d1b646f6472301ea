"""Spec texts shared by several test modules (the fake model's script is up to each test)."""

# A multi-hop RAG loop: a query generator called once per iteration, BM25 over corpus.jsonl,
# merged into the loop state, then an answer node reading the loop's final state.
MULTIHOP = """
name: multihop
models:
  task: {model: fake/script.yaml}
data:
  val: val.jsonl
params:
  query_instruction: {value: "Write a search query for the question."}
  answer_instruction: {value: "Answer from the passages."}
nodes:
  hops:
    kind: loop
    max_iters: 3
    state: {context: []}
    body:
      query:
        kind: llm
        system: "{{ query_instruction }}"
        user: "{{ input.question }} | known: {{ state.context }}"
      retrieve:
        kind: function
        fn: bm25
        args: {query: query}
        with: {corpus: corpus.jsonl, k: 1}
      merge:
        kind: function
        fn: dedup_extend
        args: {items: state.context, new: retrieve}
    update: {context: merge}
    until: "iteration >= 1 and len(state.context) >= 1"
  answer:
    kind: llm
    system: "{{ answer_instruction }}"
    user: "Passages: {{ hops.context }}\\nQ: {{ input.question }}"
output: answer
metric: {fn: exact_match, args: {pred: answer, target: input.answer}}
"""

CORPUS = [
    {"title": "Paris", "text": "Paris is the capital of France."},
    {"title": "Lyon", "text": "Lyon is a city in France known for food."},
    {"title": "Berlin", "text": "Berlin is the capital of Germany."},
]

# Count then parse: a trainable instruction and a fixed output-format peer.
COUNT_PIPELINE = """
params:
  instruction: {value: "Count the things.", role: task instruction}
  answer_format: {value: "End with Answer: N", role: output format, trainable: false}
nodes:
  count: {kind: llm, system: "{{ instruction }} {{ answer_format }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""


# A toy training setup: the task model answers right only when its instruction says ALWAYS ADD
# (or when the answer is 1); the backward engine says so; the optimizer proposes %(new)s.
TOY_SCRIPT = r"""
rules:
  - match: "backward engine"
    in: system
    reply: '{"diagnosis": "It did not add.", "param: instruction": "The instruction never says to add the counts: it should tell the model to ALWAYS ADD them."}'
  - match: "read by a program"
    in: system
    reply: '{"reasoning": "Feedback says to add.", "method": "add_instruction", "new_value": "%(new)s"}'
  - match: 'ALWAYS ADD[\s\S]*n=(\d+)'
    in: all
    reply: "Sum is {1}. Answer: {1}"
  - match: 'n=1\b'
    reply: "Answer: 1"
default: "Answer: 0"
"""

TOY_SPEC = """
name: toy
models:
  task: {model: fake/script.yaml}
  backward: {model: fake/script.yaml}
  optimizer: {model: fake/script.yaml}
data:
  train: train.jsonl
  val: val.jsonl
  test: test.jsonl
""" + COUNT_PIPELINE.lstrip() + """train: {max_steps: 2, batch_size: 4, max_proposals: 2, max_error_samples: 2, max_correct_samples: 1, seed: 0}
"""


# One llm node and a parser with train and val splits (name `mini`): specs that tests vary by one key.
MINI_TRAIN = """\
name: mini
models:
  task: {model: fake/script.yaml, temperature: 0}
data:
  train: train.jsonl
  val: val.jsonl
params:
  instruction: {value: "Count the objects."}
nodes:
  count: {kind: llm, system: "{{ instruction }}", user: "{{ input.question }}"}
  parse: {kind: function, fn: last_integer, args: {text: count}}
output: parse
metric: {fn: exact_match, args: {pred: parse, target: input.answer}}
"""
